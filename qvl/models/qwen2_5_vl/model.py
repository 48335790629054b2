"""Qwen2.5-VL top level: Qwen2-VL's model with the Qwen2.5 vision tower. Math only.

Same attribute names (`visual.*`, `model.*`, `lm_head`) and the same calls as
qvl.models.qwen2_vl.model (encode_vision, embed, forward, compute_logits, attention_modules): the text
decoder is the Qwen2 decoder, unchanged. Only `visual` is a qwen2_5_vl.vision.VisionTransformer.
"""
from __future__ import annotations

import torch.nn as nn

from qvl.models.qwen2_5_vl.config import ModelConfig
from qvl.models.qwen2_5_vl.vision import VisionTransformer
from qvl.models.qwen2_vl.model import Qwen2VLForConditionalGeneration
from qvl.models.qwen2_vl.text import Qwen2Model


class Qwen2_5_VLForConditionalGeneration(Qwen2VLForConditionalGeneration):
    def __init__(self, config: ModelConfig) -> None:
        # Qwen2-VL's __init__ builds its own tower, so the modules are assembled here (same names).
        nn.Module.__init__(self)
        self.config = config
        self.visual = VisionTransformer(config.vision)
        self.model = Qwen2Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
