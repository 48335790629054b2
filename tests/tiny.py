"""Tiny Qwen2-VL checkpoints for tests: a byte-level BPE tokenizer with the Qwen2-VL special tokens and
random-weight models written by transformers' `save_pretrained` (the reference implementation).

Everything here is deterministic (fixed seeds) and small enough to build in about a second.
"""
from __future__ import annotations

import json
from pathlib import Path

SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]

# Qwen2's pre-tokenizer split pattern (digits are split one by one).
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)

# The Qwen2-VL chat template as published with the Instruct checkpoints.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "You are a helpful assistant.", "Describe this image.", "What color is the circle?",
    "What is written in the picture? The quick brown fox jumps over the lazy dog.",
    "system user assistant red green blue yellow purple orange circle square triangle",
    "How many shapes are there? 0 1 2 3 4 5 6 7 8 9 (120,455),(300,700)",
    "Hello, world! Où est la gare? 你好，世界。 Grüße — ünïcödé ✓ 🙂",
]


IMG = "<|vision_start|><|image_pad|><|vision_end|>"       # one image's placeholder in a raw chat prompt
VID = "<|vision_start|><|video_pad|><|vision_end|>"


def chat(body: str) -> str:
    """A one-turn raw chat prompt (the Qwen chat template's user/assistant markers) around `body`."""
    return f"<|im_start|>user\n{body}<|im_end|>\n<|im_start|>assistant\n"


def image(seed: int, h: int = 112, w: int = 140):
    """A seeded random RGB PIL image of h x w pixels."""
    import numpy as np
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))

def write_tokenizer(path: str | Path, vocab_size: int = 400) -> dict[str, int]:
    """Train a small byte-level BPE and write tokenizer.json + tokenizer_config.json to `path`.

    Returns {special token: id}. The 14 specials come right after the BPE vocabulary, in Qwen2 order.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(_CORPUS * 4, trainer)
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.save(str(path / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    cfg = {
        "tokenizer_class": "Qwen2Tokenizer",
        "model_max_length": 32768,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "padding_side": "left",
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "split_special_tokens": False,
        "added_tokens_decoder": {
            str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                     "single_word": False, "special": True}
            for t, i in ids.items()
        },
        "additional_special_tokens": SPECIAL_TOKENS[1:],
        "chat_template": CHAT_TEMPLATE,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1))
    return ids


def tiny_config_dict(ids: dict[str, int], *, tied: bool = False, vocab_size: int = 448) -> dict:
    """A flat (hub-layout) Qwen2-VL config.json with tiny dimensions and the tokenizer's special ids."""
    return {
        "architectures": ["Qwen2VLForConditionalGeneration"],
        "model_type": "qwen2_vl",
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "max_position_embeddings": 4096,
        "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
        "tie_word_embeddings": tied,
        "use_sliding_window": False,
        "attention_dropout": 0.0,
        "torch_dtype": "float32",
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "vision_token_id": ids["<|vision_pad|>"],
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_config": {
            "depth": 2, "embed_dim": 32, "hidden_size": 64, "num_heads": 2, "mlp_ratio": 2,
            "in_chans": 3, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
        },
    }


def random_qwen2_vl(config, seed: int):
    """transformers' Qwen2VLForConditionalGeneration with seeded random weights (matrices N(0, 0.15), biases
    N(0, 0.02): large enough that a wrong op changes the greedy tokens)."""
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    torch.manual_seed(seed)
    return randomize(Qwen2VLForConditionalGeneration(config).eval())


def randomize(model, *, norms: bool = False):
    """Weights N(0, 0.15), biases N(0, 0.02), with `norms` norm weights N(1, 0.1) (a missed norm shows)."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 0.15)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.02)
            elif norms and ("norm" in name or "ln_q" in name):
                p.normal_(1.0, 0.1)
    return model

def make_tiny_checkpoint(path: str | Path, *, tied: bool = False, seed: int = 0,
                         max_pixels: int = 200704, overrides: dict | None = None) -> Path:
    """Write a complete random tiny Qwen2-VL checkpoint with transformers' save_pretrained.

    overrides: config.json fields to change (e.g. num_key_value_heads=1 for tensor-parallel replication).

    Files: config.json, model.safetensors, generation_config.json, tokenizer.json,
    tokenizer_config.json, preprocessor_config.json. Weights are fp32, scaled up from the default init
    so that different inputs give clearly different logits (random-init logits are otherwise nearly flat).
    """
    from transformers import Qwen2VLConfig

    path = Path(path)
    ids = write_tokenizer(path)
    cfg_dict = dict(tiny_config_dict(ids, tied=tied), **(overrides or {}))
    config = Qwen2VLConfig(**cfg_dict)
    model = random_qwen2_vl(config, seed)
    model.save_pretrained(path, safe_serialization=True)
    # save_pretrained writes a nested config in 4.57; ship the flat hub layout like the real checkpoints.
    (path / "config.json").write_text(json.dumps(cfg_dict, indent=1))
    _write_side_files(path, ids, max_pixels, "Qwen2VLProcessor")
    return path


def hf_processor(path: str | Path):
    """transformers' Qwen2VLProcessor (slow PIL image processor) for a tiny checkpoint dir.

    transformers 4.57 insists on a video processor, which needs torchvision (not installed here); tests
    feed video pixels to both implementations directly, so an empty stand-in object is passed instead.
    """
    from transformers import AutoTokenizer, Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.processing_qwen2_vl import Qwen2VLProcessor

    tok = AutoTokenizer.from_pretrained(path)
    image_processor = Qwen2VLImageProcessor.from_pretrained(path)
    video_cls = Qwen2VLProcessor.get_possibly_dynamic_module("BaseVideoProcessor")
    return Qwen2VLProcessor(image_processor=image_processor, tokenizer=tok,
                            video_processor=object.__new__(video_cls), chat_template=tok.chat_template)


def qwen_vl_utils_vision_process():
    """qwen_vl_utils.vision_process, the reference for frame sampling and alpha handling.

    The module imports torchvision at load time (not installed here, and unused by the functions the tests
    call), so a stand-in is put in sys.modules for the import only.
    """
    import importlib.util
    import sys
    import types

    stubs = {}
    if importlib.util.find_spec("torchvision") is None:
        tv = types.ModuleType("torchvision")
        tv.__version__ = "0.0.0"
        tv.io = types.ModuleType("torchvision.io")
        tv.transforms = types.ModuleType("torchvision.transforms")
        tv.transforms.InterpolationMode = types.SimpleNamespace(BICUBIC="bicubic")
        stubs = {"torchvision": tv, "torchvision.io": tv.io, "torchvision.transforms": tv.transforms}
    saved = {k: sys.modules.get(k) for k in stubs}
    sys.modules.update(stubs)
    try:
        from qwen_vl_utils import vision_process
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    return vision_process


# ------------------------------------------------------------------------------------------ Qwen2.5-VL

def tiny_qwen2_5_vl_config_dict(ids: dict[str, int], *, tied: bool = False, vocab_size: int = 448) -> dict:
    """A flat (hub-layout) Qwen2.5-VL config.json: the Qwen2-VL tiny text decoder and a 3-block Qwen2.5
    vision tower (block 1 attends per frame, blocks 0 and 2 per 112-px window), tokens_per_second 2."""
    d = tiny_config_dict(ids, tied=tied, vocab_size=vocab_size)
    d["architectures"] = ["Qwen2_5_VLForConditionalGeneration"]
    d["model_type"] = "qwen2_5_vl"
    d["vision_config"] = {
        "model_type": "qwen2_5_vl", "depth": 3, "hidden_size": 32, "intermediate_size": 48, "num_heads": 2,
        "out_hidden_size": 64, "hidden_act": "silu", "in_chans": 3, "patch_size": 14,
        "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
        "fullatt_block_indexes": [1], "tokens_per_second": 2,
    }
    return d


def write_tiny_qwen2_5_vl(path: str | Path, *, tied: bool = False, seed: int = 0, layout: str = "hub",
                          max_pixels: int = 200704) -> Path:
    """Write a random tiny Qwen2.5-VL checkpoint with transformers' save_pretrained.

    layout="hub": flat config.json, keys as transformers 4.57 saves them (`visual.*` / `model.*`);
    layout="nested": the nested config.json save_pretrained writes, keys renamed to the 4.52+ module spelling
    (`model.visual.*` / `model.language_model.*`). Same other files as make_tiny_checkpoint.
    """
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    if layout not in ("hub", "nested"):
        raise ValueError(f"layout must be 'hub' or 'nested', got {layout!r}")
    path = Path(path)
    ids = write_tokenizer(path)
    cfg_dict = tiny_qwen2_5_vl_config_dict(ids, tied=tied)
    torch.manual_seed(seed)
    model = randomize(Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**cfg_dict)).eval(), norms=True)
    model.save_pretrained(path, safe_serialization=True)
    if layout == "hub":
        (path / "config.json").write_text(json.dumps(cfg_dict, indent=1))
    else:
        f = path / "model.safetensors"
        state = load_file(f)
        renamed = {}
        for k, v in state.items():
            if k.startswith("visual."):
                k = "model." + k
            elif k.startswith("model.") and not k.startswith(("model.visual.", "model.language_model.")):
                k = "model.language_model." + k[len("model."):]
            renamed[k] = v
        save_file(renamed, f, metadata={"format": "pt"})
    _write_side_files(path, ids, max_pixels, "Qwen2_5_VLProcessor")
    return path


# -------------------------------------------------------------------------------------------- Qwen3-VL

def tiny_qwen3_vl_config_dict(ids: dict[str, int], *, tied: bool = False, vocab_size: int = 448) -> dict:
    """A nested (hub-layout) Qwen3-VL config.json: a 3-layer Qwen3 decoder with head_dim 32 != 64 / 4
    (decoupled), interleaved M-RoPE [6, 5, 5], and a 3-block 16-px tower with an 8x8 learned position grid
    and DeepStack mergers after blocks 0 and 2 (added after decoder layers 0 and 1)."""
    return {
        "architectures": ["Qwen3VLForConditionalGeneration"],
        "model_type": "qwen3_vl",
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "tie_word_embeddings": tied,
        "text_config": {
            "model_type": "qwen3_vl_text", "vocab_size": vocab_size, "hidden_size": 64,
            "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 32, "hidden_act": "silu", "rms_norm_eps": 1e-6,
            "rope_theta": 10000.0, "max_position_embeddings": 4096, "attention_bias": False,
            "rope_scaling": {"rope_type": "default", "mrope_section": [6, 5, 5], "mrope_interleaved": True},
            "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"], "dtype": "float32",
        },
        "vision_config": {
            "model_type": "qwen3_vl", "depth": 3, "hidden_size": 32, "intermediate_size": 48, "num_heads": 2,
            "hidden_act": "gelu_pytorch_tanh", "in_channels": 3, "patch_size": 16, "spatial_merge_size": 2,
            "temporal_patch_size": 2, "out_hidden_size": 64, "num_position_embeddings": 64,
            "deepstack_visual_indexes": [0, 2],
        },
    }


def write_tiny_qwen3_vl(path: str | Path, *, tied: bool = False, seed: int = 0, max_pixels: int = 262144,
                        text_overrides: dict | None = None) -> Path:
    """Write a random tiny Qwen3-VL checkpoint with transformers' save_pretrained (keys as 4.57 and the hub
    store them: `model.visual.*`, `model.language_model.*`), the nested config.json, and a Qwen3-VL
    preprocessor_config.json (patch 16, mean = std = 0.5). text_overrides: text_config fields to change
    (a new hidden_size is the vision tower's out_hidden_size too)."""
    import torch
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    path = Path(path)
    ids = write_tokenizer(path)
    cfg_dict = tiny_qwen3_vl_config_dict(ids, tied=tied)
    cfg_dict["text_config"].update(text_overrides or {})
    cfg_dict["vision_config"]["out_hidden_size"] = cfg_dict["text_config"]["hidden_size"]
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(Qwen3VLConfig(**cfg_dict)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "pos_embed" in name:
                p.normal_(0.0, 0.5)
            elif p.ndim >= 2:
                p.normal_(0.0, 0.15)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.02)
            elif "norm" in name:
                p.normal_(1.0, 0.1)     # norm weights away from 1, so a missed norm shows
    model.save_pretrained(path, safe_serialization=True)
    (path / "config.json").write_text(json.dumps(cfg_dict, indent=1))
    _write_side_files(path, ids, max_pixels, "Qwen3VLProcessor", patch_size=16,
                      mean_std=([0.5] * 3, [0.5] * 3), min_pixels=4096)
    return path


def _write_side_files(path: Path, ids: dict[str, int], max_pixels: int, processor_class: str, *,
                      patch_size: int = 14, mean_std: tuple | None = None, min_pixels: int = 3136) -> None:
    (path / "generation_config.json").write_text(json.dumps({
        "bos_token_id": ids["<|endoftext|>"], "pad_token_id": ids["<|endoftext|>"],
        "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
    }, indent=1))
    (path / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "Qwen2VLImageProcessor", "processor_class": processor_class,
        "do_resize": True, "do_rescale": True, "do_normalize": True, "do_convert_rgb": True,
        "rescale_factor": 1 / 255, "resample": 3,
        "image_mean": list(mean_std[0]) if mean_std else [0.48145466, 0.4578275, 0.40821073],
        "image_std": list(mean_std[1]) if mean_std else [0.26862954, 0.26130258, 0.27577711],
        "min_pixels": min_pixels, "max_pixels": max_pixels,
        "patch_size": patch_size, "temporal_patch_size": 2, "merge_size": 2,
    }, indent=1))


def tiny_engine(path, **kw):
    """An fp32 CPU LLMEngine on a tiny checkpoint (max_model_len 1024, an 8 MiB KV pool unless given)."""
    from qvl.config import EngineConfig
    from qvl.engine.llm_engine import LLMEngine

    kw.setdefault("max_model_len", 1024)
    kw.setdefault("kv_cache_memory", 8 << 20)
    return LLMEngine.from_config(EngineConfig(model=str(path), dtype="float32", device="cpu", **kw))


def greedy_tokens(eng, prompts, num: int) -> list[list[int]]:
    """Exactly `num` greedy tokens per prompt through qvl.LLM over `eng`."""
    from qvl.llm import LLM
    from qvl.sampling_params import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=num, min_tokens=num)
    return [o.outputs[0].token_ids for o in LLM.from_engine(eng).generate(prompts, params, use_tqdm=False)]


def hf_media_kwargs(p) -> dict:
    """transformers generate/forward kwargs for a ProcessedPrompt's media: images and videos split."""
    import torch

    kw: dict = {}
    for kind, pv, grid in (("image", "pixel_values", "image_grid_thw"),
                           ("video", "pixel_values_videos", "video_grid_thw")):
        items = [it for it in p.items if it.kind == kind]
        if items:
            kw[pv] = torch.cat([it.pixel_values for it in items])
            kw[grid] = torch.tensor([list(it.grid_thw) for it in items])
    return kw
