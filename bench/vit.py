"""Vision-tower benchmark: qvl's ViT vs transformers' on the same random weights and the same 8 images.

    python bench/vit.py --config small             # tiny dims, CPU, well under a minute
    python bench/vit.py --config 2b --device cuda  # real Qwen2-VL-2B vision dims (random weights), bf16

Reports, per implementation, the median wall time of --iters forward passes (after a warm-up) and the peak
memory of one pass above what was allocated before it (CUDA: torch.cuda.max_memory_allocated; CPU: the
torch profiler's allocation trace), the qvl/transformers ratios and max |diff| of the outputs.
Not a test: nothing here is asserted.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

CONFIGS = {
    # real Qwen2-VL-2B vision tower; grids (t, h, w) in 14-px patches: 448^2, 336x504, 1092x1932, 784^2, ...
    "2b": dict(depth=32, embed_dim=1280, num_heads=16, hidden_size=1536, mlp_ratio=4,
               grids=[(1, 32, 32), (1, 24, 36), (1, 78, 138), (1, 56, 56), (1, 16, 16), (1, 40, 60),
                      (1, 28, 20), (1, 64, 48)]),
    "small": dict(depth=4, embed_dim=128, num_heads=4, hidden_size=256, mlp_ratio=4,
                  grids=[(1, 16, 16), (1, 12, 18), (1, 20, 34), (1, 14, 14), (1, 8, 8), (1, 10, 16),
                         (1, 14, 10), (1, 16, 12)]),
}


def build(name: str, dtype: torch.dtype, device: str):
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

    from qvl.models.qwen2_vl.config import VisionConfig
    from qvl.models.qwen2_vl.vision import VisionTransformer

    spec = {k: v for k, v in CONFIGS[name].items() if k != "grids"}
    torch.manual_seed(0)
    hf_cfg = Qwen2VLVisionConfig(**spec)
    with torch.device(device):  # random init directly on the device (the 2B tower is 675M parameters)
        hf = Qwen2VisionTransformerPretrainedModel._from_config(hf_cfg, attn_implementation="sdpa", dtype=dtype)
        ours = VisionTransformer(VisionConfig(**spec)).to(dtype=dtype)
    hf, ours = hf.eval(), ours.eval()
    missing, unexpected = ours.load_state_dict(hf.state_dict(), strict=True)
    assert not missing and not unexpected
    return hf, ours


def peak_bytes(fn, device: str) -> int:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    # CPU: replay the profiler's allocation trace (every alloc/free with its size, in time order).
    import json
    import os
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    fd, trace = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(trace)
        with open(trace) as f:
            events = [e for e in json.load(f)["traceEvents"] if e.get("name") == "[memory]"]
    finally:
        os.unlink(trace)
    cur = peak = 0
    for e in sorted(events, key=lambda e: e["ts"]):
        cur += e["args"]["Bytes"]
        peak = max(peak, cur)
    return peak


def median_time(fn, iters: int, device: str) -> float:
    times = []
    for _ in range(iters):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", choices=sorted(CONFIGS), default="small")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                    help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--iters", type=int, default=5)
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))

    grids = torch.tensor(CONFIGS[args.config]["grids"])
    n_patches = int(grids.prod(-1).sum())
    gen = torch.Generator().manual_seed(1)
    pixels = torch.randn(n_patches, 1176, generator=gen).to(args.device)
    hf, ours = build(args.config, dtype, args.device)
    print(f"config={args.config} device={args.device} dtype={dtype} images={len(grids)} patches={n_patches} "
          f"merged tokens={n_patches // 4} torch={torch.__version__} threads={torch.get_num_threads()}")

    with torch.inference_mode():
        runs = {
            "transformers": lambda: hf(pixels.to(dtype), grid_thw=grids.to(args.device)),
            "qvl": lambda: ours(pixels, grids),
        }
        outs = {k: fn() for k, fn in runs.items()}  # warm-up
        diff = (outs["qvl"].float() - outs["transformers"].float()).abs().max().item()
        res = {}
        for k, fn in runs.items():
            res[k] = (median_time(fn, args.iters, args.device), peak_bytes(fn, args.device))
            print(f"  {k:>12}: median {res[k][0] * 1e3:9.1f} ms over {args.iters}   peak +{res[k][1] / 2**20:8.1f} MiB")
    (t_hf, m_hf), (t_q, m_q) = res["transformers"], res["qvl"]
    print(f"  qvl/transformers: time x{t_q / t_hf:.3f}   peak memory x{m_q / max(m_hf, 1):.3f}   "
          f"max|diff| {diff:.3g}")


if __name__ == "__main__":
    main()
