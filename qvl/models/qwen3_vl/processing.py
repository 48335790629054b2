"""Qwen3-VL's processing facts: the spec (patch 16, mean/std 0.5), timestamped video expansion, the rope
index over it, and grounding (0..1000 relative, Qwen2-VL's rule).

  preprocess_spec(config, preprocessor_config) -> PreprocessSpec   Qwen2-VL's reader with Qwen3-VL's
      defaults where preprocessor_config.json is silent: image_mean = image_std = 0.5, size
      shortest_edge 65536 (= 64 * 32**2) / longest_edge 16777216 (= 16384 * 32**2); sizes from the
      vision config (patch 16, merge 2: factor 32); video_sampling "qwen3_vl" with the video processor's
      fps / min_frames / max_frames / size from video_preprocessor_config.json (read by Config.from_pretrained
      into config.video_preprocessor), else preprocessor_config.json as transformers' loader falls back,
      else Qwen3VLVideoProcessor's class defaults (`video_options`);
  pad_tokens(item, config, encode) -> list[int]
      image: `<|image_pad|>` x t*h*w/merge**2 (replaces the pad, like Qwen2-VL);
      video: the tokens that replace the whole `<|vision_start|><|video_pad|><|vision_end|>`
      (WRAPPED_KINDS): per temporal group k, encode(f"<{t_k:.1f} seconds>") + vision_start +
      `<|video_pad|>` x h*w/merge**2 + vision_end, t_k the mean of the first and last frame time of the
      group (transformers' `_calculate_timestamps`). Frame times are `item.frame_times` (source index /
      source fps); a video without them (a frame list given no fps) counts at DEFAULT_VIDEO_FPS = 24,
      with a warning, as transformers' processor does;
  rope_index(token_ids, items, config) -> (positions (3, N), rope_delta): Qwen2-VL's max+1 rule with
      every video split into its temporal groups of t = 1 (4.57 `get_rope_index`): the timestamp and
      vision_start/end tokens between groups are text positions;
  BOX_COORDINATES = "relative_1000", box_to_original: Qwen2-VL's.
Knows nothing about tokenizers (it gets `encode`), files or the engine.
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Callable, Sequence

from qvl.models.qwen2_vl import processing as qwen2_vl
from qvl.models.qwen2_vl.processing import BOX_COORDINATES, BOX_SCALE, box_to_original  # noqa: F401
from qvl.models.qwen2_vl.rope import mrope_positions
from qvl.multimodal.spec import PreprocessSpec

DEFAULT_VIDEO_FPS = 24.0     # transformers' Qwen3VLProcessor when a video's fps is unknown
WRAPPED_KINDS = ("video",)   # pad_tokens of these kinds replace <|vision_start|>pad<|vision_end|>
_PREPROCESSOR_DEFAULTS = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
                          "size": {"shortest_edge": 65536, "longest_edge": 16777216}}


def preprocess_spec(config=None, preprocessor_config: dict | None = None) -> PreprocessSpec:
    pre = dict(_PREPROCESSOR_DEFAULTS)
    pre.update({k: v for k, v in (preprocessor_config or {}).items() if v is not None})
    if config is None:
        pre.setdefault("patch_size", 16)
    spec = qwen2_vl.preprocess_spec(config, pre)
    video = getattr(config, "video_preprocessor", None)
    return dataclasses.replace(spec, video_sampling="qwen3_vl",
                               **video_options(preprocessor_config if video is None else video))


def video_options(video_config: dict | None) -> dict:
    """PreprocessSpec video fields from the dict transformers builds Qwen3VLVideoProcessor from:
    video_preprocessor_config.json, else preprocessor_config.json (its loader's fallback); keys it lacks keep
    the class defaults (fps 2, 4..768 frames, size 128*32*32 / 768*32*32 of the t*h*w volume)."""
    d = video_config or {}
    size = d.get("size") if isinstance(d.get("size"), dict) else {}
    out = {"video_fps": d.get("fps"), "video_min_frames": d.get("min_frames"),
           "video_max_frames": d.get("max_frames"), "video_min_pixels": size.get("shortest_edge"),
           "video_max_pixels": size.get("longest_edge")}
    out = {k: v for k, v in out.items() if v is not None}
    if "video_fps" in out:
        out["video_fps"] = float(out["video_fps"])
    return {k: (v if k == "video_fps" else int(v)) for k, v in out.items()}


def frame_timestamps(frame_times: Sequence[float], merge: int) -> list[float]:
    """Seconds of each temporal group: the mean of its first and last frame's time (the frame list padded
    with its last frame to a multiple of `merge`, as transformers does)."""
    times = list(frame_times)
    if len(times) % merge:
        times += [times[-1]] * (merge - len(times) % merge)
    return [(times[i] + times[i + merge - 1]) / 2 for i in range(0, len(times), merge)]


def _group_times(item, config) -> list[float]:
    t = item.grid_thw[0]
    tp = config.vision.temporal_patch_size
    times = getattr(item, "frame_times", None)
    if times is None:
        warnings.warn(f"Qwen3-VL needs frame timestamps but the video's fps is unknown (a frame list "
                      f"without fps); counting at {DEFAULT_VIDEO_FPS:g} fps as transformers does", stacklevel=4)
        times = [i / DEFAULT_VIDEO_FPS for i in range(t * tp)]
    return frame_timestamps(times, tp)[:t]


def pad_tokens(item, config, encode: Callable[[str], list[int]]) -> list[int]:
    if item.kind == "image":
        return qwen2_vl.pad_tokens(item, config, encode)
    t, h, w = item.grid_thw
    frame = [config.video_token_id] * (h * w // config.vision.spatial_merge_size ** 2)
    out: list[int] = []
    for sec in _group_times(item, config):
        out += encode(f"<{sec:.1f} seconds>") + [config.vision_start_token_id] + frame + [config.vision_end_token_id]
    return out


def rope_index(token_ids: Sequence[int], items: Sequence, config):
    grids = []
    for it in items:
        t, h, w = it.grid_thw
        grids += [(1, h, w)] * t if it.kind == "video" else [(t, h, w)]
    return mrope_positions(token_ids, grids, config.image_token_id, config.video_token_id,
                           config.vision.spatial_merge_size)
