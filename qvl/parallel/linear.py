"""Row-parallel linears: a rank holds a slice of the input features, sums the partial products of every
rank with one all-reduce, then adds the bias (once, after the reduce, held whole by every rank).

  all_reduce(y, group)                         y summed over the TP group in place (torch.distributed)
  RowParallelLinear(in_r, out, bias, group)    float: weight (out, in_r), bias (out,) | None
  RowParallelQuantLinear(in_r, out, has_bias, spec, group=..., ...)
                                               the same around QuantLinear's kernels (qvl.layers.linear)

Column-parallel layers need no class of their own: a plain nn.Linear / QuantLinear with the rank's out_r
output features, whose output feeds only the rank's own heads or MLP slice (no communication).

RowParallelLinear is deliberately not an nn.Linear: the CPU bf16 runtime transforms
(qvl.layers.packed_linear, widened_linear) replace the forward of every nn.Linear they find, which would
drop the all-reduce; o_proj and down_proj of a shard keep F.linear.
Knows nothing about models or which layer is which (qvl.parallel.shard decides).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from qvl.layers.linear import QuantLinear


def all_reduce(y: torch.Tensor, group) -> torch.Tensor:
    dist.all_reduce(y, op=dist.ReduceOp.SUM, group=group)
    return y


class RowParallelLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, group=None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.tp_group = in_features, out_features, group
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def extra_repr(self) -> str:
        return f"in_features={self.in_features} (this rank's), out_features={self.out_features}, " \
               f"bias={self.bias is not None}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = all_reduce(F.linear(x, self.weight), self.tp_group)   # (..., out): the sum over ranks
        return y if self.bias is None else y + self.bias


class RowParallelQuantLinear(QuantLinear):
    def __init__(self, *args, group=None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.tp_group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = all_reduce(self._linear(x, None), self.tp_group)      # (..., out)
        return y if self.bias is None else y + self.bias
