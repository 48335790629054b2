"""Qwen2.5-VL's processing facts: only the M-RoPE index and the grounding coordinates differ from Qwen2-VL.

  preprocess_spec, pad_tokens     Qwen2-VL's (same image/video processors, QWEN2VL_SPEC 8.5);
  rope_index(token_ids, items, config) -> (positions (3, N) int64, rope_delta)   absolute-time M-RoPE
      (QWEN2VL_SPEC 8.4): temporal grid k of a video sits at cur + floor(k * second_per_grid_t *
      tokens_per_second), multiplied in fp32, with second_per_grid_t = temporal_patch_size / sample_fps;
      images keep interval 1; the next text starts at the item's max + 1. transformers 4.57 casts
      second_per_grid_t to int64 first (fps 4 -> 0.5 -> 0, every temporal position collapses); qvl follows
      the float rule of 4.49-4.51, so the two agree exactly when second_per_grid_t is an integer;
  BOX_COORDINATES = "resized_pixels" and box_to_original(coords, original_size, resized_size): Qwen2.5-VL
      answers boxes in absolute pixels of the image *as resized for the vision tower*.

`items` are the prompt's VisionInputs in placeholder order (kind, grid_thw, sample_fps for videos).
Knows nothing about tokenizers, files or the engine.
"""
from __future__ import annotations

from typing import Sequence

from qvl.models.qwen2_vl.processing import pad_tokens, preprocess_spec  # noqa: F401  (the family's API)
from qvl.models.qwen2_vl.rope import mrope_positions

BOX_COORDINATES = "resized_pixels"
DEFAULT_SAMPLE_FPS = 2.0   # transformers' processor default `fps` when a video carries none


def second_per_grid(item, config) -> float | None:
    """Seconds covered by one temporal grid of `item`: None for an image (interval 1), else
    temporal_patch_size / sample_fps (a video without sample_fps counts as sampled at 2 fps)."""
    if item.kind == "image":
        return None
    fps = getattr(item, "sample_fps", None) or DEFAULT_SAMPLE_FPS
    return config.vision.temporal_patch_size / fps


def rope_index(token_ids: Sequence[int], items: Sequence, config):
    v = config.vision
    return mrope_positions(token_ids, [tuple(it.grid_thw) for it in items], config.image_token_id,
                           config.video_token_id, v.spatial_merge_size,
                           second_per_grid=[second_per_grid(it, config) for it in items],
                           tokens_per_second=v.tokens_per_second)


def box_to_original(coords: Sequence[float], original_size: tuple[int, int],
                    resized_size: tuple[int, int] | None = None) -> tuple[int, ...]:
    """(x, y, x, y, ...) in pixels of the resized image of (height, width) `resized_size` -> pixels of the
    original image of (height, width) `original_size`: x * W / W', y * H / H', rounded."""
    if resized_size is None:
        raise ValueError("Qwen2.5-VL boxes are in resized-image pixels: box_to_original needs resized_size")
    (h, w), (rh, rw) = original_size, resized_size
    if min(h, w, rh, rw) <= 0:
        raise ValueError(f"image sizes must be positive, got original {original_size}, resized {resized_size}")
    return tuple(round(c * (w / rw if i % 2 == 0 else h / rh)) for i, c in enumerate(coords))
