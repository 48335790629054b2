"""Request logs, cost, vLLM-compatible metrics and traces, on real uvicorn servers over a tiny checkpoint.

A `qvl serve` process with --log-format json --log-client-addr --cost-per-hour --metrics-compat vllm: one
JSON object per finished request whose token counts equal the response's usage, no prompt text or image
bytes in the log, the cost counters moving (the attributed one by exactly the logged cost_usd), the
`vllm:` series present with Prometheus types, process_* / python_* collectors. An in-process server with
an OpenTelemetry SDK TracerProvider on the in-memory exporter: one qvl.request span per request, a child
of the caller's W3C traceparent, with media_fetch / preprocess / queue / prefill / decode children.
"""
from __future__ import annotations

import json
import time

import httpx
import pytest

from test_server import ServerProcess, app_server, metric, metrics_values, png_data_url

openai = pytest.importorskip("openai")

PRICE = 36.0          # USD per hour: 1 cent per second


def _types(text: str) -> dict[str, str]:
    return {ln.split()[2]: ln.split()[3] for ln in text.splitlines() if ln.startswith("# TYPE ")}


def _json_lines(log: str) -> list[dict]:
    return [json.loads(ln) for ln in log.splitlines() if ln.startswith("{")]


@pytest.fixture(scope="module")
def json_server(tiny_ckpt, tmp_path_factory):
    log = tmp_path_factory.mktemp("ops_log") / "server.log"
    srv = ServerProcess(tiny_ckpt, ["--served-model-name", "tiny", "--max-model-len", "512", "--log-format", "json",
                                    "--log-client-addr", "--cost-per-hour", str(PRICE), "--metrics-compat", "vllm"],
                        log)
    yield srv
    assert srv.stop() == 0
    assert "Traceback" not in srv.log_path.read_text()


def test_json_log_cost_and_vllm_metrics(json_server):
    client = openai.OpenAI(base_url=json_server.url + "/v1", api_key="none", max_retries=0, timeout=120)
    before = metrics_values(httpx.get(json_server.url + "/metrics").text)
    image = png_data_url(56, 56, seed=3)
    chat = client.chat.completions.create(model="tiny", max_tokens=7, temperature=0, messages=[{
        "role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                    {"type": "text", "text": "secret question text"}]}])
    cmpl = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=5, temperature=0)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", max_tokens=100000, messages=[{"role": "user", "content": "x"}])
    time.sleep(1.2)                                   # the instance cost keeps growing with uptime
    text = httpx.get(json_server.url + "/metrics").text
    after = metrics_values(text)

    records = {r["request_id"]: r for r in _json_lines(json_server.log())}
    rc, rp = records[chat.id], records[cmpl.id]
    for rec, resp, route in ((rc, chat, "/v1/chat/completions"), (rp, cmpl, "/v1/completions")):
        assert rec["route"] == route and rec["status"] == 200 and rec["model"] == "tiny"
        assert rec["input_tokens"] == resp.usage.prompt_tokens
        assert rec["output_tokens"] == resp.usage.completion_tokens
        assert rec["cached_tokens"] == resp.usage.prompt_tokens_details.cached_tokens
        assert rec["finish_reason"] == resp.choices[0].finish_reason
        assert rec["client"].startswith("127.0.0.1:")
        assert rec["ttft_ms"] > 0 and rec["e2e_ms"] >= rec["ttft_ms"] and rec["queue_ms"] >= 0
        assert 0 < rec["inference_time_ms"] <= rec["e2e_ms"] and rec["cost_usd"] > 0
        assert "prompt" not in rec
    assert rc["images"] == 1 and rc["videos"] == 0 and 0 < rc["visual_tokens"] < rc["input_tokens"]
    assert rp["visual_tokens"] == 0 and rp["tpot_ms"] > 0
    failed = [r for r in records.values() if r["status"] == 400]
    assert len(failed) == 1 and ("max_tokens" in failed[0]["error"] or "context" in failed[0]["error"])
    log = json_server.log()
    assert "secret question" not in log and image[30:90] not in log

    # cost: the attributed counter moved by exactly what the log lines say; the instance cost by uptime
    attributed = metric(after, "qvl:cost_usd_attributed_total") - metric(before, "qvl:cost_usd_attributed_total")
    assert attributed == pytest.approx(rc["cost_usd"] + rp["cost_usd"], rel=1e-6)
    assert metric(after, "qvl:cost_usd_total") - metric(before, "qvl:cost_usd_total") >= PRICE / 3600 * 1.0
    assert metric(after, "qvl:engine_busy_seconds_total") > 0

    types = _types(text)
    expect = {"vllm:num_requests_running": "gauge", "vllm:num_requests_waiting": "gauge",
              "vllm:kv_cache_usage_perc": "gauge", "vllm:gpu_cache_usage_perc": "gauge",
              "qvl:gpu_cache_usage_perc": "gauge", "vllm:gpu_prefix_cache_hit_rate": "gauge",
              "vllm:prompt_tokens_total": "counter", "vllm:generation_tokens_total": "counter",
              "vllm:request_success_total": "counter", "vllm:prefix_cache_queries_total": "counter",
              "vllm:gpu_prefix_cache_hits_total": "counter", "vllm:time_to_first_token_seconds": "histogram",
              "vllm:inter_token_latency_seconds": "histogram", "vllm:time_per_output_token_seconds": "histogram",
              "vllm:e2e_request_latency_seconds": "histogram", "qvl:cost_usd_total": "counter",
              "process_cpu_seconds_total": "counter", "process_resident_memory_bytes": "gauge", "python_info": "gauge"}
    for name, kind in expect.items():
        assert types.get(name) == kind, (name, types.get(name))
    for name in ("prompt_tokens_total", "generation_tokens_total"):
        assert metric(after, f"vllm:{name}") - metric(before, f"vllm:{name}") == \
            metric(after, f"qvl:{name}") - metric(before, f"qvl:{name}")
    assert metric(after, "vllm:generation_tokens_total") - metric(before, "vllm:generation_tokens_total") == \
        chat.usage.completion_tokens + cmpl.usage.completion_tokens
    assert metric(after, "vllm:e2e_request_latency_seconds_count") - \
        metric(before, "vllm:e2e_request_latency_seconds_count") == 2
    assert metric(after, "vllm:kv_cache_usage_perc") == metric(after, "vllm:gpu_cache_usage_perc")


@pytest.fixture(scope="module")
def traced_server(tiny_ckpt):
    """create_app + observe.install with an SDK TracerProvider on the in-memory exporter, under uvicorn in a
    thread; the JSON log (with --log-prompts) goes to a list."""
    import io

    pytest.importorskip("opentelemetry.sdk")
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from qvl.config import ServeOptions
    from qvl.engine.async_engine import AsyncEngine
    from qvl.engine.llm_engine import LLMEngine
    from qvl.server import observe
    from qvl.server.app import create_app

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    engine = AsyncEngine(engine=LLMEngine.from_pretrained(str(tiny_ckpt), device="cpu", dtype="float32",
                                                          max_model_len=512))
    app = create_app(engine, served_model_name="tiny")
    stream = io.StringIO()
    observe.install(app, app.state.ctx, ServeOptions(log_format="json", log_prompts=True),
                    tracer_provider=provider, log_stream=stream)
    with app_server(app, "test-uvicorn-otel") as (url, _):
        yield url, exporter, stream


def test_trace_with_child_spans_and_traceparent(traced_server):
    url, exporter, stream = traced_server
    trace_id, parent_id = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
    body = {"model": "tiny", "max_tokens": 6, "temperature": 0, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": png_data_url(56, 56, seed=5)}},
        {"type": "text", "text": "describe"}]}]}
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=120,
                   headers={"traceparent": f"00-{trace_id}-{parent_id}-01"})
    assert r.status_code == 200, r.text
    r2 = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 3}, timeout=120)
    assert r2.status_code == 200

    spans = exporter.get_finished_spans()
    roots = [s for s in spans if s.name == "qvl.request"]
    assert len(roots) == 2
    root = next(s for s in roots if s.attributes["gen_ai.request.id"] == r.json()["id"])
    assert format(root.context.trace_id, "032x") == trace_id            # the caller's trace continues
    assert format(root.parent.span_id, "016x") == parent_id
    assert root.attributes["gen_ai.usage.prompt_tokens"] == r.json()["usage"]["prompt_tokens"]
    assert root.attributes["gen_ai.usage.completion_tokens"] == r.json()["usage"]["completion_tokens"]
    children = {s.name: s for s in spans if s.parent is not None and s.parent.span_id == root.context.span_id}
    assert set(children) == {"qvl.media_fetch", "qvl.preprocess", "qvl.queue", "qvl.prefill", "qvl.decode"}
    for s in children.values():
        assert root.start_time <= s.start_time <= s.end_time <= root.end_time + 1_000_000
    assert children["qvl.media_fetch"].end_time <= children["qvl.preprocess"].start_time
    assert children["qvl.prefill"].end_time <= children["qvl.decode"].start_time + 1
    other = next(s for s in roots if s is not root)
    assert other.parent is None and format(other.context.trace_id, "032x") != trace_id

    lines = [json.loads(x) for x in stream.getvalue().splitlines()]
    rec = next(x for x in lines if x["request_id"] == r.json()["id"])
    assert rec["trace_id"] == trace_id
    assert "describe" in rec["prompt"] and "base64" not in rec["prompt"] and "client" not in rec


def test_engine_busy_time_is_split_over_requests(tiny_ckpt):
    """Each step's seconds go to its sequences by tokens scheduled: the requests' engine_time adds up to the
    engine's busy seconds, and a long prompt is charged more than a short one run alongside it."""
    from qvl.engine.llm_engine import LLMEngine
    from qvl.multimodal.prompt import ProcessedPrompt
    from qvl.sampling_params import SamplingParams

    eng = LLMEngine.from_pretrained(str(tiny_ckpt), device="cpu", dtype="float32", max_model_len=512)
    sp = SamplingParams(temperature=0, max_tokens=4, min_tokens=4)
    eng.add_request("long", ProcessedPrompt.from_token_ids(list(range(3, 203))), sp)
    eng.add_request("short", ProcessedPrompt.from_token_ids([5, 6, 7]), sp)
    done = {}
    while eng.has_unfinished_requests():
        for o in eng.step():
            if o.finished:
                done[o.request_id] = o.metrics.engine_time
    busy = eng.stats()["busy_time_s"]
    assert busy > 0 and sum(done.values()) == pytest.approx(busy, rel=1e-9)
    assert done["long"] > done["short"] > 0


def test_otlp_endpoint_picks_the_exporter():
    """--otlp-traces-endpoint: a /v1/traces URL is OTLP/HTTP, anything else OTLP/gRPC; nothing is sent until a
    request finishes, so building and shutting down a tracer needs no collector."""
    pytest.importorskip("opentelemetry.exporter.otlp.proto.grpc.trace_exporter")   # qvl[otel], not [test]
    pytest.importorskip("opentelemetry.exporter.otlp.proto.http.trace_exporter")
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GRPC
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HTTP

    from qvl.config import ServeOptions
    from qvl.server.tracing import _exporter

    assert isinstance(_exporter("http://127.0.0.1:4318/v1/traces"), HTTP)
    assert isinstance(_exporter("http://127.0.0.1:4317"), GRPC)
    with pytest.raises(ValueError, match="otlp_traces_endpoint"):
        ServeOptions(otlp_traces_endpoint="collector:4317")
