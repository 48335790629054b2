"""The quantize transform: a model built on the meta device -> the same model with QuantLinear modules.

  quantize_linears(model, spec, quantizable, *, dtype, device) -> {module name: QuantLinear}

Every nn.Linear whose module name fully matches the family's `quantizable` pattern (its weights.QUANTIZABLE)
and is not kept float by the spec (AWQ `modules_to_not_convert`) is replaced by a QuantLinear of the same
shape and bias; the rest of the model is untouched. Nothing is allocated: the new modules receive their
tensors from qvl.build by name.
"""
from __future__ import annotations

import re

import torch
import torch.nn as nn

from qvl.layers.linear import QuantLinear
from qvl.quant.spec import QuantSpec


def quantize_linears(model: nn.Module, spec: QuantSpec, quantizable: re.Pattern, *, dtype: torch.dtype,
                     device: torch.device) -> dict[str, QuantLinear]:
    replaced: dict[str, QuantLinear] = {}
    for name, mod in list(model.named_modules()):
        if not (isinstance(mod, nn.Linear) and quantizable.fullmatch(name) and not spec.keeps_float(name)):
            continue
        q = QuantLinear(mod.in_features, mod.out_features, mod.bias is not None, spec, dtype=dtype,
                        device=device, name=name)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, q)
        replaced[name] = q
    if not replaced:
        raise ValueError(f"quantization={spec.method!r}: no module of this model is quantizable")
    return replaced
