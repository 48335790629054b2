"""Qwen3-VL checkpoint keys -> module names: exactly Qwen2-VL's rules (qvl.models.qwen2_vl.weights).

The hub stores `model.visual.*` / `model.language_model.*` / `lm_head.weight` (4.57's layout), mapped to
`visual.*` / `model.*`; the 2B / 4B tie the head to the embedding (`TIED`).
"""
from qvl.models.qwen2_vl.weights import RENAMES, TIED, canonical_key, sanitize  # noqa: F401

__all__ = ["RENAMES", "TIED", "canonical_key", "sanitize"]
