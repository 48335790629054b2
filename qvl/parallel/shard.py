"""Tensor parallelism as a transform: a model built on the meta device -> rank r's shard of it.

  TPInfo(rank, size, group=None)        this process's place in the TP group (group None: the default)
  check_shardable(config, spec, size)   ValueError naming the numbers, before anything is built
  shard_model(model, tp) -> model       on the meta model, after the quantize transform, before loading;
                                        sets `model.tp` (the TPInfo) and `model.tp_dropped` (the name
                                        prefixes this rank does not hold, whose stored tensors it skips)

What a rank holds (Megatron's split; the family's `weights.TP_PLAN` says which linear is which):
  column   q_proj, gate_proj, up_proj: output features [r·out/tp, (r+1)·out/tp) of W (and of the bias):
           the rank's nH/tp query heads, its I/tp slice of the MLP; no communication.
  kv       k_proj, v_proj: the rank's nKV/tp KV heads when tp divides nKV; when tp > nKV (tp a multiple
           of nKV) the one KV head its query heads share, replicated on tp/nKV ranks.
  row      o_proj, down_proj: input features [r·in/tp, ...) of W; y = all-reduce(x_r·W_rᵀ) + b, the bias
           whole on every rank and added once, after the reduce (qvl.parallel.linear).
  attention modules: num_heads = nH/tp and num_kv_heads = the rank's KV heads (the KV cache's shape per
           rank); head_dim, scale, the norms (Qwen3's q_norm / k_norm act per head) are replicated.
  RANK0_ONLY (vision tower, token embedding, LM head): rank 0 holds them, the other ranks set them to
           None and skip their tensors when loading.
The layers' own tensors then load through the `tp_slices` each sharded module carries ({attr:
TensorSlice}, qvl.parallel.slices): qvl.build reads only those slices of the stored tensors.
Quantized: GPTQ / AWQ shards split at whole int32 words and whole groups (check_shardable refuses other
sizes: the 72B's down_proj, 29568 = 231 groups of 128, at any TP size), so they compute what tp=1 computes.
On the fly each rank quantizes its own float slice, so no group ever straddles two ranks: int4 keeps
groups of 128 where the rank's slice of the input is a multiple of 128 (then exactly tp=1's groups and
numbers), else 64 or 32 like any int4 layer (the 72B's down_proj at tp=2: 14784 inputs per rank, groups
of 64; refused below 32); int8 has one scale per output row, which in a row-parallel layer becomes the
max over the rank's part of the row. Those two cases are finer than tp=1, not the same bits: they are
held to the fast-kernel criterion.

Why vision, embedding and LM head on rank 0 only (vLLM's mm_encoder_tp_mode, decided here):
  * The vision tower is small beside the decoder (Qwen2-VL-72B: 0.68 B of 73 B parameters) and runs once
    per image. Sharding it would add two all-reduces per ViT block for little memory; replicating it
    would spend its weights and its compute on every rank for the same result. Rank 0 runs it (and the
    embedding lookup) once and the executor broadcasts `inputs_embeds` (N, H) (plus Qwen3-VL's DeepStack
    rows): H values per token, 16 KB per decoded token of the 72B in bf16.
  * The LM head stays whole (not vocabulary-parallel): sampling, logprobs, penalties and grammar masks need
    the full (n, V) logits on rank 0 anyway, so a vocab split would cost a gather of them every step to
    save V·H of memory (a tied head is the embedding itself). The price: rank 0 holds embedding + head
    (+ vision) more than the others (72B bf16: about 2 x 2.5 GB + 1.3 GB), and since the engine sizes the
    KV cache by the smallest rank, rank 0's free memory bounds it.
  * A rank that never runs these never holds them: workers load decoder layers and the final norm only.
So the shard's `forward(input_ids, positions, attn_metadata, inputs_embeds=...)` is called on every rank
with the same arguments (rank 0's embeddings), its all-reduces keep the ranks in step, and only rank 0
calls `embed`, `encode_vision` and `compute_logits`.
Knows nothing about processes, the engine or files (qvl.parallel.group / worker, qvl.build).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from qvl.layers.linear import QuantLinear
from qvl.parallel.linear import RowParallelLinear, RowParallelQuantLinear
from qvl.parallel.slices import column_slices, row_slices
from qvl.quant import onthefly
from qvl.quant.spec import QuantSpec


@dataclass(frozen=True)
class TPInfo:
    rank: int
    size: int
    group: object | None = None   # a torch.distributed ProcessGroup; None = the default group

    def __post_init__(self) -> None:
        if self.size < 1 or not 0 <= self.rank < self.size:
            raise ValueError(f"TPInfo: rank={self.rank} must be in [0, size={self.size}) and size >= 1")


def kv_heads(num_heads: int, num_kv_heads: int, size: int, rank: int) -> tuple[int, int]:
    """(first KV head, count) that rank `rank` of `size` holds."""
    if num_kv_heads >= size:
        n = num_kv_heads // size
        return rank * n, n
    return rank // (size // num_kv_heads), 1   # query heads of rank r all use this one KV head


def _layer_shapes(c) -> list[tuple[str, str, int, int]]:
    """(name, style, in_features, out_features) of the decoder projections every family shares."""
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    h, i = c.hidden_size, c.intermediate_size
    return [("self_attn.q_proj", "column", h, q), ("self_attn.k_proj", "kv", h, kv),
            ("self_attn.v_proj", "kv", h, kv), ("self_attn.o_proj", "row", q, h),
            ("mlp.gate_proj", "column", h, i), ("mlp.up_proj", "column", h, i), ("mlp.down_proj", "row", i, h)]


def check_shardable(config, spec: QuantSpec | None, size: int) -> None:
    """ValueError (one line, with the numbers) when the decoder cannot be split over `size` ranks."""
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"tensor_parallel_size must be an integer >= 1, got {size!r}")
    if size == 1:
        return
    nh, nkv, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    if nh % size:
        raise ValueError(f"tensor_parallel_size={size} must divide num_attention_heads={nh}")
    if nkv % size and size % nkv:
        raise ValueError(f"tensor_parallel_size={size} must divide num_key_value_heads={nkv} or be a "
                         f"multiple of it (then each KV head is replicated on {size}/{nkv} ranks)")
    if config.intermediate_size % size:
        raise ValueError(f"tensor_parallel_size={size} must divide intermediate_size={config.intermediate_size}")
    if spec is None:
        return
    for name, style, k, n in _layer_shapes(config):
        if spec.keeps_float(name):
            continue
        if style == "row":
            _check_row(name, spec, k, size)
        elif spec.from_checkpoint:
            n_r = kv_heads(nh, nkv, size, 0)[1] * d if style == "kv" else n // size
            pf = 32 // spec.bits if spec.method == "gptq" else 8
            if n_r % pf:
                raise ValueError(f"{spec.method} {name}: {n_r} output features per rank "
                                 f"(out_features={n} / tensor_parallel_size={size}) is not a multiple of "
                                 f"the {pf} packed in one int32")


def _check_row(name: str, spec: QuantSpec, k: int, size: int) -> None:
    """A row-parallel layer's input split must keep whole quantization groups (and whole packed words):
    a GPTQ / AWQ checkpoint's groups are fixed on disk, so the TP size must divide their number."""
    if spec.method == "int8":
        return                                    # one scale per output row: any split of K works
    k_r = k // size
    if spec.method == "int4":
        # Each rank quantizes its own slice (QuantLinear of k_r inputs), in groups that lie inside it.
        try:
            onthefly.int4_group(k_r, spec.group_size)
        except ValueError:
            raise ValueError(f"int4 {name}: {k_r} input features per rank (in_features={k} / "
                             f"tensor_parallel_size={size}) is not a multiple of 32, the smallest int4 "
                             f"group") from None
        return
    pf = 32 // spec.bits                          # GPTQ packs qweight along the input features
    if spec.method == "gptq" and k_r % pf:
        raise ValueError(f"gptq {name}: {k_r} input features per rank (in_features={k} / "
                         f"tensor_parallel_size={size}) is not a multiple of the {pf} packed in one int32")
    group = spec.group_size
    if group == -1:
        return                                    # one group over all K: every rank keeps the whole scales
    if k % group or (k // group) % size:
        raise ValueError(f"{spec.method} {name}: in_features={k} is {k / group:g} groups of {group}, which "
                         f"tensor_parallel_size={size} does not divide (a group may not straddle two ranks); "
                         f"use a tensor_parallel_size that divides {k // group}, or a checkpoint padded "
                         f"to a multiple of {group * size}")


def _quant_spec(model: nn.Module) -> QuantSpec | None:
    return next((m.spec for m in model.modules() if isinstance(m, QuantLinear)), None)


def _sharded(mod: nn.Module, style: str, a: int, b: int, tp: TPInfo) -> nn.Module:
    """The rank's module for `mod` (features [a, b) of its output (column) or input (row))."""
    has_bias = mod.has_bias if isinstance(mod, QuantLinear) else mod.bias is not None
    if isinstance(mod, QuantLinear):
        kw = dict(dtype=mod.dtype, device=mod.device, name=mod.name)
        if style == "row":
            new = RowParallelQuantLinear(b - a, mod.out_features, has_bias, mod.spec, group=tp.group, **kw)
            new.tp_slices = row_slices(mod.spec, a, b, mod.in_features)
        else:
            new = QuantLinear(mod.in_features, b - a, has_bias, mod.spec, **kw)
            new.tp_slices = column_slices(mod.spec, a, b, mod.out_features)
        return new
    if style == "row":
        new = RowParallelLinear(b - a, mod.out_features, has_bias, group=tp.group)
        new.tp_slices = row_slices(None, a, b, mod.in_features)
    else:
        new = nn.Linear(mod.in_features, b - a, bias=has_bias)
        new.tp_slices = column_slices(None, a, b, mod.out_features)
    return new


def shard_model(model: nn.Module, tp: TPInfo) -> nn.Module:
    """Rank `tp.rank`'s shard of `model` (built on the meta device; modified in place and returned)."""
    if tp.size == 1:
        return model
    from qvl.models import family_for

    config = model.config
    weights = family_for(config.model_type).weights
    check_shardable(config, _quant_spec(model), tp.size)
    r, size = tp.rank, tp.size
    nh, nkv, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    first_kv, n_kv = kv_heads(nh, nkv, size, r)
    done: dict[str, int] = {}
    with torch.device("meta"):
        for name, mod in list(model.named_modules()):
            style = next((s for s, pat in weights.TP_PLAN.items() if pat.fullmatch(name)), None)
            if style is None:
                continue
            if style == "kv":
                a, b = first_kv * d, (first_kv + n_kv) * d
            else:
                width = mod.in_features if style == "row" else mod.out_features
                a, b = r * width // size, (r + 1) * width // size
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, _sharded(mod, style, a, b, tp))
            done[style] = done.get(style, 0) + 1
    attn = model.attention_modules()
    for m in attn:
        m.num_heads, m.num_kv_heads = nh // size, n_kv
    want = {"column": 3 * len(attn), "kv": 2 * len(attn), "row": 2 * len(attn)}
    if done != want:
        raise ValueError(f"{type(model).__name__}: TP_PLAN matched {done} linears, expected {want}")
    if r != 0:
        for name in weights.RANK0_ONLY:
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, None)
    model.tp = tp
    model.tp_dropped = tuple(f"{n}." for n in weights.RANK0_ONLY) if r != 0 else ()
    return model
