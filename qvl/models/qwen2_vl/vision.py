"""Qwen2-VL vision tower (ViT + 2x2 patch merger): math only, attribute names = checkpoint names (`visual.*`).

`VisionTransformer.forward(pixel_values (np, C*T*P*P), grid_thw (ni, 3))` -> (np / merge**2, hidden_size):
any mix of images and videos packed without padding, rows in merge-block-major order (QWEN2VL_SPEC 3.2),
features returned in item order. Steps (QWEN2VL_SPEC 3):
  * pixel_values cast to the tower's dtype, then the Conv3d patch embedding (kernel = stride = (T, P, P);
    on CPU computed as the equivalent matmul);
  * 2-D rotary (row, col) in fp32, q/k rotated in fp32 and cast back;
  * pre-norm blocks: LayerNorm -> attention -> LayerNorm -> fc1 -> quick_gelu -> fc2;
  * attention is restricted to one temporal slice (frame pair) of one item. On CUDA (when triton imports)
    one `varlen_attention` kernel (qvl.layers.attention_paged) runs every segment; otherwise segments of
    equal length that follow each other (all frames of a video, same-size images) run as one batched SDPA
    call. No dense S x S mask is ever built;
  * merger: LayerNorm, fuse each 4 consecutive rows, Linear -> exact GELU -> Linear.

Reusable by later families (qwen2_5_vl): `group_segments(lengths)` batches any list of attention segments,
`VisionAttention` takes those groups, `VisionBlock.norm` / `.mlp_cls`, `PatchMerger.norm` and
`VisionTransformer.block_cls` / `.merger_cls` name the pieces a subclass swaps, and
`VisionTransformer.check_inputs` validates the packed batch.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from qvl.models.qwen2_vl.config import VisionConfig
from qvl.models.qwen2_vl.rope import apply_rotary_fp32, vision_cos_sin


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(1.702 x); in place on x when no gradient is tracked (one temporary instead of three)."""
    if torch.is_grad_enabled() and x.requires_grad:
        return x * torch.sigmoid(1.702 * x)
    return x.mul_(torch.mul(x, 1.702).sigmoid_())


_ACTS = {"quick_gelu": quick_gelu, "gelu": F.gelu, "silu": F.silu}


def group_segments(lengths: list[int]) -> list[tuple[int, int, int]]:
    """Consecutive attention segments of the given row counts, grouped for batched attention:
    [(start row, number of segments, segment length)]; adjacent segments of equal length share a group."""
    groups: list[list[int]] = []
    start = 0
    for length in lengths:
        if groups and groups[-1][2] == length:
            groups[-1][1] += 1
        else:
            groups.append([start, 1, length])
        start += length
    return [tuple(g) for g in groups]


def segment_groups(grid_thw: torch.Tensor) -> list[tuple[int, int, int]]:
    """Attention segments of a packed batch, grouped (see group_segments): every temporal slice of every
    item is one segment of h*w rows."""
    return group_segments([h * w for t, h, w in grid_thw.tolist() for _ in range(t)])


class PatchEmbed(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.shape = (config.in_chans, config.temporal_patch_size, config.patch_size, config.patch_size)
        self.embed_dim = config.embed_dim
        self.proj = nn.Conv3d(config.in_chans, config.embed_dim, kernel_size=self.shape[1:],
                              stride=self.shape[1:], bias=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        w = self.proj.weight
        x = pixel_values.to(w.dtype)
        if x.is_cuda:
            # the Conv3d itself: bit-identical to transformers' cuDNN result, and only ~2% of the tower's time
            return self.proj(x.view(-1, *self.shape)).view(-1, self.embed_dim)  # (np, E)
        # kernel == stride, so the Conv3d is a matmul over the flat (C, T, P, P) rows: ~10x faster on CPU
        # (same math; the fp32 accumulation order differs, ~1 ulp on a few elements)
        return F.linear(x.view(-1, w[0].numel()), w.view(self.embed_dim, -1))  # (np, E)


_VARLEN = None   # qvl.layers.attention_paged.varlen_attention once imported; False when triton is missing


def _varlen_for(x: torch.Tensor):
    """The Triton segment-attention kernel for x on a CUDA GPU of compute capability >= 8.0 (the kernels'
    16-bit dots) when triton imports, else None (the SDPA groups). Imported on first CUDA use only, so CPU
    runs never import triton."""
    global _VARLEN
    if not x.is_cuda or torch.cuda.get_device_capability(x.device) < (8, 0):
        return None
    if _VARLEN is None:
        try:
            from qvl.layers.attention_paged import varlen_attention
            _VARLEN = varlen_attention
        except ImportError:
            _VARLEN = False
    return _VARLEN or None


class VisionAttention(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.qkv = nn.Linear(config.embed_dim, 3 * config.embed_dim, bias=True)
        self.proj = nn.Linear(config.embed_dim, config.embed_dim, bias=True)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                groups: list[tuple[int, int, int]]) -> torch.Tensor:
        s = x.shape[0]
        q, k, v = self.qkv(x).view(s, 3, self.num_heads, self.head_dim).unbind(1)  # (S, nh, d) each
        # one at a time: the fp32 temporaries of the rotation are the attention's memory peak
        q = apply_rotary_fp32(q, cos, sin)
        k = apply_rotary_fp32(k, cos, sin)
        varlen = _varlen_for(x)
        if varlen is not None:  # CUDA: one kernel launch over every segment instead of one SDPA per group
            bounds = [0]
            for start, count, length in groups:
                bounds += [start + (i + 1) * length for i in range(count)]
            cu = torch.tensor(bounds, dtype=torch.int32).to(x.device, non_blocking=True)  # (F + 1,)
            out = varlen(q, k, v, cu_seqlens=cu, max_seqlen=max(g[2] for g in groups),
                         scale=self.head_dim ** -0.5)  # (S, nh, d)
            return self.proj(out.view(s, -1))
        out = torch.empty_like(q)
        for start, count, length in groups:
            end = start + count * length

            def seg(t):
                return t[start:end].view(count, length, self.num_heads, self.head_dim).transpose(1, 2)

            o = F.scaled_dot_product_attention(seg(q), seg(k), seg(v))  # (count, nh, length, d)
            out[start:end] = o.transpose(1, 2).reshape(count * length, self.num_heads, self.head_dim)
        return self.proj(out.view(s, -1))


class VisionMlp(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.embed_dim, config.mlp_hidden_dim)
        self.fc2 = nn.Linear(config.mlp_hidden_dim, config.embed_dim)
        self.act = _ACTS[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def layer_norm(dim: int) -> nn.Module:
    return nn.LayerNorm(dim, eps=1e-6)


class VisionBlock(nn.Module):
    norm = staticmethod(layer_norm)     # dim -> norm module (norm1, norm2)
    mlp_cls = VisionMlp

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.norm1 = self.norm(config.embed_dim)
        self.norm2 = self.norm(config.embed_dim)
        self.attn = VisionAttention(config)
        self.mlp = self.mlp_cls(config)

    def forward(self, x, cos, sin, groups):
        x = x + self.attn(self.norm1(x), cos, sin, groups)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    norm = staticmethod(layer_norm)     # dim -> norm module (ln_q)

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.merged_dim = config.embed_dim * config.spatial_merge_size ** 2
        self.ln_q = self.norm(config.embed_dim)
        self.mlp = nn.Sequential(
            nn.Linear(self.merged_dim, self.merged_dim), nn.GELU(),
            nn.Linear(self.merged_dim, config.out_hidden_size),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).view(-1, self.merged_dim))  # (np/4, 4E) -> (np/4, H)


class VisionTransformer(nn.Module):
    block_cls = VisionBlock
    merger_cls = PatchMerger

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        self.patch_embed = PatchEmbed(config)
        self.blocks = nn.ModuleList(self.block_cls(config) for _ in range(config.depth))
        self.merger = self.merger_cls(config)

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embed.proj.weight.dtype

    def check_inputs(self, pixel_values: torch.Tensor, grid_thw) -> torch.Tensor:
        """grid_thw as a CPU (ni, 3) int64 tensor; ValueError when pixel_values or the grids are malformed."""
        c = self.config
        grid_thw = torch.as_tensor(grid_thw, dtype=torch.long).view(-1, 3).cpu()
        m = c.spatial_merge_size
        expected = int((grid_thw[:, 0] * grid_thw[:, 1] * grid_thw[:, 2]).sum())
        if pixel_values.dim() != 2 or pixel_values.shape != (expected, c.patch_dim):
            raise ValueError(f"pixel_values must have shape ({expected}, {c.patch_dim}) for grids "
                             f"{grid_thw.tolist()}, got {tuple(pixel_values.shape)}")
        if bool(((grid_thw[:, 1] % m) != 0).any() or ((grid_thw[:, 2] % m) != 0).any()):
            raise ValueError(f"grid h and w must be multiples of spatial_merge_size={m}, got {grid_thw.tolist()}")
        return grid_thw

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        c = self.config
        grid_thw = self.check_inputs(pixel_values, grid_thw)
        device = self.patch_embed.proj.weight.device
        x = self.patch_embed(pixel_values.to(device))  # (np, E)
        cos, sin = vision_cos_sin(grid_thw, c.head_dim, c.spatial_merge_size, device=device)  # (np, d) fp32
        groups = segment_groups(grid_thw)
        for blk in self.blocks:
            x = blk(x, cos, sin, groups)
        return self.merger(x)  # (np/4, H)
