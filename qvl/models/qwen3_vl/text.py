"""Qwen3 text decoder as used by Qwen3-VL: Qwen2-VL's decoder (qvl.models.qwen2_vl.text) with QK-norm,
no q/k/v bias (`attention_bias`), a head_dim of its own, interleaved M-RoPE and DeepStack. Math only,
attribute names = checkpoint names (`model.layers.i.self_attn.q_norm.weight`, ...).

Per layer: q = q_norm(q_proj(x)), k = k_norm(k_proj(x)) (RMSNorm over head_dim, before rotary), the rest as
Qwen2. `Qwen3TextModel.forward(inputs_embeds (N, H), positions (3, N), attn_metadata, deepstack_embeds,
vision_mask)`: after decoder layer i < len(deepstack_embeds), deepstack_embeds[i] (M, H) is added to the
hidden states at the M rows where vision_mask (N,) is True (transformers' `_deepstack_process`).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from qvl.layers import cpu_stack
from qvl.layers.attention import AttentionMetadata
from qvl.models.qwen2_vl.text import Qwen2Attention, Qwen2DecoderLayer, Qwen2Model, RMSNorm
from qvl.models.qwen3_vl.config import ModelConfig


class Qwen3Attention(Qwen2Attention):
    stack_math = "qwen2+qk_norm"     # qvl.layers.cpu_stack: Qwen2's attention with q_norm / k_norm per head

    def __init__(self, config: ModelConfig) -> None:
        self.qkv_bias = config.attention_bias
        super().__init__(config)
        if config.attention_bias:
            self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=True)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = super().project(x)  # (N, nH, D), (N, nKV, D) x 2
        return self.q_norm(q), self.k_norm(k), v


class Qwen3DecoderLayer(Qwen2DecoderLayer):
    attn_cls = Qwen3Attention
    stack_math = "qwen2"


class Qwen3TextModel(Qwen2Model):
    layer_cls = Qwen3DecoderLayer
    interleaved_mrope = True
    stack_math = "qwen2"             # the layers' math; DeepStack steps run the Python layers (forward)

    def forward(self, inputs_embeds: torch.Tensor, positions: torch.Tensor,
                attn_metadata: AttentionMetadata | None = None,
                deepstack_embeds: Sequence[torch.Tensor] | None = None,
                vision_mask: torch.Tensor | None = None) -> torch.Tensor:
        cos, sin = self.rope_tables(inputs_embeds, positions)  # (N, 1, D) each
        deepstack = list(deepstack_embeds or [])
        if deepstack:
            if vision_mask is None:
                raise ValueError("deepstack_embeds need the vision_mask of the rows they belong to")
            vision_mask = vision_mask.to(inputs_embeds.device)
            m = int(vision_mask.sum())
            bad = [tuple(d.shape) for d in deepstack if d.shape != (m, inputs_embeds.shape[1])]
            if bad:
                raise ValueError(f"deepstack_embeds must be ({m}, {inputs_embeds.shape[1]}) for the {m} vision "
                                 f"rows, got {bad}")
        stack = cpu_stack.stack_of(self)       # CPU runtime transform: a decode step's layers in one call
        if not deepstack and stack is not None and stack.takes(inputs_embeds, attn_metadata):
            return self.norm(stack(inputs_embeds, cos, sin, attn_metadata))
        x = inputs_embeds
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, attn_metadata)
            if i < len(deepstack):
                x[vision_mask] = x[vision_mask] + deepstack[i].to(x.device, x.dtype)  # (M, H)
        return self.norm(x)
