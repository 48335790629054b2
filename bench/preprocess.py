"""Image preprocessing throughput: qvl.process_image vs transformers Qwen2VLImageProcessor (slow/PIL path).

A fixed, seeded set of mixed-size in-memory PIL images (no file decoding) is preprocessed one image per
call, as a server does per request; each side's time is the median over --runs passes of the whole set.
Both outputs are checked to be bit-identical before timing.

    python bench/preprocess.py [--runs 5] [--max-pixels 12845056] [--min-pixels 3136]
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np
from PIL import Image

# (height, width, mode)
SIZES = [(224, 224, "RGB"), (333, 517, "RGB"), (480, 640, "RGB"), (600, 800, "RGB"), (768, 1024, "RGB"),
         (720, 1280, "RGB"), (1080, 1920, "RGB"), (1536, 2048, "RGB"), (3000, 4000, "RGB"),
         (512, 512, "RGBA"), (400, 600, "L"), (50, 60, "RGB")]


def make_images(seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    images = []
    for h, w, mode in SIZES:
        # smooth gradients + noise: closer to photos than pure noise (resize cost is content-independent)
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([(xx * 255 // max(w - 1, 1)), (yy * 255 // max(h - 1, 1)), (xx + yy) % 256], -1)
        arr = np.clip(base + rng.integers(-20, 20, (h, w, 3)), 0, 255).astype(np.uint8)
        img = Image.fromarray(arr)
        if mode == "RGBA":
            img.putalpha(Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8)))
        elif mode != "RGB":
            img = img.convert(mode)
        images.append(img)
    return images


def time_set(fn, images, runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        for img in images:
            fn(img)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--min-pixels", type=int, default=3136)
    ap.add_argument("--max-pixels", type=int, default=12845056)
    args = ap.parse_args()

    import torch
    from transformers import Qwen2VLImageProcessor

    from qvl.multimodal.image import process_image, to_rgb

    images = make_images()
    hf = Qwen2VLImageProcessor(min_pixels=args.min_pixels, max_pixels=args.max_pixels)

    def ours(img):
        return process_image(img, min_pixels=args.min_pixels, max_pixels=args.max_pixels)

    def theirs(img):
        # the same white compositing qvl applies (qwen-vl-utils does it before the processor)
        return hf(images=[to_rgb(img)], return_tensors="np", input_data_format="channels_last")

    for img in images:  # correctness and warm-up
        a, b = ours(img), theirs(img)
        assert a.grid_thw == tuple(int(x) for x in b["image_grid_thw"][0])
        assert np.abs(a.pixel_values.numpy() - b["pixel_values"]).max() == 0

    t_ours = time_set(ours, images, args.runs)
    t_hf = time_set(theirs, images, args.runs)
    n = len(images)
    tokens = sum(ours(img).num_tokens for img in images)
    print(f"machine: {platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}")
    names = ", ".join(f"{h}x{w}" + ("" if m == "RGB" else m) for h, w, m in SIZES)
    print(f"{n} images (h x w): {names}")
    print(f"min_pixels {args.min_pixels}, max_pixels {args.max_pixels}: {tokens} visual tokens per set; "
          f"median of {args.runs} runs")
    print(f"  qvl.process_image            {n / t_ours:8.2f} images/s  ({t_ours * 1000:8.1f} ms per set)")
    print(f"  Qwen2VLImageProcessor (slow) {n / t_hf:8.2f} images/s  ({t_hf * 1000:8.1f} ms per set)")
    print(f"  speed-up {t_hf / t_ours:.2f}x")


if __name__ == "__main__":
    main()
