"""The HTTP routes, on one FastAPI `APIRouter`: what each endpoint reads, prepares and answers.

  GET|HEAD /health           200, no auth (app.py's middleware lets it through); 503 once the engine failed
  GET  /version              {"version": qvl's}
  GET  /v1/models            the served model, with max_model_len; /v1/models/{id} one model (404 if unknown)
  GET  /metrics              Prometheus text (metrics.py)
  POST /tokenize             token counts from the prompt plan: header dimensions, no pixel decode
  POST /detokenize           token ids -> text
  POST /v1/chat/completions  plan -> check -> load (prepare.py), then the engine; JSON or SSE
  POST /v1/completions       text prompts the same way; token-id prompts as they are

Every route reads the ServingContext from `request.app.state.ctx` and its body through body.read_json
(limits, JSON, validation -> APIError). The model may be named by the served name or an alias (the model
argument as given). An incoming X-Request-Id becomes the request id (request_ids). A client that
disconnects while its prompt is prepared or its answer generated has its engine work aborted; at the
shutdown deadline such a request is aborted too and answers 503. Errors are APIErrors (errors.py), which
app.py's handlers turn into OpenAI error bodies.
"""
from __future__ import annotations

import asyncio
import contextlib
import re
import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from qvl import __version__
from qvl.server import prepare, responses
from qvl.server.body import read_json
from qvl.server.errors import APIError
from qvl.server.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from qvl.server.serving import RequestRun, ServingContext

router = APIRouter()
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _ctx(request: Request) -> ServingContext:
    return request.app.state.ctx


_CLIENT_ID = re.compile(r"[^A-Za-z0-9._:~-]")
MAX_CLIENT_ID = 128


def request_ids(request: Request, prefix: str, body_id: str | None = None) -> tuple[str, str, str]:
    """(response id, engine id, X-Request-Id to answer with). An incoming X-Request-Id (else the body's
    vLLM `request_id`) is kept (characters outside [A-Za-z0-9._:~-] dropped, at most MAX_CLIENT_ID) so logs
    and the client's traces line up; the engine id gets a random suffix because two clients may send the
    same one."""
    own = uuid.uuid4().hex
    given = _CLIENT_ID.sub("", request.headers.get("x-request-id") or body_id or "")[:MAX_CLIENT_ID]
    if not given:
        return f"{prefix}-{own}", f"{prefix}-{own}", f"{prefix}-{own}"
    return f"{prefix}-{given}", f"{prefix}-{given}-{own[:12]}", given


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def until_disconnect(request: Request, coro):
    """Run `coro`; if the client disconnects first, or the server reaches its shutdown deadline, cancel it
    (its finally-blocks abort engine work) and answer 499 / 503."""
    ctx = _ctx(request)
    task = asyncio.ensure_future(coro)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    deadline = asyncio.ensure_future(ctx.aborting.wait())
    try:
        done, _ = await asyncio.wait({task, watcher, deadline}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        if deadline in done:
            raise APIError("The server shut down before this request finished (aborted at the end of the "
                           "graceful-shutdown period); retry it", status=503, code="shutting_down")
        raise APIError("Client disconnected", status=499, code="client_disconnected")
    finally:
        watcher.cancel()
        deadline.cancel()
        if not task.done():
            task.cancel()


def _check_model(ctx: ServingContext, name: str | None) -> None:
    if name and name != ctx.served_model_name and name not in ctx.model_aliases:
        raise APIError(f"The model `{name}` does not exist; this server serves `{ctx.served_model_name}`",
                       status=404, param="model", code="model_not_found")


@router.api_route("/health", methods=["GET", "HEAD"])
async def health(request: Request):
    failure = _ctx(request).engine.failure      # a tensor-parallel rank died: the server is going down
    if failure:
        return JSONResponse(APIError(f"the engine failed: {failure}", status=503, code="engine_failed").body(),
                            status_code=503)
    return Response(status_code=200)


@router.api_route("/version", methods=["GET", "HEAD"])
async def version():
    return {"version": __version__}


def _model_card(ctx: ServingContext) -> dict:
    return {"id": ctx.served_model_name, "object": "model", "created": int(time.time()), "owned_by": "qvl",
            "root": ctx.engine.model_path or ctx.served_model_name, "parent": None,
            "max_model_len": ctx.max_model_len}


@router.get("/v1/models")
async def models(request: Request):
    return {"object": "list", "data": [_model_card(_ctx(request))]}


@router.get("/v1/models/{model_id:path}")
async def model(request: Request, model_id: str):
    ctx = _ctx(request)
    _check_model(ctx, model_id)
    return _model_card(ctx)


@router.get("/metrics")
async def metrics(request: Request):
    body, ctype = _ctx(request).metrics.render()
    return Response(body, media_type=ctype)


def _body(model_cls) -> dict:
    """FastAPI route metadata: the JSON body is `model_cls` (app.py puts the schemas into the OpenAPI
    document; the routes read and validate bodies themselves, see body.py)."""
    return {"openapi_extra": {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{model_cls.__name__}"}}}}}}


@router.post("/tokenize", **_body(TokenizeRequest))
async def tokenize(request: Request):
    ctx = _ctx(request)
    req = await read_json(request, ctx.limits, TokenizeRequest)
    _check_model(ctx, req.model)
    return await until_disconnect(request, prepare.tokenize(ctx, req))


@router.post("/detokenize", **_body(DetokenizeRequest))
async def detokenize(request: Request):
    ctx = _ctx(request)
    req = await read_json(request, ctx.limits, DetokenizeRequest)
    _check_model(ctx, req.model)
    bad = [t for t in req.tokens if t >= ctx.vocab_size]
    if bad:
        raise APIError(f"Token id {bad[0]} is out of range [0, {ctx.vocab_size})", param="tokens",
                       code="invalid_value")
    return {"prompt": await ctx.run_blocking(ctx.processor.decode, req.tokens)}


@router.post("/v1/chat/completions", **_body(ChatCompletionRequest))
async def chat(request: Request):
    ctx = _ctx(request)
    request_id, engine_id, header_id = request_ids(request, "chatcmpl")
    run = RequestRun(ctx, request_id, "chat", engine_id=engine_id)
    try:
        req = await read_json(request, ctx.limits, ChatCompletionRequest)
        if req.request_id and "x-request-id" not in request.headers:
            run.request_id, run.engine_id, header_id = request_ids(request, "chatcmpl", req.request_id)
        _check_model(ctx, req.model)
        run.images, run.videos = prepare.check_media_counts(ctx, req.messages)
        prompt, plan = await until_disconnect(request, prepare.prepare_chat(ctx, req))
        await run.start([(prompt, prepare.sampling_params(ctx, req, len(prompt.token_ids)))], req.n)
    except BaseException as exc:
        run.fail(exc)
        raise
    sizes = plan.counts()["items"] if ctx.boxes_fn else None
    echo = prepare.chat_echo(req)
    if req.stream:
        return StreamingResponse(responses.chat_stream(ctx, run, req, sizes, echo), media_type="text/event-stream",
                                 headers={**_SSE_HEADERS, "X-Request-Id": header_id})
    return await _full(request, run, responses.chat_full(ctx, run, req, sizes, echo), header_id)


@router.post("/v1/completions", **_body(CompletionRequest))
async def completions(request: Request):
    ctx = _ctx(request)
    request_id, engine_id, header_id = request_ids(request, "cmpl")
    run = RequestRun(ctx, request_id, "completion", engine_id=engine_id)
    try:
        req = await read_json(request, ctx.limits, CompletionRequest)
        if req.request_id and "x-request-id" not in request.headers:
            run.request_id, run.engine_id, header_id = request_ids(request, "cmpl", req.request_id)
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
                                 headers={**_SSE_HEADERS, "X-Request-Id": header_id})
    return await _full(request, run, responses.completion_full(ctx, run, req, texts), header_id)


async def _full(request: Request, run: RequestRun, coro, header_id: str):
    try:
        body = await until_disconnect(request, coro)
    except BaseException as exc:
        await run.abort_unfinished()
        run.fail(exc)
        raise
    run.finish(200)
    return JSONResponse(body, headers={"X-Request-Id": header_id})
