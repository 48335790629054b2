"""Qwen3-VL dense (model_type "qwen3_vl"; 2B / 4B / 8B / 32B): DeepStack, interleaved M-RoPE, the QK-norm
Qwen3 decoder and text timestamps for video; the rest is imported from qvl.models.qwen2_vl.

  Config      config.ModelConfig (nested hub layout: text_config + vision_config; Qwen2-VL's parser)
  Model       model.Qwen3VLForConditionalGeneration (vision.py + text.py; encode_vision returns the main
              features and the DeepStack sets)
  weights     Qwen2-VL's key renames, tied head and sanitize
  processing  patch-16 / mean-0.5 PreprocessSpec, timestamped video expansion, rope index over it,
              0..1000 grounding
"""
from qvl.models.qwen3_vl import processing, weights
from qvl.models.qwen3_vl.config import ModelConfig as Config
from qvl.models.qwen3_vl.model import Qwen3VLForConditionalGeneration as Model

MODEL_TYPE = "qwen3_vl"
DISPLAY_NAME = "Qwen3-VL"
