"""Qwen2-VL checkpoint keys -> module names: renames, the tied head, and checkpoint quirks.

Keys as the hub stores them (`visual.*`, `model.*`, `lm_head.weight`) are already our module names;
transformers 4.52+ writes `model.visual.*` / `model.language_model.*` (QWEN2VL_SPEC 2), mapped back here.
`TIED` names the parameter that a missing `lm_head.weight` (or `tie_word_embeddings`) shares.
`QUANTIZABLE` matches the module names a quantized checkpoint (GPTQ, AWQ) or on-the-fly int8/int4 turns into
quantized linears: the text decoder's attention and MLP projections only. `visual.*`, the embeddings, the
norms and `lm_head` stay float, as in every official quantized Qwen-VL repo (QUANT_FORMATS 1.1), even when
a GPTQ config names no ignore list. `MERGER_OUT` is the vision merger's last weight, whose output width
must equal the text hidden size.
`TP_PLAN` is how tensor parallelism splits the decoder (qvl.parallel.shard): "column" linears split their
output features, "kv" ones their KV heads (replicated when the TP size exceeds them), "row" ones their input
features (one all-reduce each). `RANK0_ONLY` are the modules only TP rank 0 holds (vision, embedding, head).
Knows nothing about files or devices (qvl.build reads the safetensors).
"""
from __future__ import annotations

import re

RENAMES = (("model.language_model.", "model."), ("model.visual.", "visual."))
TIED = ("lm_head.weight", "model.embed_tokens.weight")   # (head, the embedding it shares)
QUANTIZABLE = re.compile(r"model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)")
MERGER_OUT = "visual.merger.mlp.2.weight"
TP_PLAN = {"column": re.compile(r"model\.layers\.\d+\.(self_attn\.q_proj|mlp\.(gate|up)_proj)"),
           "kv": re.compile(r"model\.layers\.\d+\.self_attn\.[kv]_proj"),
           "row": re.compile(r"model\.layers\.\d+\.(self_attn\.o_proj|mlp\.down_proj)")}
RANK0_ONLY = ("visual", "model.embed_tokens", "lm_head")


def canonical_key(key: str) -> str:
    """Map any accepted spelling to the hub spelling (= our module names)."""
    for old, new in RENAMES:
        if key.startswith(old):
            return new + key[len(old):]
    return key


def sanitize(name: str, tensor):
    """The tensor to load for `name` (a family mends checkpoint quirks here; Qwen2-VL has none)."""
    return tensor
