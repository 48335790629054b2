"""Qwen2-VL configuration: `ModelConfig` (text decoder + `VisionConfig`) read from a checkpoint's config.json.

Accepts both spellings transformers has written (QWEN2VL_SPEC 1):
  * flat hub layout: text fields at the top level, `rope_scaling` at the top, `vision_config` sub-dict;
  * nested layout (4.52+ / v5): `text_config` sub-dict (its values win over top-level copies), and
    `rope_scaling` or `rope_parameters` (which may also carry `rope_theta`).
Missing fields take transformers' class defaults; unknown keys are ignored. Every value is checked in
`__post_init__` and a bad one raises ValueError naming the field, the limit and the numbers.

`ModelConfig.model_type` names the one type the class accepts; another `model_type` is refused with a
message naming it (qvl.models.family_for picks the class). Subclasses (qwen2_5_vl) change
`model_type`, `vision_cls` and their own fields, not the parsing. Also `load_generation_config(dir) -> dict`
for generation_config.json.

Knows nothing about torch or weights.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

_VISION_ACTS = ("quick_gelu", "gelu", "silu")


def _as_list(x: Any) -> list[int]:
    if x is None:
        return []
    if isinstance(x, (list, tuple)):
        return [int(v) for v in x]
    return [int(x)]


def _positive(owner: str, **values: Any) -> None:
    for name, v in values.items():
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ValueError(f"{owner}.{name} must be a positive integer, got {v!r}")


class VisionSizes:
    """Sizes every Qwen-VL vision config derives the same way from `embed_dim` (the ViT width),
    `num_heads`, `in_chans`, `temporal_patch_size` and `patch_size`; `acts` are the activations its tower
    implements."""

    acts = _VISION_ACTS

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch row: C * T * P * P (1176 for Qwen2-VL's 14-px patches)."""
        return self.in_chans * self.temporal_patch_size * self.patch_size ** 2

    def check_heads_and_act(self, width_field: str) -> None:
        """The checks every tower shares: its width (config field `width_field`) splits into heads whose
        size is a multiple of 4, and the activation is one qvl implements."""
        if self.embed_dim % self.num_heads:
            raise ValueError(f"vision_config.{width_field}={self.embed_dim} must be divisible by "
                             f"num_heads={self.num_heads}")
        if self.head_dim % 4:
            raise ValueError(f"vision head_dim = {width_field}/num_heads = {self.head_dim} must be a multiple of 4 "
                             f"(2-D rotary splits it into row and column halves)")
        if self.hidden_act not in self.acts:
            raise ValueError(f"vision_config.hidden_act={self.hidden_act!r} is not supported; use one of "
                             f"{list(self.acts)}")


@dataclass
class VisionConfig(VisionSizes):
    """Qwen2-VL ViT. `hidden_size` is the merger output (= LLM width); `embed_dim` is the ViT width."""

    depth: int = 32
    embed_dim: int = 1280
    hidden_size: int = 3584
    num_heads: int = 16
    mlp_ratio: float = 4.0
    in_chans: int = 3
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    hidden_act: str = "quick_gelu"

    def __post_init__(self) -> None:
        _positive("vision_config", depth=self.depth, embed_dim=self.embed_dim, hidden_size=self.hidden_size,
                  num_heads=self.num_heads, in_chans=self.in_chans, patch_size=self.patch_size,
                  spatial_merge_size=self.spatial_merge_size, temporal_patch_size=self.temporal_patch_size)
        self.check_heads_and_act("embed_dim")
        if not self.mlp_ratio > 0 or int(self.embed_dim * self.mlp_ratio) <= 0:
            raise ValueError(f"vision_config.mlp_ratio must be > 0, got {self.mlp_ratio!r}")

    @property
    def out_hidden_size(self) -> int:
        """Width of the merger output (= the text model's hidden size)."""
        return self.hidden_size

    @property
    def mlp_hidden_dim(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)


    model_types: ClassVar[tuple] = (None, "qwen2_vl", "qwen2_vl_vision")  # accepted vision_config.model_type
    out_field: ClassVar[str] = "hidden_size"    # the config.json field that holds the merger's output width

    @classmethod
    def from_dict(cls, d: dict) -> "VisionConfig":
        d = dict(d)
        vt = d.get("model_type")
        if vt not in cls.model_types:
            raise ValueError(f"vision_config.model_type={vt!r} is not a {cls.__name__} vision tower "
                             f"(expected one of {[t for t in cls.model_types if t]})")
        if "in_chans" not in d and "in_channels" in d:
            d["in_chans"] = d["in_channels"]
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class ModelConfig:
    """Qwen2-VL text decoder + vision tower; defaults are transformers' class defaults (the 72B shape)."""

    vocab_size: int = 152064
    hidden_size: int = 8192
    intermediate_size: int = 29568
    num_hidden_layers: int = 80
    num_attention_heads: int = 64
    num_key_value_heads: int = 8
    head_dim: int | None = None  # derived: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1000000.0
    mrope_section: list[int] = field(default_factory=lambda: [16, 24, 24])
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    eos_token_id: list[int] = field(default_factory=list)
    bos_token_id: int | None = None
    pad_token_id: int | None = None
    torch_dtype: str | None = None  # the checkpoint's stored dtype, informative only
    vision: VisionConfig = field(default_factory=VisionConfig)

    model_type: ClassVar[str] = "qwen2_vl"
    vision_cls: ClassVar[type] = VisionConfig
    head_dim_decoupled: ClassVar[bool] = False   # Qwen3: head_dim * heads need not equal hidden_size

    def __post_init__(self) -> None:
        _positive("config", vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                  intermediate_size=self.intermediate_size, num_hidden_layers=self.num_hidden_layers,
                  num_attention_heads=self.num_attention_heads, num_key_value_heads=self.num_key_value_heads,
                  max_position_embeddings=self.max_position_embeddings)
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(f"hidden_size={self.hidden_size} must be divisible by "
                                 f"num_attention_heads={self.num_attention_heads}")
            self.head_dim = self.hidden_size // self.num_attention_heads
        if not self.head_dim_decoupled and self.head_dim * self.num_attention_heads != self.hidden_size:
            raise ValueError(f"head_dim * num_attention_heads = {self.head_dim} * {self.num_attention_heads} = "
                             f"{self.head_dim * self.num_attention_heads} must equal hidden_size={self.hidden_size}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_key_value_heads={self.num_key_value_heads} must divide "
                             f"num_attention_heads={self.num_attention_heads}")
        self.mrope_section = [int(s) for s in self.mrope_section]
        if len(self.mrope_section) != 3 or min(self.mrope_section) < 0:
            raise ValueError(f"mrope_section must be 3 non-negative ints (t, h, w), got {self.mrope_section}")
        if sum(self.mrope_section) != self.head_dim // 2:
            raise ValueError(f"mrope_section {self.mrope_section} sums to {sum(self.mrope_section)}, must equal "
                             f"head_dim/2 = {self.head_dim // 2}")
        if not self.rms_norm_eps > 0:
            raise ValueError(f"rms_norm_eps must be > 0, got {self.rms_norm_eps!r}")
        if not self.rope_theta > 0:
            raise ValueError(f"rope_theta must be > 0, got {self.rope_theta!r}")
        if self.vision.out_hidden_size != self.hidden_size:
            raise ValueError(f"vision_config.{self.vision.out_field}={self.vision.out_hidden_size} (merger output) "
                             f"must equal hidden_size={self.hidden_size}")
        self.eos_token_id = _as_list(self.eos_token_id)
        for name in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
            v = getattr(self, name)
            if not 0 <= v < self.vocab_size:
                raise ValueError(f"{name}={v} must be in [0, vocab_size={self.vocab_size})")
        for v in self.eos_token_id:
            if not 0 <= v < self.vocab_size:
                raise ValueError(f"eos_token_id {v} must be in [0, vocab_size={self.vocab_size})")

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        mt = d.get("model_type")
        if mt != cls.model_type:
            raise ValueError(f"model_type={mt!r} is not {cls.model_type!r} ({cls.__module__}.{cls.__name__})")
        text = dict(d)
        nested = d.get("text_config")
        if isinstance(nested, dict):
            text.update({k: v for k, v in nested.items() if v is not None or k not in text})
        if text.get("use_sliding_window"):
            raise ValueError("use_sliding_window=True is not supported (no official Qwen2-VL checkpoint uses it)")

        rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
        rtype = rope.get("type", rope.get("rope_type", "mrope"))
        if rtype not in ("mrope", "default"):
            raise ValueError(f"rope type {rtype!r} is not supported; Qwen2-VL uses 'mrope'")
        kwargs: dict[str, Any] = {}
        if "mrope_section" in rope:
            kwargs["mrope_section"] = list(rope["mrope_section"])
        theta = rope.get("rope_theta", text.get("rope_theta"))
        if theta is not None:
            kwargs["rope_theta"] = float(theta)

        names = {f.name for f in fields(cls)} - {"vision", "mrope_section", "rope_theta"}
        for k in names:
            if k in text and text[k] is not None:
                kwargs[k] = text[k]
        if "torch_dtype" not in kwargs and isinstance(text.get("dtype"), str):
            kwargs["torch_dtype"] = text["dtype"]
        # v5 keeps tie_word_embeddings on the outer config; older nested files may carry it in text_config.
        if "tie_word_embeddings" in d:
            kwargs["tie_word_embeddings"] = bool(d["tie_word_embeddings"])
        # A minimal vision_config (the AWQ repos: in_chans, model_type, spatial_patch_size) takes the class
        # defaults, like transformers; check_merger_width holds the merger width to the weights.
        kwargs["vision"] = cls.vision_cls.from_dict(d.get("vision_config") or {})
        return cls(**kwargs)

    @classmethod
    def check_merger_width(cls, d: dict, stored: int) -> None:
        """config.json `d` against the merger's output width `stored` in the weights (MERGER_OUT rows):
        ValueError naming the wrong number when vision_config's merger width (stated, or the class default
        of a minimal vision_config) and the text hidden_size disagree (an early
        Qwen2-VL-7B-Instruct-AWQ revision said 8192 for 3584)."""
        nested = d.get("text_config") if isinstance(d.get("text_config"), dict) else {}
        text = nested.get("hidden_size") or d.get("hidden_size") or cls.hidden_size
        field_ = cls.vision_cls.out_field
        vision = d.get("vision_config") or {}
        stated = vision.get(field_, cls.vision_cls.__dataclass_fields__[field_].default)
        if stated == text:
            return
        if stored == text:
            said = f"={stated}" if field_ in vision else f" (absent: the default {stated})"
            raise ValueError(f"config.json vision_config.{field_}{said} is wrong: the checkpoint's merger "
                             f"outputs {stored} = hidden_size; set vision_config.{field_} to {text}")
        raise ValueError(f"config.json hidden_size={text} does not fit the checkpoint's vision merger, which "
                         f"outputs {stored} (vision_config.{field_}={stated}): the decoder or the tower is wrong")

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "ModelConfig":
        """Read `path`/config.json; eos ids from generation_config.json (if any) are appended to the config's."""
        path = Path(path)
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise ValueError(f"{path} has no config.json; it is not a Hugging Face checkpoint directory")
        try:
            d = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg_file} is not valid JSON: {e}") from None
        config = cls.from_dict(d)
        for eos in _as_list(load_generation_config(path).get("eos_token_id")):
            if eos not in config.eos_token_id:
                config.eos_token_id.append(eos)
        return config


_GENERATION_KEYS = ("bos_token_id", "pad_token_id", "eos_token_id", "do_sample", "temperature", "top_k", "top_p",
                    "min_p", "repetition_penalty", "max_new_tokens", "max_length")


def load_generation_config(path: str | Path) -> dict:
    """Defaults from `path`/generation_config.json: the keys of `_GENERATION_KEYS` that are present
    (eos_token_id normalized to list[int]). Missing file -> {}; a malformed one -> ValueError."""
    f = Path(path) / "generation_config.json"
    if not f.is_file():
        return {}
    try:
        d = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{f} is not valid JSON: {e}") from None
    out = {k: d[k] for k in _GENERATION_KEYS if d.get(k) is not None}
    if "eos_token_id" in out:
        out["eos_token_id"] = _as_list(out["eos_token_id"])
    return out
