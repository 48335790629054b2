"""Qwen3-VL checkpoint keys -> module names: exactly Qwen2-VL's rules (qvl.models.qwen2_vl.weights).

The hub stores `model.visual.*` / `model.language_model.*` / `lm_head.weight` (4.57's layout), mapped to
`visual.*` / `model.*`; the 2B / 4B tie the head to the embedding (`TIED`). Its merger ends in `linear_fc2` (`MERGER_OUT`);
the same decoder projections are quantizable (`QUANTIZABLE`).
"""
from qvl.models.qwen2_vl.weights import QUANTIZABLE, RENAMES, TIED, canonical_key, sanitize  # noqa: F401

MERGER_OUT = "visual.merger.linear_fc2.weight"

__all__ = ["MERGER_OUT", "QUANTIZABLE", "RENAMES", "TIED", "canonical_key", "sanitize"]
