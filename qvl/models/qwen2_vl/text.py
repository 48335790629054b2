"""Qwen2 text decoder as used by Qwen2-VL: math only, attribute names = checkpoint names (`model.*`).

`Qwen2Model.forward(inputs_embeds (N, H), positions (3, N), attn_metadata)` -> final-normed hidden (N, H)
over a flat batch of tokens (see qvl.layers.attention for what the metadata means). Per layer (pre-norm):
    h   = x + o_proj(Attn(RMSNorm(x)))              q/k/v with bias, o_proj without; GQA
    out = h + down_proj(silu(gate_proj(n)) * up_proj(n)),  n = RMSNorm(h)
RMSNorm casts the normalized value to the input dtype *before* the weight multiply (QWEN2VL_SPEC 6).
On CPU bf16 the norm, the rotary and silu(gate) * up run as one call each (qvl.layers.cpu_ops), and a
decode step's layers, where the CPU runtime transform bound them, as one call (qvl.layers.cpu_stack).
Rotary tables come from qvl.models.qwen2_vl.rope (M-RoPE, cos/sin cast to the activation dtype).

Each `Qwen2Attention` carries `k_cache` / `v_cache` (None until a KVCache attaches them, shape
(num_blocks, block_size, num_kv_heads, head_dim); K is stored after rotary) and `attn_backend` (None = the
reference; qvl.layers.attention).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from qvl.models.qwen2_vl.config import ModelConfig
from qvl.layers import cpu_ops, cpu_stack
from qvl.layers.attention import AttentionMetadata, attention
from qvl.layers.fused_linear import linears
from qvl.models.qwen2_vl.rope import apply_rotary, mrope_cos_sin


class RMSNorm(nn.Module):
    stack_math = "qwen2"     # qvl.layers.cpu_stack's C++ decode step computes this class's math (see Qwen2Model)

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if cpu_ops.fast(x) and self.weight.dtype == x.dtype and x.shape[-1] % 8 == 0:
            return cpu_ops.rms_norm(x, self.weight, self.eps)      # the same math in one call (CPU bf16)
        xf = x.float()
        # x * rsqrt(mean(x^2) + eps) in fp32, then the cast, then the weight (SPEC 6). x * x is what pow(x, 2)
        # computes (same bits) with the multiply kernel this norm runs anyway: at batch 1 a decode step's small
        # ops cost mostly their code's cache misses after each linear, so fewer distinct kernels is faster.
        # The add and rsqrt run in place on the fresh (N, 1) mean (same bits; torch's F.rms_norm is these
        # ops behind one more dispatch on the CPU).
        xf = xf * (xf * xf).mean(-1, keepdim=True).add_(self.eps).rsqrt_()
        return self.weight * xf.to(x.dtype)


class Qwen2Attention(nn.Module):
    qkv_bias = True     # Qwen3 has no bias (and sets its own)
    stack_math = "qwen2"
    fused_linears = (("q_proj", "k_proj", "v_proj"),)     # same input: one kernel call where one applies

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        h, d = config.hidden_size, config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = d
        self.scale = d ** -0.5
        self.q_proj = nn.Linear(h, self.num_heads * d, bias=self.qkv_bias)
        self.k_proj = nn.Linear(h, self.num_kv_heads * d, bias=self.qkv_bias)
        self.v_proj = nn.Linear(h, self.num_kv_heads * d, bias=self.qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * d, h, bias=False)
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None
        self.attn_backend = None

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q (N, nH, D), k and v (N, nKV, D) before rotary (Qwen3 norms q and k here)."""
        n = x.shape[0]
        q, k, v = linears(self, ("q_proj", "k_proj", "v_proj"), x)
        q = q.view(n, self.num_heads, self.head_dim)  # (N, nH, D)
        k = k.view(n, self.num_kv_heads, self.head_dim)  # (N, nKV, D)
        return q, k, v.view(n, self.num_kv_heads, self.head_dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attn_metadata: AttentionMetadata | None) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.project(x)
        qk = apply_rotary(torch.cat((q, k), 1), cos, sin)  # (N, nH + nKV, D): one rotation for both
        q, k = qk.split((self.num_heads, self.num_kv_heads), 1)  # (N, nH, D), (N, nKV, D)
        o = attention(q, k, v, scale=self.scale, metadata=attn_metadata, k_cache=self.k_cache,
                      v_cache=self.v_cache, backend=self.attn_backend)  # (N, nH, D)
        return self.o_proj(o.reshape(n, self.num_heads * self.head_dim))


class Qwen2MLP(nn.Module):
    fused_linears = (("gate_proj", "up_proj"),)
    stack_math = "qwen2"

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(h, i, bias=False)
        self.up_proj = nn.Linear(h, i, bias=False)
        self.down_proj = nn.Linear(i, h, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = linears(self, ("gate_proj", "up_proj"), x)  # (N, I) each
        if torch.is_grad_enabled():
            return self.down_proj(F.silu(gate) * up)
        # inference: reuse the gate buffer (the (N, I) activations dominate prefill memory)
        if cpu_ops.fast(gate) and gate.shape[-1] % 8 == 0:
            return self.down_proj(cpu_ops.silu_mul(gate, up))
        return self.down_proj(F.silu(gate, inplace=True).mul_(up))


class Qwen2DecoderLayer(nn.Module):
    attn_cls = Qwen2Attention
    stack_math = "qwen2"

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.self_attn = self.attn_cls(config)
        self.mlp = Qwen2MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, attn_metadata):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn_metadata)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen2Model(nn.Module):
    layer_cls = Qwen2DecoderLayer
    interleaved_mrope = False   # Qwen3-VL: True (rope.mrope_cos_sin)
    # `stack_math`: the C++ decode step of qvl.layers.cpu_stack computes these classes' math. It counts only
    # where a class declares it itself (cpu_stack reads the class __dict__), so a subclass that changes the
    # math runs the Python layers unless it declares what it computes (Qwen3's attention: "qwen2+qk_norm").
    stack_math = "qwen2"

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(self.layer_cls(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def rope_tables(self, inputs_embeds: torch.Tensor, positions: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (N, 1, D) for positions (3, N) (or (N,): text-only), in the activations' dtype; the
        head axis is there once so that no layer unsqueezes them again."""
        c = self.config
        if positions.dim() == 1:
            positions = positions.unsqueeze(0).expand(3, -1)  # (3, N): text-only, all streams equal
        if positions.shape != (3, inputs_embeds.shape[0]):
            raise ValueError(f"positions must have shape (3, {inputs_embeds.shape[0]}), got "
                             f"{tuple(positions.shape)}")
        cos, sin = mrope_cos_sin(positions.to(inputs_embeds.device), c.head_dim, c.rope_theta,
                                 c.mrope_section, inputs_embeds.dtype, self.interleaved_mrope)  # (N, D) each
        return cos.unsqueeze(1), sin.unsqueeze(1)  # (N, 1, D) each

    def forward(self, inputs_embeds: torch.Tensor, positions: torch.Tensor,
                attn_metadata: AttentionMetadata | None = None) -> torch.Tensor:
        cos, sin = self.rope_tables(inputs_embeds, positions)  # (N, 1, D) each
        stack = cpu_stack.stack_of(self)       # CPU runtime transform: a decode step's layers in one call
        if stack is not None and stack.takes(inputs_embeds, attn_metadata):
            return self.norm(stack(inputs_embeds, cos, sin, attn_metadata))
        x = inputs_embeds
        for layer in self.layers:
            x = layer(x, cos, sin, attn_metadata)
        return self.norm(x)
