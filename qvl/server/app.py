"""The OpenAI-compatible HTTP server: routes, auth, body limits, disconnects, lifecycle.

`create_app(engine, ...)` builds the FastAPI app around an AsyncEngine-like object (see serving.py for
the methods used); qvl.server.launch defines the `qvl serve` flags and runs the app under uvicorn.

Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health (no auth),
POST /tokenize (token counts from header dimensions; no pixel decode, no model run), GET /metrics.
Every route but /health needs `Authorization: Bearer <key>` when an API key is set.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from qvl.server import responses
from qvl.server.errors import APIError, from_pydantic, install_error_handlers
from qvl.server.metrics import ServerMetrics
from qvl.server.protocol import ChatCompletionRequest, CompletionRequest, TokenizeRequest
from qvl.server.serving import (RequestRun, ServerLimits, ServingContext, check_media_counts, drain,
                                new_request_id, prepare_chat, prepare_text, sampling_params)

logger = logging.getLogger("qvl.server")

_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class _AuthMiddleware:
    """Pure ASGI (streams pass through untouched): Bearer key on every path but /health."""

    def __init__(self, app, api_key: str):
        self.app = app
        self.key = api_key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] == "/health" or scope["method"] == "OPTIONS":
            return await self.app(scope, receive, send)
        auth = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, token = auth.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key):
            return await self.app(scope, receive, send)
        msg = "Missing API key (send Authorization: Bearer <key>)" if not auth else "Invalid API key"
        resp = APIError(msg, status=401, code="invalid_api_key").response()
        await resp(scope, receive, send)


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


def _engine_attr(engine, *names, default=None):
    for n in names:
        obj = engine
        for part in n.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if obj is not None:
            return obj
    return default


def create_app(engine, *, served_model_name: str, api_key: str | None = None, media_policy=None,
               limits: ServerLimits | None = None, processor=None, max_model_len: int | None = None,
               default_sampling: dict | None = None, model_path: str | None = None) -> FastAPI:
    """The app around `engine` (an AsyncEngine). `media_policy=None` means the strict MediaPolicy():
    public http(s) hosts only, no local files. processor / max_model_len / default_sampling (the
    checkpoint's generation_config defaults) / model_path default to what the engine exposes."""
    processor = processor or _engine_attr(engine, "processor", "engine.processor")
    if processor is None:
        raise ValueError("create_app needs a PromptProcessor (pass processor= or give the engine .processor)")
    max_model_len = int(max_model_len or _engine_attr(engine, "max_model_len", "engine.max_model_len",
                                                      default=4096))
    model_path = model_path or _engine_attr(engine, "model_path", "engine.model_path")
    if default_sampling is None:
        from qvl.sampling_params import generation_defaults
        gen = _engine_attr(engine, "generation_config", "engine.generation_config")
        default_sampling = generation_defaults(gen) if isinstance(gen, dict) else {}
    if media_policy is None:   # the server never uses the permissive library default
        from qvl.multimodal.media import MediaPolicy
        media_policy = MediaPolicy()
    limits = limits or ServerLimits()
    stats_fn = getattr(engine, "stats", None)
    metrics = ServerMetrics(served_model_name, stats_fn, max_model_len)
    from qvl.sampling_params import SamplingParams

    tok = getattr(processor, "tokenizer", None)
    vocab = _engine_attr(engine, "vocab_size", "config.vocab_size", "engine.config.vocab_size")
    if vocab is None and tok is not None and hasattr(tok, "get_vocab_size"):
        vocab = tok.get_vocab_size(with_added_tokens=True)
    boxes_fn = _grounding_fn()
    ctx = ServingContext(engine=engine, processor=processor, served_model_name=served_model_name,
                         max_model_len=max_model_len, media_policy=media_policy, limits=limits,
                         metrics=metrics, default_sampling=dict(default_sampling or {}),
                         sampling_cls=SamplingParams, vocab_size=vocab, boxes_fn=boxes_fn)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        start = getattr(engine, "start", None)
        if start is not None:
            await _maybe(start())
        try:
            yield
        finally:
            stop = getattr(engine, "shutdown", None) or getattr(engine, "stop", None)
            if stop is not None:   # may block (joins the engine thread): keep the loop free meanwhile
                with contextlib.suppress(Exception):
                    await _maybe(await asyncio.to_thread(stop))
            if ctx.executor is not None:
                ctx.executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="qvl", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.ctx = ctx
    app.state.begin_shutdown = lambda grace_s: asyncio.ensure_future(drain(ctx, grace_s))
    install_error_handlers(app)
    if api_key:
        app.add_middleware(_AuthMiddleware, api_key=api_key)

    def check_model(name: str | None) -> None:
        if name and name != served_model_name:
            raise APIError(f"The model `{name}` does not exist; this server serves `{served_model_name}`",
                           status=404, param="model", code="model_not_found")

    @app.get("/health")
    async def health():
        return Response(status_code=200)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{
            "id": served_model_name, "object": "model", "created": int(time.time()), "owned_by": "qvl",
            "root": model_path or served_model_name, "parent": None, "max_model_len": max_model_len}]}

    @app.get("/metrics")
    async def metrics_route():
        body, ctype = metrics.render()
        return Response(body, media_type=ctype)

    @app.post("/tokenize")
    async def tokenize(request: Request):
        req = await read_json(request, limits.max_request_bytes, TokenizeRequest)
        check_model(req.model)
        if req.messages is not None:
            check_media_counts(ctx, req.messages)
            msgs = [m.to_processor() for m in req.messages]
            counts = await ctx.guarded(processor.count_tokens, msgs, policy=media_policy,
                                       max_model_len=max_model_len)
            visual = sum(int(it["tokens"]) for it in counts["items"])
            body = {"count": int(counts["prompt_tokens"]), "max_model_len": max_model_len,
                    "text_tokens": int(counts["prompt_tokens"]) - visual, "visual_tokens": visual,
                    "items": counts["items"]}
        else:
            p = await ctx.guarded(processor.process_prompt, req.prompt, None, max_model_len=None)
            body = {"count": len(p.token_ids), "max_model_len": max_model_len, "text_tokens": len(p.token_ids),
                    "visual_tokens": 0, "items": []}
            if req.return_token_ids:
                body["tokens"] = list(p.token_ids)
        return body

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        run = RequestRun(ctx, new_request_id("chatcmpl"), "chat")
        try:
            req = await read_json(request, limits.max_request_bytes, ChatCompletionRequest)
            check_model(req.model)
            run.images, run.videos = check_media_counts(ctx, req.messages)
            prompt, counts = await until_disconnect(request, prepare_chat(ctx, req))
            await run.start([(prompt, sampling_params(ctx, req, len(prompt.token_ids)))], req.n)
        except BaseException as exc:
            run.fail(exc)
            raise
        sizes = counts.get("items", []) if ctx.boxes_fn else None
        if req.stream:
            return StreamingResponse(responses.chat_stream(ctx, run, req, sizes), media_type="text/event-stream",
                                     headers={**_SSE_HEADERS, "X-Request-Id": run.request_id})
        return await _full(request, run, responses.chat_full(ctx, run, req, sizes))

    @app.post("/v1/completions")
    async def completions(request: Request):
        run = RequestRun(ctx, new_request_id("cmpl"), "completion")
        try:
            req = await read_json(request, limits.max_request_bytes, CompletionRequest)
            check_model(req.model)
            jobs, texts = [], []
            for p in req.prompt:
                processed = await until_disconnect(request, prepare_text(ctx, p, req.max_new_tokens))
                jobs.append((processed, sampling_params(ctx, req, len(processed.token_ids))))
                texts.append(p if isinstance(p, str) else processor.decode(list(p)))
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

    return app


def _grounding_fn():
    """(text, count items) -> boxes as dicts, mapped to the first image's original pixels; None when
    qvl.grounding is not available. Boxes go into an extra `qvl_boxes` field (the openai client ignores it)."""
    try:
        from qvl import grounding
    except ImportError:
        return None
    if not hasattr(grounding, "parse") or not hasattr(grounding, "to_json"):
        return None

    def boxes(text: str, items: list[dict]) -> list[dict]:
        if "<|box_start|>" not in text and "<|quad_start|>" not in text:
            return []
        first = next((it for it in items if it.get("type") == "image"), None)
        size = None
        if first is not None and first.get("original_size"):
            h, w = first["original_size"]
            size = (w, h)                            # (width, height), as grounding.to_json takes it
        return grounding.to_json(grounding.parse(text), size)

    return boxes


async def _maybe(x):
    return await x if asyncio.iscoroutine(x) or isinstance(x, asyncio.Future) else x
