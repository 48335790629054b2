"""Prepacked oneDNN weights for single-row (decode) matmuls on CPU, used only where bit-identical.

On CPUs with AMX / AVX512-BF16, `F.linear` on one bf16 row re-lays the plain (out, in) weight into the
kernel's blocked layout on every call; that copy, not the memory read, bounds batch-1 decode.
`pack_linears(linears)` gives each nn.Linear a second copy of its weight in the blocked layout
(`torch.ops.mkldnn._reorder_linear_weight`) and routes single-row inputs through it
(`torch.ops.mkldnn._linear_pointwise`). Inputs of several rows (prefill, batched decode), inputs that
need grad, other thread counts and other dtypes keep `F.linear` on the plain weight.

Numerics: the packed kernel must give the *same bits* as F.linear, or greedy tokens would drift from
transformers'. Whether it does depends on the shape and the thread count (the kernel splits the
reduction over in_features differently for some sizes), so each distinct (out, in, bias) is probed once
when packing: random rows through both paths, compared bit for bit, enough rows for ~2^17 outputs (a
different reduction order changes ~1e-4 of the outputs, so it is caught with near certainty). A shape
that differs stays on F.linear (on Qwen2-VL-2B: down_proj, in_features 8960; the rest match).

Memory: the packed copy lives beside the plain weight (prefill needs the plain one, and a tied LM head
shares it with the embedding). `pack_linears` packs nothing when the copies would exceed `max_bytes`.
`unpack_linears` restores plain F.linear. The packed tensors are not parameters: state_dict is unchanged.

Knows nothing about the model: it sees nn.Linear modules only.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

_PROBE_OUTPUTS = 1 << 17


def packing_supported(dtype: torch.dtype, device: torch.device) -> bool:
    """bf16 on a CPU whose oneDNN has bf16 kernels (AVX512-BF16 / AMX)."""
    return (device.type == "cpu" and dtype == torch.bfloat16 and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise")
            and torch.ops.mkldnn._is_mkldnn_bf16_supported())


class _PackedForward:
    """Replaces one nn.Linear's forward: packed kernel for a single contiguous row, F.linear otherwise."""

    def __init__(self, linear: nn.Linear, packed: torch.Tensor, threads: int) -> None:
        self.weight, self.bias = linear.weight, linear.bias
        self.packed, self.threads = packed, threads

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if (x.dim() == 2 and x.shape[0] == 1 and x.dtype == self.packed.dtype and x.is_contiguous()
                and not torch.is_grad_enabled() and torch.get_num_threads() == self.threads):
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")  # (1, out)
        return F.linear(x, self.weight, self.bias)


def _pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)


def _bit_identical(linear: nn.Linear, packed: torch.Tensor, threads: int) -> bool:
    """Probe: single random rows through F.linear and the packed kernel give the same bits."""
    out_f, in_f = linear.weight.shape
    rows = min(64, max(2, math.ceil(_PROBE_OUTPUTS / out_f)))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, in_f, generator=g).to(linear.weight.dtype)  # (rows, in)
    fwd = _PackedForward(linear, packed, threads)
    with torch.no_grad():
        return all(torch.equal(F.linear(x[r:r + 1], linear.weight, linear.bias), fwd(x[r:r + 1]))
                   for r in range(rows))


def pack_linears(linears: Iterable[nn.Linear], *, max_bytes: int | None = None) -> int:
    """Give each linear whose shape passes the bit-identity probe a packed single-row path.

    Returns the number of linears packed (0 when the dtype/device is unsupported or the packed copies
    would exceed max_bytes). Packing twice is a no-op for already packed modules.
    """
    linears = [m for m in linears if not isinstance(m.__dict__.get("forward"), _PackedForward)]
    if not linears or not packing_supported(linears[0].weight.dtype, linears[0].weight.device):
        return 0
    need = sum(m.weight.numel() * m.weight.element_size() for m in linears)
    if max_bytes is not None and need > max_bytes:
        return 0
    threads = torch.get_num_threads()
    verdict: dict[tuple, bool] = {}
    count = 0
    for m in linears:
        if m.weight.dtype != torch.bfloat16:
            continue
        key = (*m.weight.shape, m.bias is not None)
        if verdict.get(key) is False:
            continue
        packed = _pack(m.weight)
        if key not in verdict:
            verdict[key] = _bit_identical(m, packed, threads)
        if verdict[key]:
            m.forward = _PackedForward(m, packed, threads)
            count += 1
    return count


def unpack_linears(linears: Iterable[nn.Linear]) -> None:
    """Drop the packed copies: every linear back to its class forward (F.linear)."""
    for m in linears:
        if isinstance(m.__dict__.get("forward"), _PackedForward):
            del m.forward
