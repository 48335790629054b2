"""Qwen3-VL vision tower: Qwen2-VL's ViT with a biased patch embed, a learned position grid, a GELU-tanh MLP
and DeepStack mergers. Math only, attribute names = checkpoint names (`visual.pos_embed.weight`,
`visual.blocks.i.mlp.linear_fc1.*`, `visual.merger.norm.*`, `visual.deepstack_merger_list.j.*`).

`VisionTransformer.forward(pixel_values (np, C*T*P*P), grid_thw (ni, 3))` -> a tuple of 1 + len(
deepstack_visual_indexes) tensors, each (np / merge**2, out_hidden_size) in item order: the main features
(written over the pad tokens' embeddings) and the DeepStack sets (added to the decoder's hidden states
after layers 0, 1, ...). The 2-D rotary, the attention (one segment per frame, equal segments batched),
the blocks and the segment grouping are Qwen2-VL's (qvl.models.qwen2_vl.vision). What differs
(QWEN3VL_NOTES 2.1):
  * PatchEmbed: Conv3d with bias;
  * a learned (side x side) position embedding, bilinearly interpolated to each item's (h, w) grid with
    transformers' 4-tap weights (`fast_pos_embed_interpolate`), repeated over t and permuted into
    merge-block order, added after the patch embed;
  * blocks: LayerNorm (eps 1e-6) -> attention -> LayerNorm -> linear_fc2(gelu_tanh(linear_fc1(x)));
  * merger: LayerNorm(E) before the 2x2 shuffle (main) or LayerNorm(4E) after it (DeepStack), then
    linear_fc1 -> exact GELU -> linear_fc2.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from qvl.models.qwen2_vl import vision as qwen2_vl
from qvl.models.qwen2_vl.rope import vision_cos_sin
from qvl.models.qwen3_vl.config import VisionConfig


class PatchEmbed(qwen2_vl.PatchEmbed):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__(config)
        self.proj = nn.Conv3d(config.in_chans, config.embed_dim, kernel_size=self.shape[1:],
                              stride=self.shape[1:], bias=True)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        w = self.proj.weight
        x = pixel_values.to(w.dtype)
        if x.is_cuda:
            return self.proj(x.view(-1, *self.shape)).view(-1, self.embed_dim)  # (np, E)
        # kernel == stride: the Conv3d is a matmul over the flat (C, T, P, P) rows (see Qwen2-VL's)
        return F.linear(x.view(-1, w[0].numel()), w.view(self.embed_dim, -1), self.proj.bias)  # (np, E)


class VisionMlp(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.linear_fc1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=True)
        self.linear_fc2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=True)
        self.approximate = "tanh" if config.hidden_act == "gelu_pytorch_tanh" else "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(F.gelu(self.linear_fc1(x), approximate=self.approximate))


class VisionBlock(qwen2_vl.VisionBlock):
    mlp_cls = VisionMlp


class PatchMerger(nn.Module):
    """LayerNorm before (main) or after (DeepStack, `postshuffle`) fusing each merge**2 rows, then MLP."""

    def __init__(self, config: VisionConfig, postshuffle: bool = False) -> None:
        super().__init__()
        self.merged_dim = config.hidden_size * config.spatial_merge_size ** 2
        self.postshuffle = postshuffle
        self.norm = nn.LayerNorm(self.merged_dim if postshuffle else config.hidden_size, eps=1e-6)
        self.linear_fc1 = nn.Linear(self.merged_dim, self.merged_dim)
        self.linear_fc2 = nn.Linear(self.merged_dim, config.out_hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x.view(-1, self.merged_dim)) if self.postshuffle else self.norm(x).view(-1, self.merged_dim)
        return self.linear_fc2(F.gelu(self.linear_fc1(x)))  # (np/4, 4E) -> (np/4, H)


def position_weights(grid_thw: torch.Tensor, side: int, merge: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The 4-tap bilinear interpolation of a side x side grid onto every patch of the packed batch:
    (index (4, np) int64, weight (4, np) fp32), patches in merge-block order, repeated over t.

    As transformers: grid coordinates linspace(0, side - 1, n) in fp32, floor by int cast, ceil clipped to
    side - 1; taps (floor, floor), (floor, ceil), (ceil, floor), (ceil, ceil) with (1-dh)(1-dw), (1-dh)dw,
    dh(1-dw), dh*dw."""
    idx, wts = [], []
    for t, h, w in grid_thw.tolist():
        hi, wi = torch.linspace(0, side - 1, h), torch.linspace(0, side - 1, w)  # (h,), (w,) fp32
        hf, wf = hi.int(), wi.int()
        hc, wc = (hf + 1).clip(max=side - 1), (wf + 1).clip(max=side - 1)
        dh, dw = (hi - hf)[:, None], (wi - wf)[None]  # (h, 1), (1, w)
        taps = [(hf, wf, (1 - dh) * (1 - dw)), (hf, wc, (1 - dh) * dw), (hc, wf, dh * (1 - dw)), (hc, wc, dh * dw)]
        i = torch.stack([(a[:, None] * side + b[None]).long() for a, b, _ in taps])  # (4, h, w)
        v = torch.stack([c.expand(h, w) for _, _, c in taps])  # (4, h, w)

        def order(x: torch.Tensor) -> torch.Tensor:  # raster (4, h, w) -> merge-block order, t times
            x = x.view(4, h // merge, merge, w // merge, merge).permute(0, 1, 3, 2, 4).reshape(4, h * w)
            return x.repeat(1, t)  # (4, t*h*w)

        idx.append(order(i))
        wts.append(order(v))
    return torch.cat(idx, 1), torch.cat(wts, 1)


class VisionTransformer(nn.Module):
    block_cls = VisionBlock

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        self.patch_embed = PatchEmbed(config)
        self.pos_embed = nn.Embedding(config.num_position_embeddings, config.hidden_size)
        self.blocks = nn.ModuleList(self.block_cls(config) for _ in range(config.depth))
        self.merger = PatchMerger(config)
        self.deepstack_merger_list = nn.ModuleList(
            PatchMerger(config, postshuffle=True) for _ in config.deepstack_visual_indexes)

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embed.proj.weight.dtype

    check_inputs = qwen2_vl.VisionTransformer.check_inputs

    def position_embedding(self, grid_thw: torch.Tensor) -> torch.Tensor:
        """(np, E) learned positions of every patch, in the tower's dtype (weights cast like transformers)."""
        c = self.config
        table = self.pos_embed.weight
        index, weight = position_weights(grid_thw, c.num_grid_per_side, c.spatial_merge_size)  # (4, np)
        taps = self.pos_embed(index.to(table.device)) * weight.to(table.device, table.dtype)[:, :, None]
        return taps[0] + taps[1] + taps[2] + taps[3]  # (np, E), the taps summed in transformers' order

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> tuple[torch.Tensor, ...]:
        c = self.config
        grid_thw = self.check_inputs(pixel_values, grid_thw)
        device = self.patch_embed.proj.weight.device
        x = self.patch_embed(pixel_values.to(device)) + self.position_embedding(grid_thw)  # (np, E)
        cos, sin = vision_cos_sin(grid_thw, c.head_dim, c.spatial_merge_size, device=device)  # (np, d) fp32
        groups = qwen2_vl.segment_groups(grid_thw)
        deepstack = {}
        for i, blk in enumerate(self.blocks):
            x = blk(x, cos, sin, groups)
            if i in c.deepstack_visual_indexes:
                j = c.deepstack_visual_indexes.index(i)
                deepstack[j] = self.deepstack_merger_list[j](x)  # (np/4, H)
        return (self.merger(x), *(deepstack[j] for j in range(len(deepstack))))
