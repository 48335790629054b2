"""StructuredOutputs: compiled grammars (cached, compiled off the step path) and one matcher per sequence.

  compile(spec) -> Future[Grammar]   cached by the spec's canonical text (LRU, `cache_size` entries);
                                     new ones compile on one worker thread, never inside a step
  check(spec)                        compile and wait: ValueError naming the problem (the server's 400)
  add(seq) / release(seq)            a constrained sequence enters / leaves
  is_ready(seq)                      its grammar is compiled (the scheduler's predicate; a failed compile
                                     never is: the engine fails the request, see failed())
  bitmask(seqs, banned)              (B, ceil(V/32)) int32 for the sampling rows, or None when no row is
                                     constrained; unconstrained rows allow everything; `banned` ids
                                     (min_tokens' eos ban) are cleared in a constrained row unless that
                                     would leave the row empty (the grammar then only allows eos: it wins)
  bitmask_async(seqs, banned, overlap) the same as a Future: on the mask thread when `overlap` (CUDA: the
                                     CPU is free while the device computes), else filled at once (CPU:
                                     the forward already uses every core, and a second thread's torch
                                     work slowed a 2B batch-16 step by ~13% on 2 cores; inline, +2%)
  accept(seq) -> (ok, complete)      advance its matcher over the token just appended

Preemption / recompute: a matcher follows the sequence's *output tokens*, which a recompute keeps, so
its state survives; a matcher created late (or lost) is rebuilt by replaying them.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import torch

from qvl.sampling_params import StructuredOutputsParams
from qvl.structured.backend import GrammarBackend, Matcher


class StructuredOutputs:
    def __init__(self, backend_factory: Callable[[], GrammarBackend], vocab_size: int, *,
                 cache_size: int = 256):
        self._factory = backend_factory
        self._backend: GrammarBackend | None = None
        self._backend_lock = threading.Lock()
        self.vocab_size = vocab_size
        self.words = (vocab_size + 31) // 32
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple[str, str], Future] = OrderedDict()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="qvl-grammar")
        self._mask_pool = ThreadPoolExecutor(1, thread_name_prefix="qvl-mask")
        self._lock = threading.Lock()
        self._grammar: dict[int, Future] = {}              # seq_id -> its grammar
        self._matchers: dict[int, tuple[Matcher, int, bool]] = {}  # seq_id -> (matcher, tokens seen, ok)

    @property
    def backend(self) -> GrammarBackend:
        with self._backend_lock:                # built once, on first use (a large vocab takes ~1 s)
            if self._backend is None:
                self._backend = self._factory()
            return self._backend

    # --- grammars ------------------------------------------------------------------------------
    def compile(self, spec: StructuredOutputsParams) -> Future:
        key = spec.key()                         # ValueError for a schema that is not JSON
        with self._lock:
            fut = self._cache.get(key)
            if fut is not None:
                self._cache.move_to_end(key)
                return fut
            fut = self._pool.submit(lambda: self.backend.compile(spec))
            self._cache[key] = fut
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
            return fut

    def check(self, spec: StructuredOutputsParams) -> None:
        self.compile(spec).result()

    # --- sequences -----------------------------------------------------------------------------
    def add(self, seq) -> None:
        self._grammar[seq.seq_id] = self.compile(seq.params.structured_outputs)

    def release(self, seq) -> None:
        self._grammar.pop(seq.seq_id, None)
        self._matchers.pop(seq.seq_id, None)

    def is_ready(self, seq) -> bool:
        fut = self._grammar.get(seq.seq_id)
        return fut is None or (fut.done() and fut.exception() is None)

    def failed(self, seq) -> str | None:
        """The compile error of a sequence's grammar, once known."""
        fut = self._grammar.get(seq.seq_id)
        if fut is None or not fut.done() or fut.exception() is None:
            return None
        return str(fut.exception())

    def wait(self, timeout: float) -> None:
        """Block until some pending grammar is compiled (or timeout): the engine has nothing else to do."""
        pending = [f for f in self._grammar.values() if not f.done()]
        if pending:
            try:
                pending[0].result(timeout)
            except Exception:  # noqa: BLE001 - a failure is reported through failed()
                pass

    def _matcher(self, seq) -> tuple[Matcher, bool]:
        """The sequence's matcher, advanced over every output token it has not seen (all of them when
        new); the flag is False once a token was refused."""
        m, n, ok = self._matchers.get(seq.seq_id) or (self._grammar[seq.seq_id].result().matcher(), 0, True)
        out = seq.output_token_ids
        for t in out[n:]:
            ok = m.accept(t) and ok
        self._matchers[seq.seq_id] = (m, len(out), ok)
        return m, ok

    # --- per step ------------------------------------------------------------------------------
    def bitmask(self, seqs: list, banned: dict[int, list[int]] | None = None) -> torch.Tensor | None:
        rows = [(self._matcher(s)[0], b) for b, s in enumerate(seqs) if s.seq_id in self._grammar]
        if not rows:
            return None
        mask = torch.full((len(seqs), self.words), -1, dtype=torch.int32)     # (B, W)
        self.backend.fill_bitmasks(rows, mask)
        for _, b in rows:
            ids = (banned or {}).get(seqs[b].seq_id)
            if ids:
                kept = mask[b].clone()
                for t in ids:
                    bit = 1 << (t % 32)
                    kept[t // 32] &= ~(bit - (1 << 32) if bit >= 1 << 31 else bit)   # int32 words
                if bool((kept != 0).any()):
                    mask[b] = kept
        return mask

    def bitmask_async(self, seqs: list, banned: dict[int, list[int]] | None = None, *,
                      overlap: bool = True) -> Future:
        """bitmask() as a Future: on the mask thread when `overlap`, so it runs during the model's forward
        (llguidance drops the GIL), else computed now (see the module docstring)."""
        if overlap:
            return self._mask_pool.submit(self.bitmask, seqs, banned)
        fut: Future = Future()
        fut.set_result(self.bitmask(seqs, banned))
        return fut

    def accept(self, seq) -> tuple[bool, bool]:
        """After a token was appended to `seq`: (every output token allowed, grammar complete)."""
        if seq.seq_id not in self._grammar:
            return True, False
        m, ok = self._matcher(seq)
        return ok, m.is_terminated()

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._mask_pool.shutdown(wait=False, cancel_futures=True)
