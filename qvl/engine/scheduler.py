"""Scheduler: which sequences run this step, and how many of their tokens. No torch.

Owns: the waiting queue (FIFO; preempted sequences go back to its front) and the running list
(oldest first), the per-step budgets `max_num_batched_tokens` and `max_num_seqs`, preemption.
Does not know: tensors, the model, sampling, stop conditions (the engine finishes sequences).

Each step (`schedule`) returns data: `SchedulerOutput.num_scheduled_tokens = {seq_id: n}` for the
sequences in batch order, their block tables already grown to hold the new tokens. There are no
separate prefill and decode phases: a sequence gets `min(uncomputed tokens, budget left)` tokens, so
long prompts are prefilled in chunks alongside other sequences' decode tokens.
  1. Running sequences, oldest first. When the pool has no block for one, the newest running
     sequence is preempted (blocks freed, to be recomputed from its tokens later) until it fits —
     possibly itself. So the oldest sequence always progresses.
  2. If nothing was preempted: waiting sequences in order, while a sequence slot, budget and blocks
     remain. A new sequence first takes its longest cached prefix (BlockManager.find_cached).
     Siblings of an n > 1 request wait until the first sibling's prompt is computed, then share its
     full prompt blocks through the prefix cache. A sequence for which `is_ready(seq)` is False (its
     grammar still compiling) stays in the queue and is passed over, like a waiting sibling.
Vision items and chunk boundaries: a chunk may end inside an item's pad tokens. The rule the runner
keeps is that an item's features are computed whole, in the step where any of its pad tokens is
first scheduled (or taken from the encoder cache), and held by the sequence until its last pad token
is prefilled. So the scheduler needs no knowledge of items — simpler than aligning chunks to items,
and an item bigger than the budget still runs.
Refusal instead of looping: `add` raises ValueError for a prompt over max_model_len or over the
whole block pool; a running sequence that alone needs more blocks than the pool is finished with
finish_reason "length" (stop_reason "kv_cache_full").
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from qvl.engine.block_manager import BlockManager
from qvl.engine.sequence import Sequence, SequenceStatus


@dataclass
class SchedulerOutput:
    seqs: list[Sequence] = field(default_factory=list)            # batch order
    num_scheduled_tokens: dict[int, int] = field(default_factory=dict)
    preempted: list[Sequence] = field(default_factory=list)
    finished: list[Sequence] = field(default_factory=list)        # finished by capacity this step

    @property
    def total_tokens(self) -> int:
        return sum(self.num_scheduled_tokens.values())

    @property
    def is_empty(self) -> bool:
        return not self.seqs


class Scheduler:
    def __init__(self, block_manager: BlockManager, *, max_num_seqs: int = 256,
                 max_num_batched_tokens: int = 8192, max_model_len: int = 32768,
                 is_ready: Callable[[Sequence], bool] | None = None):
        for name, v in (("max_num_seqs", max_num_seqs),
                        ("max_num_batched_tokens", max_num_batched_tokens),
                        ("max_model_len", max_model_len)):
            if v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.is_ready = is_ready
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.busy_time_s = 0.0          # seconds of steps that ran sequences (attribute_time)

    # --- queue ---------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        n = len(seq)
        if n > self.max_model_len:
            raise ValueError(f"request {seq.request_id!r}: prompt of {n} tokens is longer than "
                             f"max_model_len={self.max_model_len}")
        bm = self.block_manager
        if bm.blocks_needed(n) > bm.num_blocks:
            raise ValueError(f"request {seq.request_id!r}: prompt of {n} tokens needs "
                             f"{bm.blocks_needed(n)} KV blocks of {bm.block_size} tokens but the "
                             f"whole pool has {bm.num_blocks}; raise kv_cache_memory or shorten it")
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    # --- the step ------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        bm = self.block_manager
        budget = self.max_num_batched_tokens

        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncomputed_tokens, budget)
            if bm.blocks_needed(seq.num_computed_tokens + n) > bm.num_blocks:
                self._finish_capacity(seq, out)          # can never fit, even alone
                continue
            while not bm.allocate(seq, n):
                victim = self.running[-1]
                self._preempt(victim, out)
                if victim is seq:
                    break
            else:
                self._take(seq, n, out)
                budget -= n
                i += 1

        if not out.preempted:
            skipped: list[Sequence] = []
            while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
                seq = self.waiting[0]
                if seq.parent is not None and not _prompt_done(seq.parent):
                    skipped.append(self.waiting.popleft())     # its sibling's prefill comes first
                    continue
                if self.is_ready is not None and not self.is_ready(seq):
                    skipped.append(self.waiting.popleft())     # its grammar is still compiling
                    continue
                cached = bm.find_cached(seq, count=seq.num_preemptions == 0)
                num_cached = len(cached) * bm.block_size
                n = min(len(seq) - num_cached, budget)
                if not bm.allocate(seq, n, cached):
                    break
                self.waiting.popleft()
                seq.status = SequenceStatus.RUNNING
                self.running.append(seq)
                self._take(seq, n, out)
                budget -= n
            self.waiting.extendleft(reversed(skipped))
            if any(self.running[k].seq_id > self.running[k + 1].seq_id
                   for k in range(len(self.running) - 1)):
                self.running.sort(key=lambda s: s.seq_id)    # readmitted recomputes keep their age
                out.seqs.sort(key=lambda s: s.seq_id)
        return out

    def _take(self, seq: Sequence, n: int, out: SchedulerOutput) -> None:
        if seq.metrics.first_scheduled_time is None:
            seq.metrics.first_scheduled_time = time.time()
        out.seqs.append(seq)
        out.num_scheduled_tokens[seq.seq_id] = n

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.reset_for_recompute()
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
        out.preempted.append(seq)

    def _finish_capacity(self, seq: Sequence, out: SchedulerOutput) -> None:
        seq.stop_reason = "kv_cache_full"
        self.finish(seq, "length")
        out.finished.append(seq)

    # --- after the step ------------------------------------------------------------------------
    def postprocess(self, out: SchedulerOutput) -> None:
        """The scheduled tokens' K/V are now written: advance counts, publish full blocks."""
        for seq in out.seqs:
            seq.num_computed_tokens += out.num_scheduled_tokens[seq.seq_id]
            self.block_manager.commit(seq)

    def attribute_time(self, out: SchedulerOutput, seconds: float) -> None:
        """Split a step's seconds over its sequences by tokens scheduled (a prefill chunk costs more than a
        decode token): each request's share of engine-busy time, what its cost is reckoned from."""
        if not out.seqs:
            return
        self.busy_time_s += seconds
        total = out.total_tokens or 1
        for seq in out.seqs:
            seq.metrics.engine_time += seconds * out.num_scheduled_tokens[seq.seq_id] / total

    def finish(self, seq: Sequence, reason: str) -> None:
        """Finish a sequence (stop / length / abort) and free its blocks. Idempotent."""
        if seq.is_finished:
            return
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.metrics.finish_time = time.time()


def _prompt_done(seq: Sequence) -> bool:
    return seq.is_finished or seq.num_computed_tokens >= seq.num_prompt_tokens
