"""One log record per finished request: its fields, and the JSON line `--log-format json` writes.

Fields (milliseconds unless named otherwise; None when the request never got that far):
  time, request_id, model, route, status, finish_reason (one per choice, comma-joined), input_tokens,
  output_tokens, cached_tokens, images, videos, visual_tokens, queue_ms (engine waiting queue), ttft_ms
  (arrival at the frontend to the first token: media download and preprocessing included),
  inference_time_ms (first scheduled to finished: prefill + decode in the engine), tpot_ms (first to last
  token over output_tokens - 1), e2e_ms, cost_usd (with --cost-per-hour), error (on failure), trace_id
  (with tracing), client (with --log-client-addr), prompt (with --log-prompts: the rendered prompt
  text, one placeholder per image/video; never media bytes).
input_tokens / output_tokens / cached_tokens are the response's `usage` numbers.

Knows nothing about HTTP or OpenTelemetry; observe.py calls it.
"""
from __future__ import annotations

import datetime
import json
import logging
import sys
from typing import Any

ROUTES = {"chat": "/v1/chat/completions", "completion": "/v1/completions"}
REQUEST_LOGGER = "qvl.requests"


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 3)


def build_record(run, obs, end: float, *, cost_usd: float | None = None, log_prompts: bool = False,
                 log_client_addr: bool = False, trace_id: str | None = None) -> dict[str, Any]:
    """The record of RequestRun `run` (qvl.server.serving) with its observations `obs` (observe.RequestObs);
    `end`: time.monotonic() at finish."""
    ttft = None if run.first_token is None else run.first_token - run.arrival
    tpot = None
    if run.first_token is not None and run.last_token is not None and run.completion_tokens > 1:
        tpot = (run.last_token - run.first_token) / (run.completion_tokens - 1)
    reasons = [run.finish_reasons.get(i, "abort") for i in range(run.num_choices)]
    rec: dict[str, Any] = {
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds"),
        "request_id": run.request_id, "model": run.ctx.served_model_name,
        "route": ROUTES.get(run.kind, run.kind), "status": run.status,
        "finish_reason": ",".join(reasons) if reasons else None,
        "input_tokens": run.prompt_tokens, "output_tokens": run.completion_tokens,
        "cached_tokens": run.cached_tokens, "images": run.images, "videos": run.videos,
        "visual_tokens": obs.visual_tokens, "queue_ms": _ms(run.queue_time), "ttft_ms": _ms(ttft),
        "inference_time_ms": _ms(obs.inference_time), "tpot_ms": _ms(tpot), "e2e_ms": _ms(end - run.arrival),
    }
    if cost_usd is not None:
        rec["cost_usd"] = cost_usd
    if run.error:
        rec["error"] = run.error
    if trace_id is not None:
        rec["trace_id"] = trace_id
    if log_client_addr:
        rec["client"] = obs.client
    if log_prompts:
        rec["prompt"] = obs.prompts[0] if len(obs.prompts) == 1 else obs.prompts
    return rec


def json_line(record: dict) -> str:
    return json.dumps(record, ensure_ascii=False, separators=(",", ":"))


def request_logger(stream=None) -> logging.Logger:
    """The `qvl.requests` logger, writing each message as it is (one JSON object per line) to `stream`
    (default stderr); it does not propagate, so the server's log format never wraps the JSON."""
    log = logging.getLogger(REQUEST_LOGGER)
    if not any(getattr(h, "_qvl_requests", False) for h in log.handlers):
        h = logging.StreamHandler(stream or sys.stderr)
        h.setFormatter(logging.Formatter("%(message)s"))
        h._qvl_requests = True
        log.addHandler(h)
    log.setLevel(logging.INFO)
    log.propagate = False
    return log
