"""Serving state and one HTTP request's engine requests: the context the routes share, and running
engine requests whose deltas responses.py turns into OpenAI bodies / SSE chunks.

Owns: `ServingContext` (the AsyncEngine and what the server reads from it, limits, media policy,
metrics, the preprocessing thread pool) and `RequestRun` (one HTTP request's engine requests, timings
and counters; it aborts whatever is unfinished when closed, so a client that goes away frees its KV
blocks). Prompt preparation is prepare.py's; routes and auth are routes.py's and app.py's.

Engine contract (qvl.engine.async_engine.AsyncEngine, typed): `await add_request(request_id,
ProcessedPrompt, SamplingParams)` -> async iterator of RequestOutput deltas (outputs[i]: index, text,
token_ids, finish_reason, logprobs as list[dict[token_id, logprob]]); `abort(request_id)`; `stats()`;
and the facts `processor`, `max_model_len`, `vocab_size`, `generation_defaults`.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable

from qvl.config import ServerLimits
from qvl.server import observe
from qvl.server.errors import APIError, media_error
from qvl.server.metrics import ServerMetrics

if TYPE_CHECKING:
    from qvl.engine.async_engine import AsyncEngine
    from qvl.engine.outputs import RequestOutput
    from qvl.multimodal.media import MediaPolicy
    from qvl.multimodal.prompt import PromptProcessor

logger = logging.getLogger("qvl.server")


@dataclass
class ServingContext:
    engine: "AsyncEngine"
    served_model_name: str
    media_policy: "MediaPolicy"
    limits: ServerLimits = field(default_factory=ServerLimits)
    metrics: ServerMetrics | None = None
    boxes_fn: Callable | None = None                  # grounding: (text, items) -> boxes, or None
    executor: ThreadPoolExecutor | None = None
    active: set = field(default_factory=set)          # RequestRuns with engine requests in flight
    shutting_down: bool = False
    observer: Any = None                              # observe.Observer: JSON log, cost, traces (or None)
    model_aliases: tuple[str, ...] = ()               # other names accepted for served_model_name
    aborting: asyncio.Event = field(default_factory=asyncio.Event)   # set at the shutdown deadline

    @property
    def processor(self) -> "PromptProcessor":
        return self.engine.processor

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def vocab_size(self) -> int:
        return self.engine.vocab_size

    @property
    def default_sampling(self) -> dict:
        """SamplingParams fields the checkpoint's generation_config.json sets (requests override them)."""
        return self.engine.generation_defaults

    async def run_blocking(self, fn, *args, **kwargs):
        """Run CPU-heavy work (media fetch, decode, resize, tokenize) in the pool; the event loop never
        blocks on it."""
        if self.executor is None:
            self.executor = ThreadPoolExecutor(self.limits.preprocess_workers, thread_name_prefix="qvl-pre")
        loop = asyncio.get_running_loop()
        with observe.phase(fn):
            return await loop.run_in_executor(self.executor, lambda: fn(*args, **kwargs))

    async def guarded(self, fn, *args, param: str | None = None, **kwargs):
        """run_blocking, mapping bad-media / bad-input / over-limit exceptions to a 4xx APIError (`param`:
        the request field holding the prompt, for limit errors)."""
        try:
            return await self.run_blocking(fn, *args, **kwargs)
        except APIError:
            raise
        except Exception as exc:  # noqa: BLE001 - classified below; unknown ones stay 500
            err = media_error(exc, param)
            if err is None:
                raise
            raise err from exc


async def drain(ctx: ServingContext, grace_s: float) -> None:
    """On SIGTERM: refuse new work, let in-flight requests finish for `grace_s`, then abort the rest
    (their streams end with finish_reason "abort" and [DONE], so connections close cleanly)."""
    ctx.shutting_down = True
    deadline = time.monotonic() + max(0.0, grace_s)
    while ctx.active and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    ctx.aborting.set()      # requests still being prepared or collected answer 503 (routes.until_disconnect)
    if ctx.active:
        logger.info("shutdown: aborting %d in-flight request(s)", len(ctx.active))
    for run in list(ctx.active):
        await run.abort_unfinished()


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


# ---------------------------------------------------------------------------------------------------
# running


async def _aclose(it: AsyncIterator) -> None:
    try:
        await it.aclose()
    except Exception:  # noqa: BLE001
        logger.exception("closing an engine iterator failed")


class RequestRun:
    """One HTTP request's engine requests (one per prompt), their merged deltas and bookkeeping."""

    def __init__(self, ctx: ServingContext, request_id: str, kind: str, *, images: int = 0, videos: int = 0,
                 engine_id: str | None = None):
        self.ctx = ctx
        self.request_id = request_id
        self.engine_id = engine_id or request_id      # unique in the engine even when request_id is a client's
        self.kind = kind
        self.arrival = time.monotonic()
        self.images, self.videos = images, videos
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.completion_tokens = 0
        self.first_token: float | None = None
        self.last_token: float | None = None
        self.itls: list[float] = []
        self.queue_time: float | None = None
        self.finish_reasons: dict[int, str] = {}
        self.stop_reasons: dict[int, int | str | None] = {}
        self.num_choices = 0
        self.status = 200
        self.error: str | None = None
        self._unfinished: set[str] = set()
        self._iters: list[tuple[str, int, Any]] = []
        self.obs = observe.begin()

    async def start(self, jobs: list[tuple[Any, Any]], n: int) -> None:
        """Add one engine request per (prompt, params). The engine refuses a bad request (ValueError)
        here, before any output, so the client still gets a proper 4xx status line."""
        if self.ctx.shutting_down:
            raise APIError("The server is shutting down", status=503, code="shutting_down")
        self.num_choices = len(jobs) * n
        self._iters = []
        self.ctx.active.add(self)
        for j, (prompt, params) in enumerate(jobs):
            rid = self.engine_id if len(jobs) == 1 else f"{self.engine_id}-{j}"
            try:
                if params.structured_outputs is not None:       # its grammar compiles off the loop first
                    await self._check_grammar(params)
                it = await self.ctx.engine.add_request(rid, prompt, params)
            except ValueError as exc:
                await self.abort_unfinished()
                raise APIError(str(exc), code="invalid_value") from exc
            except BaseException:
                await self.abort_unfinished()
                raise
            self._unfinished.add(rid)
            self.prompt_tokens += len(prompt.token_ids)
            self.obs.add_prompt(prompt)
            self._iters.append((rid, j * n, it))

    async def _check_grammar(self, params) -> None:
        """Compile the request's grammar (cached) in the pool, never on the event loop: a grammar that does
        not compile is a 400 naming the problem before the engine sees the request."""
        try:
            await self.ctx.run_blocking(self.ctx.engine.check_structured_outputs, params)
        except ValueError as exc:
            raise APIError(f"Invalid structured output request: {exc}", code="invalid_structured_output") from exc

    async def stream(self) -> AsyncIterator[tuple[int, Any]]:
        """Yield (choice index, CompletionOutput delta) from the started requests, merged as they come."""
        if len(self._iters) == 1:    # the common case: no tasks, no queue
            rid, base, it = self._iters[0]
            try:
                async for out in it:
                    self._account(rid, base, out)
                    for o in out.outputs:
                        yield base + o.index, o
            finally:
                await _aclose(it)
                await self.abort_unfinished()
            return
        queue: asyncio.Queue = asyncio.Queue()
        tasks = [asyncio.create_task(self._pump(rid, base, it, queue)) for rid, base, it in self._iters]
        try:
            done = 0
            while done < len(tasks):
                item = await queue.get()
                if item is None:
                    done += 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield item
        finally:
            for t in tasks:
                t.cancel()
            await self.abort_unfinished()

    async def _pump(self, rid: str, base: int, it, queue: asyncio.Queue) -> None:
        try:
            async for out in it:
                self._account(rid, base, out)
                for o in out.outputs:
                    await queue.put((base + o.index, o))
            await queue.put(None)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - forwarded to the consumer
            await queue.put(exc)
        finally:
            await _aclose(it)

    def _account(self, rid: str, base: int, out: "RequestOutput") -> None:
        if out.finished:
            self._unfinished.discard(rid)
        self.obs.observe_output(rid, out)
        now = time.monotonic()
        new = sum(len(o.token_ids) for o in out.outputs)
        self.cached_tokens = max(self.cached_tokens, int(out.num_cached_tokens))
        if self.queue_time is None:
            self.queue_time = out.metrics.time_in_queue
        if new:
            if self.first_token is None:
                self.first_token = now
            elif self.last_token is not None:
                gap = (now - self.last_token) / new
                self.itls.extend([gap] * new)
            self.last_token = now
            self.completion_tokens += new
        for o in out.outputs:
            if o.finish_reason is not None:      # keyed by choice: prompt j's outputs start at base j * n
                self.finish_reasons[base + o.index] = o.finish_reason
                self.stop_reasons[base + o.index] = o.stop_reason

    async def abort_unfinished(self) -> None:
        for rid in list(self._unfinished):
            self._unfinished.discard(rid)
            try:
                self.ctx.engine.abort(rid)
            except Exception:  # noqa: BLE001 - aborting must never raise into the response path
                logger.exception("abort of %s failed", rid)

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}

    def fail(self, exc: BaseException) -> None:
        if isinstance(exc, APIError):
            self.finish(exc.status, exc.message)
        elif isinstance(exc, asyncio.CancelledError):
            self.finish(499, "cancelled")
        else:
            self.finish(500, f"{type(exc).__name__}: {exc}")

    def finish(self, status: int = 200, error: str | None = None) -> None:
        """Record metrics and write the one log line for this request."""
        self.status, self.error = status, error
        self.ctx.active.discard(self)
        end = time.monotonic()
        ttft = None if self.first_token is None else self.first_token - self.arrival
        metrics = self.ctx.metrics
        if metrics is not None:
            if status == 200:
                reasons = [self.finish_reasons.get(i, "abort") for i in range(self.num_choices)]
                metrics.observe_finished(finish_reasons=reasons, prompt_tokens=self.prompt_tokens,
                                         completion_tokens=self.completion_tokens, ttft=ttft,
                                         e2e=end - self.arrival, itls=self.itls, queue_time=self.queue_time)
            else:
                metrics.observe_failure(status)
        if self.ctx.observer is not None and self.ctx.observer.finished(self, end):
            return                                    # it wrote the log line (--log-format json)
        fr = ",".join(self.finish_reasons.get(i, "abort") for i in range(self.num_choices)) or "-"
        line = (f"{self.request_id} {self.kind} status={status} prompt_tokens={self.prompt_tokens} "
                f"cached={self.cached_tokens} completion_tokens={self.completion_tokens} "
                f"images={self.images} videos={self.videos} "
                f"ttft={'-' if ttft is None else f'{ttft * 1000:.1f}ms'} total={(end - self.arrival) * 1000:.1f}ms "
                f"finish={fr}")
        if error:
            line += f" error={error!r}"
        logger.info(line)


def sse(obj: Any) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n"
