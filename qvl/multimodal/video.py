"""Video preprocessing by a PreprocessSpec: source -> frame plan -> decode chosen frames -> resize -> patches.

Owns: opening containers with PyAV under an allow-list of demuxers and only the `file` protocol
(`open_container`), probing (`probe_video`) and decoding (`decode_frames`), frame lists, and `process_video`. The
frame plan (which frames, what size: `plan_video`, shared with budget.py so counted tokens equal processed
tokens) lives in frames.py, by the spec's `video_sampling` policy: "qwen_vl_utils" (below; Qwen2-VL,
Qwen2.5-VL) or "qwen3_vl" (transformers' Qwen3VLVideoProcessor; see frames.py). Its names are re-exported
here. Opening sources is media.py's job; the normalise + patchify step is image.py's.

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

Frames are resized with PIL bicubic on uint8, the same numerics as images, under both policies
(qwen-vl-utils and Qwen3VLVideoProcessor resize videos with torchvision bicubic+antialias, which differs by
rounding; torchvision is not a dependency and does not import here). Frame indices and sizes are exact. Decoding
is sequential with PyAV; only the selected frames are converted and kept, already resized.

A list of frames (paths, URLs, bytes, PIL images) is handled like qwen-vl-utils: each frame is first
sized with the *image* rules and limits (`min_pixels`/`max_pixels` if given, else the spec's: 3136 /
12845056 for Qwen2-VL), the list is padded to a multiple of T by repeating the last frame, then the video
budget applies. Each frame is resized once, from its original size to the final size. Frames must agree
in size after the first step. Every frame's header is read before any frame is decoded: each frame within
the decompression-bomb limit, all of them within FRAME_LIST_MAX_PIXELS. Under "qwen3_vl" every listed
frame is kept (no sampling), there is no image step (frames must agree as given) and the size is Qwen3-VL's volume smart_resize of the listed count.
"""
from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image

from qvl.multimodal.frames import (DEFAULT_MAX_MODEL_LEN, FPS, FRAME_FACTOR, MAX_FRAMES,  # noqa: F401
                                   MIN_FRAMES, VIDEO_MAX_PIXELS, VIDEO_MIN_PIXELS, VideoMeta, VideoOptions,
                                   VideoPlan, _spec, check_frame_size, frame_indices, frame_pixel_limits,
                                   frame_range, frame_times, plan_frame_list, plan_video,
                                   qwen3_vl_num_frames, qwen3_vl_smart_resize, smart_nframes,
                                   video_max_pixels, video_min_pixels)
from qvl.multimodal.image import VisionInput, content_hash, patchify, resize_rgb
from qvl.multimodal.image_file import open_image, upright_size
from qvl.multimodal.media import MediaPolicy, video_source
from qvl.multimodal.spec import PreprocessSpec

# Decoded pixels one frame-list video may cost in all (each frame is decoded, resized and dropped in turn;
# this bounds the decode time): 4x Pillow's per-image decompression-bomb limit, about 358 million.
FRAME_LIST_MAX_PIXELS = 4 * 89_478_485
# FFmpeg demuxer names (a container's format name matches when any comma-separated part matches).
SAFE_VIDEO_DEMUXERS = ("mov,mp4,matroska,webm,avi,gif,apng,mpeg,mpegts,flv,ogg,asf,h264,hevc,m4v,ivf,"
                       "yuv4mpegpipe,mjpeg")


def open_container(src: str | bytes, *, label: str = "video"):
    """Open a resolved video source (path or bytes) with PyAV, restricted to safe demuxers."""
    import av

    options = {"format_whitelist": SAFE_VIDEO_DEMUXERS, "protocol_whitelist": "file"}
    target = io.BytesIO(src) if isinstance(src, bytes) else src
    try:
        container = av.open(target, mode="r", container_options=options)
    except (av.FFmpegError, OSError, ValueError, UnicodeError) as e:
        raise ValueError(f"{label}: cannot open video ({type(e).__name__}: {e})") from None
    if not container.streams.video:
        container.close()
        raise ValueError(f"{label}: no video stream in the container")
    return container


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


def check_frame_list_pixels(sizes: list[tuple[int, int]], label: str) -> None:
    """A frame list, from its frames' headers (h, w), before any is decoded: every frame within the
    decompression-bomb limit, and all of them together within FRAME_LIST_MAX_PIXELS (a tiny PNG can
    decode to 9400x9400, and hundreds fit in one request)."""
    for i, (h, w) in enumerate(sizes):
        _check_frame_pixels(h, w, f"{label} frame {i}")
    total = sum(h * w for h, w in sizes)
    if total > FRAME_LIST_MAX_PIXELS:
        raise ValueError(f"{label}: {len(sizes)} frames decode to {total} pixels in all, more than the "
                         f"frame-list limit of {FRAME_LIST_MAX_PIXELS} pixels "
                         f"(qvl.multimodal.video.FRAME_LIST_MAX_PIXELS); send fewer or smaller frames")


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
    sizes = []
    for i, src in enumerate(frames):                   # headers first: refuse before decoding anything
        img = open_image(src, policy=policy, label=f"{label} frame {i}", load=False)
        sizes.append(upright_size(img)[::-1])
        if img is not src:
            img.close()
    check_frame_list_pixels(sizes, label)
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
