"""Which slice of a stored tensor one tensor-parallel rank reads, for float and GPTQ / AWQ layers.

  TensorSlice(dim, start, stop, full, shift=0)
      rows (dim 0) or columns (dim 1) [start, stop) of a stored tensor whose size along `dim` must be
      `full` (config.json's number: a slice of a wrongly sized tensor would otherwise load silently);
      `shift` is subtracted from the values read (a row-parallel rank's GPTQ g_idx: global group numbers
      -> the rank's local ones).
  read(handle, key, tslice | None) -> torch.Tensor
      the whole tensor, or only the slice through `handle.get_slice(key)[...]`: a view into the
      memory-mapped file, of which qvl.build copies out the slice alone (a row slice touches only its own
      pages, a column slice each row's segment), so no rank holds a whole sharded tensor once loaded.
  column_slices(spec, a, b, out_features) / row_slices(spec, a, b, in_features) -> {attr: TensorSlice}
      what a column-parallel linear (output features [a, b) of W (N, K)) or a row-parallel one (input
      features [a, b)) reads of each tensor it loads (QUANT_FORMATS 1.2):
        float, int8 / int4 on the fly   weight (N, K): rows | columns; bias (N,): rows | whole
        gptq   qweight (K·b/32, N): columns | rows / (32/b);  qzeros (G, N·b/32): columns / (32/b) | groups;
               scales (G, N): columns | groups;  g_idx (K,): whole | [a, b) shifted by a / group
        awq    qweight (K, N/8): columns / 8 | rows;  qzeros (G, N/8): columns / 8 | groups;
               scales (G, N): columns | groups
      With group_size -1 (one group over all K) a row-parallel rank keeps the whole qzeros / scales.
      The alignment (a, b multiples of the packing and of whole groups) is check_shardable's
      (qvl.parallel.shard), asserted here.
Knows nothing about modules, models or torch.distributed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from qvl.quant.spec import QuantSpec


@dataclass(frozen=True)
class TensorSlice:
    dim: int
    start: int
    stop: int
    full: int
    shift: int = 0


def read(handle, key: str, ts: TensorSlice | None) -> torch.Tensor:
    """The stored tensor `key` of an open safetensors `handle`, or only its slice `ts`."""
    if ts is None:
        return handle.get_tensor(key)
    sl = handle.get_slice(key)
    shape = tuple(sl.get_shape())
    if len(shape) <= ts.dim or shape[ts.dim] != ts.full:
        raise ValueError(f"{key} has shape {shape}, expected {ts.full} along dim {ts.dim} from config.json")
    t = sl[ts.start:ts.stop] if ts.dim == 0 else sl[:, ts.start:ts.stop]
    return t - ts.shift if ts.shift else t


def _div(x: int, d: int, what: str) -> int:
    assert x % d == 0, f"{what}: {x} is not a multiple of {d} (check_shardable lets no such split through)"
    return x // d


def column_slices(spec: QuantSpec | None, a: int, b: int, out: int) -> dict[str, TensorSlice]:
    """Output features [a, b) of a linear with `out` of them."""
    rows = TensorSlice(0, a, b, out)
    if spec is None or not spec.from_checkpoint:
        return {"weight": rows, "bias": rows}
    pf = 32 // spec.bits if spec.method == "gptq" else 8          # output columns per int32 of qzeros
    packed = TensorSlice(1, _div(a, pf, "column start"), _div(b, pf, "column stop"), _div(out, pf, "out"))
    cols = TensorSlice(1, a, b, out)
    qweight = cols if spec.method == "gptq" else packed           # GPTQ packs qweight along K, AWQ along N
    return {"qweight": qweight, "qzeros": packed, "scales": cols, "bias": rows}


def row_slices(spec: QuantSpec | None, a: int, b: int, in_: int) -> dict[str, TensorSlice]:
    """Input features [a, b) of a linear with `in_` of them (the bias stays whole: added after the reduce)."""
    if spec is None or not spec.from_checkpoint:
        return {"weight": TensorSlice(1, a, b, in_)}
    if spec.act_order:
        raise ValueError("tensor parallelism: an act-order GPTQ checkpoint (desc_act=true) scatters each "
                         "group over the whole input, so o_proj / down_proj cannot be split by input rows; "
                         "use tensor_parallel_size=1 or a desc_act=false checkpoint")
    out: dict[str, TensorSlice] = {}
    if spec.method == "gptq":
        pf = 32 // spec.bits                                       # input rows per int32 of qweight
        out["qweight"] = TensorSlice(0, _div(a, pf, "row start"), _div(b, pf, "row stop"), _div(in_, pf, "in"))
    else:
        out["qweight"] = TensorSlice(0, a, b, in_)
    if spec.group_size != -1:
        g = spec.group_size
        groups = TensorSlice(0, _div(a, g, "row start"), _div(b, g, "row stop"), _div(in_, g, "in"))
        out.update(qzeros=groups, scales=groups)
    if spec.method == "gptq":
        out["g_idx"] = TensorSlice(0, a, b, in_, shift=0 if spec.group_size == -1 else a // spec.group_size)
    return out
