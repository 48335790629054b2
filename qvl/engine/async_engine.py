"""AsyncEngine: an LLMEngine stepped by a background thread, fed from asyncio code (the server).

API (all that the server needs):
  AsyncEngine(model_path, **LLMEngine options)  or  AsyncEngine(engine=an LLMEngine)
  await add_request(request_id, prompt, params) -> async iterator of RequestOutput *deltas*
      prompt: a ProcessedPrompt (qvl.multimodal.prompt; built before, off this engine's thread).
      Errors in the request itself (too long, bad ids, duplicate id) raise ValueError from this await,
      before any output.
      Each yielded RequestOutput carries only what is new: per completion the new text and token ids,
      and finish_reason on the last one; the iterator ends after `finished`. Leaving the iterator
      early (client disconnect, cancellation) aborts the request.
  abort(request_id)   thread-safe, non-blocking, idempotent; the blocks are freed on the loop thread.
  stats() -> dict     LLMEngine.stats() (num_running, num_waiting, kv_blocks_*, cache counters, ...)
  start() / shutdown()  the loop thread starts lazily on the first request; shutdown aborts
      everything still running and fails its iterators with RuntimeError.
  Read-only facts (the server's whole view of the engine; typed, nothing probed):
      processor            PromptProcessor | None (None: token-id prompts only)
      max_model_len        int, the context length requests are checked against
      model_config         the family's model Config;  vocab_size  int (the model's, not the tokenizer's)
      model_path           str | None, the checkpoint directory
      generation_config    dict, the checkpoint's generation_config.json ({} when it has none)
      generation_defaults  dict, the SamplingParams fields that file sets (requests override them)
      failure              str | None, why the engine cannot step any more (a tensor-parallel rank died)
      default_max_visual_tokens  int | None, visual tokens per request the device encodes in seconds
                           (CPU; None on CUDA): the server's limit when none is configured
      default_sampling_params(**overrides) -> SamplingParams, those defaults + overrides
      check_structured_outputs(params)  compiles the request's grammar (cached), from any thread

Threading: only the loop thread touches the LLMEngine. Other threads hand it closures through a
queue; outputs go back with loop.call_soon_threadsafe onto each request's asyncio.Queue. The requests a
step blames (LLMEngine.last_step_errors: they fail on their own) get their exception, their batch-mates
their outputs; when the whole step raises, every request it ran gets the exception (blocks already
freed) and the loop goes on.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
from typing import AsyncIterator, Callable

from qvl.engine.llm_engine import LLMEngine
from qvl.engine.outputs import RequestOutput
from qvl.multimodal.prompt import ProcessedPrompt, PromptProcessor
from qvl.sampling_params import SamplingParams, generation_defaults

log = logging.getLogger(__name__)
_IDLE_WAIT_S = 0.5


class AsyncEngine:
    def __init__(self, model: str | None = None, *, engine: LLMEngine | None = None, **engine_kwargs):
        if engine is None:
            if model is None:
                raise ValueError("AsyncEngine needs a model path or an LLMEngine (engine=...)")
            engine = LLMEngine.from_pretrained(model, **engine_kwargs)
        self.engine = engine
        self._cmds: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._lock = threading.Lock()

    @classmethod
    def from_args(cls, model: str, **engine_kwargs) -> "AsyncEngine":
        return cls(model, **engine_kwargs)

    # --- facts for the server ------------------------------------------------------------------
    @property
    def processor(self) -> PromptProcessor | None:
        return self.engine.processor

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def model_config(self):
        return self.engine.config

    @property
    def vocab_size(self) -> int:
        return self.engine.config.vocab_size

    @property
    def model_path(self) -> str | None:
        return self.engine.model_path

    @property
    def generation_config(self) -> dict:
        return dict(self.engine.generation_config)

    @property
    def generation_defaults(self) -> dict:
        return generation_defaults(self.engine.generation_config)

    @property
    def default_max_visual_tokens(self) -> int | None:
        return self.engine.default_max_visual_tokens

    @property
    def failure(self) -> str | None:
        """Why the engine cannot step any more (a tensor-parallel rank died), or None."""
        return self.engine.failure

    def stats(self) -> dict:
        return self.engine.stats()

    def default_sampling_params(self, **overrides) -> SamplingParams:
        return self.engine.default_sampling_params(**overrides)

    def check_structured_outputs(self, params: SamplingParams) -> None:
        """Compile the request's grammar and wait (any thread; ValueError naming the problem)."""
        self.engine.check_structured_outputs(params)

    # --- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        with self._lock:
            if self._stopping:
                raise RuntimeError("the engine has been shut down")
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="qvl-engine", daemon=True)
                self._thread.start()

    def shutdown(self) -> None:
        with self._lock:
            self._stopping = True
            thread = self._thread
        self._wake.set()
        if thread is not None:
            thread.join(timeout=30)
        self._fail_all(RuntimeError("the engine was shut down"))
        for rid in list(self.engine.requests):
            self.engine.abort_request(rid)
        self.engine.close()                     # tensor-parallel workers stop (a step still running: killed)

    # --- requests ------------------------------------------------------------------------------
    async def add_request(self, request_id: str, prompt: ProcessedPrompt,
                          params: SamplingParams | None = None) -> AsyncIterator[RequestOutput]:
        self.start()
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        added: asyncio.Future = loop.create_future()

        def add():
            try:
                self.engine.add_request(request_id, prompt, params, output_kind="delta")
            except Exception as e:  # noqa: BLE001 - handed to the caller
                loop.call_soon_threadsafe(_settle, added, e)
                return
            self._queues[request_id] = (loop, q)
            loop.call_soon_threadsafe(_settle, added, None)

        self._submit(add)
        await added
        return self._iterate(request_id, q)

    async def _iterate(self, request_id: str, q: asyncio.Queue) -> AsyncIterator[RequestOutput]:
        done = False
        try:
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    done = True
                    raise item
                done = item.finished
                yield item
                if done:
                    return
        finally:
            if not done:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self.engine.request_cancel(request_id)     # a vision encode in flight stops within one block

        def do():
            outs = self.engine.abort_request(request_id)
            for o in outs:
                self._push(o)
        self._submit(do)

    # --- the loop thread -----------------------------------------------------------------------
    def _submit(self, fn: Callable[[], None]) -> None:
        self._cmds.put(fn)
        self._wake.set()

    def _loop(self) -> None:
        eng = self.engine
        while not self._stopping:
            self._wake.clear()
            while True:
                try:
                    self._cmds.get_nowait()()
                except queue.Empty:
                    break
                except Exception:  # noqa: BLE001 - a command must never kill the loop
                    log.exception("engine command failed")
            if not eng.has_unfinished_requests():
                self._wake.wait(_IDLE_WAIT_S)
                continue
            try:
                outs = eng.step()
            except Exception as e:  # noqa: BLE001
                log.exception("engine step failed; failing its requests")
                for rid in eng.last_failed_request_ids:
                    self._push_error(rid, e)
                continue
            errors = eng.last_step_errors       # requests this step blamed; their batch-mates went on
            for o in outs:
                if o.request_id in errors:
                    self._push_error(o.request_id, errors[o.request_id])
                else:
                    self._push(o)

    def _push(self, out: RequestOutput) -> None:
        entry = self._queues.get(out.request_id)
        if entry is None:
            return
        if out.finished:
            del self._queues[out.request_id]
        loop, q = entry
        _call(loop, q.put_nowait, out)

    def _push_error(self, request_id: str, err: BaseException) -> None:
        entry = self._queues.pop(request_id, None)
        if entry is not None:
            _call(entry[0], entry[1].put_nowait, err)

    def _fail_all(self, err: BaseException) -> None:
        for rid in list(self._queues):
            self._push_error(rid, err)


def _settle(fut: asyncio.Future, err: BaseException | None) -> None:
    if fut.done():
        return
    if err is None:
        fut.set_result(None)
    else:
        fut.set_exception(err)


def _call(loop: asyncio.AbstractEventLoop, fn, arg) -> None:
    try:
        loop.call_soon_threadsafe(fn, arg)
    except RuntimeError:  # the caller's event loop is closed: nobody is listening
        pass
