"""Qwen2.5-VL configuration: the Qwen2-VL `ModelConfig` with the Qwen2.5 vision tower's fields.

The text decoder's fields, both config.json layouts (flat hub / nested `text_config`), the validation and
`from_pretrained` are Qwen2-VL's (qvl.models.qwen2_vl.config); only `model_type` and the vision class
change. Vision fields (QWEN2VL_SPEC 8.1): `hidden_size` is the ViT width (1280 on the hub),
`out_hidden_size` the merger output (= the text hidden size), `intermediate_size` the SwiGLU width,
`window_size` (112 px) the attention window, `fullatt_block_indexes` the blocks that attend per frame,
`tokens_per_second` the video time scale of M-RoPE.

Missing fields take transformers' class defaults, which are NOT the hub values (`hidden_size` 3584,
`tokens_per_second` 4): every official config.json states them, so values always come from the checkpoint.
Like transformers' own classes, the bare defaults do not form a consistent model (vision out 3584, text
8192), so build configs with `from_dict` / `from_pretrained`. Knows nothing about torch or weights.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from qvl.models.qwen2_vl.config import _positive
from qvl.models.qwen2_vl.config import ModelConfig as Qwen2VLModelConfig
from qvl.models.qwen2_vl.config import VisionConfig as Qwen2VLVisionConfig
from qvl.models.qwen2_vl.config import VisionSizes


@dataclass
class VisionConfig(VisionSizes):
    """Qwen2.5-VL ViT. `hidden_size` is the ViT width (`embed_dim`), `out_hidden_size` the merger output."""

    depth: int = 32
    hidden_size: int = 3584
    intermediate_size: int = 3420
    num_heads: int = 16
    in_chans: int = 3
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    window_size: int = 112
    fullatt_block_indexes: list[int] = field(default_factory=lambda: [7, 15, 23, 31])
    tokens_per_second: float = 4
    out_hidden_size: int = 3584
    hidden_act: str = "silu"

    model_types: ClassVar[tuple] = (None, "qwen2_5_vl", "qwen2_5_vl_vision")  # accepted vision model_type
    out_field: ClassVar[str] = "out_hidden_size"   # the config.json field that holds the merger's output width
    # the Qwen2-VL parser is generic over the class (model_types check, in_channels alias, known fields only)
    from_dict = classmethod(Qwen2VLVisionConfig.from_dict.__func__)

    def __post_init__(self) -> None:
        _positive("vision_config", depth=self.depth, hidden_size=self.hidden_size,
                  intermediate_size=self.intermediate_size, num_heads=self.num_heads, in_chans=self.in_chans,
                  patch_size=self.patch_size, spatial_merge_size=self.spatial_merge_size,
                  temporal_patch_size=self.temporal_patch_size, window_size=self.window_size,
                  out_hidden_size=self.out_hidden_size)
        self.check_heads_and_act("hidden_size")
        if self.merged_window < 1:
            raise ValueError(f"vision_config.window_size={self.window_size} must be at least patch_size * "
                             f"spatial_merge_size = {self.patch_size * self.spatial_merge_size}")
        self.fullatt_block_indexes = [int(i) for i in self.fullatt_block_indexes]
        bad = [i for i in self.fullatt_block_indexes if not 0 <= i < self.depth]
        if bad:
            raise ValueError(f"vision_config.fullatt_block_indexes {bad} are outside the depth {self.depth}")
        if isinstance(self.tokens_per_second, bool) or not self.tokens_per_second > 0:
            raise ValueError(f"vision_config.tokens_per_second must be > 0, got {self.tokens_per_second!r}")

    @property
    def embed_dim(self) -> int:
        """The ViT width (Qwen2-VL's name for it)."""
        return self.hidden_size

    @property
    def merged_window(self) -> int:
        """Window side in merged tokens: window_size / merge / patch (112 / 2 / 14 = 4)."""
        return self.window_size // self.spatial_merge_size // self.patch_size


@dataclass
class ModelConfig(Qwen2VLModelConfig):
    """Qwen2.5-VL text decoder (the Qwen2 decoder, same fields) + the Qwen2.5 vision tower."""

    vision: VisionConfig = field(default_factory=VisionConfig)

    model_type: ClassVar[str] = "qwen2_5_vl"
    vision_cls: ClassVar[type] = VisionConfig
