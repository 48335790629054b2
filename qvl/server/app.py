"""The OpenAI-compatible HTTP server app: `create_app(engine, ...)`, auth, error handlers, lifecycle.

`create_app(engine, *, served_model_name, api_key=None, media_policy=None, limits=None, ui=True)` builds the
FastAPI app around a `qvl.engine.async_engine.AsyncEngine`: everything the server needs from the engine
comes from its typed properties (processor, max_model_len, vocab_size, model_path, generation_defaults,
stats). The routes are routes.py's APIRouter, the web page at / is web.py's; qvl.server.launch defines
the `qvl serve` flags and runs the app under uvicorn.

Owns: the Bearer-key middleware (every route but /health and the page), CORS (`allowed_origins`), the
request-body schemas of the OpenAPI document, the handlers that turn APIError (errors.py,
framework-free), validation errors, 404/405 and anything unexpected into OpenAI error bodies (the
traceback goes to the log, never to the client), and the lifespan (start the engine; on shutdown stop
it off the event loop and drop the preprocessing pool).
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from qvl.config import ServerLimits
from qvl.engine.async_engine import AsyncEngine
from qvl.multimodal.media import MediaPolicy
from qvl.server import web
from qvl.server.errors import APIError, validation_error
from qvl.server.metrics import ServerMetrics
from qvl.server.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from qvl.server.routes import router
from qvl.server.serving import ServingContext, drain

logger = logging.getLogger("qvl.server")
ENGINE_STOP_S = 5.0       # at shutdown, how long the engine's running step may take to end


def create_app(engine: AsyncEngine, *, served_model_name: str, api_key: str | None = None,
               media_policy: MediaPolicy | None = None, limits: ServerLimits | None = None,
               ui: bool = True, model_aliases: tuple[str, ...] = (),
               allowed_origins: list[str] | None = None) -> FastAPI:
    """The app around `engine`. `media_policy=None` means the strict MediaPolicy(): public http(s) hosts
    only, no local files (the server never uses the library's permissive default). `ui`: serve the web
    page (web.py) at `/`. `model_aliases`: other names a request may give as `model`. `allowed_origins`:
    browser origins for CORS (none: no CORS headers, preflights need the key like any request)."""
    if engine.processor is None:
        raise ValueError("the server needs an engine with a tokenizer (AsyncEngine.processor is None)")
    limits = limits or ServerLimits()
    ctx = ServingContext(engine=engine, served_model_name=served_model_name,
                         media_policy=media_policy or MediaPolicy(), limits=limits,
                         metrics=ServerMetrics(served_model_name, engine.stats, engine.max_model_len),
                         boxes_fn=_grounding_fn(engine.processor.processing),
                         model_aliases=tuple(a for a in model_aliases if a and a != served_model_name))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            try:       # joins the engine thread (its current step): keep the loop free, and do not wait forever
                await asyncio.wait_for(asyncio.to_thread(engine.shutdown), ENGINE_STOP_S)
            except Exception:  # noqa: BLE001 - stopping must not fail; launch.py exits past a stuck step
                logger.warning("the engine did not stop within %.0f s", ENGINE_STOP_S)
            if ctx.executor is not None:
                ctx.executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="qvl", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.ctx = ctx
    app.state.begin_shutdown = lambda grace_s: asyncio.ensure_future(drain(ctx, grace_s))
    app.include_router(router)
    if ui:
        web.install(app)
    install_error_handlers(app)
    _describe_bodies(app, (ChatCompletionRequest, CompletionRequest, TokenizeRequest, DetokenizeRequest))
    if api_key:
        app.add_middleware(_AuthMiddleware, api_key=api_key, ui=ui)
    if allowed_origins:     # outside auth: a preflight carries no key, and a 401 still gets CORS headers
        app.add_middleware(CORSMiddleware, allow_origins=list(allowed_origins), allow_methods=["*"],
                           allow_headers=["*"], expose_headers=["X-Request-Id"], max_age=600)
    return app


def _describe_bodies(app: FastAPI, models) -> None:
    """The OpenAPI document describes the request bodies (routes.py reads them itself, so FastAPI cannot
    see them): each model's JSON schema, and its nested models, under components/schemas."""
    base = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = base()
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in models:
                js = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(js.pop("$defs", {}))
                components[model.__name__] = js
        return app.openapi_schema

    app.openapi = openapi


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def install_error_handlers(app: FastAPI) -> None:
    """APIError, request validation, routing 404/405 and unexpected exceptions -> OpenAI error bodies."""
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        return error_response(validation_error(list(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404:
            detail = f"Not found: {request.method} {request.url.path}"
        elif exc.status_code == 405:
            detail = f"Method {request.method} not allowed for {request.url.path}"
        return error_response(APIError(detail, status=exc.status_code))

    app.add_middleware(_CatchAllMiddleware)


class _AuthMiddleware:
    """Pure ASGI (streams pass through untouched): Bearer key on every path and method (OPTIONS too, so
    routes cannot be enumerated) but /health and the web page (GET / and /static/*, web.is_public)."""

    def __init__(self, app, api_key: str, ui: bool = False):
        self.app = app
        self.key = api_key.encode()
        self.ui = ui

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] == "/health" \
                or (self.ui and web.is_public(scope["method"], scope["path"])):
            return await self.app(scope, receive, send)
        auth = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, token = auth.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key):
            return await self.app(scope, receive, send)
        msg = "Missing API key (send Authorization: Bearer <key>)" if not auth else "Invalid API key"
        await error_response(APIError(msg, status=401, code="invalid_api_key"))(scope, receive, send)


class _CatchAllMiddleware:
    """Unexpected exceptions -> 500 with an error body, logged, and *not* re-raised to the server
    (Starlette's catch-all handler re-raises, which makes uvicorn drop the keep-alive connection)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def _send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, _send)
        except Exception as exc:  # noqa: BLE001 - the server must survive anything a request does
            logger.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            if not started:
                resp = error_response(APIError(f"Internal server error ({type(exc).__name__}); see the server "
                                               "log", status=500, code="internal_error"))
                await resp(scope, receive, send)


def _grounding_fn(processing):
    """(text, plan items) -> boxes as dicts, mapped to the first image's original pixels by the family's
    rule (`processing`: BOX_COORDINATES, box_to_original). Boxes go into an extra `qvl_boxes` field (the
    openai client ignores it)."""
    from qvl import grounding

    def boxes(text: str, items: list[dict]) -> list[dict]:
        if "<|box_start|>" not in text and "<|quad_start|>" not in text:
            return []
        first = next((it for it in items if it.get("type") == "image"), None)
        sizes = (first["original_size"], first["resized_size"]) if first is not None else (None, None)
        parsed, to_original = grounding.read_boxes(text, processing, *sizes)
        return grounding.to_json(parsed, to_original=to_original)

    return boxes
