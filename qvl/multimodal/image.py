"""Image preprocessing for Qwen2-VL: source -> RGB -> smart_resize -> bicubic -> normalise -> patches.

Owns: `VisionInput` (what the model and the caches consume), `smart_resize` (SPEC 4.1, transformers 4.57),
`process_image`, and the uint8 -> (np, 1176) normalise+patchify step shared with video.py.
Does not know about prompts, tokens in text, or the model; opening sources is media.py's job.

Numerics are those of transformers 4.57 `Qwen2VLImageProcessor` (the slow PIL path, SPEC 4.2), to the bit:
  1. colour: RGB images are used as is; images with alpha (RGBA, LA, PA, P or L with transparency) are
     composited over white the way qwen-vl-utils does it (paste with the alpha channel as mask); every
     other mode goes through Pillow's `convert("RGB")` (what transformers' `convert_to_rgb` does);
  2. `PIL.Image.resize((W', H'), BICUBIC)` on uint8 to `smart_resize` dimensions;
  3. rescale `x.astype(float64) * (1/255) -> float32`, then `(x - mean) / std` in float32 (CLIP mean/std).
     Step 3 depends on one uint8 value and the channel only, so it is done as a (3, 256) float32 lookup
     table built with exactly those operations: identical results, no float64 image.
  4. patchify merge-block-major (SPEC 4.2): rows ordered (h/2, w/2, 2, 2), columns (C, T=2, 14, 14), the
     frame repeated on the T axis.
EXIF orientation is not applied (neither transformers nor qwen-vl-utils apply it).
transformers 4.57's own `convert_to_rgb` is a plain `convert("RGB")` (transparent pixels keep whatever
colour they store, often black); the white compositing is qwen-vl-utils', which runs before the processor in
the official pipeline, extended here from RGBA to every mode with alpha.

content_hash = sha256 over a version tag, kind, grid and the resized uint8 RGB bytes (which determine the
pixel values exactly; 1/8 of the bytes of `pixel_values`).
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from qvl.multimodal.media import MediaPolicy, open_image

if TYPE_CHECKING:
    import torch

PATCH_SIZE = 14
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2
FACTOR = PATCH_SIZE * MERGE_SIZE                     # 28
PATCH_DIM = 3 * TEMPORAL_PATCH_SIZE * PATCH_SIZE ** 2  # 1176
MIN_PIXELS = 4 * FACTOR * FACTOR                     # 3136, hub preprocessor_config.json
MAX_PIXELS = 16384 * FACTOR * FACTOR                 # 12845056, hub preprocessor_config.json
MAX_RATIO = 200
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_HASH_TAG = b"qvl-pixels-v1"


@dataclass
class VisionInput:
    """One preprocessed image or video, ready for the vision tower."""

    kind: str                       # "image" | "video"
    pixel_values: "torch.Tensor"    # (np, 1176) float32, merge-block-major rows, (C, T, P, P) columns
    grid_thw: tuple[int, int, int]  # in 14-px patches
    content_hash: str               # sha256 hex of (kind, grid, pixel bytes)
    original_size: tuple[int, int]  # (height, width) of the source (first frame for video)
    sample_fps: float | None = None  # video: frames sampled per second of the source (None for images)

    @property
    def num_tokens(self) -> int:
        t, h, w = self.grid_thw
        return t * h * w // (MERGE_SIZE * MERGE_SIZE)


def smart_resize(height: int, width: int, factor: int = FACTOR, min_pixels: int = MIN_PIXELS,
                 max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """(height, width) -> nearest multiples of `factor` with min_pixels <= h*w <= max_pixels (SPEC 4.1).

    As transformers 4.57: Python `round` (half to even); no lower size limit (10x10 -> 56x56); the
    downscale branch floors to at least `factor`; aspect ratio above 200 is refused.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"height and width must be positive, got height {height}, width {width}")
    if min_pixels > max_pixels:
        raise ValueError(f"min_pixels {min_pixels} is larger than max_pixels {max_pixels}")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_RATIO:
        raise ValueError(f"absolute aspect ratio must be smaller than {MAX_RATIO}, got {ratio:g} "
                         f"(height {height}, width {width})")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def image_target_size(height: int, width: int, *, min_pixels: int | None = None,
                      max_pixels: int | None = None, resized_height: int | None = None,
                      resized_width: int | None = None, label: str = "image") -> tuple[int, int]:
    """Resized (height, width) of an image, as qwen-vl-utils + the processor would choose it.

    With `resized_height`/`resized_width` (both or neither) the pair is first snapped with the default
    limits (qwen-vl-utils), then the processor limits `min_pixels`/`max_pixels` apply as usual (a no-op
    unless they are tighter).
    """
    lo = MIN_PIXELS if min_pixels is None else int(min_pixels)
    hi = MAX_PIXELS if max_pixels is None else int(max_pixels)
    try:
        if (resized_height is None) != (resized_width is None):
            raise ValueError(f"resized_height and resized_width go together, got {resized_height} and "
                             f"{resized_width}")
        if resized_height is not None:
            height, width = smart_resize(int(resized_height), int(resized_width))
        return smart_resize(height, width, FACTOR, lo, hi)
    except ValueError as e:
        raise ValueError(f"{label}: {e}") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB view of an image; transparency composited over white (see module docstring)."""
    if img.mode == "RGB":
        return img
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if not has_alpha:
        return img.convert("RGB")
    rgba = img.convert("RGBA")
    out = Image.new("RGB", rgba.size, (255, 255, 255))
    out.paste(rgba, mask=rgba.getchannel("A"))
    return out


def _normalize_lut() -> np.ndarray:
    values = np.arange(256, dtype=np.uint8)
    scaled = (values.astype(np.float64) * (1 / 255)).astype(np.float32)  # transformers' rescale
    mean = np.array(CLIP_MEAN, dtype=np.float32)
    std = np.array(CLIP_STD, dtype=np.float32)
    return (scaled[None, :] - mean[:, None]) / std[:, None]              # (3, 256) float32


_LUT = _normalize_lut()


def patchify(frames: np.ndarray) -> np.ndarray:
    """uint8 frames (F, H, W, 3) or one image (H, W, 3) -> normalised patches (np, 1176) float32.

    F must be even (video.py pads); an image is used as both frames of its temporal patch.
    H and W must be multiples of 28. Row order: (t, h/2, w/2, 2, 2); columns (C, T, 14, 14).
    """
    m, p, tp = MERGE_SIZE, PATCH_SIZE, TEMPORAL_PATCH_SIZE
    image = frames.ndim == 3
    f = 1 if image else frames.shape[0]
    h, w = frames.shape[-3:-1]
    if frames.dtype != np.uint8:
        raise ValueError(f"patchify needs uint8 pixels, got {frames.dtype}")
    if h % FACTOR or w % FACTOR or (not image and f % tp):
        raise ValueError(f"patchify needs H, W multiples of {FACTOR} and an even frame count, got "
                         f"frames {f}, height {h}, width {w}")
    gt, gh, gw = (1 if image else f // tp), h // p, w // p
    tt = 1 if image else tp
    x = frames.reshape(gt, tt, gh // m, m, p, gw // m, m, p, 3)         # (gt, T, gh/m, m, P, gw/m, m, P, C)
    x = x.transpose(0, 2, 5, 3, 6, 8, 1, 4, 7)                          # (gt, gh/m, gw/m, m, m, C, T, P, P)
    x = x.reshape(gt * gh * gw, 3, tt, p * p)                           # (np, C, T, P*P) uint8
    out = np.empty((gt * gh * gw, 3, tp, p * p), dtype=np.float32)      # (np, C, T, P*P)
    for c in range(3):  # uint8 indices are always in range; mode="clip" skips numpy's buffered "raise"
        np.take(_LUT[c], x[:, c], out=out[:, c, :tt], mode="clip")
    if image:
        out[:, :, 1] = out[:, :, 0]                                     # the frame twice on T
    return out.reshape(gt * gh * gw, PATCH_DIM)                         # (np, 1176)


def content_hash(kind: str, grid_thw: tuple[int, int, int], pixels: np.ndarray) -> str:
    """sha256 hex over (version tag, kind, grid, resized uint8 pixels)."""
    h = hashlib.sha256(_HASH_TAG)
    h.update(f"|{kind}|{grid_thw[0]},{grid_thw[1]},{grid_thw[2]}|".encode())
    h.update(np.ascontiguousarray(pixels).data)
    return h.hexdigest()


def resize_rgb(img: Image.Image, height: int, width: int) -> np.ndarray:
    """RGB conversion + bicubic resize -> uint8 (height, width, 3)."""
    rgb = to_rgb(img)
    if rgb.size != (width, height):
        rgb = rgb.resize((width, height), Image.Resampling.BICUBIC)
    return np.asarray(rgb)                                              # (H', W', 3) uint8


def process_image(image: Any, *, min_pixels: int | None = None, max_pixels: int | None = None,
                  resized_height: int | None = None, resized_width: int | None = None,
                  policy: MediaPolicy | None = None, label: str | None = None) -> VisionInput:
    """Open and preprocess one image -> VisionInput with grid (1, H'/14, W'/14).

    `image`: anything media.open_image accepts. min/max_pixels default to the hub preprocessor values
    (3136 / 12845056); callers pass the checkpoint's. Errors are ValueErrors prefixed with `label`.
    """
    import torch

    label = label or "image"
    img = open_image(image, policy=policy, label=label)
    try:
        width, height = img.size
        if width == 0 or height == 0:
            raise ValueError(f"{label}: image has zero size ({width}x{height})")
        th, tw = image_target_size(height, width, min_pixels=min_pixels, max_pixels=max_pixels,
                                   resized_height=resized_height, resized_width=resized_width, label=label)
        try:
            pixels = resize_rgb(img, th, tw)
        except OSError as e:
            raise ValueError(f"{label}: cannot decode image ({type(e).__name__}: {e})") from None
    finally:
        if img is not image:  # ours, not the caller's PIL image
            img.close()
    grid = (1, th // PATCH_SIZE, tw // PATCH_SIZE)
    return VisionInput(kind="image", pixel_values=torch.from_numpy(patchify(pixels)), grid_thw=grid,
                       content_hash=content_hash("image", grid, pixels), original_size=(height, width))
