"""Offline throughput: N concurrent requests (a small image + a question, 128 new tokens each),
qvl's continuous batching vs transformers serving them one by one.

    python bench/throughput.py --config small               # tiny dims, CPU fp32, under a minute
    python bench/throughput.py --config mid --threads 1     # 1024 wide, 8 layers, Qwen2 vocab, CPU bf16
    python bench/throughput.py --config 2b --device cuda    # Qwen2-VL-2B dims, random bf16 weights

Every request has its own random image (--image-size px square; 224 -> 64 visual tokens) after a
shared system text and before its own question; eos is banned so each yields exactly --new-tokens.
qvl: all N added at once, wall time until the last finishes (vision, prefill and decode included);
total tok/s = N * new / time. transformers: generate() per request, sequentially, on the first
--hf-requests requests (its per-request cost does not depend on N); tok/s = tokens / time.
Reported for each N in --concurrency (median of --repeats qvl runs). Not a test.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from decode import (add_common_args, build_pair, hf_inputs, image_prompt, setup,  # noqa: E402
                    make_engine, timer)


def make_prompts(config, n: int, size: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    vocab = min(config.vocab_size, 150000)
    system = rng.integers(0, vocab, 24).tolist()
    out = []
    for _ in range(n):
        img = Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
        out.append(image_prompt(config, img, system, rng.integers(0, vocab, 16).tolist()))
    return out


def run_qvl(eng, prompts, new: int, device: str) -> float:
    from qvl.sampling_params import SamplingParams

    sp = SamplingParams(temperature=0, max_tokens=new, min_tokens=new)
    t0 = timer(device)
    for i, p in enumerate(prompts):
        eng.add_request(f"t{t0}-{i}", p, sp)
    n = 0
    while eng.has_unfinished_requests():
        n += sum(len(o.outputs[0].token_ids) for o in eng.step() if o.finished)
    assert n == len(prompts) * new, n
    return n / (timer(device) - t0)


def run_hf(hf, prompts, new: int, device: str, dtype) -> float:
    t0 = timer(device)
    with torch.inference_mode():
        for p in prompts:
            hf.generate(**hf_inputs(p, device, dtype), max_new_tokens=new, min_new_tokens=new,
                        do_sample=False, pad_token_id=0)
    return len(prompts) * new / (timer(device) - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(ap)
    ap.add_argument("--concurrency", type=int, nargs="+", default=None, help="default: 16 32")
    ap.add_argument("--new-tokens", type=int, default=None, help="default: 128 (2b, mid), 32 (small)")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--hf-requests", type=int, default=None, help="default: 3 (2b, mid), 2 (small)")
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    device, dtype = setup(args)
    new = args.new_tokens or (32 if args.config == "small" else 128)
    conc = args.concurrency or [16, 32]
    n_hf = args.hf_requests or (2 if args.config == "small" else 3)

    hf, ours, config = build_pair(args.config, device, dtype)
    eng = make_engine(ours, config, max_num_seqs=max(conc))
    run_qvl(eng, make_prompts(config, 2, args.image_size, seed=99), 4, device)      # warm-up
    run_hf(hf, make_prompts(config, 1, args.image_size, seed=98), 4, device, dtype)
    hf_tps = run_hf(hf, make_prompts(config, n_hf, args.image_size, seed=1), new, device, dtype)
    rows = []
    for n in conc:
        tps = statistics.median(run_qvl(eng, make_prompts(config, n, args.image_size, seed=r + 1),
                                        new, device) for r in range(args.repeats))
        rows.append(dict(concurrency=n, qvl_tok_s=round(tps, 1), hf_tok_s=round(hf_tps, 1),
                         ratio=round(tps / hf_tps, 2)))
        print(f"throughput [{args.config}, {device}] {n} requests x {new} tokens, "
              f"{args.image_size}px image: qvl {tps:.1f} tok/s, transformers one-by-one "
              f"{hf_tps:.1f} tok/s (x{tps / hf_tps:.1f})")
    print(json.dumps(dict(bench="throughput", config=args.config, device=device,
                          new_tokens=new, image_size=args.image_size, rows=rows,
                          stats=eng.stats())))


if __name__ == "__main__":
    main()
