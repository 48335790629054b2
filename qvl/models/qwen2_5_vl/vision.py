"""Qwen2.5-VL vision tower: Qwen2-VL's ViT with RMSNorm, a SwiGLU MLP and window attention. Math only,
attribute names = checkpoint names (`visual.blocks.i.norm1.weight`, `visual.blocks.i.mlp.gate_proj.*`,
`visual.merger.ln_q.weight`, ...).

`VisionTransformer.forward(pixel_values (np, C*T*P*P), grid_thw (ni, 3))` -> (np / merge**2, out_hidden_size)
in item order, like Qwen2-VL's (patch embed, 2-D rotary, attention, merger and segment batching are
imported from qvl.models.qwen2_vl.vision). What differs (QWEN2VL_SPEC 8.2-8.3):
  * blocks: RMSNorm (eps 1e-6) -> attention -> RMSNorm -> down(silu(gate(x)) * up(x)), all with biases;
    merger `ln_q` is RMSNorm;
  * window order: per item and temporal slice, windows of `merged_window` x `merged_window` merged tokens
    (112 px) in raster order, partial at the right/bottom edges, merged tokens raster order inside. Right
    after the patch embed, hidden states and the rotary cos/sin are permuted into that order in units of
    one merge group (merge**2 consecutive rows); the merger output is permuted back;
  * blocks in `fullatt_block_indexes` attend within a frame (frames stay contiguous in window order), the
    others within a window. Qwen2-VL's VisionAttention runs the segments (one varlen kernel on CUDA,
    equal-length segments batched into SDPA calls otherwise); no S x S mask.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from qvl.models.qwen2_5_vl.config import VisionConfig
from qvl.models.qwen2_vl import vision as qwen2_vl
from qvl.models.qwen2_vl.rope import vision_cos_sin
from qvl.models.qwen2_vl.text import RMSNorm


def rms_norm(dim: int) -> nn.Module:
    return RMSNorm(dim, eps=1e-6)


def window_order(grid_thw: torch.Tensor, window: int, merge: int) -> tuple[torch.Tensor, list[int]]:
    """(order (np / merge**2,) int64, window lengths in rows) of a packed batch.

    order[i] is the raster index of the merged token placed i-th in window order; the lengths list every
    window's row count (merge**2 per merged token) in that order, empty windows never appear.
    """
    orders, lengths = [], []
    offset = 0
    for t, h, w in grid_thw.tolist():
        hm, wm = h // merge, w // merge
        nh, nw = -(-hm // window), -(-wm // window)  # windows per column / row, partial ones included
        index = torch.arange(t * hm * wm).view(t, hm, wm)
        padded = F.pad(index, (0, nw * window - wm, 0, nh * window - hm), value=-1)  # (t, nh*win, nw*win)
        padded = padded.view(t, nh, window, nw, window).permute(0, 1, 3, 2, 4)  # (t, nh, nw, win, win)
        padded = padded.reshape(t * nh * nw, window * window)  # one row per window
        valid = padded >= 0
        orders.append(padded[valid] + offset)  # (t*hm*wm,)
        lengths += (valid.sum(1) * merge * merge).tolist()
        offset += t * hm * wm
    return torch.cat(orders), lengths


class VisionMlp(nn.Module):
    """SwiGLU with biases: down(act(gate(x)) * up(x))."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=True)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=True)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=True)
        self.act = qwen2_vl._ACTS[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class VisionBlock(qwen2_vl.VisionBlock):
    norm = staticmethod(rms_norm)
    mlp_cls = VisionMlp


class PatchMerger(qwen2_vl.PatchMerger):
    norm = staticmethod(rms_norm)


class VisionTransformer(qwen2_vl.VisionTransformer):
    block_cls = VisionBlock
    merger_cls = PatchMerger

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        c = self.config
        grid_thw = self.check_inputs(pixel_values, grid_thw)
        unit = c.spatial_merge_size ** 2
        device = self.patch_embed.proj.weight.device
        order, window_lengths = window_order(grid_thw, c.merged_window, c.spatial_merge_size)
        order_dev = order.to(device)

        def to_windows(t: torch.Tensor) -> torch.Tensor:  # (np, D) raster -> window order, per merge group
            return t.view(-1, unit, t.shape[-1])[order_dev].view(-1, t.shape[-1])

        x = to_windows(self.patch_embed(pixel_values.to(device)))  # (np, E)
        cos, sin = vision_cos_sin(grid_thw, c.head_dim, c.spatial_merge_size, device=device)  # (np, d) fp32
        cos, sin = to_windows(cos), to_windows(sin)
        frames = qwen2_vl.segment_groups(grid_thw)
        windows = qwen2_vl.group_segments(window_lengths)
        full = set(c.fullatt_block_indexes)
        for i, blk in enumerate(self.blocks):
            x = blk(x, cos, sin, frames if i in full else windows)
        merged = self.merger(x)  # (np/unit, H) in window order
        out = torch.empty_like(merged)
        out[order_dev] = merged  # back to raster order: the inverse permutation
        return out
