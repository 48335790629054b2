"""Qwen3-VL (dense) configuration: the Qwen2-VL `ModelConfig` parser with Qwen3's decoder and vision fields.

The hub ships the nested layout (`text_config` + `vision_config`, `rope_scaling` inside `text_config`
with `mrope_section` [24, 20, 20] and `mrope_interleaved`), which Qwen2-VL's parser already reads
(QWEN3VL_NOTES 2.1). What differs:
  * text: `head_dim` is its own field (128 on the hub), not hidden_size / heads; `attention_bias`
    (False on the hub: no q/k/v bias); q_norm / k_norm exist (text.py); defaults are transformers'
    Qwen3VLTextConfig's (rope_theta 5e6, rms_norm_eps 1e-6, head_dim 128);
  * vision: `hidden_size` is the ViT width (1152), `out_hidden_size` the merger output (= the LLM width),
    `intermediate_size` the plain GELU-tanh MLP width, patch 16, `num_position_embeddings` (a square
    learned grid, 2304 = 48 x 48), `deepstack_visual_indexes` (the blocks whose output feeds a DeepStack
    merger; [8, 16, 24] on the hub).
4.57 applies interleaved M-RoPE unconditionally for qwen3_vl; so does qvl (the flag is not read).
Knows nothing about torch or weights.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from qvl.models import read_config_dict
from qvl.models.qwen2_vl.config import _positive
from qvl.models.qwen2_vl.config import ModelConfig as Qwen2VLModelConfig
from qvl.models.qwen2_vl.config import VisionConfig as Qwen2VLVisionConfig
from qvl.models.qwen2_vl.config import VisionSizes

_VISION_ACTS = ("gelu_pytorch_tanh", "gelu")


@dataclass
class VisionConfig(VisionSizes):
    """Qwen3-VL ViT. `hidden_size` is the ViT width (`embed_dim`), `out_hidden_size` the merger output."""

    depth: int = 27
    hidden_size: int = 1152
    hidden_act: str = "gelu_pytorch_tanh"
    intermediate_size: int = 4304
    num_heads: int = 16
    in_chans: int = 3
    patch_size: int = 16
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    out_hidden_size: int = 3584
    num_position_embeddings: int = 2304
    deepstack_visual_indexes: list[int] = field(default_factory=lambda: [8, 16, 24])

    model_types: ClassVar[tuple] = (None, "qwen3_vl", "qwen3_vl_vision")
    acts = _VISION_ACTS
    out_field: ClassVar[str] = "out_hidden_size"
    from_dict = classmethod(Qwen2VLVisionConfig.from_dict.__func__)

    def __post_init__(self) -> None:
        _positive("vision_config", depth=self.depth, hidden_size=self.hidden_size,
                  intermediate_size=self.intermediate_size, num_heads=self.num_heads, in_chans=self.in_chans,
                  patch_size=self.patch_size, spatial_merge_size=self.spatial_merge_size,
                  temporal_patch_size=self.temporal_patch_size, out_hidden_size=self.out_hidden_size,
                  num_position_embeddings=self.num_position_embeddings)
        self.check_heads_and_act("hidden_size")
        side = math.isqrt(self.num_position_embeddings)
        if side * side != self.num_position_embeddings:
            raise ValueError(f"vision_config.num_position_embeddings={self.num_position_embeddings} must be a "
                             f"square (a side x side learned grid)")
        self.deepstack_visual_indexes = [int(i) for i in self.deepstack_visual_indexes]
        bad = [i for i in self.deepstack_visual_indexes if not 0 <= i < self.depth]
        if bad:
            raise ValueError(f"vision_config.deepstack_visual_indexes {bad} are outside the depth {self.depth}")

    @property
    def embed_dim(self) -> int:
        return self.hidden_size

    @property
    def num_grid_per_side(self) -> int:
        return math.isqrt(self.num_position_embeddings)


@dataclass
class ModelConfig(Qwen2VLModelConfig):
    """Qwen3-VL text decoder (Qwen3: QK-norm, decoupled head_dim) + the Qwen3-VL vision tower."""

    vocab_size: int = 151936
    hidden_size: int = 4096
    intermediate_size: int = 22016
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int | None = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 5000000.0
    mrope_section: list[int] = field(default_factory=lambda: [24, 20, 20])
    max_position_embeddings: int = 128000
    attention_bias: bool = False
    vision: VisionConfig = field(default_factory=VisionConfig)
    video_preprocessor: dict | None = field(default=None, repr=False, compare=False)   # from_pretrained

    model_type: ClassVar[str] = "qwen3_vl"
    vision_cls: ClassVar[type] = VisionConfig
    head_dim_decoupled: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self.attention_bias = bool(self.attention_bias)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "ModelConfig":
        """Qwen2-VL's reader, plus `video_preprocessor`: video_preprocessor_config.json as a dict (None when
        absent), which processing.preprocess_spec reads the video sampling numbers from."""
        config = super().from_pretrained(path)
        video = read_config_dict(path, "video_preprocessor_config.json", required=False)
        config.video_preprocessor = video or None
        return config
