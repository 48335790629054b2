"""How long another client's stream pauses while the server refuses a large body (issue #9, item 3).

Starts `python -m qvl.server.launch` (the demo checkpoint unless --model) from the tree in PYTHONPATH, runs
one long greedy stream, and meanwhile sends chat requests whose one text message is SIZE megabytes. For
each it prints the time to the refusal, the longest gap between the stream's chunks while it was
being refused next to the stream's median gap, and the server's RSS before and 0.5 s after (Linux).

  PYTHONPATH=$PWD python bench/server_bodies.py --sizes 4,50 [--model DIR] [--timeout 200]
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

import httpx


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return round(kb / 1024, 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--sizes", default="4,50", help="body sizes in MB, comma-separated")
    ap.add_argument("--timeout", type=float, default=200.0, help="seconds to wait for one refusal")
    args = ap.parse_args()
    port = _port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "qvl.server.launch", *([args.model] if args.model else []), "--port", str(port),
           "--device", "cpu", "--dtype", "float32", "--threads", "1", "--max-model-len", "4096",
           "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        arrivals: list[float] = []
        stop = threading.Event()

        def streamer():
            body = {"messages": [{"role": "user", "content": "Talk."}], "max_tokens": 3900, "ignore_eos": True,
                    "stream": True}
            while not stop.is_set():
                with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as r:
                    for line in r.iter_lines():
                        if line.startswith("data: "):
                            arrivals.append(time.monotonic())
                        if stop.is_set():
                            return

        t = threading.Thread(target=streamer, daemon=True)
        t.start()
        time.sleep(3.0)
        for size in [float(s) for s in args.sizes.split(",")]:
            text = "word " * int(size * 1e6 / 5)
            raw = json.dumps({"messages": [{"role": "user", "content": text}], "max_tokens": 4}).encode()
            rss0 = _rss_mb(proc.pid)
            t0 = time.monotonic()
            try:
                r = httpx.post(url + "/v1/chat/completions", content=raw, timeout=args.timeout,
                               headers={"Content-Type": "application/json"})
                status = r.status_code
                msg = r.json().get("error", {}).get("message", "")[:100] if status != 200 else ""
            except httpx.TimeoutException:
                status, msg = None, f"no answer within {args.timeout:g} s"
            t1 = time.monotonic()
            time.sleep(0.5)
            window = [b - a for a, b in zip(arrivals, arrivals[1:]) if b >= t0 and a <= t1 + 0.2]
            before = [b - a for a, b in zip(arrivals, arrivals[1:]) if b < t0][-200:]
            print(json.dumps({"body_mb": round(len(raw) / 1e6, 1), "status": status, "refused_in_s": round(t1 - t0, 2),
                              "stream_max_gap_s": round(max(window, default=t1 - t0), 3),
                              "stream_median_gap_s": round(statistics.median(before), 4) if before else None,
                              "server_rss_mb": [rss0, _rss_mb(proc.pid)],
                              "message": msg}), flush=True)
            time.sleep(1.0)
        stop.set()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


if __name__ == "__main__":
    main()
