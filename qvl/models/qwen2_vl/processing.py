"""Qwen2-VL's processing facts: preprocess spec, pad expansion, the M-RoPE index, grounding coordinates.

  preprocess_spec(config, preprocessor_config) -> PreprocessSpec   patch 14, merge 2, temporal 2, CLIP
      mean/std, pixel limits from preprocessor_config.json (`min_pixels`/`max_pixels`, or `size`'s
      `shortest_edge`/`longest_edge`), sizes from the vision config;
  pad_tokens(item, config, encode) -> list[int]    the tokens one item's single placeholder expands to:
      its `<|image_pad|>` / `<|video_pad|>` id, t*h*w/merge**2 times (`encode`, text -> ids, is the
      tokenizer for families whose expansion holds text, e.g. Qwen3-VL's timestamps; unused here);
  rope_index(token_ids, items, config) -> (positions (3, N) int64, rope_delta)   max+1 rule (rope.py);
  BOX_COORDINATES = "relative_1000" and box_to_original(coords, original_size, resized_size): grounding
      boxes are 0..1000 fractions of the image, so the original image's pixels are x * W / 1000.

`items` are the prompt's VisionInputs in placeholder order (kind, grid_thw; videos also sample_fps).
Knows nothing about tokenizers, files or the engine.
"""
from __future__ import annotations

from typing import Sequence

from qvl.models.qwen2_vl.rope import mrope_positions
from qvl.multimodal.spec import PreprocessSpec

BOX_COORDINATES = "relative_1000"
BOX_SCALE = 1000


def preprocess_spec(config=None, preprocessor_config: dict | None = None) -> PreprocessSpec:
    """The checkpoint's spec: sizes from the vision config (or preprocessor_config.json when there is no
    model config, e.g. a tokenizer-only directory), the rest from preprocessor_config.json or defaults."""
    pre = preprocessor_config or {}
    size = pre.get("size") if isinstance(pre.get("size"), dict) else {}
    default = PreprocessSpec()
    if config is not None:
        v = config.vision
        sizes = (v.patch_size, v.spatial_merge_size, v.temporal_patch_size)
    else:
        sizes = (int(pre.get("patch_size") or default.patch_size), int(pre.get("merge_size") or default.merge_size),
                 int(pre.get("temporal_patch_size") or default.temporal_patch_size))
    return PreprocessSpec(
        patch_size=sizes[0], merge_size=sizes[1], temporal_patch_size=sizes[2],
        image_mean=tuple(pre.get("image_mean") or default.image_mean),
        image_std=tuple(pre.get("image_std") or default.image_std),
        min_pixels=int(pre.get("min_pixels") or size.get("shortest_edge") or default.min_pixels),
        max_pixels=int(pre.get("max_pixels") or size.get("longest_edge") or default.max_pixels))


def pad_tokens(item, config, encode=None) -> list[int]:
    pad = config.image_token_id if item.kind == "image" else config.video_token_id
    t, h, w = item.grid_thw
    return [pad] * (t * h * w // config.vision.spatial_merge_size ** 2)


def rope_index(token_ids: Sequence[int], items: Sequence, config):
    return mrope_positions(token_ids, [tuple(it.grid_thw) for it in items], config.image_token_id,
                           config.video_token_id, config.vision.spatial_merge_size)


def box_to_original(coords: Sequence[float], original_size: tuple[int, int],
                    resized_size: tuple[int, int] | None = None) -> tuple[int, ...]:
    """(x, y, x, y, ...) in 0..1000 -> pixels of the original image of (height, width) original_size."""
    h, w = original_size
    return tuple(round(c * (w if i % 2 == 0 else h) / BOX_SCALE) for i, c in enumerate(coords))
