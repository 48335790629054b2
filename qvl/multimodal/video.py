"""Video preprocessing by a PreprocessSpec: source -> frame plan -> decode chosen frames -> resize -> patches.

Owns: frame selection (`smart_nframes`, `frame_range`, `frame_indices`: qwen-vl-utils 0.0.14, decord /
torchcodec readers), the per-frame pixel budget, `plan_video` (shared with budget.py, so counted tokens
equal processed tokens), PyAV decoding, and `process_video`. Opening sources is media.py's job; the
normalise + patchify step is image.py's.

The family's numbers come from `spec: PreprocessSpec` (None = Qwen2-VL's): f = spec.factor (patch * merge,
28 for Qwen2-VL, 32 for a 16-px-patch family), T = spec.temporal_patch_size (frames per temporal patch, 2),
the patch size for the grid and spec.num_tokens for the token count. The qwen-vl-utils policy numbers below
(fps 2, 4 / 768 frames, 128 / 768 tokens per frame, 0.9 of the sequence) stay here, expressed in f and T.

Frame selection (qwen-vl-utils): `fps` (default 2.0) xor `nframes`; min 4 / max 768 frames, counts rounded
to multiples of T; `video_start` / `video_end` (seconds) pick a frame range; indices
`linspace(start, end, n).round()` computed with torch float32 exactly as qwen-vl-utils does.

Per-frame pixels (qwen-vl-utils): min_pixels 128*f^2; max_pixels = max(min(768*f^2, total_pixels / n * T),
int(1.05 * min_pixels)), a caller's max_pixels can only lower it. One T-frame group costs
max_pixels / f^2 tokens, so the video costs about total_pixels / f^2 tokens in all.
  Default total_pixels = 0.9 * max_model_len * f^2  (max_model_len default 32768 -> ~29.5k tokens).
  Because the per-frame floor can beat that budget on long clips (768 frames * 128 tokens / 2 = 49k), when
  max_model_len is set and the caller gives neither nframes nor max_frames, the frame count is also
  capped at floor_T(T * total_pixels / int(1.05 * min_pixels)) (438 frames at the defaults), so a
  default video cannot overflow the context. max_model_len=None restores qwen-vl-utils exactly
  (total_pixels 0.9 * 128000 * f^2, no frame cap).

Frames are resized with PIL bicubic on uint8, the same numerics as images (qwen-vl-utils resizes videos
with torchvision bicubic+antialias, which differs by rounding; torchvision is not a dependency). Decoding
is sequential with PyAV; only the selected frames are converted and kept, already resized.

A list of frames (paths, URLs, bytes, PIL images) is handled like qwen-vl-utils: each frame is first
sized with the *image* rules and limits (`min_pixels`/`max_pixels` if given, else the spec's: 3136 /
12845056 for Qwen2-VL), the list is padded to a multiple of T by repeating the last frame, then the video
budget applies. Each frame is
resized once, from its original size to the final size. Frames must agree in size after the first step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from qvl.multimodal.image import (VisionInput, content_hash, image_target_size, patchify, resize_rgb,
                                  smart_resize, snap_resized)
from qvl.multimodal.media import MediaPolicy, open_container, open_image, video_source
from qvl.multimodal.spec import QWEN2_VL, PreprocessSpec

# qwen-vl-utils policy (the same for every family; pixel numbers scale with the spec's factor f):
FPS = 2.0
MIN_FRAMES = 4
MAX_FRAMES = 768
VIDEO_MIN_TOKENS = 128          # per-frame pixel floor: 128 * f^2
VIDEO_MAX_TOKENS = 768          # per-frame pixel ceiling: 768 * f^2
TOTAL_PIXELS_SHARE = 0.9        # default total_pixels = 0.9 * max_model_len * f^2
DEFAULT_MAX_MODEL_LEN = 32768
QWEN_VL_UTILS_SEQ_LEN = 128000
# Aliases of the Qwen2-VL default spec's values, for modules that import them; not used here.
FRAME_FACTOR = QWEN2_VL.temporal_patch_size                          # 2
VIDEO_MIN_PIXELS = VIDEO_MIN_TOKENS * QWEN2_VL.factor ** 2           # 100352
VIDEO_MAX_PIXELS = VIDEO_MAX_TOKENS * QWEN2_VL.factor ** 2           # 602112


def _spec(spec: PreprocessSpec | None) -> PreprocessSpec:
    return QWEN2_VL if spec is None else spec


def video_min_pixels(spec: PreprocessSpec | None = None) -> int:
    """Default per-frame pixel floor, 128 * factor^2 (100352 for Qwen2-VL)."""
    return VIDEO_MIN_TOKENS * _spec(spec).factor ** 2


def video_max_pixels(spec: PreprocessSpec | None = None) -> int:
    """Per-frame pixel ceiling, 768 * factor^2 (602112 for Qwen2-VL)."""
    return VIDEO_MAX_TOKENS * _spec(spec).factor ** 2


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
    spec: PreprocessSpec = field(default=QWEN2_VL, repr=False)

    @property
    def grid_thw(self) -> tuple[int, int, int]:
        p = self.spec.patch_size
        return (len(self.indices) // self.spec.temporal_patch_size, self.height // p, self.width // p)

    @property
    def num_tokens(self) -> int:
        return self.spec.num_tokens(self.grid_thw)


def _floor_t(x: float, t: int) -> int:
    return math.floor(x / t) * t


def smart_nframes(total_frames: int, video_fps: float, *, fps: float | None = None,
                  nframes: int | None = None, min_frames: int | None = None,
                  max_frames: int | None = None, spec: PreprocessSpec | None = None) -> int:
    """Frames to sample (qwen-vl-utils `smart_nframes`): a multiple of T (spec.temporal_patch_size, 2 for
    Qwen2-VL), in [T, total_frames]."""
    t = _spec(spec).temporal_patch_size
    if fps is not None and nframes is not None:
        raise ValueError(f"give either fps ({fps}) or nframes ({nframes}), not both")
    if nframes is not None:
        n = round(nframes / t) * t
    else:
        fps = FPS if fps is None else fps
        lo = math.ceil((MIN_FRAMES if min_frames is None else min_frames) / t) * t
        hi = _floor_t(min(MAX_FRAMES, total_frames) if max_frames is None else max_frames, t)
        n = total_frames / video_fps * fps
        n = _floor_t(min(min(max(n, lo), hi), total_frames), t)
    if not t <= n <= total_frames:
        raise ValueError(f"nframes should be in [{t}, {total_frames}] (frames available), got {n}")
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


def frame_pixel_limits(nframes: int, opts: VideoOptions, *,
                       spec: PreprocessSpec | None = None) -> tuple[int, float]:
    """(min_pixels, max_pixels) per frame for a video of `nframes` sampled frames."""
    spec = _spec(spec)
    lo = video_min_pixels(spec) if opts.min_pixels is None else opts.min_pixels
    hi = max(min(video_max_pixels(spec), _total_pixels(opts, spec) / nframes * spec.temporal_patch_size),
             int(lo * 1.05))
    if opts.max_pixels is not None:
        hi = min(opts.max_pixels, hi)
    return lo, hi


def _total_pixels(opts: VideoOptions, spec: PreprocessSpec) -> float:
    if opts.total_pixels is not None:
        return opts.total_pixels
    seq = QWEN_VL_UTILS_SEQ_LEN if opts.max_model_len is None else opts.max_model_len
    return TOTAL_PIXELS_SHARE * seq * spec.factor * spec.factor


def _frame_cap(opts: VideoOptions, spec: PreprocessSpec) -> int | None:
    if opts.max_model_len is None or opts.max_frames is not None or opts.nframes is not None:
        return None
    t = spec.temporal_patch_size
    lo = video_min_pixels(spec) if opts.min_pixels is None else opts.min_pixels
    return max(t, _floor_t(t * _total_pixels(opts, spec) / int(lo * 1.05), t))


def _video_size(height: int, width: int, nframes: int, opts: VideoOptions,
                spec: PreprocessSpec) -> tuple[int, int]:
    if opts.resized_height is not None and opts.resized_width is not None:
        return snap_resized(opts.resized_height, opts.resized_width, spec=spec)
    lo, hi = frame_pixel_limits(nframes, opts, spec=spec)
    return smart_resize(height, width, spec.factor, lo, hi)


def plan_video(meta: VideoMeta, opts: VideoOptions, *, label: str = "video",
               spec: PreprocessSpec | None = None) -> VideoPlan:
    """Which frames to decode and the size to resize them to, from header metadata only."""
    spec = _spec(spec)
    try:
        first, last, count = frame_range(meta.total_frames, meta.fps, opts.video_start, opts.video_end)
        cap = _frame_cap(opts, spec)
        max_frames = opts.max_frames if cap is None else min(MAX_FRAMES, cap, count)
        n = smart_nframes(count, meta.fps, fps=opts.fps, nframes=opts.nframes, min_frames=opts.min_frames,
                          max_frames=max_frames, spec=spec)
        height, width = _video_size(meta.height, meta.width, n, opts, spec)
    except ValueError as e:
        raise ValueError(f"{label}: {e}") from None
    return VideoPlan(frame_indices(first, last, n), height, width, count, n / max(count, 1e-6) * meta.fps,
                     spec)


def plan_frame_list(first_size: tuple[int, int], count: int, opts: VideoOptions, *, label: str = "video",
                    spec: PreprocessSpec | None = None) -> tuple[tuple[int, int], VideoPlan]:
    """For a list of `count` frames whose first is `first_size` (h, w): (per-frame image size, plan)."""
    spec = _spec(spec)
    step1 = image_target_size(*first_size, min_pixels=opts.min_pixels, max_pixels=opts.max_pixels,
                              resized_height=opts.resized_height, resized_width=opts.resized_width,
                              label=f"{label} frame 0", spec=spec)
    t = spec.temporal_patch_size
    n = math.ceil(count / t) * t
    try:
        height, width = _video_size(*step1, n, opts, spec)
    except ValueError as e:
        raise ValueError(f"{label}: {e}") from None
    indices = list(range(count)) + [count - 1] * (n - count)
    sample_fps = FPS if opts.fps is None else opts.fps
    return step1, VideoPlan(indices, height, width, count, sample_fps, spec)


def frame_times(indices: list[int], fps: float | None) -> tuple[float, ...] | None:
    """Seconds of each sampled frame (source index / source fps; a frame list: its index / the fps it was
    given), or None when the fps is unknown (Qwen3-VL's timestamps then use the processor default)."""
    return None if not fps else tuple(i / fps for i in indices)


def check_frame_size(i: int, size: tuple[int, int], first_size: tuple[int, int], step1: tuple[int, int],
                     opts: VideoOptions, *, label: str = "video", spec: PreprocessSpec | None = None) -> None:
    """Frame i of a list must size (image rules) like frame 0, or qwen-vl-utils could not stack them."""
    got = image_target_size(*size, min_pixels=opts.min_pixels, max_pixels=opts.max_pixels,
                            resized_height=opts.resized_height, resized_width=opts.resized_width,
                            label=f"{label} frame {i}", spec=spec)
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


def _frames_from_list(frames: list, opts: VideoOptions, policy: MediaPolicy | None, label: str,
                      spec: PreprocessSpec) -> tuple[np.ndarray, VideoPlan, tuple[int, int]]:
    out, plan, step1, original = None, None, None, None
    for i, src in enumerate(frames):
        img = open_image(src, policy=policy, label=f"{label} frame {i}")
        w, h = img.size
        if plan is None:
            original = (h, w)
            step1, plan = plan_frame_list((h, w), len(frames), opts, label=label, spec=spec)
            out = np.empty((len(plan.indices), plan.height, plan.width, 3), dtype=np.uint8)  # (n, H', W', 3)
        else:
            check_frame_size(i, (h, w), original, step1, opts, label=label, spec=spec)
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
                  policy: MediaPolicy | None = None, label: str | None = None,
                  spec: PreprocessSpec | None = None) -> VisionInput:
    """Open, sample, resize and patchify one video -> VisionInput with grid (n/T, H'/P, W'/P) (the spec's
    temporal patch and patch sizes; Qwen2-VL: 2, 14).

    `video`: a path, file:// / data: / http(s) URL, bytes (anything PyAV can demux), or a list of frames.
    Options and defaults: see the module docstring. Errors are ValueErrors prefixed with `label`.
    """
    import torch

    spec = _spec(spec)
    label = label or "video"
    opts = VideoOptions(fps, nframes, min_frames, max_frames, min_pixels, max_pixels, total_pixels,
                        resized_height, resized_width, video_start, video_end, max_model_len)
    src = video_source(video, policy=policy, label=label)
    if isinstance(src, list):
        frames, plan, original = _frames_from_list(src, opts, policy, label, spec)
        times = frame_times(plan.indices, opts.fps)
    else:
        meta = probe_video(src, label=label)
        plan = plan_video(meta, opts, label=label, spec=spec)
        frames = decode_frames(src, plan, label=label)
        original = (meta.height, meta.width)
        times = frame_times(plan.indices, meta.fps)
    grid = plan.grid_thw
    return VisionInput(kind="video", pixel_values=torch.from_numpy(patchify(frames, spec=spec)),
                       grid_thw=grid, content_hash=content_hash("video", grid, frames, spec=spec),
                       original_size=original, sample_fps=plan.sample_fps, merge_size=spec.merge_size,
                       patch_size=spec.patch_size, frame_times=times)
