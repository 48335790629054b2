"""Attention of decode rows (one query per sequence) over their gathered, padded contexts.

`decode_attention(q, k, v, scale=..., mask=...)`: q (B, nH, D), k/v (B, L, nKV, D) (a sequence's
context, padded to the longest), mask (B, 1, 1, L) bool (True = attend) or None. Returns (B, nH, D)
in q's dtype. GQA: kv head j serves query heads [j*g, (j+1)*g).

Two paths:
  * CPU, bf16/fp16: two batched fp32 matmuls around an fp32 softmax. torch's CPU SDPA (the flash
    kernel) spends its time on per-block overhead when each sequence has a single query: for 16
    sequences x 16 heads x 130 keys x 64 dims in bf16 it took 2.6 ms on this project's machine, the
    matmuls 0.26 ms, and 8 layers of it were 30% of a 16-row decode step of the mid bench config. The
    upcast K/V are a copy of the gathered context, which is a copy already; fp32 scores and softmax
    are what SDPA computes internally too (held to the bf16 criterion). One unmasked row (batch-1
    decode) runs the same two products as 3-D bmm calls (the same bits, fewer ops). In bf16 with
    qvl's CPU library (AVX2 + FMA, head_dim % 16 == 0) the same fp32 math is one call instead
    (qvl.layers.cpu_ops.decode_attention: 10 torch ops fewer per layer).
  * otherwise (float32 on the CPU: the exact reference; CUDA): SDPA, unchanged.

Knows nothing about caches, blocks or the model.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from qvl.layers import cpu_ops

_HAS_GQA = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)


def _sdpa(q, k, v, *, scale: float, mask) -> torch.Tensor:
    """q (B, nH, 1, D), k/v (B, nKV, L, D) -> (B, nH, 1, D)."""
    if k.shape[1] != q.shape[1]:
        if _HAS_GQA:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
        g = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def _fp32_matmuls(q, k, v, *, scale: float, mask) -> torch.Tensor:
    b, nh, d = q.shape
    nkv = k.shape[2]
    if b == 1 and mask is None:
        # One sequence: bmm on the (nKV, ...) operands torch.matmul would fold the batch to itself (the same
        # values and strides, so the same bits) without its broadcast and reshape ops around each product.
        qg = q.view(nkv, nh // nkv, d).float()                             # (nKV, g, D)
        probs = torch.bmm(qg, k[0].permute(1, 2, 0).float()).mul_(scale).softmax(dim=-1)  # (nKV, g, L)
        return torch.bmm(probs, v[0].transpose(0, 1).float()).view(b, nh, d).to(q.dtype)  # (1, nH, D)
    qg = q.view(b, nkv, nh // nkv, d).float()                              # (B, nKV, g, D)
    kt = k.permute(0, 2, 3, 1).float()                                     # (B, nKV, D, L)
    vt = v.transpose(1, 2).float()                                         # (B, nKV, L, D)
    scores = torch.matmul(qg, kt).mul_(scale)                              # (B, nKV, g, L)
    if mask is not None:
        scores.masked_fill_(~mask, float("-inf"))                          # mask (B, 1, 1, L) broadcasts
    probs = scores.softmax(dim=-1)
    out = torch.matmul(probs, vt)                                          # (B, nKV, g, D)
    return out.view(b, nh, d).to(q.dtype)                                  # (B, nH, D)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
                     mask: torch.Tensor | None = None) -> torch.Tensor:
    """q (B, nH, D) over k, v (B, L, nKV, D) -> (B, nH, D)."""
    if cpu_ops.fast(q) and q.shape[-1] % 16 == 0:
        return cpu_ops.decode_attention(q, k, v, scale=scale, mask=mask)  # the same math in one call
    if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16):
        return _fp32_matmuls(q, k, v, scale=scale, mask=mask)
    out = _sdpa(q.unsqueeze(2), k.transpose(1, 2).to(q.dtype), v.transpose(1, 2).to(q.dtype),
                scale=scale, mask=mask)                                    # (B, nH, 1, D)
    return out.squeeze(2)
