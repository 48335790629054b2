"""Offline jobs three ways, same run, same requests: `qvl batch` vs `qvl serve` with 16 concurrent clients
vs transformers one by one.

    python bench/batch.py                        # the shipped demo checkpoint, 200 image requests, CPU
    python bench/batch.py --model DIR --device cuda --requests 200 --new-tokens 64

Each request is a chat turn with its own random --image-size PNG (a file beside the JSONL, referenced by
a relative path) and a question; eos is banned (min_tokens = max_tokens) so each yields exactly
--new-tokens. Output tok/s = generated tokens / wall time, model load excluded everywhere:
  batch        qvl.batch.run_job over the JSONL (parse, media, preprocessing, engine, result lines);
  server       `python -m qvl.server.launch` (a subprocess, same engine flags), then --clients threads
               posting the same bodies to /v1/chat/completions until all are answered;
  transformers Qwen2VLForConditionalGeneration.generate per request, inputs from transformers'
               Qwen2VLProcessor on the same image file, on the first --hf-requests requests (its
               per-request cost does not depend on how many there are).
Each side first runs once untimed (warm-up); transformers runs before and after the qvl runs (the mean
of the two is used, as a shared machine's load drifts); qvl runs are repeated (--repeats) and the median
is printed with the ratios. Not a test.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).parent.parent
sys.path.insert(0, str(ROOT))

from qvl.config import DEMO_MODEL, BatchOptions, EngineConfig  # noqa: E402

QUESTION = "Describe this image in detail."


def write_job(folder: Path, n: int, size: int, new: int) -> Path:
    rng = np.random.default_rng(0)
    (folder / "img").mkdir()
    lines = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / "img" / f"{i}.png")
        body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": f"img/{i}.png"}},
                                                          {"type": "text", "text": QUESTION}]}],
                "max_tokens": new, "min_tokens": new, "temperature": 0}
        lines.append(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}))
    path = folder / "job.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def engine_flags(args) -> list[str]:
    out = ["--device", args.device, "--dtype", args.dtype, "--max-model-len", "4096"]
    return out + (["--threads", str(args.threads)] if args.threads else [])


def bench_batch(args, job: Path, folder: Path) -> list[float]:
    from qvl.batch import run_job, serving_context
    from qvl.server.launch import build_engine

    cfg = EngineConfig(model=args.model, device=args.device, dtype=args.dtype, max_model_len=4096,
                       threads=args.threads)
    engine = build_engine(cfg)
    ctx = serving_context(engine, cfg.model_path, job)
    rates = []
    try:
        for k in range(args.repeats + 1):          # run 0 warms up (allocator, kernels) and is not counted
            res = asyncio.run(run_job(ctx, job, folder / f"out{k}.jsonl", BatchOptions(progress=False),
                                      max_num_seqs=cfg.max_num_seqs))
            assert res.ok and res.succeeded == args.requests, res
            if k:
                rates.append(res.generation_tokens / res.elapsed_s)
            print(f"  batch run {k}: {res.generation_tokens} tokens in {res.elapsed_s:.2f} s", file=sys.stderr)
    finally:
        engine.shutdown()
    return rates


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_server(args, job: Path, folder: Path) -> list[float]:
    import httpx

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(folder / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "qvl.server.launch", args.model or str(DEMO_MODEL),
                             "--port", str(port), "--allowed-local-media-path", str(folder), *engine_flags(args),
                             "--served-model-name", "m", "--log-level", "warning"],
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    bodies = []
    for ln in job.read_text().splitlines():
        body = json.loads(ln)["body"]
        part = body["messages"][0]["content"][0]["image_url"]
        part["url"] = str(folder / part["url"])                 # the server takes no relative paths
        bodies.append(body)
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, (folder / "server.log").read_text()
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        rates = []
        for k in range(args.repeats + 1):          # run 0 warms up and is not counted
            todo = list(range(len(bodies)))
            lock = threading.Lock()
            tokens = [0]

            def client():
                with httpx.Client(timeout=600) as c:
                    while True:
                        with lock:
                            if not todo:
                                return
                            i = todo.pop()
                        r = c.post(url + "/v1/chat/completions", json=bodies[i])
                        r.raise_for_status()
                        with lock:
                            tokens[0] += r.json()["usage"]["completion_tokens"]

            t0 = time.perf_counter()
            threads = [threading.Thread(target=client) for _ in range(args.clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            dt = time.perf_counter() - t0
            assert tokens[0] == args.requests * args.new_tokens, tokens[0]
            if k:
                rates.append(tokens[0] / dt)
            print(f"  server run {k}: {tokens[0]} tokens in {dt:.2f} s", file=sys.stderr)
        return rates
    finally:
        proc.terminate()
        proc.wait(60)
        log.close()


def _hf_processor(path: str):
    """transformers' Qwen2VLProcessor with the slow (PIL) image processor: 4.57 wants a video processor,
    which needs torchvision; images never use it, so an empty stand-in is passed (as tests/tiny.py does)."""
    from transformers import AutoTokenizer, Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.processing_qwen2_vl import Qwen2VLProcessor

    tok = AutoTokenizer.from_pretrained(path)
    video_cls = Qwen2VLProcessor.get_possibly_dynamic_module("BaseVideoProcessor")
    return Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor.from_pretrained(path), tokenizer=tok,
                            video_processor=object.__new__(video_cls), chat_template=tok.chat_template)


def bench_hf(args, folder: Path) -> float:
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    if args.threads:
        torch.set_num_threads(args.threads)
    path = args.model or str(DEMO_MODEL)
    dtype = {"auto": torch.float32 if args.device == "cpu" else torch.bfloat16, "float32": torch.float32,
             "bfloat16": torch.bfloat16}[args.dtype]
    model = Qwen2VLForConditionalGeneration.from_pretrained(path, dtype=dtype).to(args.device).eval()
    proc = _hf_processor(path)
    n, tokens = min(args.hf_requests, args.requests), 0
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(-1, n):                     # request -1 (image 0 again) warms up and is not counted
            if i == 0:
                t0, tokens = time.perf_counter(), 0
            i = max(i, 0)
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
            text = proc.apply_chat_template(messages, add_generation_prompt=True)
            inputs = proc(text=[text], images=[Image.open(folder / "img" / f"{i}.png")], return_tensors="pt")
            inputs = {k: v.to(args.device) for k, v in inputs.items()}
            inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
            out = model.generate(**inputs, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                 do_sample=False)
            tokens += out.shape[1] - inputs["input_ids"].shape[1]
    dt = time.perf_counter() - t0
    print(f"  transformers: {tokens} tokens in {dt:.2f} s ({n} requests)", file=sys.stderr)
    return tokens / dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint dir (default: the demo checkpoint)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--hf-requests", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="qvl-bench-batch-") as tmp:
        folder = Path(tmp)
        job = write_job(folder, args.requests, args.image_size, args.new_tokens)
        hf_runs = [bench_hf(args, folder)]       # before and after the qvl runs: a shared machine's load drifts
        batch = bench_batch(args, job, folder)
        server = bench_server(args, job, folder)
        hf_runs.append(bench_hf(args, folder))
        hf = statistics.mean(hf_runs)
    row = {"model": args.model or "demo", "device": args.device, "threads": args.threads, "requests": args.requests,
           "new_tokens": args.new_tokens, "image_size": args.image_size, "clients": args.clients,
           "batch_tok_s": statistics.median(batch), "server_tok_s": statistics.median(server), "hf_tok_s": hf,
           "batch_runs": batch, "server_runs": server, "hf_runs": hf_runs}
    if args.json:
        print(json.dumps(row, indent=1))
        return
    print(f"{args.requests} requests x {args.new_tokens} new tokens, {args.image_size}px image each, "
          f"{row['model']} on {args.device} (threads {args.threads or 'default'}); medians of {args.repeats}:")
    print(f"  qvl batch                 {row['batch_tok_s']:9.1f} tok/s   {row['batch_tok_s'] / hf:6.2f}x transformers")
    print(f"  qvl serve, {args.clients:2d} clients     {row['server_tok_s']:9.1f} tok/s   "
          f"{row['server_tok_s'] / hf:6.2f}x transformers")
    print(f"  transformers, one by one  {hf:9.1f} tok/s")


if __name__ == "__main__":
    main()
