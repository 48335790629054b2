"""Qwen2-VL checkpoint keys -> module names: renames, the tied head, and checkpoint quirks.

Keys as the hub stores them (`visual.*`, `model.*`, `lm_head.weight`) are already our module names;
transformers 4.52+ writes `model.visual.*` / `model.language_model.*` (QWEN2VL_SPEC 2), mapped back here.
`TIED` names the parameter that a missing `lm_head.weight` (or `tie_word_embeddings`) shares.
`QUANTIZABLE` matches the module names a quantized checkpoint (GPTQ, AWQ) or on-the-fly int8/int4 turns into
quantized linears: the text decoder's attention and MLP projections only. `visual.*`, the embeddings, the
norms and `lm_head` stay float, as in every official quantized Qwen-VL repo (QUANT_FORMATS 1.1), even when
a GPTQ config names no ignore list. `MERGER_OUT` is the vision merger's last weight, whose output width
must equal the text hidden size.
Knows nothing about files or devices (qvl.build reads the safetensors).
"""
from __future__ import annotations

import re

RENAMES = (("model.language_model.", "model."), ("model.visual.", "visual."))
TIED = ("lm_head.weight", "model.embed_tokens.weight")   # (head, the embedding it shares)
QUANTIZABLE = re.compile(r"model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)")
MERGER_OUT = "visual.merger.mlp.2.weight"


def canonical_key(key: str) -> str:
    """Map any accepted spelling to the hub spelling (= our module names)."""
    for old, new in RENAMES:
        if key.startswith(old):
            return new + key[len(old):]
    return key


def sanitize(name: str, tensor):
    """The tensor to load for `name` (a family mends checkpoint quirks here; Qwen2-VL has none)."""
    return tensor
