"""How long a short text request waits while a large image encodes: inline encode vs the VisionWorker.

    python bench/encode_stall.py --size 224 --reps 2

The engine is a tiny random Qwen2-VL decoder (tests/tiny.py) carrying the real Qwen2-VL-2B vision tower
(depth 32, width 1280, random weights; its merger projects to the tiny decoder's width, so it is ~8M
parameters smaller than the 2B's). One image request (--size px square) is added, then a 2-token greedy
text request; reported per mode: seconds from adding the text request to its completion, and to the
image request's completion (its encode dominates). Modes alternate per repetition; medians are printed.
"inline" is the encode inside the engine step (the path before the worker); "worker" the default for a
tower this large. Not a test: nothing here is asserted.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def build(ckpt: Path):
    from qvl.build import load_model
    from qvl.config import EngineConfig
    from qvl.engine.llm_engine import LLMEngine
    from qvl.models.qwen2_vl.config import VisionConfig
    from qvl.models.qwen2_vl.vision import VisionTransformer
    from qvl.multimodal.prompt import PromptProcessor

    model, config = load_model(ckpt, dtype=torch.float32, device="cpu")
    torch.manual_seed(0)
    model.visual = VisionTransformer(VisionConfig(depth=32, embed_dim=1280, num_heads=16, mlp_ratio=4,
                                                  hidden_size=config.hidden_size)).eval()
    processor = PromptProcessor.from_pretrained(ckpt, config)
    return LLMEngine(model, config, processor, EngineConfig(max_model_len=4096, kv_cache_memory=64 << 20,
                                                            encoder_cache_memory=0))


def run_once(eng, worker: bool, size: int, seed: int) -> tuple[float, float]:
    from qvl.multimodal.prompt import ProcessedPrompt
    from qvl.sampling_params import SamplingParams

    eng.vision.enabled = worker
    img = Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8))
    chat = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Hi<|im_end|>\n<|im_start|>assistant\n"
    greedy = SamplingParams(temperature=0, max_tokens=2, min_tokens=2)
    eng.add_request("img", eng.processor.process_prompt(chat, {"image": [img]}), greedy)
    t0 = time.perf_counter()
    eng.add_request("txt", ProcessedPrompt.from_token_ids([5, 6, 7]), greedy)
    done = {}
    while eng.has_unfinished_requests():
        for o in eng.step():
            if o.finished:
                done[o.request_id] = time.perf_counter() - t0
    return done["txt"], done["img"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=224, help="image side in pixels (224: 64 visual tokens)")
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args()
    from tiny import make_tiny_checkpoint

    with tempfile.TemporaryDirectory() as d:
        eng = build(make_tiny_checkpoint(Path(d) / "ckpt"))
    res = {"inline": [], "worker": []}
    for r in range(args.reps):
        for mode in ("inline", "worker"):
            txt, img = run_once(eng, mode == "worker", args.size, seed=r)
            res[mode].append((txt, img))
            print(f"rep {r} {mode:6s}: text request done after {txt:7.2f} s, image request after {img:7.2f} s",
                  flush=True)
    for mode, rows in res.items():
        print(f"median {mode:6s}: text {statistics.median(t for t, _ in rows):.2f} s, "
              f"image {statistics.median(i for _, i in rows):.2f} s ({args.reps} reps, "
              f"{torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
