"""ModelConfig / VisionConfig parsing (flat hub and nested layouts), validation, generation defaults."""
from __future__ import annotations

import copy
import json

import pytest

from qvl.models.qwen2_vl.config import ModelConfig, VisionConfig, load_generation_config

HUB_2B = {
    "architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl",
    "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645,
    "vision_start_token_id": 151652, "vision_end_token_id": 151653, "vision_token_id": 151654,
    "image_token_id": 151655, "video_token_id": 151656, "hidden_act": "silu", "hidden_size": 1536,
    "initializer_range": 0.02, "intermediate_size": 8960, "max_position_embeddings": 32768,
    "max_window_layers": 28, "num_attention_heads": 12, "num_hidden_layers": 28, "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": True,
    "torch_dtype": "bfloat16", "transformers_version": "4.41.2", "use_cache": True, "use_sliding_window": False,
    "vision_config": {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_chans": 3,
                      "hidden_size": 1536, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "vocab_size": 151936,
}


def test_flat_hub_layout():
    c = ModelConfig.from_dict(HUB_2B)
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (151936, 1536, 8960, 28)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (12, 2, 128)
    assert c.mrope_section == [16, 24, 24] and c.rope_theta == 1e6 and c.rms_norm_eps == 1e-6
    assert c.tie_word_embeddings is True and c.eos_token_id == [151645] and c.torch_dtype == "bfloat16"
    assert (c.image_token_id, c.video_token_id, c.vision_start_token_id, c.vision_end_token_id) == (
        151655, 151656, 151652, 151653)
    v = c.vision
    assert (v.depth, v.embed_dim, v.hidden_size, v.num_heads, v.head_dim, v.mlp_hidden_dim) == (
        32, 1280, 1536, 16, 80, 5120)
    assert v.hidden_act == "quick_gelu" and v.patch_dim == 1176


def test_nested_layout_from_transformers_equals_flat():
    from transformers import Qwen2VLConfig

    nested = Qwen2VLConfig(**copy.deepcopy(HUB_2B)).to_dict()
    assert "text_config" in nested
    assert ModelConfig.from_dict(nested) == ModelConfig.from_dict(HUB_2B)


def test_v5_rope_parameters_layout():
    d = copy.deepcopy(HUB_2B)
    text = {k: d.pop(k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                  "num_key_value_heads", "rms_norm_eps", "vocab_size", "max_position_embeddings")}
    d.pop("rope_scaling"), d.pop("rope_theta")
    text["rope_parameters"] = {"type": "mrope", "mrope_section": [16, 24, 24], "rope_theta": 1e6,
                               "rope_type": "default"}
    d["text_config"] = text
    d["vision_config"]["model_type"] = "qwen2_vl_vision"
    assert ModelConfig.from_dict(d) == ModelConfig.from_dict(HUB_2B)


@pytest.mark.parametrize("mt", ["qwen2_5_vl", "llava", None])
def test_refuses_other_model_types(mt):
    d = dict(HUB_2B, model_type=mt)
    with pytest.raises(ValueError, match=repr(mt)):
        ModelConfig.from_dict(d)


@pytest.mark.parametrize("patch, match", [
    ({"num_attention_heads": 10}, "hidden_size=1536 must be divisible by num_attention_heads=10"),
    ({"head_dim": 64}, "head_dim \\* num_attention_heads = 64 \\* 12 = 768 must equal hidden_size=1536"),
    ({"num_key_value_heads": 5}, "num_key_value_heads=5 must divide num_attention_heads=12"),
    ({"rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 16]}}, "sums to 56, must equal head_dim/2 = 64"),
    ({"rope_scaling": {"type": "yarn", "factor": 4}}, "rope type 'yarn'"),
    ({"vocab_size": 0}, "vocab_size must be a positive integer"),
    ({"image_token_id": 200000}, "image_token_id=200000 must be in \\[0, vocab_size=151936\\)"),
    ({"use_sliding_window": True}, "use_sliding_window"),
    ({"rms_norm_eps": 0}, "rms_norm_eps"),
])
def test_validation_errors(patch, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_dict(dict(HUB_2B, **patch))


@pytest.mark.parametrize("patch, match", [
    ({"hidden_size": 1024}, "vision_config.hidden_size=1024 \\(merger output\\) must equal hidden_size=1536"),
    ({"num_heads": 3}, "embed_dim=1280 must be divisible by num_heads=3"),
    ({"hidden_act": "relu"}, "hidden_act='relu'"),
    ({"model_type": "qwen2_5_vl"}, "vision_config.model_type='qwen2_5_vl'"),
])
def test_vision_validation_errors(patch, match):
    d = copy.deepcopy(HUB_2B)
    d["vision_config"].update(patch)
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_dict(d)


def test_vision_in_channels_alias():
    assert VisionConfig.from_dict({"in_channels": 1, "hidden_size": 8}).in_chans == 1


def test_from_pretrained_and_generation_config(tmp_path):
    with pytest.raises(ValueError, match="has no config.json"):
        ModelConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(HUB_2B))
    assert load_generation_config(tmp_path) == {}
    (tmp_path / "generation_config.json").write_text(json.dumps({
        "bos_token_id": 151643, "pad_token_id": 151643, "do_sample": True, "eos_token_id": [151645, 151643],
        "repetition_penalty": 1.05, "temperature": 0.1, "top_k": 1, "top_p": 0.001,
        "transformers_version": "4.37.0"}))
    g = load_generation_config(tmp_path)
    assert g == {"bos_token_id": 151643, "pad_token_id": 151643, "do_sample": True,
                 "eos_token_id": [151645, 151643], "repetition_penalty": 1.05, "temperature": 0.1, "top_k": 1,
                 "top_p": 0.001}
    assert ModelConfig.from_pretrained(tmp_path).eos_token_id == [151645, 151643]
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        ModelConfig.from_pretrained(tmp_path)


def test_tiny_fixture_config(tiny_ckpt):
    c = ModelConfig.from_pretrained(tiny_ckpt)
    assert c.hidden_size == 64 and c.vision.embed_dim == 32 and c.mrope_section == [2, 3, 3]
    assert len(c.eos_token_id) == 2
