"""The packed checkpoint formats -> qvl's plain integer form (QUANT_FORMATS 1.2-1.4).

Every reader returns `Quantized(q, zeros, scales, group)` for one linear of `out` x `in` (N x K):
  q       (N, K) uint8, the integers in [0, 2**bits)
  zeros   (G, N) float32, integer-valued zero points (G = K / group)
  scales  (G, N) float32 (the stored fp16 values, exactly)
  group   input columns per group
  perm    None, or (K,) int64 for act-order GPTQ: q's column j is input column perm[j] (groups are then
          contiguous in q, group g = q's columns [g·group, (g+1)·group)); a kernel multiplies x[:, perm]
and the dequantized weight, in q's column order, is W'[n, j] = (q[n, j] - zeros[j // group, n]) *
scales[j // group, n] (GPTQ writes it s·(q − z), AWQ (q − z)·s: the same product); W[:, perm] = W'.

  gptq(qweight, qzeros, scales, g_idx, *, bits, group_size, zero_offset, shape)
      qweight (K·bits/32, N) int32 packed along the input dim, LSB first; qzeros (G, N·bits/32) int32
      packed along the output dim; a v1 checkpoint stores zero − 1 (zero_offset 1). Symmetric only: every
      zero must be 2**(bits−1) (the 0x77777777 word of sym int4 v1), else ValueError. g_idx (K,), group
      of each input column: i // group (or None) keeps q as stored; anything else (act order) must give
      every group exactly `group` columns, and q comes back with its columns sorted by group (perm).
  awq(qweight, qzeros, scales, *, group_size, shape)
      4 bit; qweight (K, N/8) and qzeros (G, N/8) int32 packed along the output dim, column 8c + ORDER[i]
      at bits [4i, 4i + 4).
Shapes are checked against `shape` = (N, K) from config.json; a mismatch names the tensor and both shapes.
Knows nothing about modules or files.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)          # packed slot i holds column 8c + AWQ_ORDER[i]
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # column j of a group of 8 sits in slot AWQ_REVERSE_ORDER[j]


class Quantized(NamedTuple):
    q: torch.Tensor
    zeros: torch.Tensor
    scales: torch.Tensor
    group: int
    perm: torch.Tensor | None = None


def _expect(name: str, t: torch.Tensor, shape: tuple, dtype: torch.dtype | None = None) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)} from config.json "
                         f"and quantization_config")
    if dtype is not None and t.dtype != dtype:
        raise ValueError(f"{name} has dtype {t.dtype}, expected {dtype}")


def _unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """(R, C) int32 -> (R·32/bits, C): word r holds rows r·pf .. r·pf+pf−1, LSB first."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    vals = (packed[:, None, :] >> shifts[None, :, None]) & ((1 << bits) - 1)   # (R, pf, C)
    return vals.reshape(-1, packed.shape[1])


def _unpack_cols(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """(R, C) int32 -> (R, C·32/bits): word c holds columns c·pf .. c·pf+pf−1, LSB first."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    vals = (packed[:, :, None] >> shifts[None, None, :]) & ((1 << bits) - 1)   # (R, C, pf)
    return vals.reshape(packed.shape[0], -1)


def num_groups(in_features: int, group_size: int) -> tuple[int, int]:
    """(group, G) for a layer: group_size −1 is one group per row; the group must divide the input."""
    group = in_features if group_size == -1 else group_size
    if in_features % group:
        raise ValueError(f"group_size={group_size} does not divide in_features={in_features}")
    return group, in_features // group


def gptq(qweight, qzeros, scales, g_idx, *, bits: int, group_size: int, zero_offset: int,
         shape: tuple[int, int], name: str = "") -> Quantized:
    n, k = shape
    pf = 32 // bits
    if k % pf or n % pf:
        raise ValueError(f"{name}: GPTQ {bits}-bit packs {pf} values per int32; in_features={k} and "
                         f"out_features={n} must be multiples of {pf}")
    group, g = num_groups(k, group_size)
    _expect(f"{name}.qweight", qweight, (k // pf, n), torch.int32)
    _expect(f"{name}.qzeros", qzeros, (g, n // pf), torch.int32)
    _expect(f"{name}.scales", scales, (g, n))
    perm = None
    if g_idx is not None:
        _expect(f"{name}.g_idx", g_idx, (k,))
        gi = g_idx.long()
        if not torch.equal(gi, torch.arange(k) // group):                       # act order
            counts = torch.bincount(gi.clamp(0, g), minlength=g + 1)
            if int(gi.min()) < 0 or int(gi.max()) >= g or not bool((counts[:g] == group).all()):
                raise ValueError(f"{name}.g_idx must give each of the {g} groups {group} input columns; "
                                 f"it has values {int(gi.min())}..{int(gi.max())} and group sizes "
                                 f"{sorted(set(counts[:g].tolist()))}")
            perm = torch.argsort(gi, stable=True)                                  # (K,) q's column order
    q = _unpack_rows(qweight, bits).t().to(torch.uint8)                           # (N, K)
    q = (q if perm is None else q[:, perm]).contiguous()
    zeros = _unpack_cols(qzeros, bits) + zero_offset                               # (G, N)
    sym = 1 << (bits - 1)
    if not bool((zeros == sym).all()):
        bad = sorted(set(zeros.unique().tolist()) - {sym})[:4]
        raise ValueError(f"{name}.qzeros: zero points {bad} found where symmetric {bits}-bit GPTQ has "
                         f"{sym} everywhere (stored {sym - zero_offset}); the checkpoint is asymmetric or "
                         f"its checkpoint_format is wrong")
    return Quantized(q, zeros.float(), scales.float(), group, perm)


def awq(qweight, qzeros, scales, *, group_size: int, shape: tuple[int, int], name: str = "") -> Quantized:
    n, k = shape
    if n % 8:
        raise ValueError(f"{name}: AWQ packs 8 output columns per int32; out_features={n} is not a multiple of 8")
    group, g = num_groups(k, group_size)
    _expect(f"{name}.qweight", qweight, (k, n // 8), torch.int32)
    _expect(f"{name}.qzeros", qzeros, (g, n // 8), torch.int32)
    _expect(f"{name}.scales", scales, (g, n))
    reverse = list(AWQ_REVERSE_ORDER)

    def unpack(t):                                             # (R, N/8) int32 -> (R, N), columns in order
        vals = _unpack_cols(t, 4).view(t.shape[0], n // 8, 8)  # (R, N/8, 8) in packed slot order
        return vals[:, :, reverse].reshape(t.shape[0], n)

    q = unpack(qweight).t().to(torch.uint8).contiguous()      # (N, K)
    return Quantized(q, unpack(qzeros).float(), scales.float(), group)


def dequantize(qz: Quantized, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W (N, K) = (q − z)·s in the input's column order (perm undone), computed in float32 (exact for
    ≤ 8-bit q and fp16 scales), then cast."""
    n, k = qz.q.shape
    q = qz.q.view(n, k // qz.group, qz.group).float()                                        # (N, G, g)
    w = ((q - qz.zeros.t()[:, :, None]) * qz.scales.t()[:, :, None]).view(n, k)               # (N, K), q's order
    if qz.perm is not None:
        w = torch.empty_like(w).index_copy_(1, qz.perm, w)                                    # W[:, perm] = W'
    return w.to(dtype)
