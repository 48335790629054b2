"""Video preprocessing for Qwen2-VL: source -> frame plan -> decode selected frames -> resize -> patches.

Owns: frame selection (`smart_nframes`, `frame_range`, `frame_indices`: qwen-vl-utils 0.0.14, decord /
torchcodec readers), the per-frame pixel budget, `plan_video` (shared with budget.py, so counted tokens
equal processed tokens), PyAV decoding, and `process_video`. Opening sources is media.py's job; the
normalise + patchify step is image.py's.

Frame selection (qwen-vl-utils): `fps` (default 2.0) xor `nframes`; min 4 / max 768 frames, even counts;
`video_start` / `video_end` (seconds) pick a frame range; indices `linspace(start, end, n).round()`
computed with torch float32 exactly as qwen-vl-utils does.

Per-frame pixels (qwen-vl-utils): min_pixels 128*28^2; max_pixels = max(min(768*28^2, total_pixels / n * 2),
int(1.05 * min_pixels)), a caller's max_pixels can only lower it. One 2-frame group costs
max_pixels / 28^2 tokens, so the video costs about total_pixels / 28^2 tokens in all.
  Default total_pixels = 0.9 * max_model_len * 28^2  (max_model_len default 32768 -> ~29.5k tokens).
  Because the per-frame floor can beat that budget on long clips (768 frames * 128 tokens / 2 = 49k), when
  max_model_len is set and the caller gives neither nframes nor max_frames, the frame count is also
  capped at floor_even(2 * total_pixels / int(1.05 * min_pixels)) (438 frames at the defaults), so a
  default video cannot overflow the context. max_model_len=None restores qwen-vl-utils exactly
  (total_pixels 0.9 * 128000 * 28^2, no frame cap).

Frames are resized with PIL bicubic on uint8, the same numerics as images (qwen-vl-utils resizes videos
with torchvision bicubic+antialias, which differs by rounding; torchvision is not a dependency). Decoding
is sequential with PyAV; only the selected frames are converted and kept, already resized.

A list of frames (paths, URLs, bytes, PIL images) is handled like qwen-vl-utils: each frame is first
sized with the *image* rules and limits (`min_pixels`/`max_pixels` if given, else 3136 / 12845056), the
list is padded to an even count by repeating the last frame, then the video budget applies. Each frame is
resized once, from its original size to the final size. Frames must agree in size after the first step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from qvl.multimodal.image import (FACTOR, PATCH_SIZE, TEMPORAL_PATCH_SIZE, VisionInput, content_hash,
                                  image_target_size, patchify, resize_rgb, smart_resize)
from qvl.multimodal.media import MediaPolicy, open_container, open_image, video_source

FPS = 2.0
FRAME_FACTOR = 2
MIN_FRAMES = 4
MAX_FRAMES = 768
VIDEO_MIN_PIXELS = 128 * FACTOR * FACTOR
VIDEO_MAX_PIXELS = 768 * FACTOR * FACTOR
DEFAULT_MAX_MODEL_LEN = 32768
QWEN_VL_UTILS_SEQ_LEN = 128000


@dataclass
class VideoOptions:
    """Per-video options, qwen-vl-utils names (see module docstring for defaults)."""

    fps: float | None = None
    nframes: int | None = None
    min_frames: int | None = None
    max_frames: int | None = None
    min_pixels: int | None = None
    max_pixels: int | None = None
    total_pixels: float | None = None
    resized_height: int | None = None
    resized_width: int | None = None
    video_start: float | None = None
    video_end: float | None = None
    max_model_len: int | None = DEFAULT_MAX_MODEL_LEN


@dataclass
class VideoMeta:
    """What the container header says (budget.py) or what a frame list holds."""

    total_frames: int
    fps: float
    height: int
    width: int
    duration: float | None = None


@dataclass
class VideoPlan:
    indices: list[int]       # source frame per output frame (even count, padding included)
    height: int              # resized
    width: int
    total_frames: int        # frames in the selected time range
    sample_fps: float

    @property
    def grid_thw(self) -> tuple[int, int, int]:
        return (len(self.indices) // TEMPORAL_PATCH_SIZE, self.height // PATCH_SIZE, self.width // PATCH_SIZE)

    @property
    def num_tokens(self) -> int:
        t, h, w = self.grid_thw
        return t * h * w // 4


def _floor2(x: float) -> int:
    return math.floor(x / FRAME_FACTOR) * FRAME_FACTOR


def smart_nframes(total_frames: int, video_fps: float, *, fps: float | None = None,
                  nframes: int | None = None, min_frames: int | None = None,
                  max_frames: int | None = None) -> int:
    """Number of frames to sample (qwen-vl-utils `smart_nframes`): even, in [2, total_frames]."""
    if fps is not None and nframes is not None:
        raise ValueError(f"give either fps ({fps}) or nframes ({nframes}), not both")
    if nframes is not None:
        n = round(nframes / FRAME_FACTOR) * FRAME_FACTOR
    else:
        fps = FPS if fps is None else fps
        lo = math.ceil((MIN_FRAMES if min_frames is None else min_frames) / FRAME_FACTOR) * FRAME_FACTOR
        hi = _floor2(min(MAX_FRAMES, total_frames) if max_frames is None else max_frames)
        n = total_frames / video_fps * fps
        n = _floor2(min(min(max(n, lo), hi), total_frames))
    if not FRAME_FACTOR <= n <= total_frames:
        raise ValueError(f"nframes should be in [{FRAME_FACTOR}, {total_frames}] (frames available), got {n}")
    return n


def frame_range(total_frames: int, video_fps: float, video_start: float | None = None,
                video_end: float | None = None) -> tuple[int, int, int]:
    """(first, last, count) frame indices for a [video_start, video_end] seconds window."""
    if video_fps <= 0 or total_frames <= 0:
        raise ValueError(f"video has {total_frames} frames at {video_fps} fps")
    if video_start is None and video_end is None:
        return 0, total_frames - 1, total_frames
    duration = total_frames / video_fps
    start = 0.0 if video_start is None else max(0.0, min(video_start, duration))
    end = duration if video_end is None else max(0.0, min(video_end, duration))
    first = math.ceil(start * video_fps)
    last = total_frames - 1 if video_end is None else min(math.floor(end * video_fps), total_frames - 1)
    if first >= last:
        raise ValueError(f"empty time range: video_start {video_start} s -> frame {first}, video_end "
                         f"{video_end} s -> frame {last} (video: {total_frames} frames at {video_fps:g} fps)")
    return first, last, last - first + 1


def frame_indices(first: int, last: int, n: int) -> list[int]:
    """`torch.linspace(first, last, n).round()` in float32, as qwen-vl-utils."""
    import torch

    return torch.linspace(first, last, n).round().long().tolist()


def frame_pixel_limits(nframes: int, opts: VideoOptions) -> tuple[int, float]:
    """(min_pixels, max_pixels) per frame for a video of `nframes` sampled frames."""
    lo = VIDEO_MIN_PIXELS if opts.min_pixels is None else opts.min_pixels
    hi = max(min(VIDEO_MAX_PIXELS, _total_pixels(opts) / nframes * FRAME_FACTOR), int(lo * 1.05))
    if opts.max_pixels is not None:
        hi = min(opts.max_pixels, hi)
    return lo, hi


def _total_pixels(opts: VideoOptions) -> float:
    if opts.total_pixels is not None:
        return opts.total_pixels
    seq = QWEN_VL_UTILS_SEQ_LEN if opts.max_model_len is None else opts.max_model_len
    return 0.9 * seq * FACTOR * FACTOR


def _frame_cap(opts: VideoOptions) -> int | None:
    if opts.max_model_len is None or opts.max_frames is not None or opts.nframes is not None:
        return None
    lo = VIDEO_MIN_PIXELS if opts.min_pixels is None else opts.min_pixels
    return max(FRAME_FACTOR, _floor2(2 * _total_pixels(opts) / int(lo * 1.05)))


def _video_size(height: int, width: int, nframes: int, opts: VideoOptions) -> tuple[int, int]:
    if opts.resized_height is not None and opts.resized_width is not None:
        return smart_resize(opts.resized_height, opts.resized_width)
    lo, hi = frame_pixel_limits(nframes, opts)
    return smart_resize(height, width, FACTOR, lo, hi)


def plan_video(meta: VideoMeta, opts: VideoOptions, *, label: str = "video") -> VideoPlan:
    """Which frames to decode and the size to resize them to, from header metadata only."""
    try:
        first, last, count = frame_range(meta.total_frames, meta.fps, opts.video_start, opts.video_end)
        cap = _frame_cap(opts)
        max_frames = opts.max_frames if cap is None else min(MAX_FRAMES, cap, count)
        n = smart_nframes(count, meta.fps, fps=opts.fps, nframes=opts.nframes, min_frames=opts.min_frames,
                          max_frames=max_frames)
        height, width = _video_size(meta.height, meta.width, n, opts)
    except ValueError as e:
        raise ValueError(f"{label}: {e}") from None
    return VideoPlan(frame_indices(first, last, n), height, width, count, n / max(count, 1e-6) * meta.fps)


def plan_frame_list(first_size: tuple[int, int], count: int, opts: VideoOptions, *,
                    label: str = "video") -> tuple[tuple[int, int], VideoPlan]:
    """For a list of `count` frames whose first is `first_size` (h, w): (per-frame image size, plan)."""
    step1 = image_target_size(*first_size, min_pixels=opts.min_pixels, max_pixels=opts.max_pixels,
                              resized_height=opts.resized_height, resized_width=opts.resized_width,
                              label=f"{label} frame 0")
    n = math.ceil(count / FRAME_FACTOR) * FRAME_FACTOR
    try:
        height, width = _video_size(*step1, n, opts)
    except ValueError as e:
        raise ValueError(f"{label}: {e}") from None
    indices = list(range(count)) + [count - 1] * (n - count)
    sample_fps = FPS if opts.fps is None else opts.fps
    return step1, VideoPlan(indices, height, width, count, sample_fps)


def check_frame_size(i: int, size: tuple[int, int], first_size: tuple[int, int], step1: tuple[int, int],
                     opts: VideoOptions, *, label: str = "video") -> None:
    """Frame i of a list must size (image rules) like frame 0, or qwen-vl-utils could not stack them."""
    got = image_target_size(*size, min_pixels=opts.min_pixels, max_pixels=opts.max_pixels,
                            resized_height=opts.resized_height, resized_width=opts.resized_width,
                            label=f"{label} frame {i}")
    if got != step1:
        raise ValueError(f"{label}: frame {i} ({size[0]}x{size[1]}) resizes to {got[0]}x{got[1]} but frame 0 "
                         f"({first_size[0]}x{first_size[1]}) to {step1[0]}x{step1[1]}; frames must agree")


def probe_video(src: str | bytes, *, label: str = "video") -> VideoMeta:
    """Frame count, fps and size from the container header (frame count estimated from duration * fps
    when the header has none, else counted from packets without decoding)."""
    import av

    with open_container(src, label=label) as container:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        duration = None
        if stream.duration and stream.time_base:
            duration = float(stream.duration * stream.time_base)
        elif container.duration:
            duration = container.duration / 1e6
        frames = stream.frames or 0
        fps = float(rate) if rate else (frames / duration if frames and duration else 0.0)
        if not frames and duration and fps:
            frames = int(round(duration * fps))
        if not frames:
            try:
                frames = sum(1 for p in container.demux(stream) if p.size)
            except av.FFmpegError as e:
                raise ValueError(f"{label}: unreadable video ({type(e).__name__}: {e})") from None
        height, width = stream.codec_context.height, stream.codec_context.width
    if not frames or not fps or not height or not width:
        raise ValueError(f"{label}: cannot read video metadata (frames {frames}, fps {fps:g}, "
                         f"size {width}x{height})")
    _check_frame_pixels(height, width, label)
    return VideoMeta(frames, fps, height, width, duration)


def _check_frame_pixels(height: int, width: int, label: str) -> None:
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and height * width > limit:
        raise ValueError(f"{label}: decompression-bomb guard: frame {width}x{height} = {width * height} "
                         f"pixels exceeds the limit of {limit} pixels (PIL.Image.MAX_IMAGE_PIXELS)")


def decode_frames(src: str | bytes, plan: VideoPlan, *, label: str = "video") -> np.ndarray:
    """Decode sequentially, keeping only the planned frames, resized: uint8 (n, H', W', 3).

    If the stream ends before a planned index (header frame count too high), the last decoded frame
    stands in for the missing ones.
    """
    import av

    wanted: dict[int, list[int]] = {}
    for pos, idx in enumerate(plan.indices):
        wanted.setdefault(idx, []).append(pos)
    out = np.empty((len(plan.indices), plan.height, plan.width, 3), dtype=np.uint8)  # (n, H', W', 3)
    done = np.zeros(len(plan.indices), dtype=bool)
    last_idx, last_frame = max(wanted), None
    try:
        with open_container(src, label=label) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for i, frame in enumerate(container.decode(stream)):
                if i == 0:
                    _check_frame_pixels(frame.height, frame.width, label)
                last_frame = frame
                if i in wanted:
                    pixels = resize_rgb(frame.to_image(), plan.height, plan.width)
                    for pos in wanted[i]:
                        out[pos] = pixels
                        done[pos] = True
                if i >= last_idx:
                    break
    except (av.FFmpegError, OSError) as e:
        raise ValueError(f"{label}: unreadable video ({type(e).__name__}: {e})") from None
    if last_frame is None:
        raise ValueError(f"{label}: no frames could be decoded")
    if not done.all():
        out[~done] = resize_rgb(last_frame.to_image(), plan.height, plan.width)
    return out


def _frames_from_list(frames: list, opts: VideoOptions, policy: MediaPolicy | None,
                      label: str) -> tuple[np.ndarray, VideoPlan, tuple[int, int]]:
    out, plan, step1, original = None, None, None, None
    for i, src in enumerate(frames):
        img = open_image(src, policy=policy, label=f"{label} frame {i}")
        w, h = img.size
        if plan is None:
            original = (h, w)
            step1, plan = plan_frame_list((h, w), len(frames), opts, label=label)
            out = np.empty((len(plan.indices), plan.height, plan.width, 3), dtype=np.uint8)  # (n, H', W', 3)
        else:
            check_frame_size(i, (h, w), original, step1, opts, label=label)
        try:
            out[i] = resize_rgb(img, plan.height, plan.width)
        except OSError as e:
            raise ValueError(f"{label} frame {i}: cannot decode image ({type(e).__name__}: {e})") from None
        finally:
            if img is not src:
                img.close()
    out[len(frames):] = out[len(frames) - 1]
    return out, plan, original


def process_video(video: Any, *, fps: float | None = None, nframes: int | None = None,
                  min_frames: int | None = None, max_frames: int | None = None,
                  min_pixels: int | None = None, max_pixels: int | None = None,
                  total_pixels: float | None = None, resized_height: int | None = None,
                  resized_width: int | None = None, video_start: float | None = None,
                  video_end: float | None = None, max_model_len: int | None = DEFAULT_MAX_MODEL_LEN,
                  policy: MediaPolicy | None = None, label: str | None = None) -> VisionInput:
    """Open, sample, resize and patchify one video -> VisionInput with grid (n/2, H'/14, W'/14).

    `video`: a path, file:// / data: / http(s) URL, bytes (anything PyAV can demux), or a list of frames.
    Options and defaults: see the module docstring. Errors are ValueErrors prefixed with `label`.
    """
    import torch

    label = label or "video"
    opts = VideoOptions(fps, nframes, min_frames, max_frames, min_pixels, max_pixels, total_pixels,
                        resized_height, resized_width, video_start, video_end, max_model_len)
    src = video_source(video, policy=policy, label=label)
    if isinstance(src, list):
        frames, plan, original = _frames_from_list(src, opts, policy, label)
    else:
        meta = probe_video(src, label=label)
        plan = plan_video(meta, opts, label=label)
        frames = decode_frames(src, plan, label=label)
        original = (meta.height, meta.width)
    grid = plan.grid_thw
    return VisionInput(kind="video", pixel_values=torch.from_numpy(patchify(frames)), grid_thw=grid,
                       content_hash=content_hash("video", grid, frames), original_size=original,
                       sample_fps=plan.sample_fps)
