"""Qwen3-VL checkpoint keys -> module names: exactly Qwen2-VL's rules (qvl.models.qwen2_vl.weights).

The hub stores `model.visual.*` / `model.language_model.*` / `lm_head.weight` (4.57's layout), mapped to
`visual.*` / `model.*`; the 2B / 4B tie the head to the embedding (`TIED`). Its merger ends in `linear_fc2` (`MERGER_OUT`);
the same decoder projections are quantizable (`QUANTIZABLE`) and split the same way under tensor
parallelism (`TP_PLAN`; q_norm / k_norm act per head over head_dim, so every rank keeps them whole).
"""
from qvl.models.qwen2_vl.weights import (QUANTIZABLE, RANK0_ONLY, RENAMES, TIED, TP_PLAN,  # noqa: F401
                                         canonical_key, sanitize)

MERGER_OUT = "visual.merger.linear_fc2.weight"

__all__ = ["MERGER_OUT", "QUANTIZABLE", "RANK0_ONLY", "RENAMES", "TIED", "TP_PLAN", "canonical_key",
           "sanitize"]
