"""Offline throughput: N concurrent requests (a small image + a question, 128 new tokens each),
qvl's continuous batching vs transformers serving them one by one.

    python bench/throughput.py --config small               # tiny dims, CPU fp32, under a minute
    python bench/throughput.py --config mid --threads 1     # 1024 wide, 8 layers, Qwen2 vocab, CPU bf16
    python bench/throughput.py --config 2b --device cuda    # Qwen2-VL-2B dims, random bf16 weights

Every request has its own random image (--image-size px square; 224 -> 64 visual tokens) after a
shared system text and before its own question; eos is banned so each yields exactly --new-tokens.
qvl: all N added at once, wall time until the last finishes (vision, prefill and decode included);
total tok/s = N * new / time; decode phase tok/s (once every request has its first token) beside
its roofline, N tokens per read of the decode weights (bench/decode.py's bytes and copy bandwidth).
transformers: generate() per request, sequentially, on the first
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
from decode import (add_common_args, build_pair, copy_bandwidth, decode_weight_bytes,  # noqa: E402
                    engine_options, hf_inputs, image_prompt, make_engine, setup, timer)


def make_prompts(config, n: int, size: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    vocab = min(config.vocab_size, 150000)
    system = rng.integers(0, vocab, 24).tolist()
    out = []
    for _ in range(n):
        img = Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
        out.append(image_prompt(config, img, system, rng.integers(0, vocab, 16).tolist()))
    return out


def run_qvl(eng, prompts, new: int, device: str, decode_rate: list | None = None) -> float:
    """Total tok/s. decode_rate, if given, gets the decode phase's tok/s appended: from the first
    step after which every request has its first token to the end (N * (new - 1) tokens)."""
    from qvl.sampling_params import SamplingParams

    sp = SamplingParams(temperature=0, max_tokens=new, min_tokens=new)
    t0 = timer(device)
    for i, p in enumerate(prompts):
        eng.add_request(f"t{t0}-{i}", p, sp)
    n, started, t_dec = 0, set(), None
    while eng.has_unfinished_requests():
        outs = eng.step()
        started.update(o.request_id for o in outs)
        n += sum(len(o.outputs[0].token_ids) for o in outs if o.finished)
        if t_dec is None and len(started) == len(prompts):
            t_dec = timer(device)
    t_end = timer(device)
    assert n == len(prompts) * new, n
    if decode_rate is not None and new > 1:
        decode_rate.append(len(prompts) * (new - 1) / (t_end - t_dec))
    return n / (t_end - t0)


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
    eng = make_engine(ours, config, max_num_seqs=max(conc), **engine_options(args))
    run_qvl(eng, make_prompts(config, 2, args.image_size, seed=99), 4, device)      # warm-up
    run_hf(hf, make_prompts(config, 1, args.image_size, seed=98), 4, device, dtype)
    hf_tps = run_hf(hf, make_prompts(config, n_hf, args.image_size, seed=1), new, device, dtype)
    bw, wbytes = copy_bandwidth(device), decode_weight_bytes(ours)
    rows = []
    for n in conc:
        dec: list[float] = []
        tps = statistics.median(run_qvl(eng, make_prompts(config, n, args.image_size, seed=r + 1),
                                        new, device, dec) for r in range(args.repeats))
        dec_tps, roof = statistics.median(dec), n * bw / wbytes     # a decode step reads the weights once
        rows.append(dict(concurrency=n, qvl_tok_s=round(tps, 1), hf_tok_s=round(hf_tps, 1),
                         ratio=round(tps / hf_tps, 2), qvl_decode_tok_s=round(dec_tps, 1),
                         decode_roofline_tok_s=round(roof, 1), decode_over_roofline=round(dec_tps / roof, 3)))
        print(f"throughput [{args.config}, {device}, {eng.cpu_runtime.mode}, {eng.runner.attention_backend.name} "
              f"attention, graphs {'on' if eng.runner.graphs is not None else 'off'}] {n} requests x {new} tokens, "
              f"{args.image_size}px image: qvl {tps:.1f} tok/s, transformers one-by-one "
              f"{hf_tps:.1f} tok/s (x{tps / hf_tps:.1f}); decode phase {dec_tps:.1f} tok/s, roofline "
              f"{roof:.0f} ({wbytes / 1e9:.2f} GB per step at {bw / 1e9:.1f} GB/s): {dec_tps / roof:.2f}")
    print(json.dumps(dict(bench="throughput", config=args.config, device=device,
                          new_tokens=new, image_size=args.image_size, rows=rows,
                          stats=eng.stats())))


if __name__ == "__main__":
    main()
