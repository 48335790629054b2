"""Engine deltas -> OpenAI bodies: whole responses (non-streaming) and SSE chunk streams.

Streams follow OpenAI: chat sends, per choice, a role chunk first, then content deltas, then a chunk with
an empty delta and the finish_reason (with tools, replies are parsed for Hermes tool calls: each call is
one `tool_calls` delta, finish_reason "tool_calls"); with `stream_options.include_usage` every chunk carries
`"usage": null` and a last chunk with `choices: []` carries the usage; then `data: [DONE]`. With chat
`echo`, the text the reply continues (prepare.chat_echo) comes first, whole and streamed. An engine
failure after the first byte becomes an error chunk (the status line is already sent), then [DONE].
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, AsyncIterator

from qvl.server.errors import APIError, error_body
from qvl.server.protocol import ChatCompletionResponse, CompletionResponse
from qvl.server.serving import RequestRun, ServingContext, sse
from qvl.server.tools import ToolCallStream, parse_tool_calls

logger = logging.getLogger("qvl.server")


# ---------------------------------------------------------------------------------------------------
# logprobs


def _token_str(ctx: ServingContext, tid: int) -> str:
    return ctx.processor.decode([tid], skip_special_tokens=False)


def chat_logprobs(ctx: ServingContext, token_ids: list[int], logprobs: list | None, top_n: int) -> list[dict]:
    out = []
    for k, tid in enumerate(token_ids):
        d = _as_dict(logprobs[k]) if logprobs and k < len(logprobs) else {}
        tok = _token_str(ctx, tid)
        top = sorted(d.items(), key=lambda kv: -kv[1])[:top_n]
        out.append({"token": tok, "logprob": max(float(d.get(tid, float("-inf"))), -9999.0),
                    "bytes": list(tok.encode("utf-8")),
                    "top_logprobs": [{"token": (s := _token_str(ctx, t)), "logprob": max(float(v), -9999.0),
                                      "bytes": list(s.encode("utf-8"))} for t, v in top]})
    return out


def completion_logprobs(ctx: ServingContext, token_ids: list[int], logprobs: list | None, top_n: int,
                        offset: int) -> dict:
    res = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for k, tid in enumerate(token_ids):
        d = _as_dict(logprobs[k]) if logprobs and k < len(logprobs) else {}
        tok = _token_str(ctx, tid)
        res["tokens"].append(tok)
        res["token_logprobs"].append(max(float(d.get(tid, float("-inf"))), -9999.0))
        top = sorted(d.items(), key=lambda kv: -kv[1])[:top_n]
        res["top_logprobs"].append({_token_str(ctx, t): max(float(v), -9999.0) for t, v in top})
        res["text_offset"].append(offset)
        offset += len(tok)
    return res


def _as_dict(entry: Any) -> dict[int, float]:
    if entry is None:
        return {}
    if isinstance(entry, dict):
        return {int(k): float(getattr(v, "logprob", v)) for k, v in entry.items()}
    return {}


# ---------------------------------------------------------------------------------------------------
# chat


async def _collect(run: RequestRun, texts: list[str]) -> tuple[list[str], list[list[int]], list[list]]:
    """Run a request to the end: per choice the text (appended to `texts`), token ids and logprobs."""
    tokens: list[list[int]] = [[] for _ in texts]
    lps: list[list] = [[] for _ in texts]
    async for idx, o in run.stream():
        texts[idx] += o.text
        tokens[idx].extend(o.token_ids)
        if o.logprobs:
            lps[idx].extend(o.logprobs)
    return texts, tokens, lps


async def chat_full(ctx: ServingContext, run: RequestRun, req, grounding_sizes=None, echo: str = "") -> dict:
    texts, tokens, lps = await _collect(run, [echo] * run.num_choices)
    choices = []
    for i, text in enumerate(texts):
        c = {"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None,
             "finish_reason": run.finish_reasons.get(i, "abort"), "stop_reason": run.stop_reasons.get(i)}
        if getattr(req, "tools_active", False):
            content, calls = parse_tool_calls(text)
            if calls:
                c["message"] = {"role": "assistant", "content": content, "tool_calls": calls}
                if c["finish_reason"] == "stop":
                    c["finish_reason"] = "tool_calls"
        if req.logprobs:
            c["logprobs"] = {"content": chat_logprobs(ctx, tokens[i], lps[i], req.top_logprobs or 0)}
        choices.append(c)
    body = ChatCompletionResponse(id=run.request_id, model=ctx.served_model_name, choices=choices,
                                  usage=run.usage())
    if ctx.boxes_fn is not None and grounding_sizes is not None:
        boxes = [_boxes(ctx, t, grounding_sizes) for t in texts]
        if any(boxes):
            body.qvl_boxes = boxes
    return body.model_dump(exclude={"qvl_boxes"} if body.qvl_boxes is None else None)


def _boxes(ctx: ServingContext, text: str, sizes) -> list:
    try:
        return ctx.boxes_fn(text, sizes)
    except Exception:  # noqa: BLE001 - grounding is a convenience, never a failure
        logger.exception("grounding parse failed")
        return []


def chat_stream(ctx: ServingContext, run: RequestRun, req, grounding_sizes=None,
                echo: str = "") -> AsyncIterator[str]:
    created = int(time.time())
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    continuous = bool(req.stream_options and req.stream_options.continuous_usage_stats)
    base = {"id": run.request_id, "object": "chat.completion.chunk", "created": created,
            "model": ctx.served_model_name}

    def chunk(choices, usage=None):
        c = {**base, "choices": choices}
        if include_usage:
            c["usage"] = usage if usage is not None else (run.usage() if continuous else None)
        return sse(c)

    async def events() -> AsyncIterator[str]:
        for i in range(req.n):
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None}])
            if echo:
                yield chunk([{"index": i, "delta": {"content": echo}, "logprobs": None, "finish_reason": None}])
        texts: dict[int, str] = {i: echo for i in range(req.n)} if echo else {}
        grounding = ctx.boxes_fn is not None and grounding_sizes is not None
        tools = {i: ToolCallStream() for i in range(req.n)} if getattr(req, "tools_active", False) else None
        async for idx, o in run.stream():
            if grounding:
                texts[idx] = texts.get(idx, "") + o.text
            if tools is not None:
                for c in _tool_deltas(tools[idx], idx, o.text, o.finish_reason is not None):
                    yield chunk([c])
            elif o.text or o.token_ids:
                c = {"index": idx, "delta": {"content": o.text}, "logprobs": None, "finish_reason": None}
                if req.logprobs:
                    c["logprobs"] = {"content": chat_logprobs(ctx, list(o.token_ids), o.logprobs,
                                                              req.top_logprobs or 0)}
                yield chunk([c])
            if o.finish_reason is not None:
                reason = o.finish_reason
                if tools is not None and tools[idx].num_calls and reason == "stop":
                    reason = "tool_calls"
                c = {"index": idx, "delta": {}, "logprobs": None, "finish_reason": reason}
                if grounding and (boxes := _boxes(ctx, texts.get(idx, ""), grounding_sizes)):
                    c["qvl_boxes"] = boxes
                yield chunk([c])
        if include_usage:
            yield chunk([], usage=run.usage())

    return guarded(run, events())


def _tool_deltas(parser: ToolCallStream, idx: int, text: str, last: bool) -> list[dict]:
    """Chunk choices for one delta of a reply parsed for tool calls: content as it comes, each call whole."""
    events = parser.feed(text) + (parser.finish() if last else [])
    k = parser.num_calls - sum(kind == "tool_call" for kind, _ in events)     # index of the next call
    out = []
    for kind, value in events:
        if kind == "content":
            delta = {"content": value}
        else:
            delta = {"tool_calls": [{"index": k, **value}]}
            k += 1
        out.append({"index": idx, "delta": delta, "logprobs": None, "finish_reason": None})
    return out


async def guarded(run: RequestRun, events: AsyncIterator[str]) -> AsyncIterator[str]:
    """SSE lines of `events`, then `data: [DONE]`; an error after the stream started is reported in-band.

    Whatever happens (finish, error, client disconnect) the request's unfinished sequences are aborted
    (their blocks freed) and the request is logged once with its status.
    """
    status, error = 200, None
    try:
        async for line in events:
            yield line
        yield sse("[DONE]")
    except asyncio.CancelledError:
        status, error = 499, "client disconnected"
        raise
    except APIError as exc:
        status, error = exc.status, exc.message
        yield sse(exc.body())
        yield sse("[DONE]")
    except Exception as exc:  # noqa: BLE001 - the stream has started; report in-band
        logger.exception("%s failed mid-stream", run.request_id)
        status, error = 500, f"{type(exc).__name__}: {exc}"
        yield sse(error_body(f"Internal server error ({type(exc).__name__}); see the server log",
                             "server_error", None, "internal_error"))
        yield sse("[DONE]")
    finally:
        await run.abort_unfinished()
        run.finish(status, error)


# ---------------------------------------------------------------------------------------------------
# completions


async def completion_full(ctx: ServingContext, run: RequestRun, req, prompt_texts: list[str]) -> dict:
    n = req.n
    echoed = [prompt_texts[i // n] if req.echo else "" for i in range(run.num_choices)]
    texts, tokens, lps = await _collect(run, echoed)
    choices = []
    for i, text in enumerate(texts):
        lp = None
        if req.logprobs is not None:
            start = len(prompt_texts[i // n]) if req.echo else 0
            lp = completion_logprobs(ctx, tokens[i], lps[i], req.logprobs, start)
        choices.append({"index": i, "text": text, "logprobs": lp,
                        "finish_reason": run.finish_reasons.get(i, "abort"),
                        "stop_reason": run.stop_reasons.get(i)})
    return CompletionResponse(id=run.request_id, model=ctx.served_model_name, choices=choices,
                              usage=run.usage()).model_dump()


def completion_stream(ctx: ServingContext, run: RequestRun, req, prompt_texts: list[str]) -> AsyncIterator[str]:
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    base = {"id": run.request_id, "object": "text_completion", "created": int(time.time()),
            "model": ctx.served_model_name}
    offsets = [0] * run.num_choices

    def chunk(choices, usage=None):
        c = {**base, "choices": choices}
        if include_usage:
            c["usage"] = usage
        return sse(c)

    async def events() -> AsyncIterator[str]:
        if req.echo:
            for i in range(run.num_choices):
                offsets[i] = len(prompt_texts[i // req.n])
                yield chunk([{"index": i, "text": prompt_texts[i // req.n], "logprobs": None,
                              "finish_reason": None}])
        async for idx, o in run.stream():
            if o.text or o.token_ids or o.finish_reason is not None:
                lp = None
                if req.logprobs is not None:
                    lp = completion_logprobs(ctx, list(o.token_ids), o.logprobs, req.logprobs, offsets[idx])
                offsets[idx] += len(o.text)
                yield chunk([{"index": idx, "text": o.text, "logprobs": lp, "finish_reason": o.finish_reason}])
        if include_usage:
            yield chunk([], usage=run.usage())

    return guarded(run, events())
