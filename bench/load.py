"""Load test for a running `qvl serve`: N concurrent streaming chat clients share M requests.

    python bench/load.py --url http://127.0.0.1:8000 --clients 32 --requests 500 [--image 224x224]

Each client loops: POST /v1/chat/completions with stream=true and stream_options.include_usage, reads
the SSE stream to `data: [DONE]`, records time to first content token (TTFT) and total latency, and
takes the next request until M have been sent. A request fails on a non-200 status, an error chunk, a
missing [DONE], or a transport error. Prints throughput (requests/s, output tokens/s), p50/p95/p99 of
TTFT and latency, and the failures (first few messages); `--json` also writes the numbers as JSON.
Exit code 1 when any request failed.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import statistics
import sys
import time

import httpx


def _percentile(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def _image_url(size: str) -> str:
    from PIL import Image

    w, h = (int(x) for x in size.lower().split("x"))
    img = Image.new("RGB", (w, h))
    img.putdata([((x * 7) % 256, (y * 5) % 256, ((x + y) * 3) % 256) for y in range(h) for x in range(w)])
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _payload(args, i: int, image: str | None) -> dict:
    text = f"{args.prompt} (request {i})"
    content: list | str = text
    if image is not None:
        content = [{"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": text}]
    body = {"model": args.model, "messages": [{"role": "user", "content": content}],
            "max_tokens": args.max_tokens, "temperature": args.temperature, "stream": True,
            "stream_options": {"include_usage": True}}
    if args.ignore_eos:
        body["ignore_eos"] = True
    body.update(args.extra_body)
    return body


async def _one(client: httpx.AsyncClient, args, i: int, image: str | None, res: dict) -> None:
    start = time.perf_counter()
    ttft = None
    done = False
    tokens = 0
    try:
        async with client.stream("POST", "/v1/chat/completions", json=_payload(args, i, image)) as r:
            if r.status_code != 200:
                body = (await r.aread()).decode(errors="replace")
                raise RuntimeError(f"HTTP {r.status_code}: {body[:200]}")
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    raise RuntimeError(f"error chunk: {chunk['error'].get('message')}")
                if ttft is None and any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                    ttft = time.perf_counter() - start
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
        if not done:
            raise RuntimeError("stream ended without [DONE]")
        res["latency"].append(time.perf_counter() - start)
        if ttft is not None:
            res["ttft"].append(ttft)
        res["tokens"] += tokens
    except Exception as exc:  # noqa: BLE001 - every failure is counted and reported
        res["failures"].append(f"request {i}: {type(exc).__name__}: {exc}")


async def run(args) -> dict:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    image = _image_url(args.image) if args.image else None
    res = {"latency": [], "ttft": [], "tokens": 0, "failures": []}
    counter = iter(range(args.requests))
    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
    timeout = httpx.Timeout(args.timeout)
    async with httpx.AsyncClient(base_url=args.url, headers=headers, limits=limits, timeout=timeout) as client:
        if args.model is None:
            r = await client.get("/v1/models")
            r.raise_for_status()
            args.model = r.json()["data"][0]["id"]

        async def worker():
            for i in counter:
                await _one(client, args, i, image, res)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(args.clients)))
        res["wall"] = time.perf_counter() - start
    return res


def summarize(args, res: dict) -> dict:
    ok = len(res["latency"])
    wall = res["wall"]
    return {
        "clients": args.clients, "requests": args.requests, "succeeded": ok, "failed": len(res["failures"]),
        "wall_s": round(wall, 3), "requests_per_s": round(ok / wall, 3) if wall else None,
        "output_tokens": res["tokens"], "output_tokens_per_s": round(res["tokens"] / wall, 2) if wall else None,
        **{f"ttft_p{p}_ms": round(_percentile(res["ttft"], p) * 1000, 1) for p in (50, 95, 99)},
        **{f"latency_p{p}_ms": round(_percentile(res["latency"], p) * 1000, 1) for p in (50, 95, 99)},
        "ttft_mean_ms": round(statistics.fmean(res["ttft"]) * 1000, 1) if res["ttft"] else None,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--api-key", default=os.environ.get("QVL_API_KEY"))
    p.add_argument("--model", default=None, help="model id (default: the first of /v1/models)")
    p.add_argument("--clients", type=int, default=32, help="concurrent streaming clients (N)")
    p.add_argument("--requests", type=int, default=256, help="total requests shared by the clients (M)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--ignore-eos", action="store_true", help="always generate max_tokens tokens")
    p.add_argument("--prompt", default="Describe the picture in one sentence.")
    p.add_argument("--image", default=None, metavar="WxH", help="attach a generated WxH PNG to every request")
    p.add_argument("--extra-body", type=json.loads, default={}, metavar="JSON",
                   help='extra request fields, e.g. \'{"top_k": 5}\'')
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--json", default=None, metavar="OUT.json", help="also write the summary here")
    args = p.parse_args(argv)

    res = asyncio.run(run(args))
    s = summarize(args, res)
    print(f"{s['succeeded']}/{s['requests']} ok, {s['failed']} failed, {s['clients']} clients, "
          f"wall {s['wall_s']:.2f}s")
    print(f"throughput: {s['requests_per_s']} req/s, {s['output_tokens_per_s']} output tok/s "
          f"({s['output_tokens']} tokens)")
    print(f"TTFT    p50 {s['ttft_p50_ms']} ms  p95 {s['ttft_p95_ms']} ms  p99 {s['ttft_p99_ms']} ms")
    print(f"latency p50 {s['latency_p50_ms']} ms  p95 {s['latency_p95_ms']} ms  p99 {s['latency_p99_ms']} ms")
    for f in res["failures"][:10]:
        print("  FAIL", f)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(s, fh, indent=1)
    return 1 if res["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
