"""A CPU runtime transform: a decode step's Qwen2 / Qwen3 decoder layers in one call into qvl's CPU library.

Why: at batch 1 the 2B's decode step spends 25-30 ms of its ~130 (int4, 1 thread, Zen 3) outside the
kernels: ~8000 Python calls and ~3000 torch ops over 28 layers, each running with cold caches after a linear
has streamed megabytes of weight. Here the layers' kernels run back to back in C++
(qvl/layers/cpu_kernels/stack.h), the same calls in the same order as the Python layers make, so the hidden
states are the Python path's bit for bit (tests/test_cpu_stack.py).

  install(decoder) -> bool      after qvl.layers.fused_linear.fuse_linears: binds the decoder (Qwen2's
                                or Qwen3's: each of its classes declares `stack_math` itself, "qwen2",
                                or "qwen2+qk_norm" for Qwen3's attention) when every layer's q/k/v and
                                gate/up are one fused qvl kernel call and o_proj / down_proj one qvl
                                kernel each (qk-int4 / qk-int8 QuantLinears, act-order GPTQ's with
                                their column permutation, bf16 on qvl's panels) and
                                the glue ops run here (AVX2 + FMA); False (nothing bound) otherwise
  uninstall(decoder)
  stack_of(decoder) -> DecodeStack | None
  DecodeStack.takes(x, metadata) -> bool    a decode step it runs: every sequence one new token, B rows no
                                more than the kernels' few-row paths take, the reference attention over
                                the paged bf16 caches, no grad, qvl.layers.cpu_ops enabled
  DecodeStack(x (B, H), cos, sin (B, 1, D), metadata) -> (B, H): the hidden states after the last layer
                                (before the final norm); each token's K/V written to its cache slot

The model asks for it in its forward (qvl.models.qwen2_vl.text.Qwen2Model, Qwen3-VL's Qwen3TextModel when
no DeepStack rows come with the step); prefill, mixed steps and anything `takes` refuses run the Python
layers. Index errors (a slot or block outside the cache, a table shorter than the context) are a
ValueError, raised before anything is written.
"""
from __future__ import annotations

import ctypes

import torch
import torch.nn as nn

from qvl.layers import cpu_ops
from qvl.layers import linear as qlinear
from qvl.layers import quant_kernels as qk
from qvl.layers.attention import REFERENCE, AttentionMetadata
from qvl.layers.fused_linear import _KEY, _FusedPanels, _FusedQuant
from qvl.layers.linear import QuantLinear
from qvl.layers.packed_linear import _PanelForward

_STACK = "_cpu_stack"
_P, _I, _F = ctypes.c_void_p, ctypes.c_int, ctypes.c_float


class _Linear(ctypes.Structure):           # stack.h's Linear
    _fields_ = [("bits", _I), ("w", _P), ("s", _P), ("z", _P), ("zc", _I), ("group", _I), ("il", _I),
                ("isa", _I), ("N", _I), ("K", _I), ("bias", _P), ("perm", _P)]


class _Layer(ctypes.Structure):            # stack.h's Layer
    _fields_ = [("qkv", _Linear), ("o", _Linear), ("gate_up", _Linear), ("down", _Linear),
                ("ln1", _P), ("ln2", _P), ("q_norm", _P), ("k_norm", _P), ("k_cache", _P), ("v_cache", _P)]


class _Step(ctypes.Structure):             # stack.h's Step
    _fields_ = [("B", _I), ("H", _I), ("nH", _I), ("nKV", _I), ("D", _I), ("I", _I), ("eps", _F), ("scale", _F),
                ("x", _P), ("cos", _P), ("sin", _P), ("slots", _P), ("tables", _P), ("width", _I), ("ctx", _P),
                ("block_size", _I), ("num_blocks", _I), ("nthreads", _I), ("nlayers", _I), ("layers", _P)]


def _quant(w: qk.QuantWeight, bias: torch.Tensor | None, perm: torch.Tensor | None,
           keep: list) -> tuple[_Linear, int]:
    b = w.bias32(bias)
    keep += [b, perm]                                  # perm: (K,) int64 from formats.gptq (act order) or None
    return _Linear(w.bits, w.w.data_ptr(), w.s.data_ptr(), None if w.z is None else w.z.data_ptr(), w.zc, w.group,
                   w.il, w.isa, w.n, w.k, None if b is None else b.data_ptr(),
                   None if perm is None else perm.data_ptr()), qlinear.MANY_ROWS - 1


def _panels(panels: torch.Tensor, bias: torch.Tensor | None, isa: int | None, max_rows: int,
            keep: list) -> tuple[_Linear, int]:
    b = None if bias is None else bias.detach().float().contiguous()
    keep.append(b)
    n, k = panels.shape
    return _Linear(16, panels.data_ptr(), None, None, 0, 0, 0, qk.bf16_isa() if isa is None else isa, n, k,
                   None if b is None else b.data_ptr()), max_rows


def _fused(module: nn.Module, names: tuple[str, ...], keep: list) -> tuple[_Linear, int] | None:
    f = module.__dict__.get(_KEY, {}).get(names)
    if isinstance(f, _FusedQuant):
        return _quant(f.weight, f.bias, f.perm, keep)
    if isinstance(f, _FusedPanels):
        return _panels(f.panels, f.bias, f.isa, f.max_rows, keep)
    return None


def _single(m: nn.Module, keep: list) -> tuple[_Linear, int] | None:
    if type(m) is QuantLinear and m.kernel in ("qk-int4", "qk-int8"):
        return _quant(m.kernel_weight(), m.bias, m.perm, keep)
    fwd = m.__dict__.get("forward") if type(m) is nn.Linear else None
    if isinstance(fwd, _PanelForward):
        return _panels(fwd.packed, fwd.bias, fwd.isa, fwd.max_rows, keep)
    return None


class DecodeStack:
    def __init__(self, decoder: nn.Module, layers: list[_Layer], max_rows: int, keep: list) -> None:
        c = decoder.config
        self.decoder, self.max_rows, self._keep = decoder, max_rows, keep
        self.layers = (_Layer * len(layers))(*layers)
        a = decoder.layers[0].self_attn
        self.dims = (c.hidden_size, a.num_heads, a.num_kv_heads, a.head_dim, c.intermediate_size)
        self.eps, self.scale = float(decoder.layers[0].input_layernorm.eps), float(a.scale)

    def takes(self, x: torch.Tensor, md: AttentionMetadata | None) -> bool:
        if (md is None or not cpu_ops.fast(x) or x.dim() != 2 or not 0 < x.shape[0] <= self.max_rows
                or md.max_query_len != 1 or md.num_tokens != x.shape[0] or len(md.seq_lens_q) != x.shape[0]
                or md.slot_mapping is None
                or not isinstance(md.block_tables, torch.Tensor) or md.block_tables.device.type != "cpu"):
            return False
        first = self.decoder.layers[0].self_attn.k_cache
        for layer in self.decoder.layers:        # every cache bf16, contiguous, of the first one's shape
            a = layer.self_attn
            kc, vc = a.k_cache, a.v_cache
            if (kc is None or vc is None or kc.dtype != torch.bfloat16 or vc.dtype != torch.bfloat16
                    or not (kc.is_contiguous() and vc.is_contiguous()) or not kc.shape == vc.shape == first.shape
                    or kc.shape[2:] != (a.num_kv_heads, a.head_dim) or a.attn_backend not in (None, REFERENCE)):
                return False
        return True

    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, md: AttentionMetadata) -> torch.Tensor:
        h, nh, nkv, d, i = self.dims
        b = x.shape[0]
        for t, layer in zip(self.layers, self.decoder.layers):       # the caches, (blocks, block_size, nKV, D)
            t.k_cache, t.v_cache = layer.self_attn.k_cache.data_ptr(), layer.self_attn.v_cache.data_ptr()
        kc = self.decoder.layers[0].self_attn.k_cache                 # takes(): all of this one's shape
        out = x.contiguous().clone()                                                            # (B, H)
        cos, sin = cos.reshape(b, d).contiguous(), sin.reshape(b, d).contiguous()              # (B, D)
        slots = md.slot_mapping.to(torch.int64).contiguous()                                   # (B,)
        tables = md.block_tables.to(torch.int32).contiguous()                                  # (B, W)
        ctx = md.seq_lens.to(torch.int32).contiguous()                                         # (B,)
        step = _Step(b, h, nh, nkv, d, i, self.eps, self.scale, out.data_ptr(), cos.data_ptr(), sin.data_ptr(),
                     slots.data_ptr(), tables.data_ptr(), tables.shape[1], ctx.data_ptr(), kc.shape[1], kc.shape[0],
                     torch.get_num_threads(), len(self.layers), ctypes.addressof(self.layers))
        rc = qk._lib().qk_decode_stack(ctypes.byref(step))
        if rc:
            raise ValueError(f"qvl decode stack refused the step (code {rc}: -1 a slot, block or context outside "
                             f"the cache of {kc.shape[0]} blocks x {kc.shape[1]}, -2 ISA); slots "
                             f"{slots.tolist()}, context lengths {ctx.tolist()}")
        return out


def _math(m: nn.Module) -> str | None:
    """The math m's own class (not a base) declares for stack.h (qvl.models.qwen2_vl.text)."""
    return type(m).__dict__.get("stack_math")


def _norms(layer: nn.Module) -> list[nn.Module] | None:
    """The layer's RMSNorms in stack.h's order (ln1, ln2, then Qwen3's q_norm, k_norm), or None where a class
    of the layer does not declare the math stack.h computes or a norm is not bf16."""
    attn = _math(layer.self_attn)
    norms = [layer.input_layernorm, layer.post_attention_layernorm]
    norms += [layer.self_attn.q_norm, layer.self_attn.k_norm] if attn == "qwen2+qk_norm" else []
    ok = (attn in ("qwen2", "qwen2+qk_norm") and all(_math(m) == "qwen2" for m in (layer, layer.mlp, *norms))
          and all(n.weight.dtype == torch.bfloat16 for n in norms))
    return norms if ok else None


def install(decoder: nn.Module) -> bool:
    decoder.__dict__.pop(_STACK, None)
    lib = qk._lib()
    if _math(decoder) != "qwen2" or lib is None or not lib.qk_glue_ok() or not len(decoder.layers):
        return False
    a0 = decoder.layers[0].self_attn
    if a0.head_dim % 16 or decoder.config.hidden_size % 8 or decoder.config.intermediate_size % 8:
        return False
    keep, layers, rows = [], [], []
    for layer in decoder.layers:
        norms = _norms(layer)
        if norms is None:
            return False
        a, m = layer.self_attn, layer.mlp
        parts = (_fused(a, ("q_proj", "k_proj", "v_proj"), keep), _single(a.o_proj, keep),
                 _fused(m, ("gate_proj", "up_proj"), keep), _single(m.down_proj, keep))
        if any(p is None for p in parts):
            return False
        w = [n.weight.detach() for n in norms]
        keep += w
        ptrs = [t.data_ptr() for t in w] + [None] * (4 - len(w))
        layers.append(_Layer(*(p[0] for p in parts), *ptrs, None, None))
        rows += [p[1] for p in parts]
    lib.qk_decode_stack.argtypes, lib.qk_decode_stack.restype = [ctypes.POINTER(_Step)], ctypes.c_int
    decoder.__dict__[_STACK] = DecodeStack(decoder, layers, min(rows), keep)
    return True


def uninstall(decoder: nn.Module) -> None:
    decoder.__dict__.pop(_STACK, None)


def stack_of(decoder: nn.Module) -> DecodeStack | None:
    return decoder.__dict__.get(_STACK)
