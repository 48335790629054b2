"""The random checkpoints bench/quant.py, quant_interleaved.py and llama_cpp.py time (written once, reused).

  work_dir(args) -> Path       --workdir/L{layers} (Qwen2-VL) or --workdir/qwen3-vl-L{layers} (--family qwen3-vl)
  write_float(path, layers, family)   random bf16 weights in qvl's own parameter names (the tied head stored
                               once), norms 1, the rest N(0, 0.02); the vision tower cut to one block
  write_packed(src, path, fmt, bits)  GPTQ v1 (sym, group 128; fmt "gptq-act": act order, a random column
                               order per layer input) or AWQ gemm (group 128) copies of src, packed by
                               tests/quant_fixtures.py; the float rest in fp16, as the official repos store it
  ensure_checkpoints(work, layers, family, ckpts)   write whichever of "float" and PACKED's names are missing
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

PACKED = {"gptq8": ("gptq", 8), "gptq4": ("gptq", 4), "awq": ("awq", 4),   # checkpoint -> (format, bits)
          "gptq4-act": ("gptq-act", 4)}                                      # act order (desc_act: true)

# Qwen3-VL-2B-Instruct's text config (28 Qwen3 layers, hidden 2048, intermediate 6144, 16 heads of 128 over 8
# KV heads, q/k norms, tied head) and a one-block vision tower of its shape (not read while decoding).
QWEN3_2B = dict(
    model_type="qwen3_vl", architectures=["Qwen3VLForConditionalGeneration"], tie_word_embeddings=True,
    image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
    text_config=dict(model_type="qwen3_vl_text", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                     num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                     hidden_act="silu", rms_norm_eps=1e-6, rope_theta=5e6, max_position_embeddings=32768,
                     attention_bias=False, bos_token_id=151643, eos_token_id=151645,
                     rope_scaling=dict(rope_type="default", mrope_section=[24, 20, 20], mrope_interleaved=True)),
    vision_config=dict(model_type="qwen3_vl", depth=1, hidden_size=1024, intermediate_size=4096, num_heads=16,
                       hidden_act="gelu_pytorch_tanh", in_channels=3, patch_size=16, spatial_merge_size=2,
                       temporal_patch_size=2, out_hidden_size=2048, num_position_embeddings=2304,
                       deepstack_visual_indexes=[0]))
FAMILIES = ("qwen2-vl", "qwen3-vl")


def _config(layers: int, family: str = "qwen2-vl") -> dict:
    if family == "qwen3-vl":
        d = json.loads(json.dumps(QWEN3_2B))
        d["text_config"]["num_hidden_layers"] = layers
        d["torch_dtype"] = "bfloat16"
        return d
    from decode import config_dict

    d = config_dict("2b")
    d["num_hidden_layers"] = layers
    d["vision_config"] = dict(d["vision_config"], depth=1)
    d["torch_dtype"] = "bfloat16"
    return d


def work_dir(args) -> Path:
    """Where --family's checkpoints live under --workdir (L28/ for Qwen2-VL, qwen3-vl-L28/ for Qwen3-VL)."""
    prefix = "" if args.family == "qwen2-vl" else f"{args.family}-"
    return Path(args.workdir) / f"{prefix}L{args.layers}"


def write_float(path: Path, layers: int, family: str = "qwen2-vl") -> None:
    from safetensors.torch import save_file

    from qvl.models import family_for

    d = _config(layers, family)
    fam = family_for(d["model_type"])
    with torch.device("meta"):
        model = fam.Model(fam.Config.from_dict(d))
    g = torch.Generator().manual_seed(0)
    state = {}
    for name, p in model.named_parameters():        # the tied head is the embedding: stored once
        t = torch.empty(p.shape, dtype=torch.float32)
        if p.ndim == 1:
            t.fill_(1.0) if "norm" in name else t.normal_(0, 0.02, generator=g)
        else:
            t.normal_(0, 0.02, generator=g)
        state[name] = t.bfloat16()
    path.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(d, indent=1))


def write_packed(src: Path, path: Path, fmt: str, bits: int) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    from quant_fixtures import PROJ, awq_pack, column_order, gptq_pack

    state = {}
    with safe_open(str(src / "model.safetensors"), "pt") as h:
        for key in h.keys():
            t = h.get_tensor(key)
            if PROJ.fullmatch(key):
                w = t.float()
                order = column_order(key, w.shape[1], 0) if fmt == "gptq-act" else None
                packed, _ = gptq_pack(w, bits, 128, order) if fmt.startswith("gptq") else awq_pack(w, 128)
                state.update({f"{key[:-len('.weight')]}.{a}": v for a, v in packed.items()})
            else:
                state[key] = t.half()
    path.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    d = json.loads((src / "config.json").read_text())
    d["torch_dtype"] = "float16"
    d["quantization_config"] = (
        {"bits": bits, "group_size": 128, "desc_act": fmt == "gptq-act", "sym": True, "quant_method": "gptq"}
        if fmt.startswith("gptq") else
        {"bits": 4, "group_size": 128, "modules_to_not_convert": ["visual"], "quant_method": "awq",
         "version": "gemm", "zero_point": True})
    (path / "config.json").write_text(json.dumps(d, indent=1))


def ensure_checkpoints(work: Path, layers: int, family: str, ckpts) -> None:
    """work/float and each of ckpts ("float" or a PACKED name) under work, written where missing."""
    if not (work / "float" / "model.safetensors").is_file():
        write_float(work / "float", layers, family)
    for ckpt in sorted(set(ckpts) - {"float"}):
        if not (work / ckpt / "model.safetensors").is_file():
            write_packed(work / "float", work / ckpt, *PACKED[ckpt])
