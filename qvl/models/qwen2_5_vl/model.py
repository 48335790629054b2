"""Qwen2.5-VL top level: Qwen2-VL's model with the Qwen2.5 vision tower. Math only.

Same attribute names (`visual.*`, `model.*`, `lm_head`) and the same calls as
qvl.models.qwen2_vl.model (encode_vision, embed, forward, compute_logits, attention_modules): the text
decoder is the Qwen2 decoder, unchanged. Only `visual` is a qwen2_5_vl.vision.VisionTransformer.
"""
from __future__ import annotations

from qvl.models.qwen2_5_vl.vision import VisionTransformer
from qvl.models.qwen2_vl.model import Qwen2VLForConditionalGeneration


class Qwen2_5_VLForConditionalGeneration(Qwen2VLForConditionalGeneration):
    vision_cls = VisionTransformer
    display_name = "Qwen2.5-VL"
