"""Qwen2.5-VL checkpoint keys -> module names: exactly Qwen2-VL's rules (qvl.models.qwen2_vl.weights).

Hub keys (`visual.*`, `model.*`, `lm_head.weight`) are the module names; transformers 4.52+ spells them
`model.visual.*` / `model.language_model.*` (QWEN2VL_SPEC 2; 4.52.x even wrote those to disk, #38403).
The 3B ties its head to the embedding (`TIED`); quantizable modules, the merger and the
tensor-parallel plan (`TP_PLAN`, `RANK0_ONLY`) as Qwen2-VL's.
"""
from qvl.models.qwen2_vl.weights import (MERGER_OUT, QUANTIZABLE, RANK0_ONLY, RENAMES, TIED, TP_PLAN,  # noqa: F401
                                         canonical_key, sanitize)

__all__ = ["MERGER_OUT", "QUANTIZABLE", "RANK0_ONLY", "RENAMES", "TIED", "TP_PLAN", "canonical_key",
           "sanitize"]
