"""Training-time Qwen2-VL forward for the demo checkpoint (used by tools/ only; qvl never imports it).

Parameter names are the hub checkpoint's (`visual.*`, `model.*`, `lm_head.weight`), so `state_dict()`
saves straight into a `model.safetensors` that transformers 4.57 and qvl load. The math is QWEN2VL_SPEC's
(2-D vision rotary, per-frame vision attention, PatchMerger, Qwen2 decoder with M-RoPE sections, qkv
bias, SwiGLU, RMSNorm cast-before-weight); tests/test_demo_checkpoint.py checks it against transformers.

It is shaped for training rather than serving:
  * vision: every *segment* (an image, or one temporal slice of a video) is one row of a padded
    (S, Lp, E) batch with a key-padding mask. Images arrive as (n, 588) uint8 (one frame, C*14*14) and are
    embedded with the Conv3d kernel summed over T, which equals the processor's duplicated frame.
  * text: rows hold a shared prefix (system + user + vision) and several question segments; a question
    attends causally to the prefix and to itself only (`seg` ids), positions are given by the caller.
  * no KV cache: greedy decoding for evals re-runs the text forward (answers are short).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class DemoConfig:
    vocab_size: int
    pad_token_id: int
    eos_token_id: int
    image_token_id: int
    video_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int
    vision_token_id: int
    hidden_size: int = 256
    intermediate_size: int = 640
    num_hidden_layers: int = 6
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    mrope_section: tuple = (8, 12, 12)
    vision_depth: int = 6
    vision_embed_dim: int = 192
    vision_num_heads: int = 3
    vision_mlp_ratio: int = 3

    def hub_config(self, dtype: str = "bfloat16") -> dict:
        """config.json in the flat hub layout of the official Qwen2-VL checkpoints (SPEC 1.1)."""
        return {
            "architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl",
            "attention_dropout": 0.0, "bos_token_id": self.pad_token_id, "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id, "hidden_act": "silu", "hidden_size": self.hidden_size,
            "initializer_range": 0.02, "intermediate_size": self.intermediate_size,
            "max_position_embeddings": 32768, "max_window_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads, "num_hidden_layers": self.num_hidden_layers,
            "num_key_value_heads": self.num_key_value_heads, "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta, "sliding_window": 32768, "use_sliding_window": False,
            "tie_word_embeddings": False, "torch_dtype": dtype, "use_cache": True,
            "vocab_size": self.vocab_size,
            "vision_start_token_id": self.vision_start_token_id, "vision_end_token_id": self.vision_end_token_id,
            "vision_token_id": self.vision_token_id, "image_token_id": self.image_token_id,
            "video_token_id": self.video_token_id,
            "vision_config": {"depth": self.vision_depth, "embed_dim": self.vision_embed_dim,
                              "mlp_ratio": self.vision_mlp_ratio, "num_heads": self.vision_num_heads,
                              "in_chans": 3, "hidden_size": self.hidden_size, "patch_size": 14,
                              "spatial_merge_size": 2, "temporal_patch_size": 2, "hidden_act": "quick_gelu"},
            "rope_scaling": {"type": "mrope", "mrope_section": list(self.mrope_section)},
        }


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), -1)


class VisionAttention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, cos, sin, mask):                      # x (S, Lp, E), cos/sin (S, 1, Lp, hd) fp32
        s, lp, e = x.shape
        q, k, v = self.qkv(x).view(s, lp, 3, self.heads, -1).permute(2, 0, 3, 1, 4)  # (S, nh, Lp, hd) each
        dt = q.dtype
        q = (q.float() * cos + rotate_half(q.float()) * sin).to(dt)
        k = (k.float() * cos + rotate_half(k.float()) * sin).to(dt)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # mask (S, 1, 1, Lp)
        return self.proj(o.transpose(1, 2).reshape(s, lp, e))


class VisionMlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        y = self.fc1(x)
        return self.fc2(y * torch.sigmoid(1.702 * y))                 # quick_gelu


class VisionBlock(nn.Module):
    def __init__(self, dim, heads, ratio):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn, self.mlp = VisionAttention(dim, heads), VisionMlp(dim, dim * ratio)

    def forward(self, x, cos, sin, mask):
        x = x + self.attn(self.norm1(x), cos, sin, mask)
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.proj = nn.Conv3d(3, dim, kernel_size=(2, 14, 14), stride=(2, 14, 14), bias=False)


class Merger(nn.Module):
    def __init__(self, dim, out):
        super().__init__()
        self.ln_q = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(4 * dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, out))


class Vision(nn.Module):
    def __init__(self, c: DemoConfig):
        super().__init__()
        e = c.vision_embed_dim
        self.patch_embed = PatchEmbed(e)
        self.blocks = nn.ModuleList(VisionBlock(e, c.vision_num_heads, c.vision_mlp_ratio)
                                    for _ in range(c.vision_depth))
        self.merger = Merger(e, c.hidden_size)
        hd = e // c.vision_num_heads // 2
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, hd, 2).float() / hd), persistent=False)
        self.register_buffer("mean", torch.tensor(MEAN), persistent=False)
        self.register_buffer("std", torch.tensor(STD), persistent=False)

    def _norm(self, px):                                          # uint8 (n, C*T*14*14) -> float
        x = px.float().mul_(1 / 255).view(px.shape[0], 3, -1)
        return ((x - self.mean[:, None]) / self.std[:, None]).view(px.shape[0], -1)

    def forward(self, img_px, vid_px, dst, pos, valid, keep=None):
        """img_px (Ni, 588) u8, vid_px (Nv, 1176) u8, dst (Ni+Nv,) flat slot in (S*Lp), pos (S, Lp, 2),
        valid (S, Lp) bool -> merged tokens of valid blocks, row-major: (M, H). keep: the flat indices of
        valid[:, ::4] (given by the data loader so the GPU never waits on a boolean-mask sync)."""
        w = self.patch_embed.proj.weight                              # (E, 3, 2, 14, 14)
        e = w.shape[0]
        feats = [F.linear(self._norm(img_px), w.sum(2).reshape(e, -1))] if img_px.numel() else []
        if vid_px.numel():
            feats.append(F.linear(self._norm(vid_px), w.reshape(e, -1)))
        feats = torch.cat(feats)                                      # (Ni+Nv, E)
        s, lp = valid.shape
        x = feats.new_zeros(s * lp, e).index_copy(0, dst, feats).view(s, lp, e)
        f = pos.float()[..., None] * self.inv_freq                    # (S, Lp, 2, hd/4)
        f = f.flatten(2)
        emb = torch.cat((f, f), -1)[:, None]                          # (S, 1, Lp, hd)
        cos, sin = emb.cos(), emb.sin()
        mask = valid[:, None, None, :]
        for blk in self.blocks:
            x = blk(x, cos, sin, mask)
        y = self.merger.ln_q(x).reshape(s * lp // 4, 4 * e)           # (S*Lp/4, 4E)
        keep = keep if keep is not None else valid[:, ::4].reshape(-1).nonzero()[:, 0]
        y = y[keep]                                                   # (M, 4E)
        return self.merger.mlp(y)                                     # (M, H)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x):
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, c: DemoConfig):
        super().__init__()
        self.nh, self.nkv = c.num_attention_heads, c.num_key_value_heads
        self.hd = c.hidden_size // self.nh
        self.q_proj = nn.Linear(c.hidden_size, self.nh * self.hd)
        self.k_proj = nn.Linear(c.hidden_size, self.nkv * self.hd)
        self.v_proj = nn.Linear(c.hidden_size, self.nkv * self.hd)
        self.o_proj = nn.Linear(self.nh * self.hd, c.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask):                             # x (B, L, H), cos (B, 1, L, hd)
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.nh, self.hd).transpose(1, 2)
        k = self.k_proj(x).view(b, n, self.nkv, self.hd).transpose(1, 2)
        v = self.v_proj(x).view(b, n, self.nkv, self.hd).transpose(1, 2)
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        rep = self.nh // self.nkv
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)   # (B, nh, L, hd)
        return self.o_proj(o.transpose(1, 2).reshape(b, n, -1))


class Mlp(nn.Module):
    def __init__(self, c: DemoConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Layer(nn.Module):
    def __init__(self, c: DemoConfig):
        super().__init__()
        self.self_attn, self.mlp = Attention(c), Mlp(c)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, x, cos, sin, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class TextModel(nn.Module):
    def __init__(self, c: DemoConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(Layer(c) for _ in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)


class DemoQwen2VL(nn.Module):
    def __init__(self, c: DemoConfig):
        super().__init__()
        self.cfg = c
        self.visual = Vision(c)
        self.model = TextModel(c)
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        hd = c.hidden_size // c.num_attention_heads
        self.register_buffer("inv_freq", 1.0 / c.rope_theta ** (torch.arange(0, hd, 2).float() / hd),
                             persistent=False)
        self.apply(self._init)
        for name, p in self.named_parameters():                       # scaled residual projections
            if name.endswith(("o_proj.weight", "down_proj.weight", "attn.proj.weight", "fc2.weight")):
                nn.init.normal_(p, std=0.02 / (2 * max(c.num_hidden_layers, c.vision_depth)) ** 0.5)

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding, nn.Conv3d)):
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    def rope(self, pos):                                              # pos (3, B, L) -> cos, sin (B, 1, L, hd)
        f = pos.float()[..., None] * self.inv_freq                    # (3, B, L, hd/2)
        a, b, _ = self.cfg.mrope_section
        f = torch.cat((f[0, ..., :a], f[1, ..., a:a + b], f[2, ..., a + b:]), -1)
        emb = torch.cat((f, f), -1)[:, None]
        return emb.cos(), emb.sin()

    def text(self, ids, pos, mask, vis, vis_index=None):
        """ids (B, L), pos (3, B, L), mask (B, 1, L, L) bool, vis (M, H) for the pad tokens (vis_index: their
        flat positions in (B*L), row-major) -> (B, L, H)."""
        x = self.model.embed_tokens(ids)
        if vis is not None and vis.numel():
            if vis_index is None:
                is_vis = (ids == self.cfg.image_token_id) | (ids == self.cfg.video_token_id)
                vis_index = is_vis.reshape(-1).nonzero()[:, 0]
            b, n, hdim = x.shape
            x = x.reshape(b * n, hdim).index_copy(0, vis_index, vis.to(x.dtype)).view(b, n, hdim)
        cos, sin = self.rope(pos)
        for layer in self.model.layers:
            x = layer(x, cos, sin, mask)
        return self.model.norm(x)


def segment_mask(seg: torch.Tensor) -> torch.Tensor:
    """seg (B, L): 0 shared prefix, k >= 1 question k, -1 padding -> bool (B, 1, L, L), True = may attend.
    Causal, and a question sees the prefix and itself only (padding rows see the prefix: no empty row)."""
    n = seg.shape[1]
    idx = torch.arange(n, device=seg.device)
    causal = idx[:, None] >= idx[None, :]
    sj, si = seg[:, None, :], seg[:, :, None]
    return (causal & (sj >= 0) & ((sj == 0) | (sj == si)))[:, None]
