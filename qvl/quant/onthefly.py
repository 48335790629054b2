"""Float weights -> symmetric weight-only integers while loading (EngineConfig.quantization int8 / int4).

  quantize(weight (N, K) float, bits, group_size, name) -> qvl.quant.formats.Quantized
    int8: one scale per output row (group_size −1), s = max|W_row| / 127, q = round(W / s) in [−127, 127],
          stored as q + 128 with zero point 128.
    int4: one scale per group of `group_size` (128) input columns, s = max|W_group| / 7,
          q = round(W / s) in [−8, 7], stored as q + 8 with zero point 8; where 128 does not divide K the
          largest of 64 and 32 that does is used (no Qwen-VL decoder needs it: its widths are multiples of 128).
s is rounded to fp16 (the CPU kernels' scale type, as the GPTQ / AWQ checkpoints store it; at least 2^-24,
fp16's smallest) before q is computed, so the float32 reference and the kernels dequantize the same W; a
weight whose scale would pass fp16's 65504 (|W| > 8.3e6 for int8) is refused with its name.
Computed in float32 from the stored tensor, one tensor at a time (the caller drops the float weight).
Round-to-nearest, no calibration: GPTQ/AWQ checkpoints are the better int4 when published.
"""
from __future__ import annotations

import torch

from qvl.quant.formats import Quantized

_INT4_FALLBACK_GROUPS = (64, 32)
_FP16_MAX = torch.finfo(torch.float16).max                 # the largest fp16 scale, 65504


def int4_group(in_features: int, group_size: int) -> int:
    for g in (group_size, *_INT4_FALLBACK_GROUPS):
        if in_features % g == 0:
            return g
    raise ValueError(f"int4 quantization needs in_features divisible by 128, 64 or 32, got {in_features}")


def quantize(weight: torch.Tensor, bits: int, group_size: int, name: str = "weight") -> Quantized:
    n, k = weight.shape
    w = weight.detach().float()
    group = k if group_size == -1 else int4_group(k, group_size) if bits == 4 else group_size
    if k % group:
        raise ValueError(f"group_size={group} does not divide in_features={k}")
    qmax = (1 << (bits - 1)) - 1                                                  # 127 | 7
    wg = w.view(n, k // group, group)                                             # (N, G, g)
    amax = wg.abs().amax(-1)                                                      # (N, G)
    if not bool(torch.isfinite(amax).all()) or float(amax.max()) > _FP16_MAX * qmax:
        raise ValueError(f"{name}: int{bits} on the fly keeps fp16 scales, which hold |w| up to "
                         f"{_FP16_MAX * qmax:g}; this weight reaches {float(amax.max()):g}")
    scales = (amax / qmax).to(torch.float16).float().clamp_min(2.0 ** -24)       # (N, G), fp16 values
    q = torch.round(wg / scales[..., None]).clamp_(-qmax - (bits == 4), qmax)    # int8: ±127, int4: −8..7
    zero = 1 << (bits - 1)
    q = (q + zero).to(torch.uint8).view(n, k)                                     # (N, K)
    zeros = torch.full((k // group, n), float(zero))                              # (G, N)
    return Quantized(q, zeros, scales.t().contiguous(), group)
