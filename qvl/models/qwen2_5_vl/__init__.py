"""Qwen2.5-VL (model_type "qwen2_5_vl"; 3B / 7B / 32B / 72B): Qwen2-VL plus window attention, an RMSNorm /
SwiGLU vision tower and absolute-time M-RoPE; everything else is imported from qvl.models.qwen2_vl.

  Config      config.ModelConfig (flat hub and nested layouts, Qwen2-VL's parser)
  Model       model.Qwen2_5_VLForConditionalGeneration (vision.py + Qwen2-VL's text decoder)
  weights     Qwen2-VL's key renames, tied head and sanitize
  processing  Qwen2-VL's PreprocessSpec and pad expansion; own rope index and grounding coordinates
"""
from qvl.models.qwen2_5_vl import processing, weights
from qvl.models.qwen2_5_vl.config import ModelConfig as Config
from qvl.models.qwen2_5_vl.model import Qwen2_5_VLForConditionalGeneration as Model

MODEL_TYPE = "qwen2_5_vl"
DISPLAY_NAME = "Qwen2.5-VL"
