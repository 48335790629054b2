"""The small ops between a decoder layer's linears, for CPU bf16 activations: one C++ call each.

At batch 1 a decode step's torch ops between the linears (RMSNorm is 9 of them, rotary 4, decode
attention 10, SiLU and the product 2) each pay a dispatch and the cache misses of their own code right
after a linear has streamed megabytes of weight through the caches. Here each is one call into qvl's CPU
library (qvl/layers/cpu_kernels/glue.h, AVX2 + FMA): on the 2B int4 decode (1 thread, Zen 3) the time
outside the linears and the LM head went from 32.3 to 23.9 ms a token (`bench/quant.py --glue-ab`).

    fast(x) -> bool       the ops below apply to x: CPU, bf16, no grad, the library built, AVX2 + FMA here
                          and ENABLED (a module switch: bench/quant.py --glue-ab turns it off and on
                          in one process to compare)
    rms_norm(x (..., H), w (H,), eps) -> (..., H)                       fresh
    rotary(x (N, heads, D), cos, sin_signed (N, 1, D) or (N, D)) -> (N, heads, D)   fresh
    silu_mul(gate (M, I), up (M, I)) -> silu(gate) · up, written over gate where gate is contiguous
    decode_attention(q (B, nH, D), k, v (B, L, nKV, D), scale, mask (B, 1, 1, L) bool | None) -> (B, nH, D)

Callers check fast(x) first and otherwise run their torch expression (the reference: float32 never gets
here). Numerics, against those expressions: rotary gives the same bits (each product and the sum
rounded to bf16, as torch's ops round); rms_norm and silu_mul round where they round, but sum the squares
in another order and take e^x from a polynomial (~1 ulp of fp32), so a few outputs differ by one bf16 ulp;
decode_attention computes scores, softmax and the weighted sum in fp32 (as the CPU bf16 path of
qvl.layers.decode_attention does) and rounds once. Held to the bf16 criterion. Each output row (each
sequence and head for attention) is computed alone: results do not depend on the batch or thread count.
Shapes: RMSNorm and silu_mul need the last dim % 8 == 0, rotary and attention head_dim % 16 == 0, rotary
one table row per token (the callers check; the C++ refuses others with a ValueError). Strides: fast()
does not look at them, the functions make what they need contiguous (a view where it already is).
"""
from __future__ import annotations

import torch

from qvl.layers import quant_kernels as qk

ENABLED = True
_state: dict = {}


def _glue():
    if "lib" not in _state:
        lib = qk._lib()
        _state["lib"] = lib if lib is not None and lib.qk_glue_ok() else None
    return _state["lib"]


def fast(x: torch.Tensor) -> bool:
    return (ENABLED and x.dtype == torch.bfloat16 and x.device.type == "cpu" and not torch.is_grad_enabled()
            and _glue() is not None)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as 2-D rows with unit column stride (a view where it can be, else a copy)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _check(rc: int, what: str, shape) -> None:
    if rc:
        raise ValueError(f"qvl CPU op {what} refused shape {tuple(shape)} (code {rc}: -1 shape, -2 ISA)")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x2 = _rows(x)
    w = weight.contiguous()
    y = torch.empty(x2.shape, dtype=torch.bfloat16)                                      # (rows, H)
    _check(_glue().qk_rms_norm(x2.data_ptr(), x2.stride(0), w.data_ptr(), y.data_ptr(), y.stride(0),
                               x2.shape[0], x2.shape[1], eps), "rms_norm", x.shape)
    return y.view(x.shape)


def _heads(x: torch.Tensor) -> torch.Tensor:
    """(N, heads, D) with each token's heads contiguous (a view where they are)."""
    return x if x.stride(2) == 1 and x.stride(1) == x.shape[2] else x.contiguous()


def rotary(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    n, heads, d = x.shape
    x = _heads(x)
    cos, sin_signed = cos.reshape(n, d).contiguous(), sin_signed.reshape(n, d).contiguous()   # (N, D)
    y = torch.empty(n, heads, d, dtype=torch.bfloat16)
    _check(_glue().qk_rotary(x.data_ptr(), x.stride(0), cos.data_ptr(), sin_signed.data_ptr(), y.data_ptr(),
                             heads * d, n, heads, d), "rotary", x.shape)
    return y


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    g, u = _rows(gate), _rows(up)
    out = g if g.data_ptr() == gate.data_ptr() and g.is_contiguous() else torch.empty(g.shape, dtype=torch.bfloat16)
    _check(_glue().qk_silu_mul(g.data_ptr(), g.stride(0), u.data_ptr(), u.stride(0), out.data_ptr(), out.stride(0),
                               g.shape[0], g.shape[1]), "silu_mul", gate.shape)
    return out.view(gate.shape)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
                     mask: torch.Tensor | None = None) -> torch.Tensor:
    b, nh, d = q.shape
    length, nkv = k.shape[1], k.shape[2]
    q = _heads(q)
    k, v = (t if t.stride(3) == 1 and t.stride(2) == d else t.contiguous() for t in (k, v))
    m = None if mask is None else mask.reshape(b, length).to(torch.bool).contiguous()       # (B, L) bytes
    out = torch.empty(b, nh, d, dtype=torch.bfloat16)
    _check(_glue().qk_decode_attention(q.data_ptr(), q.stride(0), k.data_ptr(), k.stride(0), k.stride(1),
                                       v.data_ptr(), v.stride(0), v.stride(1), None if m is None else m.data_ptr(),
                                       out.data_ptr(), b, length, nh, nkv, d, scale, torch.get_num_threads()),
           "decode_attention", q.shape)
    return out
