"""Tiny GPTQ / AWQ checkpoints written by the tests themselves, from the format description
(/work/shared/QUANT_FORMATS.md 1.2-1.6), independently of qvl's readers.

  write_quantized(path, fmt, *, bits=4, group=32, layout="hub", zero_bias=False, seed=0, act_order=False,
                  overrides=None) -> (quantized checkpoint dir, float reference dir)

A random Qwen2-VL with hidden 128 / intermediate 256 (every packing constraint holds with group 32) is
made with transformers; every decoder projection is quantized by round-to-nearest:
  gptq  symmetric, zero 2**(bits−1), s = max|W_group| / (2**(bits−1) − 1), q = round(W / s) + zero in
        [0, 2**bits); qweight packs 32/bits input rows per int32 LSB first; qzeros packs 32/bits output
        columns and stores zero − 1 (v1); g_idx = i // group; fp16 scales. act_order (desc_act: true):
        each layer's input columns are taken in a random order, group g = the order's g-th `group`
        columns, g_idx[order[i]] = i // group; q/k/v share one order and gate/up another (one input
        each, as GPTQ's Hessian order), o_proj and down_proj their own.
  awq   4 bit with zero points: s = (max − min) / 15, z = round(−min / s), q = round(W / s) + z in [0, 15];
        qweight (K, N/8) and qzeros (G, N/8) pack column 8c + ORDER[i] at bits [4i, 4i + 4).
Everything else is stored fp16 (as the official repos); the reference dir holds the same model in float32
with every value the quantized checkpoint implies: fp16-rounded float tensors and the dequantized
W = (q − z)·s, written by save_pretrained, so transformers on it is the exact float reference.
layout "nested" renames keys to transformers 4.52+'s `model.language_model.*` / `model.visual.*`;
zero_bias adds the all-zero `bias` tensors older GPTQ revisions carry on o_proj and the MLP.

  quantize_checkpoint(src, dst, fmt, *, bits=4, group=32) -> {weight key: dequantized W}
      the same packing applied to a float checkpoint dir of any family (Qwen2.5-VL's `model.layers.*`,
      Qwen3-VL's `model.language_model.layers.*`): the decoder projections packed, every other tensor and
      file as stored, quantization_config added to config.json.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch

from tiny import _write_side_files, random_qwen2_vl, tiny_config_dict, write_tokenizer

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
PROJ = re.compile(r"model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight")


def quant_config_dict(ids: dict[str, int]) -> dict:
    d = tiny_config_dict(ids)
    d.update(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
             rope_scaling={"type": "mrope", "mrope_section": [4, 6, 6]}, torch_dtype="float16")
    d["vision_config"] = dict(d["vision_config"], hidden_size=128)
    return d


def _pack_u32(vals: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """Pack `vals` (ints < 2**bits) along `axis` (groups of 32/bits consecutive values, LSB first) -> int32."""
    pf = 32 // bits
    v = np.moveaxis(vals.astype(np.uint32), axis, -1)
    v = v.reshape(*v.shape[:-1], v.shape[-1] // pf, pf)
    word = np.zeros(v.shape[:-1], dtype=np.uint32)
    for j in range(pf):
        word |= v[..., j] << np.uint32(bits * j)
    return np.ascontiguousarray(np.moveaxis(word, -1, axis)).view(np.int32)


def gptq_pack(w: torch.Tensor, bits: int, group: int, order: torch.Tensor | None = None):
    """W (N, K) fp32 -> (stored tensors, dequantized W); order: the act order (a permutation of K), None
    for columns in order."""
    n, k = w.shape
    zero, qmax = 1 << (bits - 1), (1 << bits) - 1
    order = torch.arange(k) if order is None else order                      # group g: order[g·group ...]
    g_idx = torch.empty(k, dtype=torch.long).index_copy_(0, order, torch.arange(k) // group)   # (K,)
    amax = w[:, order].view(n, k // group, group).abs().amax(-1)             # (N, G)
    s = (amax / (zero - 1)).half().float()                                    # (N, G) fp16 values
    sk = s[:, g_idx]                                                          # (N, K) each weight's scale
    q = (torch.round(w / sk) + zero).clamp(0, qmax).to(torch.int64)          # (N, K)
    deq = sk * (q - zero)
    q = q.numpy()
    tensors = {
        "qweight": torch.from_numpy(_pack_u32(q.T, bits, axis=0)),                       # (K·b/32, N)
        "qzeros": torch.from_numpy(_pack_u32(np.full((k // group, n), zero - 1), bits, axis=1)),
        "scales": s.t().contiguous().half(),                                              # (G, N)
        "g_idx": g_idx.to(torch.int32),
    }
    return tensors, deq


_INPUTS = {"q": "qkv", "k": "qkv", "v": "qkv", "o": "o", "gate": "gate_up", "up": "gate_up", "down": "down"}


def column_order(hub_key: str, k: int, seed: int) -> torch.Tensor:
    """One random column order per layer and input (q/k/v share theirs, gate/up theirs)."""
    m = re.match(r"model\.layers\.(\d+)\.\w+\.(\w+)_proj", hub_key)
    tag = f"{m.group(1)}.{_INPUTS[m.group(2)]}"
    g = torch.Generator().manual_seed(seed * 1000 + sum(map(ord, tag)) * 7 + int(m.group(1)))
    return torch.randperm(k, generator=g)


def awq_pack(w: torch.Tensor, group: int):
    n, k = w.shape
    wg = w.view(n, k // group, group)
    lo, hi = wg.amin(-1), wg.amax(-1)
    s = ((hi - lo).clamp_min(1e-5) / 15).half().float()                      # (N, G)
    z = torch.round(-lo / s).clamp(0, 15)
    q = (torch.round(wg / s[..., None]) + z[..., None]).clamp(0, 15)
    deq = ((q - z[..., None]) * s[..., None]).view(n, k)

    def pack(vals: np.ndarray) -> torch.Tensor:                              # (R, N) -> (R, N/8) int32
        r = vals.shape[0]
        v = vals.astype(np.uint32).reshape(r, n // 8, 8)
        word = np.zeros((r, n // 8), dtype=np.uint32)
        for i in range(8):
            word |= v[:, :, AWQ_ORDER[i]] << np.uint32(4 * i)
        return torch.from_numpy(word.view(np.int32))

    tensors = {"qweight": pack(q.view(n, k).t().numpy()), "qzeros": pack(z.t().numpy()),
               "scales": s.t().contiguous().half()}
    return tensors, deq


def _nested(key: str) -> str:
    if key.startswith("visual."):
        return "model." + key
    if key.startswith("model."):
        return "model.language_model." + key[len("model."):]
    return key


def quant_config(fmt: str, bits: int, group: int, act_order: bool = False) -> dict:
    """config.json's quantization_config as AutoGPTQ / AutoAWQ write it."""
    if fmt == "gptq":
        return {"bits": bits, "damp_percent": 0.1, "dataset": None, "desc_act": act_order, "group_size": group,
                "modules_in_block_to_quantize": None, "quant_method": "gptq", "sym": True, "true_sequential": True}
    return {"bits": 4, "group_size": group, "modules_to_not_convert": ["visual"], "quant_method": "awq",
            "version": "gemm", "zero_point": True}


DECODER_PROJ = re.compile(r"model\.(language_model\.)?layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)"
                          r"\.weight")


def quantize_checkpoint(src, dst, fmt: str, *, bits: int = 4, group: int = 32) -> dict[str, torch.Tensor]:
    import shutil

    from safetensors.torch import load_file, save_file

    src, dst = Path(src), Path(dst)
    shutil.copytree(src, dst)
    stored, deq = {}, {}
    for key, t in load_file(str(src / "model.safetensors")).items():
        if DECODER_PROJ.fullmatch(key):
            tensors, deq[key] = gptq_pack(t.float(), bits, group) if fmt == "gptq" else awq_pack(t.float(), group)
            stored.update({f"{key[:-len('.weight')]}.{a}": v for a, v in tensors.items()})
        else:
            stored[key] = t
    save_file({k: v.contiguous() for k, v in stored.items()}, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(dict(cfg, quantization_config=quant_config(fmt, bits, group)), indent=1))
    return deq


def write_quantized(path, fmt: str, *, bits: int = 4, group: int = 32, layout: str = "hub",
                    zero_bias: bool = False, seed: int = 0, act_order: bool = False,
                    overrides: dict | None = None) -> tuple[Path, Path]:
    from safetensors.torch import save_file
    from transformers import Qwen2VLConfig

    path = Path(path)
    qdir, ref = path / "quant", path / "ref"
    ids = write_tokenizer(qdir)
    write_tokenizer(ref)
    cfg = quant_config_dict(ids)
    for key, v in (overrides or {}).items():                        # other text shapes; vision_config merges
        cfg[key] = dict(cfg[key], **v) if key == "vision_config" else v
    model = random_qwen2_vl(Qwen2VLConfig(**dict(cfg, torch_dtype="float32")), seed)
    stored: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())                    # what an fp16 checkpoint holds
        state = model.state_dict()
        for key, t in state.items():
            hub = key.replace("model.language_model.", "model.").replace("model.visual.", "visual.")
            if PROJ.fullmatch(hub):
                prefix = hub[: -len(".weight")]
                order = column_order(hub, t.shape[1], seed) if act_order else None
                tensors, deq = gptq_pack(t, bits, group, order) if fmt == "gptq" else awq_pack(t, group)
                t.copy_(deq)                             # the reference runs the dequantized weight
                stored.update({f"{prefix}.{a}": v for a, v in tensors.items()})
                if zero_bias and f"{key[:-len('.weight')]}.bias" not in state:
                    stored[f"{prefix}.bias"] = torch.zeros(t.shape[0], dtype=torch.float16)
            else:
                stored[hub] = t.half()
    model.save_pretrained(ref, safe_serialization=True)
    ref_cfg = dict(cfg, torch_dtype="float32")
    (ref / "config.json").write_text(json.dumps(ref_cfg, indent=1))
    if layout == "nested":
        stored = {_nested(k): v for k, v in stored.items()}
    qdir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in stored.items()}, str(qdir / "model.safetensors"),
              metadata={"format": "pt"})
    qc = quant_config(fmt, bits, group, act_order)
    (qdir / "config.json").write_text(json.dumps(dict(cfg, quantization_config=qc), indent=1))
    for d in (qdir, ref):
        _write_side_files(d, ids, 200704, "Qwen2VLProcessor")
    return qdir, ref
