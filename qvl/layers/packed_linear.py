"""Prepacked oneDNN weights for few-row (decode) matmuls on CPU bf16.

On CPUs with AMX / AVX512-BF16, `F.linear` on a few bf16 rows re-lays the plain (out, in) weight into
the kernel's blocked layout on every call; that copy, not the memory read, bounds decode.
`pack_linears(linears)` gives each nn.Linear a second copy of its weight in the blocked layout
(`torch.ops.mkldnn._reorder_linear_weight`) and routes inputs of up to `max_rows` rows through it
(`torch.ops.mkldnn._linear_pointwise`). More rows (prefill), inputs that need grad, another thread
count and other dtypes keep `F.linear` on the plain weight.

Numerics, two contracts (`exact`). exact=True: the packed kernel gives the *same bits* as F.linear.
Whether it does depends on the shape, the number of rows and the thread count (the kernels split the
reduction over in_features differently for some sizes), so each distinct (out, in, bias) is probed
once when packing, for 1, 2, ... rows up to MAX_ROWS: random inputs through both paths, compared bit
for bit, enough calls for ~2^17 outputs per row count (a different reduction order changes ~1e-4 of
the outputs, so it is caught with near certainty). `max_rows` is the last row count before the first
mismatch; a shape that differs already at one row stays on F.linear (on Qwen2-VL-2B with 2 threads:
down_proj, in_features 8960, whose packed kernel is 2x faster at 1 row and 1.7x at 16).
exact=False, what the engine uses (bf16 is held to the bf16 criterion, not to F.linear's bits): no
probe, every shape packed for up to MAX_ROWS rows. That also saves the probe's start-up time (the
LM head's alone took 5 to 11 s on the shared 2-core machine). Neither path is batch-invariant for
every shape: F.linear itself gives one row other bits alone than beside another row for some shapes
(1024x2816, 1536x1536 here), so bf16 batched == alone holds within the bf16 criterion, as on CUDA.

Memory: the packed copy lives beside the plain weight (prefill needs the plain one, and a tied LM head
shares it with the embedding). `pack_linears` packs nothing when the copies would exceed `max_bytes`.
`unpack_linears` restores plain F.linear. The packed tensors are not parameters: state_dict is unchanged,
and they are a snapshot: after changing a weight, unpack and pack again.

qvl's panels (exact=False): where qvl's own bf16 kernel runs (AVX-512 BF16, out % 16 == 0;
qvl.layers.quant_kernels), a linear's copy is in that kernel's 16-row panels instead of oneDNN's layout, the
same bytes. At one row it read 21 GB/s of weight where oneDNN's packed kernel read 11 (the 2B's 8960 x 1536
and 1536 x 8960: 1299 vs 2545 us, 1308 vs 2462; the 151936 x 1536 head 21.8 vs 14.3 GB/s), about even at 16
rows, 0.84x at 32 (1 thread, interleaved, `python bench/quant.py --kernels --head`, machine shared). The
kernel splits a call's panels over torch's own OpenMP threads; at 2 threads the 2B's bf16 decode (q/k/v
and gate/up fused, qvl.layers.fused_linear) ran 15.1-15.2 tok/s on the panels against 9.3-9.5 through
oneDNN, 16 requests 43.5 against 41.5-41.6 (one process switching between the two, twice each, quiet
machine; bench/quant.py's decode and 16-request measures), so every shape that fits takes the panels at
every thread count.

CPUs without native bf16 (AVX2): `panel_linears(linears)` gives the same panels and qvl's AVX2 + FMA bf16
kernel for up to MAX_ROWS rows; more rows keep the forward the linear had (the CPU runtime widens first:
qvl.layers.widened_linear's fp32 path), and unpacking restores it.

Knows nothing about the model: it sees nn.Linear modules only.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from qvl.layers import quant_kernels as qk

_PROBE_OUTPUTS = 1 << 17
MAX_ROWS = 32


def packing_supported(dtype: torch.dtype, device: torch.device) -> bool:
    """bf16 on a CPU whose oneDNN has bf16 kernels (AVX512-BF16 / AMX)."""
    return (device.type == "cpu" and dtype == torch.bfloat16 and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise")
            and torch.ops.mkldnn._is_mkldnn_bf16_supported())


class _PackedForward:
    """Replaces one nn.Linear's forward: packed kernel for up to max_rows contiguous rows, else F.linear."""

    def __init__(self, linear: nn.Linear, packed: torch.Tensor, threads: int, max_rows: int) -> None:
        self.weight, self.bias = linear.weight, linear.bias
        self.packed, self.threads, self.max_rows = packed, threads, max_rows

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if (x.dim() == 2 and 0 < x.shape[0] <= self.max_rows and x.dtype == self.packed.dtype
                and x.is_contiguous() and not torch.is_grad_enabled()
                and torch.get_num_threads() == self.threads):
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")  # (M, out)
        return F.linear(x, self.weight, self.bias)


class _PanelForward:
    """qvl's bf16 panel kernel (isa: quant_kernels.bf16_mm's) for up to max_rows contiguous rows; more
    go to `inner`, the forward the linear had before (the AVX2 path's widened one), or F.linear."""

    def __init__(self, linear: nn.Linear, panels: torch.Tensor, max_rows: int, isa: int | None = None) -> None:
        self.weight, self.bias, self.packed, self.max_rows = linear.weight, linear.bias, panels, max_rows
        self.isa, self.inner = isa, linear.__dict__.get("forward")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if (x.dim() == 2 and 0 < x.shape[0] <= self.max_rows and x.dtype == self.packed.dtype
                and x.is_contiguous() and not torch.is_grad_enabled()):
            return qk.bf16_mm(x, self.packed, self.bias, isa=self.isa)                     # (M, out)
        return self.inner(x) if self.inner is not None else F.linear(x, self.weight, self.bias)


def _panels_fit(m: nn.Linear, isa: int = 1) -> bool:
    """The kernel runs here at `isa` (1 AVX-512 BF16, 2 AVX2) and the shape is whole panels."""
    best = qk.bf16_isa()
    return m.weight.shape[0] % 16 == 0 and m.weight.shape[1] % 2 == 0 and best > 0 and (isa != 1 or best == 1)


def _pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)


def _max_identical_rows(linear: nn.Linear, packed: torch.Tensor, threads: int) -> int:
    """Probe: the largest m <= MAX_ROWS such that inputs of 1..m random rows give the same bits through
    F.linear and the packed kernel (0: not even one row)."""
    out_f, in_f = linear.weight.shape
    g = torch.Generator().manual_seed(0)
    fwd = _PackedForward(linear, packed, threads, MAX_ROWS)
    with torch.no_grad():
        for m in range(1, MAX_ROWS + 1):
            for _ in range(min(64, math.ceil(_PROBE_OUTPUTS / (m * out_f)))):
                x = torch.randn(m, in_f, generator=g).to(linear.weight.dtype)  # (m, in)
                if not torch.equal(F.linear(x, linear.weight, linear.bias), fwd(x)):
                    return m - 1
    return MAX_ROWS


def _is_packed(m: nn.Linear) -> bool:
    return isinstance(m.__dict__.get("forward"), (_PackedForward, _PanelForward))


def pack_linears(linears: Iterable[nn.Linear], *, max_bytes: int | None = None, exact: bool = True,
                 head: nn.Linear | None = None) -> int:
    """Give each linear (and `head`, the LM head) a packed path for up to MAX_ROWS rows; exact: oneDNN's
    layout, only where, and for as many rows as, the probe finds F.linear's bits; exact=False: qvl's bf16
    panel layout where that kernel runs (module docstring), else oneDNN's, no probe.

    Returns how many of `linears` (and the head) are packed afterwards (already packed ones count and
    are left as they are). Packs nothing when the dtype/device is unsupported or the new copies would
    exceed max_bytes.
    """
    linears = list(linears) + ([head] if head is not None else [])
    todo = [m for m in linears if not _is_packed(m) and m.weight.dtype == torch.bfloat16]
    need = sum(m.weight.numel() * m.weight.element_size() for m in todo)
    if not todo or (max_bytes is not None and need > max_bytes):
        return sum(_is_packed(m) for m in linears)
    if not packing_supported(todo[0].weight.dtype, todo[0].weight.device):
        return sum(_is_packed(m) for m in linears)
    threads = torch.get_num_threads()
    max_rows: dict[tuple, int] = {}            # (out, in, bias) -> probe verdict
    for m in todo:
        # qvl's bf16 panel kernel: same bytes, faster (module docstring)
        if not exact and _panels_fit(m):
            m.forward = _PanelForward(m, qk.pack_bf16(m.weight), MAX_ROWS)
            continue
        key = (*m.weight.shape, m.bias is not None)
        if max_rows.get(key) == 0:
            continue
        packed = _pack(m.weight)
        if key not in max_rows:
            max_rows[key] = _max_identical_rows(m, packed, threads) if exact else MAX_ROWS
        if max_rows[key]:
            m.forward = _PackedForward(m, packed, threads, max_rows[key])
    return sum(_is_packed(m) for m in linears)


def panel_linears(linears: Iterable[nn.Linear], *, max_bytes: int | None = None, isa: int = 2) -> int:
    """CPUs without native bf16 (AVX2): each bf16 linear whose shape fits gets a copy of its weight in
    qvl's panels and the AVX2 kernel (isa 2) for up to MAX_ROWS rows; more rows keep the forward it had
    (qvl.layers.widened_linear's fp32 path). Nothing when the copies would exceed max_bytes. Returns
    how many of `linears` are on panels afterwards. 1 thread, Zen 3, weight from DRAM (8960 x 1536):
    1 row 2.5 ms against F.linear's 4.9, 4 rows 3.6 against 12.6, 15 rows 8.5 against 44.4, 16 rows 10.5
    against the fp32 blocks' 18.2, 32 rows 16.0 against 20.6; the 151936 x 1536 head 36 against 66 ms.
    Against qvl's AVX2 GEMM (widened_linear's path where the library runs; a later session, W in L3):
    16 rows 11.8 against 16.9 ms, 32 rows 20.5 against 21.3, 48 rows 30.3 against 26.4 (1536 x 1536 and
    2816 x 1024 cross over alike), so MAX_ROWS stays 32."""
    linears = list(linears)
    todo = [m for m in linears if m.weight.dtype == torch.bfloat16 and m.weight.device.type == "cpu"
            and not _is_packed(m) and _panels_fit(m, isa)]
    need = sum(m.weight.numel() * m.weight.element_size() for m in todo)
    if max_bytes is None or need <= max_bytes:
        for m in todo:
            m.forward = _PanelForward(m, qk.pack_bf16(m.weight), MAX_ROWS, isa)
    return sum(_is_packed(m) for m in linears)


def unpack_linears(linears: Iterable[nn.Linear]) -> None:
    """Drop the packed copies: every linear back to the forward it had before packing (F.linear, or the
    widened one it had)."""
    for m in linears:
        if _is_packed(m):
            inner = getattr(m.__dict__["forward"], "inner", None)
            del m.forward
            if inner is not None:
                m.forward = inner
