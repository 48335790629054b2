"""Frame plans: which source frames a video samples and the size they are resized to, from header
metadata only (video.py decodes by the plan; budget.py counts tokens by it, so counts equal processing).

Owns: VideoOptions / VideoMeta / VideoPlan, `plan_video`, `plan_frame_list`, frame times, and the two
sampling policies a PreprocessSpec picks with `spec.video_sampling`:

"qwen_vl_utils" (Qwen2-VL, Qwen2.5-VL; see video.py's docstring for the numbers): `smart_nframes`,
`frame_range`, `frame_indices` (torch float32 linspace), the per-frame pixel budget from total_pixels.

"qwen3_vl" (transformers 4.57 Qwen3VLVideoProcessor): `qwen3_vl_num_frames` is its `sample_frames`
(num_frames = int(total / video_fps * fps) clamped to [min_frames, max_frames] and to total, or a given
`nframes` as num_frames, unclamped; fps and nframes exclusive), indices
`np.linspace(0, total - 1, num_frames).round().astype(int)`; `qwen3_vl_smart_resize` is its module-level
`smart_resize` over the t*h*w volume with the spec's video_min_pixels / video_max_pixels
(size.shortest_edge / longest_edge), computed on the sampled (unpadded) count; the sampled frames are then
padded with the last one to a multiple of T (its `_preprocess`). Per-request options map onto the
processor's: fps, nframes -> num_frames, min_frames / max_frames (its attributes), min_pixels / max_pixels ->
size.shortest_edge / longest_edge (pixels of the volume, not per frame); total_pixels (qwen-vl-utils' name)
caps the volume at T * total_pixels, the volume qwen-vl-utils would give; resized_height / resized_width
snap to the factor as for the other families; video_start / video_end (not in transformers) select a frame
range that is then sampled as if it were the whole video. No context-derived frame cap (transformers has
none); the context check refuses a prompt that does not fit.

Limits (both policies): an explicit resized_height / resized_width is brought within max_pixels when one
is given (the request path always gives one: limits.py), and a qwen-vl-utils frame never exceeds the
per-frame ceiling 768 * f^2, even when min_pixels sits at it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from qvl.multimodal.image import image_target_size, smart_resize, snap_resized
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
    Qwen2-VL), in [T, total_frames] (a video shorter than T frames is refused here, as qwen-vl-utils does;
    plan_video takes all its frames instead)."""
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
        h, w = snap_resized(opts.resized_height, opts.resized_width, spec=spec)
        if opts.max_pixels is not None and h * w > opts.max_pixels:      # resized counts against the limit
            h, w = smart_resize(h, w, spec.factor, min(video_min_pixels(spec), opts.max_pixels), opts.max_pixels)
        return h, w
    lo, hi = frame_pixel_limits(nframes, opts, spec=spec)
    h, w = smart_resize(height, width, spec.factor, lo, hi)
    if h * w > video_max_pixels(spec):      # a min_pixels at the ceiling rounds up past it: never above it
        h, w = smart_resize(h, w, spec.factor, spec.factor ** 2, video_max_pixels(spec))
    return h, w


def qwen3_vl_num_frames(total_frames: int, video_fps: float | None, *, fps: float | None = None,
                        nframes: int | None = None, min_frames: int | None = None,
                        max_frames: int | None = None, spec: PreprocessSpec | None = None) -> int:
    """Frames to sample, as Qwen3VLVideoProcessor.sample_frames (its fps / min_frames / max_frames are the
    spec's unless given; video_fps None counts at 24 as it does)."""
    spec = _spec(spec)
    if fps is not None and nframes is not None:
        raise ValueError(f"give either fps ({fps}) or nframes ({nframes}), not both")
    if nframes is not None:
        return int(nframes)
    fps = spec.video_fps if fps is None else fps
    lo = spec.video_min_frames if min_frames is None else min_frames
    hi = spec.video_max_frames if max_frames is None else max_frames
    n = int(total_frames / (video_fps or 24) * fps)
    return min(min(max(n, lo), hi), total_frames)


def qwen3_vl_smart_resize(num_frames: int, height: int, width: int, temporal_factor: int = 2,
                          factor: int = 32, min_pixels: int = 128 * 128,
                          max_pixels: int = 16 * 16 * 2 * 2 * 2 * 6144) -> tuple[int, int]:
    """(h, w) as transformers' qwen3_vl video `smart_resize`: the t*h*w volume within [min, max]_pixels."""
    if num_frames < temporal_factor:
        raise ValueError(f"{num_frames} frames sampled, need at least temporal_patch_size {temporal_factor}")
    if height < factor or width < factor:
        raise ValueError(f"frame {width}x{height} is smaller than the {factor}-px resize factor")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"absolute aspect ratio must be smaller than 200, got "
                         f"{max(height, width) / min(height, width)}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    t_bar = round(num_frames / temporal_factor) * temporal_factor
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt((num_frames * height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def qwen3_vl_pixel_limits(opts: VideoOptions, spec: PreprocessSpec) -> tuple[int, float]:
    """(shortest_edge, longest_edge) of the t*h*w volume for one request."""
    lo = spec.video_min_pixels if opts.min_pixels is None else opts.min_pixels
    hi = spec.video_max_pixels if opts.max_pixels is None else opts.max_pixels
    if opts.total_pixels is not None:
        hi = min(hi, spec.temporal_patch_size * opts.total_pixels)
    return lo, hi


def _qwen3_vl_size(height: int, width: int, nframes: int, opts: VideoOptions,
                   spec: PreprocessSpec) -> tuple[int, int]:
    lo, hi = qwen3_vl_pixel_limits(opts, spec)
    if opts.resized_height is not None and opts.resized_width is not None:
        h, w = snap_resized(opts.resized_height, opts.resized_width, spec=spec)
        if opts.max_pixels is not None and nframes * h * w > opts.max_pixels:   # the volume's limit
            h, w = qwen3_vl_smart_resize(nframes, h, w, spec.temporal_patch_size, spec.factor, min(lo, hi), hi)
        return h, w
    return qwen3_vl_smart_resize(nframes, height, width, spec.temporal_patch_size, spec.factor, lo, hi)


def _pad_t(indices: list[int], t: int) -> list[int]:
    """Repeat the last frame up to a multiple of T (Qwen3VLVideoProcessor._preprocess; T = 2 there)."""
    return indices + indices[-1:] * (-len(indices) % t)


def _plan_qwen3_vl(meta: VideoMeta, opts: VideoOptions, spec: PreprocessSpec) -> VideoPlan:
    first, _, count = frame_range(meta.total_frames, meta.fps, opts.video_start, opts.video_end)
    n = qwen3_vl_num_frames(count, meta.fps, fps=opts.fps, nframes=opts.nframes, min_frames=opts.min_frames,
                            max_frames=opts.max_frames, spec=spec)
    if n < 1:
        raise ValueError(f"nframes should be at least 1, got {n}")
    height, width = _qwen3_vl_size(meta.height, meta.width, n, opts, spec)
    indices = (first + np.linspace(0, count - 1, n).round().astype(int)).tolist()
    return VideoPlan(_pad_t(indices, spec.temporal_patch_size), height, width, count,
                     n / max(count, 1e-6) * meta.fps, spec)


def plan_video(meta: VideoMeta, opts: VideoOptions, *, label: str = "video",
               spec: PreprocessSpec | None = None) -> VideoPlan:
    """Which frames to decode and the size to resize them to, from header metadata only, by the spec's
    video_sampling policy."""
    spec = _spec(spec)
    try:
        if spec.video_sampling == "qwen3_vl":
            return _plan_qwen3_vl(meta, opts, spec)
        first, last, count = frame_range(meta.total_frames, meta.fps, opts.video_start, opts.video_end)
        cap = _frame_cap(opts, spec)
        max_frames = opts.max_frames if cap is None else min(MAX_FRAMES, cap, count)
        if count < spec.temporal_patch_size and opts.nframes is None:
            n = count    # shorter than one temporal patch: its frames, the last repeated (as for any odd count)
        else:
            n = smart_nframes(count, meta.fps, fps=opts.fps, nframes=opts.nframes, min_frames=opts.min_frames,
                              max_frames=max_frames, spec=spec)
        height, width = _video_size(meta.height, meta.width, n, opts, spec)
    except ValueError as e:
        raise ValueError(f"{label}: {e}") from None
    return VideoPlan(_pad_t(frame_indices(first, last, n), spec.temporal_patch_size), height, width, count,
                     n / max(count, 1e-6) * meta.fps, spec)


def _list_frame_size(size: tuple[int, int], opts: VideoOptions, label: str,
                     spec: PreprocessSpec) -> tuple[int, int]:
    """A listed frame's size before the video step: qwen-vl-utils sizes it with the image rules; Qwen3-VL's
    processor stacks the frames as they are (so they must agree exactly)."""
    if spec.video_sampling == "qwen3_vl":
        return tuple(size)
    return image_target_size(*size, min_pixels=opts.min_pixels, max_pixels=opts.max_pixels,
                             resized_height=opts.resized_height, resized_width=opts.resized_width,
                             label=label, spec=spec)


def plan_frame_list(first_size: tuple[int, int], count: int, opts: VideoOptions, *, label: str = "video",
                    spec: PreprocessSpec | None = None) -> tuple[tuple[int, int], VideoPlan]:
    """For a list of `count` frames whose first is `first_size` (h, w): (per-frame image size, plan)."""
    spec = _spec(spec)
    step1 = _list_frame_size(first_size, opts, f"{label} frame 0", spec)
    t = spec.temporal_patch_size
    n = math.ceil(count / t) * t
    size = _qwen3_vl_size if spec.video_sampling == "qwen3_vl" else _video_size
    try:
        height, width = size(*step1, count if size is _qwen3_vl_size else n, opts, spec)
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
    """Frame i of a list must size like frame 0 (image rules; Qwen3-VL: as given), or they cannot stack."""
    got = _list_frame_size(size, opts, f"{label} frame {i}", _spec(spec))
    if got != step1:
        raise ValueError(f"{label}: frame {i} ({size[0]}x{size[1]}) resizes to {got[0]}x{got[1]} but frame 0 "
                         f"({first_size[0]}x{first_size[1]}) to {step1[0]}x{step1[1]}; frames must agree")

