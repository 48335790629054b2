"""OpenTelemetry traces (the optional extra `qvl[otel]`): one span per finished request, with child spans
for its phases, exported over OTLP (`--otlp-traces-endpoint`, as vLLM names it).

Spans, written when the request finishes from the times observe.RequestObs recorded (nothing is traced
on the engine's thread, and a request costs the exporter's batch queue nothing until then):
  qvl.request (kind SERVER; the request's W3C `traceparent` / `tracestate` make it a child of the
  caller's span) with children qvl.media_fetch (planning: template, remote media fetched once, headers
  read), qvl.preprocess (pixel decode, resize, pad expansion, positions), qvl.queue (engine waiting
  queue), qvl.prefill (first scheduled -> first token) and qvl.decode (first token -> finished); the
  ones a request never reached are left out. Attributes follow vLLM's `gen_ai.*` names (request id,
  model, usage, latencies) plus qvl.* (images, videos, visual and cached tokens, cost).

Endpoint: a URL whose path ends in /v1/traces is sent OTLP/HTTP (protobuf), any other OTLP/gRPC
(e.g. http://collector:4317). Tests pass their own TracerProvider (the SDK's in-memory exporter).
"""
from __future__ import annotations

import time
from typing import Any


def _exporter(endpoint: str):
    if endpoint.rstrip("/").endswith("/v1/traces"):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        return OTLPSpanExporter(endpoint=endpoint)
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    return OTLPSpanExporter(endpoint=endpoint, insecure=endpoint.startswith("http://"))


class RequestTracer:
    def __init__(self, endpoint: str | None = None, *, provider: Any = None, service_name: str = "qvl"):
        try:
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
            from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
        except ImportError as exc:
            raise ValueError("--otlp-traces-endpoint needs OpenTelemetry: pip install 'qvl[otel]' "
                             f"({exc})") from None
        if provider is None:
            if not endpoint:
                raise ValueError("RequestTracer needs an OTLP endpoint or a TracerProvider")
            try:
                exporter = _exporter(endpoint)
            except ImportError as exc:
                raise ValueError(f"the OTLP exporter is missing: pip install 'qvl[otel]' ({exc})") from None
            provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
            provider.add_span_processor(BatchSpanProcessor(exporter))
            self._owned = True
        else:
            self._owned = False
        self.provider = provider
        self.tracer = provider.get_tracer("qvl")
        self.propagator = TraceContextTextMapPropagator()

    def record(self, run, obs, end: float, cost_usd: float | None = None) -> str:
        """Write the spans of finished RequestRun `run` (observations `obs`, `end` = time.monotonic() at
        finish); returns the trace id (32 hex digits)."""
        from opentelemetry import trace
        from opentelemetry.trace import SpanKind, Status, StatusCode

        shift = time.time() - time.monotonic()

        def mono_ns(t: float) -> int:
            return int((t + shift) * 1e9)

        parent = self.propagator.extract(obs.trace_headers) if obs.trace_headers else None
        ttft = None if run.first_token is None else run.first_token - run.arrival
        attrs = {"gen_ai.request.id": run.request_id, "gen_ai.response.model": run.ctx.served_model_name,
                 "gen_ai.usage.prompt_tokens": run.prompt_tokens,
                 "gen_ai.usage.completion_tokens": run.completion_tokens,
                 "gen_ai.latency.e2e": end - run.arrival, "http.response.status_code": run.status,
                 "qvl.route": run.kind, "qvl.images": run.images, "qvl.videos": run.videos,
                 "qvl.visual_tokens": obs.visual_tokens, "qvl.cached_tokens": run.cached_tokens}
        if ttft is not None:
            attrs["gen_ai.latency.time_to_first_token"] = ttft
        if run.queue_time is not None:
            attrs["gen_ai.latency.time_in_queue"] = run.queue_time
        if cost_usd is not None:
            attrs["qvl.cost_usd"] = cost_usd
        reasons = [run.finish_reasons[i] for i in sorted(run.finish_reasons)]
        if reasons:
            attrs["gen_ai.response.finish_reasons"] = reasons
        root = self.tracer.start_span("qvl.request", context=parent, kind=SpanKind.SERVER,
                                      start_time=mono_ns(run.arrival), attributes=attrs)
        inside = trace.set_span_in_context(root)
        children = [(name, mono_ns(t0), mono_ns(t1)) for name, t0, t1 in obs.phases]
        e = obs.engine
        for name, t0, t1 in (("qvl.queue", e.arrival, e.first_scheduled), ("qvl.prefill", e.first_scheduled,
                             e.first_token), ("qvl.decode", e.first_token, e.finished)):
            if t0 is not None and t1 is not None:
                children.append((name, int(t0 * 1e9), int(t1 * 1e9)))
        for name, t0, t1 in sorted(children, key=lambda c: c[1]):
            self.tracer.start_span(name, context=inside, start_time=t0).end(end_time=max(t0, t1))
        if run.status != 200:
            root.set_status(Status(StatusCode.ERROR, run.error or f"status {run.status}"))
        root.end(end_time=mono_ns(end))
        return format(root.get_span_context().trace_id, "032x")

    def shutdown(self) -> None:
        """Flush what is queued (only a provider this tracer built is shut down)."""
        if self._owned:
            self.provider.shutdown()
        else:
            self.provider.force_flush()
