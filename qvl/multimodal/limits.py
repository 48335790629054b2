"""A request's media options under the server's limits: a request may lower them, never raise them.

The limits are the checkpoint's preprocessing (PreprocessSpec: preprocessor_config.json's min/max pixels
per image; the video sampling policy's per-frame ceiling and default pixel budget) with the engine-wide
defaults laid over them (EngineConfig.mm_processor_kwargs: min_pixels / max_pixels per image, fps per
video). `request_options(kind, options, spec, ...)` returns the options process_image / process_video
(and their header counts) get for one item:

  images: max_pixels = min(the request's, the limit); min_pixels = the request's or the limit's, never
      above that max_pixels. resized_height / resized_width are snapped as before and then sized within
      the same [min_pixels, max_pixels] (so `resized_*` can never buy more pixels than `max_pixels`).
  videos: min_pixels / max_pixels per frame never above the policy's per-frame ceiling (qwen-vl-utils:
      768 * factor^2; Qwen3-VL: the processor's longest_edge of the volume), total_pixels never above the
      default budget of the context (0.9 * max_model_len * factor^2); explicit resized_* get the ceiling
      as max_pixels; fps: the engine default when the request gives neither fps nor nframes, and never
      above it.
The counts therefore equal what loading produces; the context check and max_visual_tokens_per_request
then apply as usual. Knows nothing about tokens in text, HTTP or the engine.
"""
from __future__ import annotations

from qvl.multimodal.frames import TOTAL_PIXELS_SHARE, video_max_pixels
from qvl.multimodal.spec import PreprocessSpec


def request_options(kind: str, options: dict, spec: PreprocessSpec, *, default_fps: float | None = None,
                    max_model_len: int | None = None) -> dict:
    """The options one image or video is processed with (see the module docstring)."""
    opts = {k: v for k, v in options.items() if v is not None}
    if kind == "image":
        hi = min(int(opts.get("max_pixels", spec.max_pixels)), spec.max_pixels)
        opts["max_pixels"] = hi
        opts["min_pixels"] = min(int(opts.get("min_pixels", spec.min_pixels)), hi)
        return opts
    ceiling = spec.video_max_pixels if spec.video_sampling == "qwen3_vl" else video_max_pixels(spec)
    for key in ("min_pixels", "max_pixels"):
        if key in opts:
            opts[key] = min(int(opts[key]), ceiling)
    if "resized_height" in opts and "max_pixels" not in opts:
        opts["max_pixels"] = ceiling
    if "total_pixels" in opts and max_model_len is not None:
        opts["total_pixels"] = min(float(opts["total_pixels"]),
                                   TOTAL_PIXELS_SHARE * max_model_len * spec.factor ** 2)
    if default_fps is not None and "nframes" not in opts:
        opts["fps"] = min(float(opts.get("fps", default_fps)), default_fps)
    if max_model_len is not None:
        opts["max_model_len"] = max_model_len   # default total_pixels = 0.9 * context (frames.py)
    return opts
