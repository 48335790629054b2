"""Qwen3-VL top level: Qwen2-VL's model with the Qwen3-VL tower and the Qwen3 decoder. Math only.

Same attribute names (`visual.*`, `model.*`, `lm_head`) and calls as qvl.models.qwen2_vl.model, with the
DeepStack contract for the runner:

    feats  = model.encode_vision(pixel_values, grid_thw)   # tuple (main, ds_0, ..., ds_k-1), each (M, H)
    embeds = model.embed(input_ids, feats[0] rows of this batch, vision_mask)          # (N, H)
    hidden = model(input_ids, positions, md, inputs_embeds=embeds,
                   deepstack_embeds=[ds_i rows of this batch], vision_mask=vision_mask)  # (N, H)

The DeepStack rows are sliced with the same token range as the main rows (a chunk holding part of an
image passes that part of every set); steps without vision rows (decode, prefix-cache hits) pass none.
"""
from __future__ import annotations

from typing import Sequence

import torch

from qvl.layers.attention import AttentionMetadata
from qvl.models.qwen2_vl.model import Qwen2VLForConditionalGeneration
from qvl.models.qwen3_vl.text import Qwen3TextModel
from qvl.models.qwen3_vl.vision import VisionTransformer


class Qwen3VLForConditionalGeneration(Qwen2VLForConditionalGeneration):
    vision_cls = VisionTransformer
    text_cls = Qwen3TextModel
    display_name = "Qwen3-VL"

    def encode_vision(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(main, deepstack...) features, each (np / merge**2, H), of the packed items in item order."""
        return self.visual(pixel_values, grid_thw)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                attn_metadata: AttentionMetadata | None = None,
                inputs_embeds: torch.Tensor | None = None,
                deepstack_embeds: Sequence[torch.Tensor] | None = None,
                vision_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Final-normed hidden states (N, H); deepstack_embeds (each (M, H)) go to the vision_mask rows."""
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("forward needs input_ids or inputs_embeds")
            if self.model.embed_tokens is None:
                raise ValueError("this tensor-parallel rank holds no embedding (rank 0 does): pass inputs_embeds")
            inputs_embeds = self.model.embed_tokens(input_ids.to(self.device))  # (N, H)
        return self.model(inputs_embeds, positions, attn_metadata, deepstack_embeds, vision_mask)
