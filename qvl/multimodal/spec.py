"""PreprocessSpec: the numbers a model family's image/video preprocessing is made of.

A family (qvl/models/<family>/processing.py) builds one from its checkpoint (preprocessor_config.json +
config.json); image.py, video.py and budget.py resize, normalise and patchify by it. Knows nothing else.
"""
from __future__ import annotations

from dataclasses import dataclass

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
VIDEO_SAMPLING = ("qwen_vl_utils", "qwen3_vl")


@dataclass(frozen=True)
class PreprocessSpec:
    patch_size: int = 14                 # pixels per patch side
    merge_size: int = 2                  # patches per merged token side (spatial_merge_size)
    temporal_patch_size: int = 2         # frames per temporal patch
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    min_pixels: int = 4 * 28 * 28        # 3136, the hub preprocessor_config.json
    max_pixels: int = 16384 * 28 * 28    # 12845056
    # Video frame sampling and sizing policy (video.py / frames.py):
    #   "qwen_vl_utils": qwen-vl-utils 0.0.14 (Qwen2-VL, Qwen2.5-VL): per-frame pixel budget;
    #   "qwen3_vl": transformers' Qwen3VLVideoProcessor: sample_frames + smart_resize over t*h*w.
    video_sampling: str = "qwen_vl_utils"
    # qwen3_vl only (qwen_vl_utils keeps its own numbers, fps 2 / 4..768 frames, in frames.py): the video
    # processor's fps / min_frames / max_frames and size.shortest_edge / longest_edge, pixels of the whole
    # t*h*w volume (Qwen3VLVideoProcessor's class defaults: 2, 4, 768, 128*32*32, 768*32*32)
    video_fps: float = 2.0
    video_min_frames: int = 4
    video_max_frames: int = 768
    video_min_pixels: int = 128 * 32 * 32
    video_max_pixels: int = 768 * 32 * 32

    def __post_init__(self) -> None:
        for name in ("patch_size", "merge_size", "temporal_patch_size", "min_pixels", "max_pixels",
                     "video_min_frames", "video_max_frames", "video_min_pixels", "video_max_pixels"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"PreprocessSpec.{name} must be a positive integer, got {v!r}")
        if self.min_pixels > self.max_pixels:
            raise ValueError(f"PreprocessSpec: min_pixels {self.min_pixels} > max_pixels {self.max_pixels}")
        if self.video_sampling not in VIDEO_SAMPLING:
            raise ValueError(f"PreprocessSpec.video_sampling must be one of {VIDEO_SAMPLING}, "
                             f"got {self.video_sampling!r}")
        if not (isinstance(self.video_fps, (int, float)) and not isinstance(self.video_fps, bool)
                and self.video_fps > 0):
            raise ValueError(f"PreprocessSpec.video_fps must be a positive number, got {self.video_fps!r}")

    @property
    def factor(self) -> int:
        """Resize granularity in pixels: patch_size * merge_size (28 for Qwen2-VL)."""
        return self.patch_size * self.merge_size

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch row: 3 * T * P * P (1176 for Qwen2-VL)."""
        return 3 * self.temporal_patch_size * self.patch_size ** 2

    def num_tokens(self, grid_thw: tuple[int, int, int]) -> int:
        """Visual tokens of an item with grid (t, h, w) in patches: t*h*w / merge**2."""
        t, h, w = grid_thw
        return t * h * w // (self.merge_size ** 2)


QWEN2_VL = PreprocessSpec()
