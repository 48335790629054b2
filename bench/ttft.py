"""Time to first token of one image request alone: qvl vs transformers, same random weights, same run.

    python bench/ttft.py --config 2b --device cuda                  # Qwen2-VL-2B dims, 1280x720 image
    python bench/ttft.py --config small --width 320 --height 240   # CPU smoke run, seconds

One request: a random --width x --height image (1280x720 -> 1196 visual tokens at Qwen2-VL's default pixel
limits) and 16 text tokens, one new token. Reported separately, medians of --repeats:
  preprocess   the image resized and patched (qvl.multimodal.image.process_image; transformers' image
               processor for the transformers row)
  ttft         from add_request to the first token out of step() (vision encode + prefill + sampling)
The encoder cache is off, so every repeat encodes the image. Not a test.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from decode import add_common_args, build_pair, engine_options, hf_inputs, image_prompt, make_engine, setup, timer  # noqa: E402,E501


def qvl_ttft(eng, prompt, device: str) -> float:
    from qvl.sampling_params import SamplingParams

    t0 = timer(device)
    eng.add_request(f"ttft{time.monotonic_ns()}", prompt, SamplingParams(temperature=0, max_tokens=1))
    while eng.has_unfinished_requests():
        eng.step()
    return timer(device) - t0


def hf_ttft(hf, kw: dict, device: str) -> float:
    t0 = timer(device)
    with torch.inference_mode():
        hf.generate(**kw, max_new_tokens=1, do_sample=False, pad_token_id=0)
    return timer(device) - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(ap)
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=720)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    device, dtype = setup(args)
    hf, ours, config = build_pair(args.config, device, dtype)
    eng = make_engine(ours, config, max_num_seqs=4, enable_prefix_caching=False, encoder_cache_memory=0,
                      **engine_options(args))
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (args.height, args.width, 3), dtype=np.uint8))
    text = rng.integers(0, min(config.vocab_size, 150000), 16).tolist()

    pre, ours_t, hf_t = [], [], []
    for r in range(args.repeats + 1):                  # the first round warms up (kernels, allocator)
        t0 = time.perf_counter()
        prompt = image_prompt(config, img, text[:8], text[8:])
        pre.append(time.perf_counter() - t0)
        ours_t.append(qvl_ttft(eng, prompt, device))
        hf_t.append(hf_ttft(hf, hf_inputs(prompt, device, dtype), device))
    pre, ours_t, hf_t = (statistics.median(x[1:]) for x in (pre, ours_t, hf_t))
    vis = prompt.items[0].num_tokens
    res = dict(bench="ttft", config=args.config, device=device, dtype=str(dtype).split(".")[-1],
               image=f"{args.width}x{args.height}", visual_tokens=vis, prompt_tokens=len(prompt.token_ids),
               preprocess_s=round(pre, 4), qvl_ttft_s=round(ours_t, 4), hf_ttft_s=round(hf_t, 4),
               hf_over_qvl=round(hf_t / ours_t, 2), attention=eng.runner.attention_backend.name)
    print(f"ttft [{args.config}, {device}, {res['dtype']}] one {res['image']} image ({vis} visual tokens): "
          f"preprocess {pre * 1e3:.0f} ms; qvl {ours_t * 1e3:.0f} ms, transformers {hf_t * 1e3:.0f} ms "
          f"(x{hf_t / ours_t:.2f} faster); medians of {args.repeats}")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
