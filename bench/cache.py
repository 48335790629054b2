"""Agent-loop cache benefit: time to first token when the same image is asked about twice.

    python bench/cache.py --config small               # tiny dims, CPU fp32, under a minute
    python bench/cache.py --config 2b --device cuda    # Qwen2-VL-2B dims, random bf16 weights

Each round uses a fresh random image of --image-size (W x H; 1280x720 -> 1196 visual tokens):
turn 1 = system text + image + question 1 (cold), turn 2 = the same system text and image +
question 2. TTFT = wall time from add_request to the first token (preprocessing excluded: the
prompts are built before). Three qvl settings: prefix + encoder caches (default), encoder cache
only (--no-prefix-caching equivalent), no caches; transformers' TTFT (generate with one new token)
on turn 2 for reference. Medians over --rounds. Target: turn 2 <= 10% of turn 1 with the caches.
Not a test.
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


def ttft(eng, prompt, device: str) -> float:
    from qvl.sampling_params import SamplingParams

    t0 = timer(device)
    rid = f"c{t0}"
    eng.add_request(rid, prompt, SamplingParams(temperature=0, max_tokens=1))
    while eng.has_unfinished_requests():
        if any(o.outputs[0].token_ids for o in eng.step()):
            break
    t = timer(device) - t0
    eng.abort_request(rid)
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(ap)
    ap.add_argument("--image-size", type=int, nargs=2, default=None, metavar=("W", "H"),
                    help="default: 1280 720 (2b), 448 448 (small)")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    device, dtype = setup(args)
    w, h = args.image_size or ((1280, 720) if args.config == "2b" else (448, 448))

    hf, ours, config = build_pair(args.config, device, dtype)
    rng = np.random.default_rng(0)
    vocab = min(config.vocab_size, 150000)
    system = rng.integers(0, vocab, 40).tolist()

    def turns():
        img = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        q1, q2 = rng.integers(0, vocab, 20).tolist(), rng.integers(0, vocab, 24).tolist()
        return image_prompt(config, img, system, q1), image_prompt(config, img, system, q2)

    settings = {"prefix+encoder cache": dict(),
                "encoder cache only": dict(enable_prefix_caching=False),
                "no cache": dict(enable_prefix_caching=False, encoder_cache_memory=0)}
    rounds = [turns() for _ in range(args.rounds + 1)]
    rows = {}
    for name, kw in settings.items():
        eng = make_engine(ours, config, max_num_seqs=4, **kw)
        ttft(eng, rounds[0][0], device)                          # warm-up
        ttft(eng, rounds[0][1], device)
        first, second = [], []
        for t1, t2 in rounds[1:]:
            first.append(ttft(eng, t1, device))
            second.append(ttft(eng, t2, device))
        f, s = statistics.median(first), statistics.median(second)
        rows[name] = dict(first_ms=round(f * 1e3, 2), second_ms=round(s * 1e3, 2),
                          second_over_first=round(s / f, 3), stats=eng.stats())
        print(f"cache [{args.config}, {device}] {name:22s}: TTFT first {f * 1e3:8.1f} ms, "
              f"second {s * 1e3:8.1f} ms ({s / f:.1%} of first)")
        for m in eng.model.attention_modules():                  # free this engine's KV pool
            m.k_cache = m.v_cache = None
        del eng
    hf_t = []
    with torch.inference_mode():
        hf.generate(**hf_inputs(rounds[0][1], device, dtype), max_new_tokens=1, do_sample=False,
                    pad_token_id=0)
        for _, t2 in rounds[1:]:
            t0 = timer(device)
            hf.generate(**hf_inputs(t2, device, dtype), max_new_tokens=1, do_sample=False,
                        pad_token_id=0)
            hf_t.append(timer(device) - t0)
    hf_ms = statistics.median(hf_t) * 1e3
    print(f"cache [{args.config}, {device}] transformers turn-2 TTFT {hf_ms:.1f} ms; "
          f"qvl cached turn 2 is x{hf_ms / rows['prefix+encoder cache']['second_ms']:.1f} faster")
    print(json.dumps(dict(bench="cache", config=args.config, device=device, image_size=[w, h],
                          visual_tokens=rounds[0][0].items[0].num_tokens, qvl=rows,
                          hf_second_ms=round(hf_ms, 2))))


if __name__ == "__main__":
    main()
