"""Qwen2-VL (model_type "qwen2_vl"; 2B / 7B / 72B): the first family of the registry (qvl.models).

  Config      config.ModelConfig (flat hub and nested layouts)
  Model       model.Qwen2VLForConditionalGeneration (vision.py + text.py + rope.py; math only)
  weights     key renames, the tied head, sanitize
  processing  PreprocessSpec, pad expansion, M-RoPE index, grounding coordinates
"""
from qvl.models.qwen2_vl import processing, weights
from qvl.models.qwen2_vl.config import ModelConfig as Config
from qvl.models.qwen2_vl.model import Qwen2VLForConditionalGeneration as Model

MODEL_TYPE = "qwen2_vl"
DISPLAY_NAME = "Qwen2-VL"
