"""From a validated request to engine requests: prompt preparation (limits, context check from header
dimensions before any pixel is decoded, preprocessing off the event loop), sampling parameters, and
running one or more engine requests whose deltas responses.py turns into OpenAI bodies / SSE chunks.

Owns: `ServingContext` (engine, processor, limits, metrics, thread pool) and `RequestRun` (one HTTP
request's engine requests, timings and counters; it aborts whatever is unfinished when closed, so a
client that goes away frees its KV blocks). Knows nothing about routes or auth (app.py).

Engine contract used (qvl.engine.async_engine.AsyncEngine): `add_request(request_id, prompt, params)`
-> async iterator of RequestOutput deltas (outputs[i]: index, text, token_ids, finish_reason,
logprobs as list[dict[token_id, logprob]]); `abort(request_id)`; `stats()`.
"""
from __future__ import annotations

import asyncio
import inspect
import json
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

from qvl.config import ServerLimits
from qvl.server.errors import APIError, media_error

logger = logging.getLogger("qvl.server")


@dataclass
class ServingContext:
    engine: Any
    processor: Any
    served_model_name: str
    max_model_len: int
    media_policy: Any = None
    limits: ServerLimits = field(default_factory=ServerLimits)
    metrics: Any = None
    default_sampling: dict = field(default_factory=dict)   # from generation_config.json
    sampling_cls: Any = None
    vocab_size: int | None = None
    boxes_fn: Callable | None = None
    executor: ThreadPoolExecutor | None = None
    active: set = field(default_factory=set)          # RequestRuns with engine requests in flight
    shutting_down: bool = False

    async def run_blocking(self, fn, *args, **kwargs):
        """Run CPU-heavy work (media decode, resize, tokenize) in the pool; the event loop never blocks."""
        if self.executor is None:
            self.executor = ThreadPoolExecutor(self.limits.preprocess_workers, thread_name_prefix="qvl-pre")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, lambda: fn(*args, **kwargs))

    async def guarded(self, fn, *args, **kwargs):
        """run_blocking, mapping bad-media / bad-input exceptions to a 4xx APIError."""
        try:
            return await self.run_blocking(fn, *args, **kwargs)
        except APIError:
            raise
        except Exception as exc:  # noqa: BLE001 - classified below; unknown ones stay 500
            err = media_error(exc)
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
    if ctx.active:
        logger.info("shutdown: aborting %d in-flight request(s)", len(ctx.active))
    for run in list(ctx.active):
        await run.abort_unfinished()


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


# ---------------------------------------------------------------------------------------------------
# prompt preparation


def check_media_counts(ctx: ServingContext, messages) -> tuple[int, int]:
    images = videos = 0
    for m in messages:
        i, v = m.count_media()
        images += i
        videos += v
    lim = ctx.limits
    if images > lim.max_images_per_request:
        raise APIError(f"Too many images in one request: {images} > max_images_per_request "
                       f"{lim.max_images_per_request}", param="messages", code="too_many_images")
    if videos > lim.max_videos_per_request:
        raise APIError(f"Too many videos in one request: {videos} > max_videos_per_request "
                       f"{lim.max_videos_per_request}", param="messages", code="too_many_videos")
    return images, videos


def _describe_items(items: list[dict]) -> str:
    """'image 1: 1230 tokens (3000x4000 -> 840x1148); video 1: ...' (sizes as height x width)."""
    parts, seen = [], {"image": 0, "video": 0}
    for it in items:
        kind = it.get("type", "item")
        seen[kind] = seen.get(kind, 0) + 1
        desc = f"{kind} {seen[kind]}: {it['tokens']} tokens"
        if it.get("original_size") and it.get("resized_size"):
            (oh, ow), (rh, rw) = it["original_size"], it["resized_size"]
            desc += f" ({oh}x{ow} -> {rh}x{rw}"
            grid = it.get("grid_thw")
            if kind == "video" and grid:
                desc += f", {grid[0]} temporal patches"
            desc += ")"
        parts.append(desc)
    return "; ".join(parts)


def check_budget(ctx: ServingContext, counts: dict, max_new_tokens: int | None) -> None:
    """Refuse (400) before decoding pixels: prompt vs context, visual-token limit, prompt + max_tokens.

    `counts` is PromptProcessor.count_tokens' result: {"prompt_tokens", "items": [{type, original_size,
    resized_size, grid_thw, tokens}]}.
    """
    items = counts.get("items", [])
    total = int(counts["prompt_tokens"])
    visual = sum(int(it["tokens"]) for it in items)
    L = ctx.max_model_len
    if total >= L:
        detail = f"text: {total - visual} tokens"
        if items:
            detail += "; " + _describe_items(items)
        raise APIError(f"This model's maximum context length is {L} tokens, but the prompt has {total} "
                       f"tokens ({detail}). Lower max_pixels / fps / nframes or shorten the prompt.",
                       param="messages", code="context_length_exceeded")
    lim = ctx.limits.max_visual_tokens_per_request
    if lim is not None and visual > lim:
        raise APIError(f"Too many visual tokens: {visual} > max_visual_tokens_per_request {lim} "
                       f"({_describe_items(items)}). Lower max_pixels / fps / nframes, or send fewer "
                       f"images.", param="messages", code="too_many_visual_tokens")
    if max_new_tokens is not None and total + max_new_tokens > L:
        raise APIError(f"This model's maximum context length is {L} tokens. However, you requested "
                       f"{total + max_new_tokens} tokens ({total} in the prompt, {max_new_tokens} for the "
                       f"completion). Reduce max_tokens or the prompt.", param="max_tokens",
                       code="context_length_exceeded")


def check_processed(ctx: ServingContext, prompt, max_new_tokens: int | None, param: str = "messages") -> None:
    n = len(prompt.token_ids)
    if n == 0:
        raise APIError("The prompt is empty", param=param)
    if n >= ctx.max_model_len or (max_new_tokens is not None and n + max_new_tokens > ctx.max_model_len):
        raise APIError(f"This model's maximum context length is {ctx.max_model_len} tokens, but the request "
                       f"needs {n} prompt tokens + {max_new_tokens or 1} completion tokens.",
                       param=param, code="context_length_exceeded")
    if ctx.vocab_size is not None:
        bad = [t for t in prompt.token_ids if not 0 <= t < ctx.vocab_size]
        if bad:
            raise APIError(f"Token id {bad[0]} is out of range [0, {ctx.vocab_size})", param=param)


async def prepare_chat(ctx: ServingContext, req) -> tuple[Any, dict]:
    """Validated chat request -> (ProcessedPrompt, token counts). Raises APIError for bad input."""
    check_media_counts(ctx, req.messages)
    messages = [m.to_processor() for m in req.messages]
    counts = await ctx.guarded(ctx.processor.count_tokens, messages, policy=ctx.media_policy,
                               max_model_len=ctx.max_model_len)
    check_budget(ctx, counts, req.max_new_tokens)
    prompt = await ctx.guarded(ctx.processor.process_messages, messages, policy=ctx.media_policy,
                               max_model_len=ctx.max_model_len)
    check_processed(ctx, prompt, req.max_new_tokens)
    return prompt, counts


async def prepare_text(ctx: ServingContext, prompt: str | list[int], max_new_tokens: int | None):
    if isinstance(prompt, str):
        processed = await ctx.guarded(ctx.processor.process_prompt, prompt, None, policy=ctx.media_policy,
                                      max_model_len=ctx.max_model_len)
    else:
        pads = {getattr(ctx.processor, "image_token_id", None), getattr(ctx.processor, "video_token_id", None)}
        bad = sorted({t for t in prompt if t in pads})
        if bad:
            raise APIError(f"Prompt token ids contain image/video placeholder id(s) {bad} but /v1/completions "
                           f"takes no media", param="prompt")
        processed = _text_prompt(prompt)
    check_processed(ctx, processed, max_new_tokens, param="prompt")
    return processed


def _text_prompt(token_ids: list[int]):
    """A ProcessedPrompt for plain token ids (text only: positions are 0..N-1 on all three streams)."""
    import torch
    from qvl.multimodal.prompt import ProcessedPrompt

    n = len(token_ids)
    return ProcessedPrompt(token_ids=list(token_ids), positions=torch.arange(n).expand(3, n).clone(),  # (3, N)
                           rope_delta=0)


def sampling_params(ctx: ServingContext, req, prompt_len: int):
    """SamplingParams = checkpoint defaults < request fields; max_tokens defaults to the room left."""
    kwargs = {**ctx.default_sampling, **req.sampling_kwargs()}
    max_new = req.max_new_tokens
    if max_new is None:   # the room left, capped by the checkpoint's max_new_tokens when it sets one
        room = max(1, ctx.max_model_len - prompt_len)
        max_new = min(room, ctx.default_sampling.get("max_tokens") or room)
    kwargs["max_tokens"] = max_new
    if req.num_logprobs is not None:
        kwargs["logprobs"] = req.num_logprobs
    try:
        return ctx.sampling_cls(**kwargs)
    except (ValueError, TypeError) as exc:
        raise APIError(str(exc), code="invalid_value") from exc


# ---------------------------------------------------------------------------------------------------
# running


async def _maybe_await(x):
    return await x if inspect.isawaitable(x) else x


async def _aclose(it) -> None:
    close = getattr(it, "aclose", None)
    if close is not None:
        try:
            await close()
        except Exception:  # noqa: BLE001
            logger.exception("closing an engine iterator failed")


class RequestRun:
    """One HTTP request's engine requests (one per prompt), their merged deltas and bookkeeping."""

    def __init__(self, ctx: ServingContext, request_id: str, kind: str, *, images: int = 0, videos: int = 0):
        self.ctx = ctx
        self.request_id = request_id
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

    async def start(self, jobs: list[tuple[Any, Any]], n: int) -> None:
        """Add one engine request per (prompt, params). The engine refuses a bad request (ValueError)
        here, before any output, so the client still gets a proper 4xx status line."""
        if self.ctx.shutting_down:
            raise APIError("The server is shutting down", status=503, code="shutting_down")
        self.num_choices = len(jobs) * n
        self._iters = []
        self.ctx.active.add(self)
        for j, (prompt, params) in enumerate(jobs):
            rid = self.request_id if len(jobs) == 1 else f"{self.request_id}-{j}"
            try:
                it = await _maybe_await(self.ctx.engine.add_request(rid, prompt, params))
            except ValueError as exc:
                await self.abort_unfinished()
                raise APIError(str(exc), code="invalid_value") from exc
            except BaseException:
                await self.abort_unfinished()
                raise
            self._unfinished.add(rid)
            self.prompt_tokens += len(prompt.token_ids)
            self._iters.append((rid, j * n, it))

    async def stream(self) -> AsyncIterator[tuple[int, Any]]:
        """Yield (choice index, CompletionOutput delta) from the started requests, merged as they come."""
        if len(self._iters) == 1:    # the common case: no tasks, no queue
            rid, base, it = self._iters[0]
            try:
                async for out in it:
                    self._account(rid, out)
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
                self._account(rid, out)
                for o in out.outputs:
                    await queue.put((base + o.index, o))
            await queue.put(None)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - forwarded to the consumer
            await queue.put(exc)
        finally:
            await _aclose(it)

    def _account(self, rid: str, out) -> None:
        if getattr(out, "finished", False):
            self._unfinished.discard(rid)
        now = time.monotonic()
        new = sum(len(o.token_ids) for o in out.outputs)
        cached = getattr(out, "num_cached_tokens", None)
        if cached is not None:
            self.cached_tokens = max(self.cached_tokens, int(cached))
        m = getattr(out, "metrics", None)
        if m is not None and self.queue_time is None:
            q = getattr(m, "time_in_queue", None)
            if q is None and getattr(m, "first_scheduled_time", None) and getattr(m, "arrival_time", None):
                q = m.first_scheduled_time - m.arrival_time
            self.queue_time = q
        if new:
            if self.first_token is None:
                self.first_token = now
            elif self.last_token is not None:
                gap = (now - self.last_token) / new
                self.itls.extend([gap] * new)
            self.last_token = now
            self.completion_tokens += new
        for o in out.outputs:
            if o.finish_reason is not None:
                self.finish_reasons[o.index] = o.finish_reason
                self.stop_reasons[o.index] = getattr(o, "stop_reason", None)

    async def abort_unfinished(self) -> None:
        for rid in list(self._unfinished):
            self._unfinished.discard(rid)
            try:
                await _maybe_await(self.ctx.engine.abort(rid))
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
