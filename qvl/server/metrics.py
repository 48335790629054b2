"""Prometheus metrics for the server, named like vLLM's with a `qvl:` prefix, in an own registry.

Owns: per-request observations (the server records them as a request finishes: finish reason, token
counts, TTFT measured from arrival at the frontend so it includes media download and preprocessing,
inter-token latency, end-to-end latency, queue time) and a collector that reads `engine.stats()` at
scrape time for the gauges (running / waiting / KV-cache usage and free/total blocks) and the engine's
cumulative counters (prefix cache, encoder cache, preemptions). Knows nothing about HTTP.

Engine stats keys read (LLMEngine.stats(); a missing one is simply not exported): num_running,
num_waiting, kv_blocks_free, kv_blocks_total, kv_cache_usage, prefix_cache_queries, prefix_cache_hits,
encoder_cache_queries, encoder_cache_hits, num_preemptions.
"""
from __future__ import annotations

import logging
from typing import Callable

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, disable_created_metrics,
                               generate_latest)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

logger = logging.getLogger("qvl.server")

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
    """Reads engine.stats() once per scrape."""

    def __init__(self, stats_fn: Callable[[], dict], model_name: str):
        self.stats_fn = stats_fn
        self.model_name = model_name

    def describe(self):
        return []

    def collect(self):
        try:
            s = self.stats_fn() or {}
        except Exception:  # a broken stats() must not break /metrics
            logger.exception("engine.stats() failed")
            return
        labels = (["model_name"], [self.model_name])

        def gauge(name, doc, value):
            if value is not None:
                g = GaugeMetricFamily(name, doc, labels=labels[0])
                g.add_metric(labels[1], float(value))
                yield g

        def counter(name, doc, value):
            if value is not None:
                c = CounterMetricFamily(name, doc, labels=labels[0])
                c.add_metric(labels[1], float(value))
                yield c

        yield from gauge("qvl:num_requests_running", "Requests in the running batch.", s.get("num_running"))
        yield from gauge("qvl:num_requests_waiting", "Requests waiting to be scheduled.", s.get("num_waiting"))
        yield from gauge("qvl:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0..1).",
                         s.get("kv_cache_usage"))
        yield from gauge("qvl:kv_cache_blocks_total", "KV-cache blocks in the pool.", s.get("kv_blocks_total"))
        yield from gauge("qvl:kv_cache_blocks_free", "KV-cache blocks free (cached-but-unused count as free).",
                         s.get("kv_blocks_free"))
        yield from counter("qvl:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                           s.get("prefix_cache_queries"))
        yield from counter("qvl:prefix_cache_hits", "Prompt tokens found in the prefix cache.",
                           s.get("prefix_cache_hits"))
        yield from counter("qvl:mm_cache_queries", "Vision items looked up in the encoder cache.",
                           s.get("encoder_cache_queries"))
        yield from counter("qvl:mm_cache_hits", "Vision items found in the encoder cache.",
                           s.get("encoder_cache_hits"))
        yield from counter("qvl:num_preemptions", "Sequences preempted (blocks freed, recomputed later).",
                           s.get("num_preemptions"))


class ServerMetrics:
    def __init__(self, model_name: str, stats_fn: Callable[[], dict] | None = None, max_model_len: int = 32768):
        self.model_name = model_name
        disable_created_metrics()   # no *_created series (process-wide; vLLM does the same)
        self.registry = CollectorRegistry()
        r, lab = self.registry, ["model_name"]
        self.request_success = Counter("qvl:request_success", "Finished requests by finish reason.",
                                       lab + ["finished_reason"], registry=r)
        self.request_failure = Counter("qvl:request_failure", "Requests answered with an error, by status.",
                                       lab + ["status"], registry=r)
        self.prompt_tokens = Counter("qvl:prompt_tokens", "Prompt tokens processed (incl. vision pads).",
                                     lab, registry=r)
        self.generation_tokens = Counter("qvl:generation_tokens", "Tokens generated.", lab, registry=r)
        self.ttft = Histogram("qvl:time_to_first_token_seconds", "Arrival to first token (incl. media).",
                              lab, buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("qvl:inter_token_latency_seconds", "Time between output tokens.", lab,
                             buckets=_ITL_BUCKETS, registry=r)
        self.e2e = Histogram("qvl:e2e_request_latency_seconds", "Arrival to last token.", lab,
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.queue = Histogram("qvl:request_queue_time_seconds", "Time in the engine's waiting queue.", lab,
                               buckets=_LATENCY_BUCKETS, registry=r)
        self.prompt_len = Histogram("qvl:request_prompt_tokens", "Prompt length per request.", lab,
                                    buckets=_1_2_5(max_model_len), registry=r)
        self.gen_len = Histogram("qvl:request_generation_tokens", "Generated tokens per request.", lab,
                                 buckets=_1_2_5(max_model_len), registry=r)
        if stats_fn is not None:
            r.register(_EngineCollector(stats_fn, model_name))

    def observe_finished(self, *, finish_reasons: list[str], prompt_tokens: int, completion_tokens: int,
                         ttft: float | None, e2e: float, itls: list[float], queue_time: float | None) -> None:
        m = self.model_name
        for reason in finish_reasons:
            self.request_success.labels(m, reason or "abort").inc()
        self.prompt_tokens.labels(m).inc(prompt_tokens)
        self.generation_tokens.labels(m).inc(completion_tokens)
        self.prompt_len.labels(m).observe(prompt_tokens)
        self.gen_len.labels(m).observe(completion_tokens)
        if ttft is not None:
            self.ttft.labels(m).observe(ttft)
        for x in itls:
            self.itl.labels(m).observe(x)
        self.e2e.labels(m).observe(e2e)
        if queue_time is not None:
            self.queue.labels(m).observe(queue_time)

    def observe_failure(self, status: int) -> None:
        self.request_failure.labels(self.model_name, str(status)).inc()

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
