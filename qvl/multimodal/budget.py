"""Visual token counts from headers only (no pixel decoding), and the context-length check.

Owns: `ItemBudget`, `image_num_tokens`, `video_num_tokens`, `check_context`, and `describe` (what
`qvl tokens` prints). Images: `PIL.Image.open(...).size` (lazy, header only). Videos: container header
(frame count, or duration * fps when the count is missing; fps; size) through video.probe_video, then the
same `plan_video` that process_video uses, so counts equal what processing the pixels gives. Frame lists
read each frame's header. Remote sources are still downloaded (under the same MediaPolicy).
Every entry point takes the family's `spec: PreprocessSpec` (None = Qwen2-VL's), the same one given to
process_image / process_video, and counts tokens with `spec.num_tokens(grid)`.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

from qvl.multimodal.frames import (DEFAULT_MAX_MODEL_LEN, VideoOptions, check_frame_size, frame_times,
                                   plan_frame_list, plan_video)
from qvl.multimodal.image import image_target_size
from qvl.multimodal.image_file import open_image, upright_size
from qvl.multimodal.media import MediaPolicy, video_source
from qvl.multimodal.spec import QWEN2_VL, PreprocessSpec
from qvl.multimodal.video import check_frame_list_pixels, probe_video

VIDEO_EXTENSIONS = {".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts", ".flv",
                    ".ogv", ".wmv", ".3gp", ".y4m", ".ivf"}
_IMAGE_OPTIONS = {"min_pixels", "max_pixels", "resized_height", "resized_width"}


@dataclass
class ItemBudget:
    kind: str                          # "image" | "video"
    original_size: tuple[int, int]     # (height, width); first frame for video
    resized_size: tuple[int, int]      # (height, width) after smart_resize
    grid_thw: tuple[int, int, int]     # in patches (14 px for Qwen2-VL)
    num_tokens: int                    # spec.num_tokens(grid): t*h*w // merge**2
    nframes: int | None = None         # sampled frames incl. padding (video)
    total_frames: int | None = None    # frames in the source / selected range (video)
    video_fps: float | None = None
    sample_fps: float | None = None
    label: str | None = None
    frame_times: tuple[float, ...] | None = None   # video: seconds of each sampled frame (None: fps unknown)


def header_size(source: Any, *, policy: MediaPolicy | None = None, label: str = "image") -> tuple[int, int]:
    """(width, height) of an image source from its header (PIL's lazy open; pixels not decoded)."""
    img = open_image(source, policy=policy, label=label, load=False)
    size = upright_size(img)                      # EXIF orientation: the size the pixels will have
    if img is not source:
        img.close()
    return size


def image_num_tokens(source: Any, *, min_pixels: int | None = None, max_pixels: int | None = None,
                     resized_height: int | None = None, resized_width: int | None = None,
                     policy: MediaPolicy | None = None, label: str | None = None,
                     spec: PreprocessSpec | None = None) -> ItemBudget:
    """Tokens of one image, from its header. Same options and defaults as process_image."""
    spec = QWEN2_VL if spec is None else spec
    label = label or "image"
    width, height = header_size(source, policy=policy, label=label)
    if width == 0 or height == 0:
        raise ValueError(f"{label}: image has zero size ({width}x{height})")
    th, tw = image_target_size(height, width, min_pixels=min_pixels, max_pixels=max_pixels,
                               resized_height=resized_height, resized_width=resized_width, label=label,
                               spec=spec)
    grid = (1, th // spec.patch_size, tw // spec.patch_size)
    return ItemBudget("image", (height, width), (th, tw), grid, spec.num_tokens(grid), label=label)


def video_num_tokens(source: Any, *, fps: float | None = None, nframes: int | None = None,
                     min_frames: int | None = None, max_frames: int | None = None,
                     min_pixels: int | None = None, max_pixels: int | None = None,
                     total_pixels: float | None = None, resized_height: int | None = None,
                     resized_width: int | None = None, video_start: float | None = None,
                     video_end: float | None = None, max_model_len: int | None = DEFAULT_MAX_MODEL_LEN,
                     policy: MediaPolicy | None = None, label: str | None = None,
                     spec: PreprocessSpec | None = None) -> ItemBudget:
    """Tokens of one video, from the container header. Same options and defaults as process_video."""
    label = label or "video"
    opts = VideoOptions(fps, nframes, min_frames, max_frames, min_pixels, max_pixels, total_pixels,
                        resized_height, resized_width, video_start, video_end, max_model_len)
    src = video_source(source, policy=policy, label=label)
    if isinstance(src, list):
        sizes = []
        for i, frame in enumerate(src):
            w, h = header_size(frame, policy=policy, label=f"{label} frame {i}")
            sizes.append((h, w))
        check_frame_list_pixels(sizes, label)
        step1, plan = plan_frame_list(sizes[0], len(sizes), opts, label=label, spec=spec)
        for i, size in enumerate(sizes[1:], 1):
            check_frame_size(i, size, sizes[0], step1, opts, label=label, spec=spec)
        original, video_fps = sizes[0], None
        times = frame_times(plan.indices, opts.fps)
    else:
        meta = probe_video(src, label=label)
        plan = plan_video(meta, opts, label=label, spec=spec)
        original, video_fps = (meta.height, meta.width), meta.fps
        times = frame_times(plan.indices, meta.fps)
    return ItemBudget("video", original, (plan.height, plan.width), plan.grid_thw, plan.num_tokens,
                      nframes=len(plan.indices), total_frames=plan.total_frames, video_fps=video_fps,
                      sample_fps=plan.sample_fps, label=label, frame_times=times)


def check_context(items: list[ItemBudget], text_tokens: int, max_model_len: int) -> int:
    """Total prompt tokens (text + visual); ValueError listing every item when it exceeds max_model_len."""
    total = text_tokens + sum(it.num_tokens for it in items)
    if total > max_model_len:
        parts = [f"{it.label or f'{it.kind} {i + 1}'}: {it.num_tokens} tokens (grid "
                 f"{'x'.join(map(str, it.grid_thw))}, resized {it.resized_size[0]}x{it.resized_size[1]})"
                 for i, it in enumerate(items)]
        raise ValueError(f"prompt needs {total} tokens ({text_tokens} text + "
                         f"{total - text_tokens} visual: {'; '.join(parts) or 'none'}), more than "
                         f"max_model_len {max_model_len}; lower max_pixels / fps / total_pixels or raise "
                         "max_model_len")
    return total


def _looks_like_video(source: Any) -> bool:
    if isinstance(source, (list, tuple)):
        return True
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if path.startswith("data:"):
            return path[5:].lower().startswith("video/")
        return os.path.splitext(path.split("?", 1)[0])[1].lower() in VIDEO_EXTENSIONS
    return False


def describe(path: Any, *, kind: str | None = None, max_model_len: int | None = DEFAULT_MAX_MODEL_LEN,
             text_tokens: int = 0, policy: MediaPolicy | None = None, spec: PreprocessSpec | None = None,
             prompt_tokens: Any = None, count: Any = None, **options: Any) -> dict:
    """One item's token budget as a JSON-ready dict (for `qvl tokens`).

    kind: "image", "video", or None to guess (video extension / data:video / frame list -> video; else
    image, falling back to video when the header is not an image; neither: "not a recognised image or
    video"). `options` are the image or video options (min_pixels, max_pixels, fps, nframes, ...). `fits`
    compares text_tokens + num_tokens with max_model_len. `spec`: the family's PreprocessSpec (None =
    Qwen2-VL's). `count(kind, path, options) -> ItemBudget`, when given, measures instead of the header
    counters here (qvl tokens passes the PromptProcessor's plan, the server's path). `prompt_tokens`
    (ItemBudget -> int), when given, adds what the item takes in a prompt: its vision start/end and any
    text of the family's expansion (Qwen3-VL's video timestamps); `fits` then uses it.
    """
    if kind not in (None, "image", "video"):
        raise ValueError(f"kind must be 'image', 'video' or None, got {kind!r}")
    label = str(path) if isinstance(path, (str, os.PathLike)) else kind or "item"
    if len(label) > 80:
        label = label[:77] + "..."

    def measure(kind: str) -> ItemBudget:
        if count is not None:
            return count(kind, path, options)
        if kind == "image":
            image_options = {k: v for k, v in options.items() if k in _IMAGE_OPTIONS}
            return image_num_tokens(path, policy=policy, label=label, spec=spec, **image_options)
        return video_num_tokens(path, policy=policy, label=label, max_model_len=max_model_len, spec=spec,
                                **options)

    if kind is not None:
        item = measure(kind)
    elif _looks_like_video(path):
        item = measure("video")
    else:
        try:
            item = measure("image")
        except ValueError as image_error:
            if "not a recognised image" not in str(image_error):
                raise
            try:
                item = measure("video")
            except ValueError as video_error:
                if "cannot open video" not in str(video_error):
                    raise
                raise ValueError(f"{label}: not a recognised image or video file") from None
    out = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(item).items()
           if v is not None and k not in ("frame_times", "label")}
    out["label"] = label
    used = item.num_tokens
    if prompt_tokens is not None:
        out["prompt_tokens"] = used = int(prompt_tokens(item))
    out["max_model_len"] = max_model_len
    if max_model_len is not None:
        out["fits"] = text_tokens + used <= max_model_len
    return out
