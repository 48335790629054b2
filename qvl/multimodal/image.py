"""Image preprocessing: source -> RGB -> smart_resize -> bicubic -> normalise -> patches, by a PreprocessSpec.

Owns: `VisionInput` (what the model and the caches consume), `smart_resize` (SPEC 4.1, transformers 4.57),
`process_image`, and the uint8 -> (np, patch_dim) normalise+patchify step shared with video.py.
Does not know about prompts, tokens in text, or the model; opening sources is media.py's job.

Every number of the model family (patch, merge and temporal patch sizes, the resize factor patch*merge,
mean/std, default pixel limits, tokens per grid) comes from the `spec: PreprocessSpec` argument of each
entry point; None means `qvl.multimodal.spec.QWEN2_VL`. The module-level PATCH_SIZE, MERGE_SIZE, ... are
aliases of that default spec's values for older importers; nothing here reads them.

Numerics are those of transformers 4.57 `Qwen2VLImageProcessor` (the slow PIL path, SPEC 4.2), to the bit:
  1. colour: RGB images are used as is; images with alpha (RGBA, LA, PA, P or L with transparency) are
     composited over white the way qwen-vl-utils does it (paste with the alpha channel as mask); every
     other mode goes through Pillow's `convert("RGB")` (what transformers' `convert_to_rgb` does);
  2. `PIL.Image.resize((W', H'), BICUBIC)` on uint8 to `smart_resize` dimensions;
  3. rescale `x.astype(float64) * (1/255) -> float32`, then `(x - mean) / std` in float32 (the spec's
     mean/std; CLIP's for Qwen2-VL). Step 3 depends on one uint8 value and the channel only, so it is done
     as a (3, 256) float32 lookup table (one per (mean, std), cached) built with exactly those operations:
     identical results, no float64 image.
  4. patchify merge-block-major (SPEC 4.2): rows ordered (h/m, w/m, m, m), columns (C, T, P, P) (for
     Qwen2-VL m=2, T=2, P=14), an image's frame repeated on the T axis.
The EXIF orientation is applied when the image is opened (media.upright, as transformers' load_image does),
before resizing; original_size and grounding boxes are the upright image's.
transformers 4.57's own `convert_to_rgb` is a plain `convert("RGB")` (transparent pixels keep whatever
colour they store, often black); the white compositing is qwen-vl-utils', which runs before the processor in
the official pipeline, extended here from RGBA to every mode with alpha.

content_hash = sha256 over a version tag, kind, grid and the resized uint8 RGB bytes (which determine the
pixel values exactly; 1/8 of the bytes of `pixel_values`), plus the spec's layout and mean/std when they
differ from Qwen2-VL's (so the same pixels under another normalisation never share a hash; Qwen2-VL
hashes are unchanged).
"""
from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from qvl.multimodal.image_file import open_image
from qvl.multimodal.media import MediaPolicy
from qvl.multimodal.spec import CLIP_MEAN, CLIP_STD, QWEN2_VL, PreprocessSpec  # noqa: F401 (re-exported)

if TYPE_CHECKING:
    import torch

# Aliases of the Qwen2-VL default spec's values, for modules that import them; not used in this package's
# media code (pass `spec=` instead). CLIP_MEAN / CLIP_STD are re-exported from qvl.multimodal.spec.
PATCH_SIZE = QWEN2_VL.patch_size                     # 14
MERGE_SIZE = QWEN2_VL.merge_size                     # 2
TEMPORAL_PATCH_SIZE = QWEN2_VL.temporal_patch_size   # 2
FACTOR = QWEN2_VL.factor                             # 28
PATCH_DIM = QWEN2_VL.patch_dim                       # 1176
MIN_PIXELS = QWEN2_VL.min_pixels                     # 3136, hub preprocessor_config.json
MAX_PIXELS = QWEN2_VL.max_pixels                     # 12845056, hub preprocessor_config.json

MAX_RATIO = 200                 # transformers' smart_resize rule, the same for every family
IMAGE_MIN_TOKENS = 4            # qwen-vl-utils' default image limits, in merged tokens (x factor^2 pixels):
IMAGE_MAX_TOKENS = 16384        # used to snap resized_height / resized_width
_HASH_TAG = b"qvl-pixels-v1"


def _spec(spec: PreprocessSpec | None) -> PreprocessSpec:
    return QWEN2_VL if spec is None else spec


@dataclass
class VisionInput:
    """One preprocessed image or video, ready for the vision tower."""

    kind: str                       # "image" | "video"
    pixel_values: "torch.Tensor"    # (np, patch_dim) float32, merge-block-major rows, (C, T, P, P) columns
    grid_thw: tuple[int, int, int]  # in patches (14 px for Qwen2-VL)
    content_hash: str               # sha256 hex of (kind, grid, pixel bytes)
    original_size: tuple[int, int]  # (height, width) of the source (first frame for video)
    sample_fps: float | None = None  # video: frames sampled per second of the source (None for images)
    merge_size: int = QWEN2_VL.merge_size  # the spec's spatial merge: merge**2 patches per token
    patch_size: int = QWEN2_VL.patch_size  # the spec's patch side in pixels
    frame_times: tuple[float, ...] | None = None  # video: seconds of each sampled frame (None: fps unknown)

    @property
    def num_tokens(self) -> int:
        t, h, w = self.grid_thw
        return t * h * w // (self.merge_size * self.merge_size)

    @property
    def resized_size(self) -> tuple[int, int]:
        """(height, width) in pixels of the image (frames) as resized for the vision tower."""
        return self.grid_thw[1] * self.patch_size, self.grid_thw[2] * self.patch_size


def smart_resize(height: int, width: int, factor: int | None = None, min_pixels: int | None = None,
                 max_pixels: int | None = None, *, spec: PreprocessSpec | None = None) -> tuple[int, int]:
    """(height, width) -> nearest multiples of `factor` with min_pixels <= h*w <= max_pixels (SPEC 4.1).

    factor / min_pixels / max_pixels not given come from `spec` (spec.factor, spec.min_pixels,
    spec.max_pixels; Qwen2-VL: 28, 3136, 12845056).
    As transformers 4.57: Python `round` (half to even); no lower size limit (10x10 -> 56x56); the
    downscale branch floors to at least `factor`; aspect ratio above 200 is refused.
    """
    spec = _spec(spec)
    factor = spec.factor if factor is None else factor
    min_pixels = spec.min_pixels if min_pixels is None else min_pixels
    max_pixels = spec.max_pixels if max_pixels is None else max_pixels
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


def snap_resized(height: int, width: int, *, spec: PreprocessSpec | None = None) -> tuple[int, int]:
    """An explicit resized_height/resized_width snapped as qwen-vl-utils does: factor multiples within its
    default image limits (4 .. 16384 tokens of factor^2 pixels)."""
    f = _spec(spec).factor
    return smart_resize(height, width, f, IMAGE_MIN_TOKENS * f * f, IMAGE_MAX_TOKENS * f * f)


def image_target_size(height: int, width: int, *, min_pixels: int | None = None,
                      max_pixels: int | None = None, resized_height: int | None = None,
                      resized_width: int | None = None, label: str = "image",
                      spec: PreprocessSpec | None = None) -> tuple[int, int]:
    """Resized (height, width) of an image, as qwen-vl-utils + the processor would choose it.

    min_pixels / max_pixels default to the spec's (the checkpoint's processor limits). With
    `resized_height`/`resized_width` (both or neither) the pair is first snapped with qwen-vl-utils'
    default limits (4 and 16384 tokens of factor^2 pixels), then the processor limits apply as usual (a
    no-op unless they are tighter). The result never exceeds max_pixels (transformers' upscale branch can
    round past it when min_pixels is close to max_pixels; such a size is brought back under it).
    """
    spec = _spec(spec)
    lo = spec.min_pixels if min_pixels is None else int(min_pixels)
    hi = spec.max_pixels if max_pixels is None else int(max_pixels)
    try:
        if (resized_height is None) != (resized_width is None):
            raise ValueError(f"resized_height and resized_width go together, got {resized_height} and "
                             f"{resized_width}")
        if resized_height is not None:
            height, width = snap_resized(int(resized_height), int(resized_width), spec=spec)
        th, tw = smart_resize(height, width, spec.factor, lo, hi)
        if th * tw > hi:      # the upscale branch rounds up past max_pixels when min_pixels is close to it
            th, tw = smart_resize(th, tw, spec.factor, min(lo, spec.factor ** 2), hi)
        return th, tw
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


@functools.lru_cache(maxsize=16)
def _lut(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    values = np.arange(256, dtype=np.uint8)
    scaled = (values.astype(np.float64) * (1 / 255)).astype(np.float32)  # transformers' rescale
    mean_ = np.array(mean, dtype=np.float32)
    std_ = np.array(std, dtype=np.float32)
    out = (scaled[None, :] - mean_[:, None]) / std_[:, None]            # (3, 256) float32
    out.setflags(write=False)                                           # shared by every caller
    return out


def normalize_lut(spec: PreprocessSpec | None = None) -> np.ndarray:
    """(3, 256) float32: the normalised value of each uint8 per channel under the spec's mean/std."""
    spec = _spec(spec)
    mean, std = tuple(map(float, spec.image_mean)), tuple(map(float, spec.image_std))
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"image_mean and image_std need 3 channels, got {mean} and {std}")
    return _lut(mean, std)


def patchify(frames: np.ndarray, *, spec: PreprocessSpec | None = None) -> np.ndarray:
    """uint8 frames (F, H, W, 3) or one image (H, W, 3) -> normalised patches (np, patch_dim) float32.

    With the spec's patch P, merge m and temporal patch T (Qwen2-VL: 14, 2, 2 -> patch_dim 1176):
    F must be a multiple of T (video.py pads); an image is repeated T times on its temporal patch.
    H and W must be multiples of P*m. Row order: (t, h/m, w/m, m, m); columns (C, T, P, P).
    """
    spec = _spec(spec)
    m, p, tp = spec.merge_size, spec.patch_size, spec.temporal_patch_size
    lut = normalize_lut(spec)
    image = frames.ndim == 3
    f = 1 if image else frames.shape[0]
    h, w = frames.shape[-3:-1]
    if frames.dtype != np.uint8:
        raise ValueError(f"patchify needs uint8 pixels, got {frames.dtype}")
    if h % spec.factor or w % spec.factor or (not image and f % tp):
        raise ValueError(f"patchify needs H, W multiples of {spec.factor} and a frame count that is a "
                         f"multiple of {tp}, got frames {f}, height {h}, width {w}")
    gt, gh, gw = (1 if image else f // tp), h // p, w // p
    tt = 1 if image else tp
    x = frames.reshape(gt, tt, gh // m, m, p, gw // m, m, p, 3)         # (gt, T, gh/m, m, P, gw/m, m, P, C)
    x = x.transpose(0, 2, 5, 3, 6, 8, 1, 4, 7)                          # (gt, gh/m, gw/m, m, m, C, T, P, P)
    x = x.reshape(gt * gh * gw, 3, tt, p * p)                           # (np, C, T, P*P) uint8
    out = np.empty((gt * gh * gw, 3, tp, p * p), dtype=np.float32)      # (np, C, T, P*P)
    for c in range(3):  # uint8 indices are always in range; mode="clip" skips numpy's buffered "raise"
        np.take(lut[c], x[:, c], out=out[:, c, :tt], mode="clip")
    if image and tp > 1:
        out[:, :, 1:] = out[:, :, :1]                                   # the frame T times on T
    return out.reshape(gt * gh * gw, spec.patch_dim)                    # (np, 3*T*P*P)


def _layout_key(spec: PreprocessSpec) -> tuple:
    return (spec.patch_size, spec.merge_size, spec.temporal_patch_size, tuple(map(float, spec.image_mean)),
            tuple(map(float, spec.image_std)))


def _spec_tag(spec: PreprocessSpec) -> bytes:
    """What of the spec pixel_values depend on beyond (grid, pixels); empty for Qwen2-VL's values."""
    key = _layout_key(spec)
    return b"" if key == _layout_key(QWEN2_VL) else repr(key).encode()


def content_hash(kind: str, grid_thw: tuple[int, int, int], pixels: np.ndarray, *,
                 spec: PreprocessSpec | None = None) -> str:
    """sha256 hex over (version tag, kind, grid, resized uint8 pixels[, the spec if not Qwen2-VL's])."""
    h = hashlib.sha256(_HASH_TAG)
    h.update(f"|{kind}|{grid_thw[0]},{grid_thw[1]},{grid_thw[2]}|".encode())
    h.update(_spec_tag(_spec(spec)))
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
                  policy: MediaPolicy | None = None, label: str | None = None,
                  spec: PreprocessSpec | None = None) -> VisionInput:
    """Open and preprocess one image -> VisionInput with grid (1, H'/P, W'/P) (P = spec.patch_size).

    `image`: anything image_file.open_image accepts. min/max_pixels default to the spec's (Qwen2-VL: the hub
    preprocessor values 3136 / 12845056). Errors are ValueErrors prefixed with `label`.
    """
    import torch

    spec = _spec(spec)
    label = label or "image"
    img = open_image(image, policy=policy, label=label)
    try:
        width, height = img.size
        if width == 0 or height == 0:
            raise ValueError(f"{label}: image has zero size ({width}x{height})")
        th, tw = image_target_size(height, width, min_pixels=min_pixels, max_pixels=max_pixels,
                                   resized_height=resized_height, resized_width=resized_width, label=label,
                                   spec=spec)
        try:
            pixels = resize_rgb(img, th, tw)
        except OSError as e:
            raise ValueError(f"{label}: cannot decode image ({type(e).__name__}: {e})") from None
    finally:
        if img is not image:  # ours, not the caller's PIL image
            img.close()
    grid = (1, th // spec.patch_size, tw // spec.patch_size)
    return VisionInput(kind="image", pixel_values=torch.from_numpy(patchify(pixels, spec=spec)),
                       grid_thw=grid, content_hash=content_hash("image", grid, pixels, spec=spec),
                       original_size=(height, width), merge_size=spec.merge_size,
                       patch_size=spec.patch_size)
