"""bf16 weights, fp32 arithmetic: nn.Linear for CPUs without native bf16 dot products (AVX2, AVX-512F).

There torch's bf16 GEMM is a generic loop: on this project's machine with the ISA capped at AVX2
(`ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2`, bench/cpu_linear.py, 1 thread), 256 rows through a
2816x1024 bf16 linear ran at 21 GFLOP/s where the same matmul in fp32 ran at 87. `widen_linears(linears)` keeps each weight in
bf16 (no second copy: memory stays that of the checkpoint) and computes inputs of `min_rows` rows or
more in fp32, rounding the result to bf16 once:
  * where qvl's CPU library runs (AVX2 + FMA: quant_kernels.bf16_isa() > 0), its GEMM
    (cpu_kernels/gemm.h) reads the bf16 weight as stored, widening 16 rows x 256 columns at a time
    into an L1 block that every 6-row tile of the input multiplies;
  * elsewhere the weight is converted block by block (`block_elems` elements, 4 MiB of fp32 by default,
    so a block stays in cache while torch's fp32 GEMM reads it) and multiplied by the fp32 input.
On Zen 3 (AVX2, 1 thread; `python bench/cpu_linear.py --threads 1 --rows 16 64 256 1024`, the mid and
2B decoder shapes) the library's GEMM ran 58-78 GFLOP/s from 64 to 1024 rows where the fp32 blocks ran
39-71 and torch's fp32 GEMM (MKL) on an fp32 copy of the weight 32-79; at 16 rows 39-54 against 24-34
and 17-54. The FMA peak of that core, measured, is 90-94.
Fewer rows (decode) keep F.linear: bf16 matrix-vector products
are memory-bound and read half the bytes of fp32 (measured there: 1 row through 8960x1536, 21.8 vs 8.7
GFLOP/s; at 16 rows the fp32 blocks ran 2.5x faster than bf16). Inputs that need grad and other dtypes keep F.linear too.

Numerics: products of bf16 values are exact in fp32 and the sums accumulate in fp32, as oneDNN's bf16
kernels do, so results differ from F.linear's only by rounding order (held to the bf16 criterion:
greedy tokens equal to float32's until a near-tie). The library's GEMM sums each output's terms in one
fixed order: its bits depend on neither the other rows of the call nor the thread count.

Knows nothing about the model or the CPU: which linears to widen is the caller's decision
(qvl.layers.cpu_runtime). State_dict is unchanged; `unwiden_linears` restores F.linear.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from qvl.layers import quant_kernels as qk

MIN_ROWS = 16
BLOCK_ELEMS = 1 << 20


class _WidenedForward:
    """Replaces one bf16 nn.Linear's forward: an fp32 GEMM from the bf16 weight for >= min_rows rows."""

    def __init__(self, linear: nn.Linear, min_rows: int, block_elems: int, library: bool) -> None:
        self.weight, self.bias, self.min_rows, self.library = linear.weight, linear.bias, min_rows, library
        self.block = max(1, block_elems // linear.in_features)        # output rows per block

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        rows = x.numel() // x.shape[-1] if x.dim() else 0
        if rows < self.min_rows or x.dtype != w.dtype or torch.is_grad_enabled():
            return F.linear(x, w, self.bias)
        out_f, in_f = w.shape
        if self.library and qk.bf16_isa() > 0 and w.is_contiguous():            # the library's GEMM
            y = qk.bf16_gemm(x.reshape(rows, in_f).contiguous(), w, self.bias)   # (M, out)
            return y.view(*x.shape[:-1], out_f)
        n = min(self.block, out_f)
        x32 = x.reshape(rows, in_f).float()                                      # (M, in)
        y = torch.empty(rows, out_f, dtype=x.dtype, device=x.device)             # (M, out)
        # Scratch reused by every block: fresh 4 MiB allocations would page-fault on each block.
        w32 = torch.empty(n, in_f, dtype=torch.float32, device=x.device)         # (b, in)
        acc = torch.empty(rows * n, dtype=torch.float32, device=x.device)
        for s in range(0, out_f, n):
            b = min(n, out_f - s)
            blk = w32[:b].copy_(w[s:s + b])                                      # (b, in) fp32
            out = torch.mm(x32, blk.t(), out=acc[:rows * b].view(rows, b))       # (M, b)
            if self.bias is not None:
                out += self.bias[s:s + b]
            y[:, s:s + b] = out
        return y.view(*x.shape[:-1], out_f)


def is_widened(m: nn.Module) -> bool:
    return isinstance(m.__dict__.get("forward"), _WidenedForward)


def widen_linears(linears: Iterable[nn.Linear], *, min_rows: int = MIN_ROWS,
                  block_elems: int = BLOCK_ELEMS, library: bool = True) -> int:
    """Give every bf16 linear among `linears` the fp32 path for >= min_rows rows: qvl's GEMM where it
    runs and `library` is True, else torch's fp32 GEMM on blocks of `block_elems` converted weights.
    Returns how many of them are widened afterwards (already widened ones are left as they are)."""
    linears = list(linears)
    for m in linears:
        if m.weight.dtype == torch.bfloat16 and "forward" not in m.__dict__:
            m.forward = _WidenedForward(m, min_rows, block_elems, library)
    return sum(is_widened(m) for m in linears)


def unwiden_linears(linears: Iterable[nn.Linear]) -> None:
    """Every widened linear back to its class forward (F.linear)."""
    for m in linears:
        if is_widened(m):
            del m.forward
