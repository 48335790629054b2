"""Prometheus metrics for the server, named like vLLM's with a `qvl:` prefix, in an own registry.

Owns: per-request observations (the server records them as a request finishes: finish reason, token
counts, TTFT measured from arrival at the frontend so it includes media download and preprocessing,
inter-token latency, end-to-end latency, queue time), a collector that reads `engine.stats()` at scrape
time for the gauges (running / waiting / KV-cache usage and free/total blocks) and the engine's
cumulative counters (prefix cache, encoder cache, preemptions, busy seconds), the cost series, and the
process / Python collectors (process_*, python_info, python_gc_*). Knows nothing about HTTP.

Names: KV usage is exported under vLLM's current name (`kv_cache_usage_perc`) and its older one
(`gpu_cache_usage_perc`, still read by vLLM's production-stack router), same value. `compat="vllm"`
also exports the `vllm:`-prefixed series vLLM's dashboards, KEDA/HPA recipes and routers read:
num_requests_running / waiting, kv_cache_usage_perc, gpu_cache_usage_perc, (gpu_)prefix_cache_queries /
hits and gpu_prefix_cache_hit_rate, num_preemptions, prompt / generation token counters, request_success,
the TTFT / inter-token (and its older name time_per_output_token) / e2e / queue histograms and the
prompt / generation length histograms. Counters carry the Prometheus `_total` suffix.

Cost (`cost_per_hour`, the instance price in USD): `qvl:cost_usd_total` is what the instance has cost
since the server started (price x uptime; per 1,000 requests or per million tokens on a dashboard by
dividing rates), `qvl:cost_usd_attributed_total` the part attributed to requests (each request's share
of engine-busy time, the `cost_usd` of its log line); their ratio is the utilisation.

Engine stats keys read (LLMEngine.stats(); a missing one is simply not exported): num_running,
num_waiting, kv_blocks_free, kv_blocks_total, kv_cache_usage, prefix_cache_queries, prefix_cache_hits,
encoder_cache_queries, encoder_cache_hits, num_preemptions, busy_time_s.
"""
from __future__ import annotations

import logging
import time
from typing import Callable

from prometheus_client import (CONTENT_TYPE_LATEST, GC_COLLECTOR, PLATFORM_COLLECTOR, PROCESS_COLLECTOR,
                               CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

logger = logging.getLogger("qvl.server")

COMPAT = ("vllm",)
_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                    7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4,
                0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)


def _1_2_5(limit: int) -> list[float]:
    out, m = [], 1
    while True:
        for k in (1, 2, 5):
            if k * m > limit:
                return out
            out.append(float(k * m))
        m *= 10


class _EngineCollector:
    """Reads engine.stats() once per scrape; yields the `qvl:` series and, per compat prefix, vLLM's."""

    def __init__(self, stats_fn: Callable[[], dict], model_name: str, compat: tuple[str, ...] = (),
                 cost_per_hour: float | None = None):
        self.stats_fn = stats_fn
        self.model_name = model_name
        self.compat = compat
        self.cost_per_hour = cost_per_hour
        self.started = time.monotonic()

    def describe(self):
        return []

    def _family(self, kind, name, doc, value):
        if value is None:
            return []
        f = (GaugeMetricFamily if kind == "gauge" else CounterMetricFamily)(name, doc, labels=["model_name"])
        f.add_metric([self.model_name], float(value))
        return [f]

    def collect(self):
        try:
            s = self.stats_fn() or {}
        except Exception:  # a broken stats() must not break /metrics
            logger.exception("engine.stats() failed")
            return
        g = lambda name, doc, key: self._family("gauge", name, doc, s.get(key))     # noqa: E731
        c = lambda name, doc, key: self._family("counter", name, doc, s.get(key))   # noqa: E731
        usage = "Fraction of KV-cache blocks in use (0..1)."
        yield from g("qvl:num_requests_running", "Requests in the running batch.", "num_running")
        yield from g("qvl:num_requests_waiting", "Requests waiting to be scheduled.", "num_waiting")
        yield from g("qvl:kv_cache_usage_perc", usage, "kv_cache_usage")
        yield from g("qvl:gpu_cache_usage_perc", usage + " Older name of kv_cache_usage_perc.", "kv_cache_usage")
        yield from g("qvl:kv_cache_blocks_total", "KV-cache blocks in the pool.", "kv_blocks_total")
        yield from g("qvl:kv_cache_blocks_free", "KV-cache blocks free (cached-but-unused count as free).",
                     "kv_blocks_free")
        yield from c("qvl:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", "prefix_cache_queries")
        yield from c("qvl:prefix_cache_hits", "Prompt tokens found in the prefix cache.", "prefix_cache_hits")
        yield from c("qvl:mm_cache_queries", "Vision items looked up in the encoder cache.", "encoder_cache_queries")
        yield from c("qvl:mm_cache_hits", "Vision items found in the encoder cache.", "encoder_cache_hits")
        yield from c("qvl:num_preemptions", "Sequences preempted (blocks freed, recomputed later).", "num_preemptions")
        yield from c("qvl:engine_busy_seconds", "Seconds the engine spent in steps that ran sequences.",
                     "busy_time_s")
        if self.cost_per_hour is not None:
            spent = self.cost_per_hour * (time.monotonic() - self.started) / 3600.0
            yield from self._family("counter", "qvl:cost_usd", "What the instance has cost since the server "
                                    "started (--cost-per-hour x uptime), USD.", spent)
        for p in self.compat:
            yield from g(f"{p}:num_requests_running", "Requests in the running batch.", "num_running")
            yield from g(f"{p}:num_requests_waiting", "Requests waiting to be scheduled.", "num_waiting")
            yield from g(f"{p}:kv_cache_usage_perc", usage, "kv_cache_usage")
            yield from g(f"{p}:gpu_cache_usage_perc", usage + " Deprecated vLLM name.", "kv_cache_usage")
            for old in ("", "gpu_"):
                yield from c(f"{p}:{old}prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                             "prefix_cache_queries")
                yield from c(f"{p}:{old}prefix_cache_hits", "Prompt tokens found in the prefix cache.",
                             "prefix_cache_hits")
            q, h = s.get("prefix_cache_queries"), s.get("prefix_cache_hits")
            if q is not None and h is not None:
                yield from self._family("gauge", f"{p}:gpu_prefix_cache_hit_rate", "Prefix-cache hit rate "
                                        "since start (0..1).", h / q if q else 0.0)
            yield from c(f"{p}:num_preemptions", "Sequences preempted.", "num_preemptions")


class _RequestSeries:
    """The per-request counters and histograms under one prefix."""

    def __init__(self, p: str, r: CollectorRegistry, max_model_len: int):
        lab = ["model_name"]
        self.request_success = Counter(f"{p}:request_success", "Finished requests by finish reason.",
                                       lab + ["finished_reason"], registry=r)
        self.prompt_tokens = Counter(f"{p}:prompt_tokens", "Prompt tokens processed (incl. vision pads).",
                                     lab, registry=r)
        self.generation_tokens = Counter(f"{p}:generation_tokens", "Tokens generated.", lab, registry=r)
        self.ttft = Histogram(f"{p}:time_to_first_token_seconds", "Arrival to first token (incl. media).",
                              lab, buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = [Histogram(f"{p}:inter_token_latency_seconds", "Time between output tokens.", lab,
                              buckets=_ITL_BUCKETS, registry=r)]
        if p != "qvl":          # vLLM's older name of the same histogram, still on many dashboards
            self.itl.append(Histogram(f"{p}:time_per_output_token_seconds", "Time between output tokens "
                                      "(older name of inter_token_latency_seconds).", lab,
                                      buckets=_ITL_BUCKETS, registry=r))
        self.e2e = Histogram(f"{p}:e2e_request_latency_seconds", "Arrival to last token.", lab,
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.queue = Histogram(f"{p}:request_queue_time_seconds", "Time in the engine's waiting queue.", lab,
                               buckets=_LATENCY_BUCKETS, registry=r)
        self.prompt_len = Histogram(f"{p}:request_prompt_tokens", "Prompt length per request.", lab,
                                    buckets=_1_2_5(max_model_len), registry=r)
        self.gen_len = Histogram(f"{p}:request_generation_tokens", "Generated tokens per request.", lab,
                                 buckets=_1_2_5(max_model_len), registry=r)

    def observe(self, m: str, finish_reasons, prompt_tokens, completion_tokens, ttft, e2e, itls, queue_time):
        for reason in finish_reasons:
            self.request_success.labels(m, reason or "abort").inc()
        self.prompt_tokens.labels(m).inc(prompt_tokens)
        self.generation_tokens.labels(m).inc(completion_tokens)
        self.prompt_len.labels(m).observe(prompt_tokens)
        self.gen_len.labels(m).observe(completion_tokens)
        if ttft is not None:
            self.ttft.labels(m).observe(ttft)
        for h in self.itl:
            child = h.labels(m)
            for x in itls:
                child.observe(x)
        self.e2e.labels(m).observe(e2e)
        if queue_time is not None:
            self.queue.labels(m).observe(queue_time)


class ServerMetrics:
    def __init__(self, model_name: str, stats_fn: Callable[[], dict] | None = None, max_model_len: int = 32768,
                 *, compat: str | None = None, cost_per_hour: float | None = None):
        if compat is not None and compat not in COMPAT:
            raise ValueError(f"metrics compat must be one of {', '.join(COMPAT)} or None, got {compat!r}")
        self.model_name = model_name
        self.cost_per_hour = cost_per_hour
        disable_created_metrics()   # no *_created series (process-wide; vLLM does the same)
        self.registry = CollectorRegistry()
        r = self.registry
        for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):   # process_*, python_*
            r.register(collector)
        self.request_failure = Counter("qvl:request_failure", "Requests answered with an error, by status.",
                                       ["model_name", "status"], registry=r)
        prefixes = ("qvl",) + ((compat,) if compat else ())
        self.series = [_RequestSeries(p, r, max_model_len) for p in prefixes]
        self.cost_attributed = None
        if cost_per_hour is not None:
            self.cost_attributed = Counter("qvl:cost_usd_attributed", "Cost attributed to finished requests "
                                           "(each one's share of engine-busy time), USD.", ["model_name"], registry=r)
        if stats_fn is not None:
            r.register(_EngineCollector(stats_fn, model_name, prefixes[1:], cost_per_hour))

    def observe_finished(self, *, finish_reasons: list[str], prompt_tokens: int, completion_tokens: int,
                         ttft: float | None, e2e: float, itls: list[float], queue_time: float | None) -> None:
        for s in self.series:
            s.observe(self.model_name, finish_reasons, prompt_tokens, completion_tokens, ttft, e2e, itls, queue_time)

    def observe_failure(self, status: int) -> None:
        self.request_failure.labels(self.model_name, str(status)).inc()

    def request_cost(self, engine_seconds: float) -> float | None:
        """The USD share of a request that kept the engine busy `engine_seconds` (None without a price); it is
        added to qvl:cost_usd_attributed_total."""
        if self.cost_per_hour is None:
            return None
        usd = self.cost_per_hour * engine_seconds / 3600.0
        self.cost_attributed.labels(self.model_name).inc(usd)
        return usd

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
