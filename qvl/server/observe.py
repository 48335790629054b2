"""What the server observes about each request beyond the response: phase timings, engine timings,
the caller's address and trace context, and what is done with them when the request finishes (the JSON
request log, the cost share, the trace).

  RequestObs     one request's observations. RequestRun (serving.py) makes one (`begin()`), adds its
                 prompts (`add_prompt`: visual tokens, prompt text) and engine outputs
                 (`observe_output`: queue / first-scheduled / first-token / finished times and the
                 engine-busy seconds attributed to it); ServingContext.run_blocking times the prompt
                 phases it runs (`phase(fn)`: plan = media fetch, load = preprocessing).
  ScopeMiddleware a pure ASGI middleware that puts the client address and the W3C `traceparent` /
                 `tracestate` headers where `begin()` finds them (a context variable: no route changes).
  Observer       on finish: the request's cost share (metrics.ServerMetrics.request_cost), its spans
                 (tracing.RequestTracer, optional) and, with --log-format json, its log record
                 (request_log.py) as one JSON line on the `qvl.requests` logger.
  install(app, ctx, opts)   the above from ServeOptions: the metrics (compat names, cost), the tracer,
                 the observer and the middleware.
"""
from __future__ import annotations

import contextlib
import time
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from qvl.server import request_log

if TYPE_CHECKING:
    from qvl.config import ServeOptions

# run_blocking's functions -> the span / phase they are (others are not phases of a request)
PHASES = {"plan": "qvl.media_fetch", "load": "qvl.preprocess"}

_SCOPE: ContextVar[tuple[str | None, dict]] = ContextVar("qvl_request_scope", default=(None, {}))
_CURRENT: ContextVar["RequestObs | None"] = ContextVar("qvl_request_obs", default=None)


@dataclass
class EngineTimes:
    """time.time() seconds over the request's engine requests: earliest start, latest finish."""
    arrival: float | None = None
    first_scheduled: float | None = None
    first_token: float | None = None
    finished: float | None = None


def _min(a, b):
    return b if a is None else a if b is None else min(a, b)


@dataclass
class RequestObs:
    client: str | None = None
    trace_headers: dict = field(default_factory=dict)
    phases: list = field(default_factory=list)           # (span name, monotonic start, monotonic end)
    visual_tokens: int = 0
    prompts: list = field(default_factory=list)          # rendered prompt texts (media as placeholders)
    engine: EngineTimes = field(default_factory=EngineTimes)
    _engine_time: dict = field(default_factory=dict)     # engine request id -> busy seconds so far

    def add_prompt(self, prompt) -> None:
        self.visual_tokens += sum(it.num_tokens for it in prompt.items)
        self.prompts.append(prompt.text)

    def observe_output(self, rid: str, out) -> None:
        m, e = out.metrics, self.engine
        e.arrival = _min(e.arrival, m.arrival_time)
        e.first_scheduled = _min(e.first_scheduled, m.first_scheduled_time)
        e.first_token = _min(e.first_token, m.first_token_time)
        if m.finished_time is not None:
            e.finished = m.finished_time if e.finished is None else max(e.finished, m.finished_time)
        self._engine_time[rid] = m.engine_time

    @property
    def engine_time(self) -> float:
        return sum(self._engine_time.values())

    @property
    def inference_time(self) -> float | None:
        e = self.engine
        return None if e.first_scheduled is None or e.finished is None else e.finished - e.first_scheduled


def begin() -> RequestObs:
    """A new request's observations, with the scope ScopeMiddleware saw; phases timed from here on in this
    task (and the tasks it starts) are its own."""
    client, headers = _SCOPE.get()
    obs = RequestObs(client=client, trace_headers=headers)
    _CURRENT.set(obs)
    return obs


@contextlib.contextmanager
def phase(fn):
    """Time `fn`'s run as a phase of the current request, when it is one (PHASES)."""
    obs, name = _CURRENT.get(), PHASES.get(getattr(fn, "__name__", ""))
    if obs is None or name is None:
        yield
        return
    t0 = time.monotonic()
    try:
        yield
    finally:
        obs.phases.append((name, t0, time.monotonic()))


class ScopeMiddleware:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        client = scope.get("client")
        headers = {}
        for k, v in scope.get("headers") or []:
            if k in (b"traceparent", b"tracestate"):
                headers[k.decode()] = v.decode("latin-1")
        token = _SCOPE.set((f"{client[0]}:{client[1]}" if client else None, headers))
        current = _CURRENT.set(None)
        try:
            await self.app(scope, receive, send)
        finally:
            _CURRENT.reset(current)
            _SCOPE.reset(token)


class Observer:
    def __init__(self, metrics=None, *, log_format: str = "text", log_prompts: bool = False,
                 log_client_addr: bool = False, tracer=None, log_stream=None):
        self.metrics, self.tracer = metrics, tracer
        self.json = log_format == "json"
        self.log_prompts, self.log_client_addr = log_prompts, log_client_addr
        self.log = request_log.request_logger(log_stream) if self.json else None

    def finished(self, run, end: float) -> bool:
        """Cost, trace and JSON log of a finished request; True when its log line was written here (the
        text line is then not written)."""
        obs: RequestObs = run.obs
        cost = self.metrics.request_cost(obs.engine_time) if self.metrics is not None else None
        trace_id = self.tracer.record(run, obs, end, cost) if self.tracer is not None else None
        if not self.json:
            return False
        rec = request_log.build_record(run, obs, end, cost_usd=cost, log_prompts=self.log_prompts,
                                       log_client_addr=self.log_client_addr, trace_id=trace_id)
        self.log.info(request_log.json_line(rec))
        return True

    def shutdown(self) -> None:
        if self.tracer is not None:
            self.tracer.shutdown()


def install(app, ctx, opts: "ServeOptions", *, tracer_provider: Any = None,
            log_stream=None) -> Observer:
    """Wire ServeOptions' observability into an app made by create_app (before it starts); `ctx` is its
    serving.ServingContext (app.state.ctx)."""
    from qvl.server.metrics import ServerMetrics

    ctx.metrics = ServerMetrics(ctx.served_model_name, ctx.engine.stats, ctx.max_model_len,
                                compat=opts.metrics_compat, cost_per_hour=opts.cost_per_hour)
    tracer = None
    if opts.otlp_traces_endpoint or tracer_provider is not None:
        from qvl.server.tracing import RequestTracer

        tracer = RequestTracer(opts.otlp_traces_endpoint, provider=tracer_provider)
    ctx.observer = Observer(ctx.metrics, log_format=opts.log_format, log_prompts=opts.log_prompts,
                            log_client_addr=opts.log_client_addr, tracer=tracer, log_stream=log_stream)
    app.add_middleware(ScopeMiddleware)
    return ctx.observer
