"""Rotary position embeddings for Qwen2-VL: M-RoPE positions, text rotary tables, vision 2-D rotary.

Owns three things and nothing else (no modules, no weights, no engine knowledge):

* `mrope_positions(input_ids, grids, ...)`: the 3-stream (t, h, w) position ids of one prompt and its
  `rope_delta`, by the *max+1* rule (QWEN2VL_SPEC 5.4; transformers <= 4.57 `get_rope_index`). A decode
  token at index i (0-based, i >= len(prompt)) then sits at `i + rope_delta` on all three streams.
  Temporal grid k of an item sits at k (Qwen2-VL), or, when the item has a `second_per_grid` (Qwen2.5-VL
  absolute time, QWEN2VL_SPEC 8.4), at floor(k * second_per_grid * tokens_per_second) multiplied in fp32.
* Text rotary: frequencies in fp32, each of the head_dim/2 frequencies takes its position from the stream
  its `mrope_section` says (t for the first section, h for the second, w for the third; or, for Qwen3-VL,
  interleaved t h w t h w ...), duplicated to head_dim, cos/sin computed in fp32 then cast to the
  activation dtype; rotation is the half-split ("rotate_half", pairs (j, j + d/2)) convention.
* Vision 2-D rotary: (row, col) of every patch in merge-block-major order, fp32 cos/sin, and q/k rotated in
  fp32 then cast back (QWEN2VL_SPEC 3.3).
"""
from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import torch

from qvl.layers import cpu_ops


def _check_grid(k: int, grid: Sequence[int], merge: int) -> tuple[int, int, int]:
    if len(grid) != 3:
        raise ValueError(f"grid of vision item {k} must be (t, h, w), got {tuple(grid)}")
    t, h, w = (int(x) for x in grid)
    if t < 1 or h < 1 or w < 1 or h % merge or w % merge:
        raise ValueError(
            f"grid of vision item {k} is (t={t}, h={h}, w={w}); t, h, w must be >= 1 and h, w multiples "
            f"of spatial_merge_size={merge}"
        )
    return t, h, w


def mrope_positions(
    input_ids: Sequence[int] | torch.Tensor,
    grids: Sequence[Sequence[int]],
    image_token_id: int,
    video_token_id: int,
    spatial_merge_size: int = 2,
    second_per_grid: Sequence[float | None] | None = None,
    tokens_per_second: float = 1.0,
) -> tuple[torch.Tensor, int]:
    """M-RoPE position ids of one unpadded prompt.

    `grids` holds one (t, h, w) per vision item (in 14-px patches) in order of appearance; an item's kind
    is the pad token its run is made of, and item k covers t*h*w // merge**2 consecutive pad tokens
    (adjacent items of the same kind simply follow each other in the run).

    `second_per_grid` (one entry per item, or None for all) gives an item's seconds per temporal grid;
    None keeps the Qwen2-VL temporal index. The next text starts at the item's max position + 1.

    Returns (positions LongTensor (3, N), rope_delta = max(positions) + 1 - N). Raises ValueError when the
    pad tokens and the grids disagree (naming the item, the expected and the found counts).
    """
    if second_per_grid is not None and len(second_per_grid) != len(grids):
        raise ValueError(f"second_per_grid has {len(second_per_grid)} entries for {len(grids)} vision grids")
    ids = torch.as_tensor(input_ids, dtype=torch.long).flatten()  # (N,)
    n = ids.numel()
    positions = torch.empty(3, n, dtype=torch.long)  # (3, N)
    is_pad = (ids == image_token_id) | (ids == video_token_id)
    # Maximal runs of one pad id: starts where the id changes into a pad id.
    change = torch.ones(n, dtype=torch.bool)
    if n > 1:
        change[1:] = ids[1:] != ids[:-1]
    run_starts = torch.nonzero(is_pad & change).flatten().tolist()
    run_ends = torch.nonzero(is_pad & torch.cat([change[1:], torch.ones(1, dtype=torch.bool)])).flatten()
    run_ends = (run_ends + 1).tolist()

    merge = spatial_merge_size
    cur = 0  # next free position = max of everything placed so far + 1
    pos = 0  # next token index to place
    k = 0  # next vision item
    for start, end in zip(run_starts, run_ends):
        text_len = start - pos
        positions[:, pos:start] = torch.arange(cur, cur + text_len)
        cur += text_len
        while start < end:
            if k >= len(grids):
                raise ValueError(
                    f"prompt has {int(is_pad.sum())} vision pad tokens but the {len(grids)} grids cover only "
                    f"{sum(_count(g, merge) for g in grids)}; pad token at index {start} has no vision item"
                )
            t, h, w = _check_grid(k, grids[k], merge)
            hm, wm = h // merge, w // merge
            count = t * hm * wm
            if start + count > end:
                raise ValueError(
                    f"vision item {k} with grid ({t}, {h}, {w}) needs {count} consecutive pad tokens at index "
                    f"{start}, found {end - start}"
                )
            spg = None if second_per_grid is None else second_per_grid[k]
            tk = _temporal_index(t, spg, tokens_per_second)  # (t,)
            tt = tk.view(t, 1, 1).expand(t, hm, wm).flatten()  # (count,)
            hh = torch.arange(hm).view(1, hm, 1).expand(t, hm, wm).flatten()
            ww = torch.arange(wm).view(1, 1, wm).expand(t, hm, wm).flatten()
            positions[:, start:start + count] = torch.stack([tt, hh, ww]) + cur  # (3, count)
            cur += max(int(tk[-1]) + 1, hm, wm)
            start += count
            k += 1
        pos = end
    positions[:, pos:n] = torch.arange(cur, cur + n - pos)
    cur += n - pos
    if k != len(grids):
        raise ValueError(
            f"{len(grids)} vision grids given but the prompt's pad tokens hold only {k} items"
        )
    return positions, cur - n


def _temporal_index(t: int, second_per_grid: float | None, tokens_per_second: float) -> torch.Tensor:
    """Temporal position offsets (t,) of an item's temporal grids: 0..t-1, or absolute time in fp32
    (k * second_per_grid * tokens_per_second, floored by .long(); transformers 4.49's float rule)."""
    k = torch.arange(t)
    if second_per_grid is None:
        return k
    return (k * torch.tensor(float(second_per_grid), dtype=torch.float32) * tokens_per_second).long()


def _count(grid: Sequence[int], merge: int) -> int:
    t, h, w = (int(x) for x in grid)
    return t * (h // merge) * (w // merge)


# ---------------------------------------------------------------------------------------------- rotary


@lru_cache(maxsize=32)
def _inv_freq(dim: int, theta: float, device: str) -> torch.Tensor:
    """1 / theta^(2j/dim), j < dim/2, computed in fp32 on the CPU (as transformers does) then moved."""
    inv = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))  # (dim/2,)
    return inv.to(device)


@lru_cache(maxsize=32)
def _stream_ids(mrope_section: tuple[int, ...], device: str, interleaved: bool = False) -> torch.Tensor:
    """Stream (0 = t, 1 = h, 2 = w) each rotary frequency takes its position from: sections in a row
    (Qwen2-VL: t t .. h h .. w w ..), or interleaved (Qwen3-VL `apply_interleaved_mrope`: slot j < 3 * h
    with j % 3 == 1 is h, j < 3 * w with j % 3 == 2 is w, every other slot t: t h w t h w .. t t)."""
    if not interleaved:
        return torch.repeat_interleave(torch.arange(3), torch.tensor(mrope_section)).to(device)  # (D/2,)
    stream = torch.zeros(sum(mrope_section), dtype=torch.long)
    stream[1:3 * mrope_section[1]:3] = 1
    stream[2:3 * mrope_section[2]:3] = 2
    return stream.to(device)  # (D/2,)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the last dim split in halves."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def mrope_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float, mrope_section: Sequence[int], dtype: torch.dtype,
    interleaved: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Text rotary tables for positions (3, N): cos and a half-negated sin, each (N, head_dim) in `dtype`.
    `interleaved` picks the frequencies' streams as Qwen3-VL does (see _stream_ids).

    The sin table's first half is negated (exact: only the sign flips) so that `apply_rotary` needs no
    negation per call: rotate_half(x) * sin == swap_halves(x) * sin_signed, bit for bit."""
    if sum(mrope_section) != head_dim // 2:
        raise ValueError(f"mrope_section {list(mrope_section)} must sum to head_dim/2 = {head_dim // 2}")
    inv = _inv_freq(head_dim, float(theta), str(positions.device))  # (D/2,)
    stream = _stream_ids(tuple(int(s) for s in mrope_section), str(positions.device), interleaved)  # (D/2,)
    pos = positions.float()  # (3, N)
    # Pick each frequency's stream first; the product is elementwise so this equals select-after.
    freqs = pos[stream].t() * inv  # (N, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (N, D)
    sin = emb.sin()
    return emb.cos().to(dtype), torch.cat((-sin[:, :head_dim // 2], sin[:, head_dim // 2:]), -1).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """x (N, heads, D) rotated in x's dtype with mrope_cos_sin's tables (N, D), or those tables already
    unsqueezed to (N, 1, D) (a decoder does that once per forward, not once per layer): x*cos +
    rotate_half(x)*sin, computed as x*cos + swap_halves(x)*sin_signed (same bits, fewer kernels). The
    swapped copy and the product are fresh tensors, so the multiply and the add run in place on them:
    each op still rounds to x's dtype on its own, as the out-of-place expression does."""
    if (x.dim() == 3 and x.shape[-1] % 16 == 0 and cos.dtype == x.dtype and cos.shape[0] == x.shape[0]
            and cpu_ops.fast(x)):
        return cpu_ops.rotary(x, cos, sin_signed)           # the same bits in one call (CPU bf16)
    if cos.dim() == 2:
        cos, sin_signed = cos.unsqueeze(1), sin_signed.unsqueeze(1)  # (N, 1, D)
    return (x * cos).add_(x.roll(x.shape[-1] // 2, -1).mul_(sin_signed))


def vision_cos_sin(
    grid_thw: torch.Tensor, head_dim: int, spatial_merge_size: int, theta: float = 10000.0,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Vision 2-D rotary tables of all patches of `grid_thw` (ni, 3): fp32 cos, sin (S, head_dim).

    Dims [0, D/4) and [D/2, 3D/4) carry the patch row, the others the column (QWEN2VL_SPEC 3.3).
    """
    m = spatial_merge_size
    grid_thw = torch.as_tensor(grid_thw).cpu()
    device = torch.device(device) if device is not None else torch.device("cpu")
    pos = []
    for t, h, w in grid_thw.tolist():
        rows = torch.arange(h).view(h, 1).expand(h, w)
        cols = torch.arange(w).view(1, w).expand(h, w)
        # merge-block-major: (h/m, m, w/m, m) -> (h/m, w/m, m, m)
        rows = rows.reshape(h // m, m, w // m, m).permute(0, 2, 1, 3).flatten()  # (h*w,)
        cols = cols.reshape(h // m, m, w // m, m).permute(0, 2, 1, 3).flatten()
        pos.append(torch.stack([rows, cols], dim=-1).repeat(t, 1))  # (t*h*w, 2)
    pos = torch.cat(pos).to(device)  # (S, 2)
    inv = _inv_freq(head_dim // 2, float(theta), str(device))  # (D/4,)
    freqs = (pos.float().unsqueeze(-1) * inv).flatten(1)  # (S, D/2): row freqs then col freqs
    emb = torch.cat((freqs, freqs), dim=-1)  # (S, D)
    return emb.cos(), emb.sin()


def apply_rotary_fp32(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (S, heads, D) rotated in fp32 with fp32 cos/sin (S, D), cast back to x's dtype."""
    xf = x.float()
    out = xf * cos.unsqueeze(1)  # (S, heads, D) fp32
    # in place but with the product rounded before the add (no fused multiply-add), as transformers rounds
    return out.add_(rotate_half(xf).mul_(sin.unsqueeze(1))).to(x.dtype)
