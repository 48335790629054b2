"""CPU linear kernels, one shape at a time: GFLOP/s of each path at decode and prefill row counts.

    python bench/cpu_linear.py --threads 1                  # this CPU as it is
    python bench/cpu_linear.py --threads 1 --emulate-avx2   # ISA capped at AVX2 (a fresh process)

Shapes: the mid bench config's and Qwen2-VL-2B's decoder linears (out x in). Paths: F.linear in bf16
(torch's default), the prepacked oneDNN weight (qvl.layers.packed_linear's kernel, where oneDNN has
bf16), the fp32-from-bf16 path (qvl.layers.widened_linear; below its MIN_ROWS it is F.linear): qvl's
GEMM (cpu_kernels/gemm.h, where the library runs) and torch's fp32 GEMM on converted weight blocks,
and F.linear in float32 on a float32 copy of the weight (the reference cost). GFLOP/s = 2 * rows *
out * in / median time; at 1 row that number is also the GB/s of bf16 weight read (2 bytes per
multiply-add). The best bf16 rate in the table is the practical peak this machine gives. Not a test.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from decode import add_emulate_avx2_arg, rerun_if_emulating_avx2  # noqa: E402

SHAPES = {"mid": [(1024, 1024), (2816, 1024), (1024, 2816)],
          "2b": [(1536, 1536), (256, 1536), (8960, 1536), (1536, 8960)]}


def median_s(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.inference_mode()
def measure(out_f: int, in_f: int, rows: int, repeats: int) -> dict:
    from qvl.layers.packed_linear import packing_supported
    from qvl.layers.widened_linear import unwiden_linears, widen_linears

    lin = nn.Linear(in_f, out_f, bias=False).bfloat16()
    w32 = lin.weight.float()
    x = torch.randn(rows, in_f).bfloat16()
    x32 = x.float()
    flop = 2 * rows * out_f * in_f
    res = {"bf16": median_s(lambda: F.linear(x, lin.weight), repeats)}
    if packing_supported(torch.bfloat16, torch.device("cpu")):
        packed = torch.ops.mkldnn._reorder_linear_weight(lin.weight, 1)
        res["onednn_packed"] = median_s(
            lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], ""), repeats)
    widen_linears([lin])
    res["fp32_from_bf16"] = median_s(lambda: lin(x), repeats)
    unwiden_linears([lin])
    widen_linears([lin], library=False)
    res["fp32_blocks"] = median_s(lambda: lin(x), repeats)
    unwiden_linears([lin])
    res["fp32"] = median_s(lambda: F.linear(x32, w32), repeats)
    return {k: round(flop / t / 1e9, 1) for k, t in res.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 16, 256])
    ap.add_argument("--repeats", type=int, default=15)
    add_emulate_avx2_arg(ap)
    args = ap.parse_args()
    rerun_if_emulating_avx2(args, __file__)
    if args.threads:
        torch.set_num_threads(args.threads)
    from qvl.layers.cpu_runtime import probe_cpu

    feats = probe_cpu()
    cap = torch.backends.cpu.get_cpu_capability()
    rows = []
    for config, shapes in SHAPES.items():
        for out_f, in_f in shapes:
            for m in args.rows:
                r = dict(config=config, out=out_f, inp=in_f, rows=m, **measure(out_f, in_f, m, args.repeats))
                rows.append(r)
                print(f"[{cap}, {torch.get_num_threads()} threads] {config} {out_f}x{in_f}, {m} rows: "
                      + ", ".join(f"{k} {v}" for k, v in r.items() if k not in ("config", "out", "inp", "rows"))
                      + " GFLOP/s")
    print(json.dumps(dict(bench="cpu_linear", capability=cap, native_bf16=feats.native_bf16,
                          threads=torch.get_num_threads(), rows=rows)))


if __name__ == "__main__":
    main()
