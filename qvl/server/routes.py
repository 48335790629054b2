"""The HTTP routes, on one FastAPI `APIRouter`: what each endpoint reads, prepares and answers.

  GET  /health               200, no auth (app.py's middleware lets it through)
  GET  /v1/models            the served model, with max_model_len
  GET  /metrics              Prometheus text (metrics.py)
  POST /tokenize             token counts from the prompt plan: header dimensions, no pixel decode
  POST /v1/chat/completions  plan -> check -> load (prepare.py), then the engine; JSON or SSE
  POST /v1/completions       text prompts the same way; token-id prompts as they are

Every route reads the ServingContext from `request.app.state.ctx`. Bodies are read here (size limit
before reading it all, JSON, pydantic validation -> APIError); a client that disconnects while its prompt
is prepared or its answer generated has its engine work aborted. Errors are APIErrors (errors.py), which
app.py's handlers turn into OpenAI error bodies.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from qvl.server import prepare, responses
from qvl.server.errors import APIError, from_pydantic
from qvl.server.protocol import ChatCompletionRequest, CompletionRequest, TokenizeRequest
from qvl.server.serving import RequestRun, ServingContext, new_request_id

router = APIRouter()
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _ctx(request: Request) -> ServingContext:
    return request.app.state.ctx


async def read_json(request: Request, max_bytes: int, model_cls):
    """Read the body (refusing > max_bytes with 413 before reading it all), parse JSON, validate."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_bytes:
        raise APIError(f"Request body too large: {int(length)} bytes > max_request_bytes {max_bytes}",
                       status=413, code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise APIError(f"Request body too large: more than max_request_bytes {max_bytes} bytes",
                           status=413, code="request_too_large")
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        raise APIError("Request body is empty; expected a JSON object", code="invalid_json")
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(f"Invalid JSON body: {exc}", code="invalid_json") from exc
    if not isinstance(data, dict):
        raise APIError(f"Request body must be a JSON object, got {type(data).__name__}", code="invalid_json")
    try:
        return model_cls.model_validate(data)
    except ValidationError as exc:
        raise from_pydantic(exc) from exc


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def until_disconnect(request: Request, coro):
    """Run `coro`; if the client disconnects first, cancel it (its finally-blocks abort engine work)."""
    task = asyncio.ensure_future(coro)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        raise APIError("Client disconnected", status=499, code="client_disconnected")
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()


def _check_model(ctx: ServingContext, name: str | None) -> None:
    if name and name != ctx.served_model_name:
        raise APIError(f"The model `{name}` does not exist; this server serves `{ctx.served_model_name}`",
                       status=404, param="model", code="model_not_found")


@router.get("/health")
async def health():
    return Response(status_code=200)


@router.get("/v1/models")
async def models(request: Request):
    ctx = _ctx(request)
    return {"object": "list", "data": [{
        "id": ctx.served_model_name, "object": "model", "created": int(time.time()), "owned_by": "qvl",
        "root": ctx.engine.model_path or ctx.served_model_name, "parent": None,
        "max_model_len": ctx.max_model_len}]}


@router.get("/metrics")
async def metrics(request: Request):
    body, ctype = _ctx(request).metrics.render()
    return Response(body, media_type=ctype)


@router.post("/tokenize")
async def tokenize(request: Request):
    ctx = _ctx(request)
    req = await read_json(request, ctx.limits.max_request_bytes, TokenizeRequest)
    _check_model(ctx, req.model)
    return await until_disconnect(request, prepare.tokenize(ctx, req))


@router.post("/v1/chat/completions")
async def chat(request: Request):
    ctx = _ctx(request)
    run = RequestRun(ctx, new_request_id("chatcmpl"), "chat")
    try:
        req = await read_json(request, ctx.limits.max_request_bytes, ChatCompletionRequest)
        _check_model(ctx, req.model)
        run.images, run.videos = prepare.check_media_counts(ctx, req.messages)
        prompt, plan = await until_disconnect(request, prepare.prepare_chat(ctx, req))
        await run.start([(prompt, prepare.sampling_params(ctx, req, len(prompt.token_ids)))], req.n)
    except BaseException as exc:
        run.fail(exc)
        raise
    sizes = plan.counts()["items"] if ctx.boxes_fn else None
    if req.stream:
        return StreamingResponse(responses.chat_stream(ctx, run, req, sizes), media_type="text/event-stream",
                                 headers={**_SSE_HEADERS, "X-Request-Id": run.request_id})
    return await _full(request, run, responses.chat_full(ctx, run, req, sizes))


@router.post("/v1/completions")
async def completions(request: Request):
    ctx = _ctx(request)
    run = RequestRun(ctx, new_request_id("cmpl"), "completion")
    try:
        req = await read_json(request, ctx.limits.max_request_bytes, CompletionRequest)
        _check_model(ctx, req.model)
        jobs, texts = [], []
        for p in req.prompt:
            processed, text = await until_disconnect(request, prepare.prepare_text(ctx, p, req.max_new_tokens))
            jobs.append((processed, prepare.sampling_params(ctx, req, len(processed.token_ids))))
            texts.append(text)
        await run.start(jobs, req.n)
    except BaseException as exc:
        run.fail(exc)
        raise
    if req.stream:
        return StreamingResponse(responses.completion_stream(ctx, run, req, texts),
                                 media_type="text/event-stream",
                                 headers={**_SSE_HEADERS, "X-Request-Id": run.request_id})
    return await _full(request, run, responses.completion_full(ctx, run, req, texts))


async def _full(request: Request, run: RequestRun, coro):
    try:
        body = await until_disconnect(request, coro)
    except BaseException as exc:
        await run.abort_unfinished()
        run.fail(exc)
        raise
    run.finish(200)
    return JSONResponse(body, headers={"X-Request-Id": run.request_id})
