"""Linears that read the same input, computed in one kernel call (q/k/v, gate/up): a CPU runtime transform.

A model says which of its linears share an input and calls them through `linears(module, names, x)`:

    class Qwen2Attention(nn.Module):
        fused_linears = (("q_proj", "k_proj", "v_proj"),)
        ...
        q, k, v = linears(self, ("q_proj", "k_proj", "v_proj"), x)      # each (N, out_i)

Without the transform that is `tuple(getattr(module, n)(x) for n in names)`, the exact math. After
`fuse_linears(model)` (qvl.layers.cpu_runtime applies it after packing), a group whose members all run the
same qvl CPU kernel is one weight: the members' 16-row panels (and their blocked scales / zeros) are
concatenated along the output dim (on huge pages, qvl.layers.huge_pages), and each member's own tensors
become views of the concatenation (no memory is added). One call then reads one sequential stream: for the 2B at batch 1 that is 4 kernel
calls a layer instead of 7, and k/v_proj (256 rows each) stop paying a call and a panel ramp of their own.

  qk-int4 / qk-int8 QuantLinears (same bits, group, in_features and act-order column permutation;
      every member but the last a multiple of 128 rows, the kernels' block of interleaved panels): every row count, the
      fused QuantWeight's in-register path below MANY_ROWS rows, its dequant + GEMM path from there on.
  bf16 linears on qvl's panels (qvl.layers.packed_linear._PanelForward): up to their max_rows, else each
      member's own forward (prefill: F.linear on the plain weights).
Other groups (oneDNN-packed, fp32, CUDA, TP row-parallel layers) are left alone. Below MANY_ROWS rows the
outputs equal the members' own kernel calls bit for bit (each output's sum is computed the same way, in
one call); the many-row path is torch's bf16 GEMM over the wider weight, held to the bf16 criterion as
the members' own is.
`unfuse_linears(model)` drops the fused calls (the members' views stay valid).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from qvl.layers import linear as qlinear
from qvl.layers import quant_kernels as qk
from qvl.layers.huge_pages import empty_huge
from qvl.layers.linear import QuantLinear
from qvl.layers.packed_linear import _PanelForward

_KEY = "_fused_linears"            # module.__dict__[_KEY]: names -> fused call


def linears(module: nn.Module, names: tuple[str, ...], x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The outputs of module.<name>(x) for each name, through the fused call where one applies."""
    fused = module.__dict__.get(_KEY, {}).get(names)
    if fused is not None and fused.takes(x):
        return fused(x)
    return tuple(getattr(module, n)(x) for n in names)


class _Fused:
    """One call for a group: y (M, sum out_i) split into the members' (M, out_i) outputs (contiguous)."""

    def __init__(self, sizes: list[int], in_features: int) -> None:
        self.sizes, self.in_features = sizes, in_features

    def takes(self, x: torch.Tensor) -> bool:
        return (x.dim() == 2 and x.dtype == torch.bfloat16 and x.device.type == "cpu" and x.is_contiguous()
                and x.shape[1] == self.in_features and not torch.is_grad_enabled())

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        y = self.run(x)                                                                    # (M, sum out_i)
        return tuple(t.contiguous() for t in y.split(self.sizes, dim=1))


class _FusedQuant(_Fused):
    def __init__(self, mods: list[QuantLinear]) -> None:
        super().__init__([m.out_features for m in mods], mods[0].in_features)
        m0, n = mods[0], sum(self.sizes)
        if m0.kernel == "qk-int4":
            zs = [m.z4 if m.z4 is not None else torch.full_like(m.s4, m.zc, dtype=torch.uint8) for m in mods]
            one_zero = all(m.z4 is None and m.zc == m0.zc for m in mods)
            w, s = _cat(mods, "w4"), _cat(mods, "s4")
            z = None if one_zero else _cat_tensors(zs, mods, "z4")
            self.weight = qk.QuantWeight(4, w, s, z, m0.zc if one_zero else 0, m0.group)
        else:
            self.weight = qk.QuantWeight(8, _cat(mods, "w8"), _cat(mods, "s8"), group=m0.group)
        biases = [m.bias if m.bias is not None else torch.zeros(m.out_features, dtype=m.dtype) for m in mods]
        self.bias = torch.cat(biases) if any(m.bias is not None for m in mods) else None     # (n,)
        self.perm = m0.perm                              # act-order GPTQ: the members' one column order
        assert self.weight.n == n

    def run(self, x: torch.Tensor) -> torch.Tensor:
        if self.perm is not None:
            x = x.index_select(1, self.perm)
        if x.shape[0] >= qlinear.MANY_ROWS:
            return self.weight.dequant_matmul(x, self.bias)
        return self.weight.matmul(x, self.bias)


class _FusedPanels(_Fused):
    def __init__(self, mods: list[nn.Linear]) -> None:
        super().__init__([m.out_features for m in mods], mods[0].in_features)
        fwds = [m.__dict__["forward"] for m in mods]
        parts = [f.packed for f in fwds]
        self.panels = torch.cat(parts, out=empty_huge((sum(t.shape[0] for t in parts), parts[0].shape[1]),
                                                      parts[0].dtype))                     # (n, K) panels
        start = 0
        for f, size in zip(fwds, self.sizes):
            f.packed = self.panels[start:start + size]                                     # the member's view
            start += size
        self.max_rows, self.isa = min(f.max_rows for f in fwds), fwds[0].isa
        biases = [m.bias.detach().float() if m.bias is not None else torch.zeros(m.out_features) for m in mods]
        self.bias = torch.cat(biases) if any(m.bias is not None for m in mods) else None     # (n,) fp32

    def takes(self, x: torch.Tensor) -> bool:
        return super().takes(x) and 0 < x.shape[0] <= self.max_rows

    def run(self, x: torch.Tensor) -> torch.Tensor:
        return qk.bf16_mm(x, self.panels, self.bias, isa=self.isa)


def _cat_tensors(parts: list[torch.Tensor], mods: list[nn.Module], buf: str) -> torch.Tensor:
    """cat along dim 0; each member's buffer `buf` becomes its view of the result."""
    shape = (sum(t.shape[0] for t in parts), *parts[0].shape[1:])
    whole, start = torch.cat(parts, out=empty_huge(shape, parts[0].dtype)), 0
    for m, t in zip(mods, parts):
        m.register_buffer(buf, whole[start:start + t.shape[0]])
        start += t.shape[0]
    return whole


def _cat(mods: list[QuantLinear], buf: str) -> torch.Tensor:
    return _cat_tensors([m._buffers[buf] for m in mods], mods, buf)


def _same_perm(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    """Act-order members fuse when they sort their input columns alike (GPTQ's q/k/v and gate/up do:
    one input, one Hessian order)."""
    return (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))


def _fusable(mods: list[nn.Module]) -> type[_Fused] | None:
    if all(type(m) is QuantLinear for m in mods):
        m0 = mods[0]
        same = all(m.kernel == m0.kernel and m.group == m0.group and m.in_features == m0.in_features
                   and _same_perm(m.perm, m0.perm) for m in mods)
        # the integer panels are interleaved in blocks of 128 rows: all but the last member fill whole blocks
        same = same and all(m.out_features % 128 == 0 for m in mods[:-1])
        return _FusedQuant if same and m0.kernel in ("qk-int4", "qk-int8") else None
    if all(type(m) is nn.Linear and isinstance(m.__dict__.get("forward"), _PanelForward) for m in mods):
        return _FusedPanels if len({(m.in_features, m.__dict__["forward"].isa) for m in mods}) == 1 else None
    return None


def fuse_linears(model: nn.Module) -> int:
    """Fuse every group a module declares in `fused_linears` whose members run one qvl kernel; returns
    how many groups are fused afterwards."""
    done = 0
    for module in model.modules():
        for names in getattr(type(module), "fused_linears", ()):
            table = module.__dict__.setdefault(_KEY, {})
            if names not in table:
                mods = [getattr(module, n) for n in names]
                kind = _fusable(mods)
                if kind is None:
                    continue
                table[names] = kind(mods)
            done += 1
    return done


def unfuse_linears(model: nn.Module) -> None:
    for module in model.modules():
        module.__dict__.pop(_KEY, None)
