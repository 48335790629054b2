"""Qwen2-VL top level: vision tower + text decoder + LM head over a flat token batch. Math only.

Attribute names are the hub checkpoint's (`visual.*`, `model.*`, `lm_head`), so loading is a rename table
(qvl.build). The pieces are separate calls so the runner controls what runs and when:

    feats  = model.encode_vision(pixel_values (np, 1176), grid_thw (ni, 3))    # (np/4, H), item order
    embeds = model.embed(input_ids (N,), feats for the pad tokens in this batch)  # (N, H)
    hidden = model(input_ids, positions (3, N), attn_metadata, inputs_embeds=embeds)  # (N, H)
    logits = model.compute_logits(hidden[rows that sample])                    # (n, V) float32

Knows nothing about tokenization, scheduling or the KV-cache allocation (a runner sets `k_cache`/`v_cache`
on each `model.layers[i].self_attn`, see `attention_modules()`).
"""
from __future__ import annotations

import warnings

import torch
import torch.nn as nn

from qvl.models.qwen2_vl.config import ModelConfig
from qvl.layers.attention import AttentionMetadata
from qvl.models.qwen2_vl.text import Qwen2Attention, Qwen2Model
from qvl.models.qwen2_vl.vision import VisionTransformer


class Qwen2VLForConditionalGeneration(nn.Module):
    vision_cls: type[nn.Module] = VisionTransformer   # a family with another tower overrides this only
    text_cls: type[nn.Module] = Qwen2Model            # ... and one with another decoder this
    display_name = "Qwen2-VL"

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.visual = self.vision_cls(config.vision)
        self.model = self.text_cls(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    # dtype and device are read off the final norm: every tensor-parallel rank holds it, while the
    # embedding lives on rank 0 only (qvl.parallel.shard).
    @property
    def dtype(self) -> torch.dtype:
        return self.model.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        if self.model.norm.weight.dtype == torch.float16:
            warnings.warn(f"{self.display_name} in float16 overflows (NaN / '!!!!' outputs, "
                          f"transformers#33294); use bfloat16", stacklevel=3)
        return out

    def attention_modules(self) -> list[Qwen2Attention]:
        """The decoder attention modules, in layer order (each takes `k_cache` / `v_cache`)."""
        return [layer.self_attn for layer in self.model.layers]

    def encode_vision(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """Vision features (np / merge**2, H) of the packed items, in item order."""
        return self.visual(pixel_values, grid_thw)

    def embed(self, input_ids: torch.Tensor, vision_embeds: torch.Tensor | None = None,
              vision_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings (N, H) with `vision_embeds` (M, H) written at the vision slots in order.

        vision_mask (N,) bool marks the slots; by default every image/video pad token is one. Callers that
        feed generated tokens pass the mask of the prompt's media spans, because a model may *sample* a pad
        id, which is then an ordinary token (transformers embeds it as text too).
        M must equal the number of slots (None counts as 0), else ValueError.
        """
        c = self.config
        embeds = self.model.embed_tokens(input_ids.to(self.device))  # (N, H)
        if vision_mask is None:
            is_pad = (input_ids == c.image_token_id) | (input_ids == c.video_token_id)
        else:
            is_pad = vision_mask
        num_pad = int(is_pad.sum())
        m = 0 if vision_embeds is None else vision_embeds.shape[0]
        if m != num_pad:
            raise ValueError(f"{num_pad} image/video pad tokens in input_ids but {m} vision embeddings given")
        if vision_embeds is not None and vision_embeds.dim() != 2:
            raise ValueError(f"vision_embeds must be (M, {c.hidden_size}), got {tuple(vision_embeds.shape)}")
        if m:
            embeds[is_pad.to(embeds.device)] = vision_embeds.to(embeds.device, embeds.dtype)
        return embeds

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                attn_metadata: AttentionMetadata | None = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Final-normed hidden states (N, H) of a flat batch; inputs_embeds (N, H) replaces the lookup."""
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("forward needs input_ids or inputs_embeds")
            if self.model.embed_tokens is None:
                raise ValueError("this tensor-parallel rank holds no embedding (rank 0 does): pass inputs_embeds")
            inputs_embeds = self.model.embed_tokens(input_ids.to(self.device))  # (N, H)
        return self.model(inputs_embeds, positions, attn_metadata)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(n, H) -> (n, V) float32 (the head runs in the model dtype, like transformers)."""
        return self.lm_head(hidden).float()
