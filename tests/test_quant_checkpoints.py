"""GPTQ (v1, 4 and 8 bit) and AWQ (gemm) checkpoints, written by tests/quant_fixtures.py from the format
description, loaded by qvl in float32: logits and greedy tokens equal to transformers running the exactly
dequantized float weights, with an image; hub and 4.52+ nested key layouts; the checkpoint quirks
(zero biases, minimal vision_config, wrong merger width) and the refusals, each one line."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from qvl.build import load_model
from qvl.layers.linear import QuantLinear
from tiny import IMG, chat, image
from quant_fixtures import write_quantized

FORMATS = {"gptq4": ("gptq", 4, "hub"), "gptq8": ("gptq", 8, "nested"), "awq": ("awq", 4, "hub"),
           "awq_nested": ("awq", 4, "nested"), "gptq4_act": ("gptq", 4, "hub")}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    out = {}
    for tag, (fmt, bits, layout) in FORMATS.items():
        out[tag] = write_quantized(tmp_path_factory.mktemp(tag), fmt, bits=bits, layout=layout,
                                   zero_bias=tag == "gptq4", seed=len(out), act_order=tag.endswith("_act"))
    return out


def test_fixture_words_are_the_published_format(ckpts):
    """The sym int4 v1 zero word is 0x77777777 (int8: 0x7f7f7f7f); the quantized tensors keep int32."""
    for tag, word in (("gptq4", 0x77777777), ("gptq8", 0x7F7F7F7F)):
        qdir, _ = ckpts[tag]
        state = load_file(str(qdir / "model.safetensors"))
        zeros = [v for k, v in state.items() if k.endswith(".qzeros")]
        assert zeros and all(z.dtype == torch.int32 and bool((z == np.int32(np.uint32(word))).all()) for z in zeros)
        assert all(v.dtype == torch.float16 for k, v in state.items() if k.endswith(".scales"))
        assert any(k.startswith("model.language_model.layers.") for k in state) == (tag == "gptq8")


@pytest.mark.parametrize("tag", list(FORMATS))
def test_logits_and_greedy_match_transformers_on_dequantized_weights(ckpts, tag):
    from transformers import Qwen2VLForConditionalGeneration
    from tiny import greedy_tokens, hf_processor, tiny_engine

    qdir, ref = ckpts[tag]
    eng = tiny_engine(qdir)
    quantized = [m for m in eng.model.modules() if isinstance(m, QuantLinear)]
    assert len(quantized) == 2 * 7 and all(m.kernel == "dequant" for m in quantized)
    assert all((m.perm is not None) == tag.endswith("_act") for m in quantized)      # act order: permuted
    assert not any(isinstance(m, QuantLinear) for m in eng.model.visual.modules())
    assert isinstance(eng.model.lm_head, torch.nn.Linear) and eng.model.quantization.method == FORMATS[tag][0]
    hf = Qwen2VLForConditionalGeneration.from_pretrained(ref).eval()
    proc = hf_processor(ref)
    inp = proc(text=[chat(IMG + "Describe this image.")], images=[image(0)], return_tensors="pt")
    prompt = eng.processor.process_prompt(chat(IMG + "Describe this image."), {"image": [image(0)]})
    assert prompt.token_ids == inp["input_ids"][0].tolist()
    with torch.no_grad():
        ref_logits = hf(**inp).logits[0]
        ids = inp["input_ids"][0]
        feats = eng.model.encode_vision(inp["pixel_values"], inp["image_grid_thw"])
        pos = torch.as_tensor(prompt.positions)
        ours = eng.model.compute_logits(eng.model(ids, pos, inputs_embeds=eng.model.embed(ids, feats)))
        ref_tokens = hf.generate(**inp, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    assert (ours - ref_logits).abs().max().item() <= 1e-4 and ref_logits.std().item() > 0.1
    assert greedy_tokens(eng, [prompt], 12)[0] == ref_tokens[0, ids.shape[0]:].tolist()


def _edit(src, dst, *, config=None, tensors=None):
    shutil.copytree(src, dst)
    if config:
        d = json.loads((dst / "config.json").read_text())
        config(d)
        (dst / "config.json").write_text(json.dumps(d))
    if tensors:
        f = dst / "model.safetensors"
        state = load_file(str(f))
        tensors(state)
        save_file(state, str(f), metadata={"format": "pt"})
    return dst


def test_minimal_awq_vision_config_takes_the_family_defaults(ckpts, tmp_path):
    """The AWQ repos ship vision_config = {in_chans, model_type, spatial_patch_size}: the rest is the class
    defaults (as transformers), and a merger width the weights contradict is named."""
    from qvl.models.qwen2_vl.config import ModelConfig

    minimal = {"in_chans": 3, "model_type": "qwen2_vl", "spatial_patch_size": 14}
    d = json.loads((ckpts["awq"][0] / "config.json").read_text())
    v = ModelConfig.from_dict(dict(d, hidden_size=3584, num_attention_heads=112, vision_config=minimal)).vision
    assert (v.depth, v.embed_dim, v.num_heads, v.hidden_size) == (32, 1280, 16, 3584)
    bad = _edit(ckpts["awq"][0], tmp_path / "min", config=lambda c: c.update(vision_config=minimal))
    with pytest.raises(ValueError, match=r"^config.json vision_config.hidden_size \(absent: the default 3584\) is "
                                         r"wrong: the checkpoint's merger outputs 128 = hidden_size"):
        load_model(bad)


def test_wrong_merger_width_names_the_wrong_number(ckpts, tmp_path):
    src = ckpts["awq"][0]
    bad = _edit(src, tmp_path / "w1", config=lambda c: c["vision_config"].update(hidden_size=8192))
    with pytest.raises(ValueError, match=r"^config.json vision_config.hidden_size=8192 is wrong: the checkpoint's "
                                         r"merger outputs 128 = hidden_size; set vision_config.hidden_size to 128$"):
        load_model(bad)
    bad = _edit(src, tmp_path / "w2", config=lambda c: c.update(hidden_size=256))
    with pytest.raises(ValueError, match=r"^config.json hidden_size=256 does not fit the checkpoint's vision "
                                         r"merger, which outputs 128"):
        load_model(bad)


def test_zero_bias_accepted_nonzero_refused(ckpts, tmp_path):
    src = ckpts["gptq4"][0]
    state = load_file(str(src / "model.safetensors"))
    assert bool((state["model.layers.0.mlp.down_proj.bias"] == 0).all())   # the fixture carries them
    bad = _edit(src, tmp_path / "b", tensors=lambda s: s["model.layers.1.mlp.down_proj.bias"].fill_(0.5))
    with pytest.raises(ValueError, match=r"^model.layers.1.mlp.down_proj.bias is nonzero but "
                                         r"model.layers.1.mlp.down_proj has no bias in this model$"):
        load_model(bad)


def _set_qc(**kv):
    return lambda c: c["quantization_config"].update(kv)


@pytest.mark.parametrize("tag, edit, message", [
    ("gptq4", _set_qc(desc_act=True, group_size=-1), r"^quantization_config: desc_act=true with "
                                                     r"group_size=-1 \(act order needs groups\)$"),
    ("gptq4", _set_qc(bits=3), r"^quantization: GPTQ with bits=3 \(qvl runs 4 and 8\) is not supported$"),
    ("gptq4", _set_qc(sym=False), r"^quantization: asymmetric GPTQ \(sym=False\) is not supported$"),
    ("gptq4", lambda c: c.update(quantization_config={"quant_method": "fp8", "activation_scheme": "dynamic"}),
     r"^quantization: quant_method='fp8' in config.json \(qvl loads gptq and awq checkpoints\) is not supported$"),
    ("gptq4", lambda c: c.update(quantization_config={"quant_method": "bitsandbytes", "load_in_4bit": True}),
     r"^quantization: quant_method='bitsandbytes' in config.json"),
    ("awq", _set_qc(version="gemv"), r"^quantization: AWQ version='gemv' \(qvl reads the gemm packing\)"),
    ("awq", _set_qc(bits=8), r"^quantization: AWQ with bits=8 \(AWQ is 4-bit\) is not supported$"),
    ("gptq4", _set_qc(group_size=64), r"model.layers.0.mlp.down_proj.qzeros has shape \(8, 16\), expected "
                                      r"\(4, 16\) from config.json and quantization_config"),
])
def test_refusals_one_line(ckpts, tmp_path, tag, edit, message):
    bad = _edit(ckpts[tag][0], tmp_path / "bad", config=edit)
    with pytest.raises(ValueError, match=message) as e:
        load_model(bad)
    assert "\n" not in str(e.value)


def test_asymmetric_zeros_and_bad_g_idx_refused(ckpts, tmp_path):
    from qvl.parallel.slices import row_slices
    from qvl.quant.spec import QuantSpec

    src = ckpts["gptq4"][0]
    key = "model.layers.0.self_attn.q_proj"
    bad = _edit(src, tmp_path / "z", tensors=lambda s: s[f"{key}.qzeros"].fill_(0x66666666))
    with pytest.raises(ValueError, match=rf"^{key}.qzeros: zero points \[7\] found where symmetric 4-bit GPTQ "
                                         r"has 8 everywhere \(stored 7\)"):
        load_model(bad)

    def uneven(s):                                           # group 1 takes a column of group 0
        s[f"{key}.g_idx"][0] = 1
    bad = _edit(ckpts["gptq4_act"][0], tmp_path / "g", tensors=uneven)
    with pytest.raises(ValueError, match=rf"^{key}.g_idx must give each of the 4 groups 32 input columns; it "
                                         r"has values 0..3 and group sizes \[31, 32, 33\]$"):
        load_model(bad)
    bad = _edit(ckpts["gptq4_act"][0], tmp_path / "n", tensors=lambda s: s.pop(f"{key}.g_idx"))
    with pytest.raises(ValueError, match=rf"missing.*{key}.g_idx"):         # act order needs every g_idx
        load_model(bad)
    with pytest.raises(ValueError, match=r"^tensor parallelism: an act-order GPTQ checkpoint \(desc_act=true\) "
                                         r"scatters each group over the whole input"):
        row_slices(QuantSpec("gptq", 4, 32, act_order=True), 0, 64, 128)


def test_act_order_g_idx_reorders_the_columns(ckpts):
    """The act-order fixture's g_idx really scatters the groups; a flipped trivial g_idx (a valid act order)
    is read too, and equals the dequantized weight computed column by column from the stored tensors."""
    from qvl.quant import formats

    state = load_file(str(ckpts["gptq4_act"][0] / "model.safetensors"))
    key = "model.layers.1.mlp.down_proj"
    g_idx = state[f"{key}.g_idx"].long()
    assert not torch.equal(g_idx, torch.arange(256) // 32) and torch.equal(torch.bincount(g_idx), torch.full((8,), 32))
    qz = formats.gptq(state[f"{key}.qweight"], state[f"{key}.qzeros"], state[f"{key}.scales"], g_idx, bits=4,
                      group_size=32, zero_offset=1, shape=(128, 256), name=key)
    q = formats._unpack_rows(state[f"{key}.qweight"], 4).t().float()                        # (N, K) as stored
    want = (q - 8) * state[f"{key}.scales"].float().t()[:, g_idx]                            # s[g_idx[k]]·(q − z)
    assert torch.equal(formats.dequantize(qz), want) and torch.equal(qz.q[:, 0].long(), q[:, int(qz.perm[0])].long())


def test_method_must_match_the_checkpoint(ckpts, tiny_ckpt):
    from qvl.config import QUANTIZATIONS
    from qvl.quant import METHODS

    assert QUANTIZATIONS == METHODS                  # EngineConfig's choices are what the loader runs
    with pytest.raises(ValueError, match=r"^quantization='awq' contradicts the checkpoint, which is "
                                         r"gptq-quantized"):
        load_model(ckpts["gptq4"][0], quantization="awq")
    with pytest.raises(ValueError, match=r"^quantization='int8' contradicts the checkpoint"):
        load_model(ckpts["awq"][0], quantization="int8")
    with pytest.raises(ValueError, match=r"^quantization='gptq' but config.json has no quantization_config"):
        load_model(tiny_ckpt, quantization="gptq")
    model, _ = load_model(ckpts["gptq4"][0], quantization="gptq")
    assert model.quantization.method == "gptq" and model.quantization.zero_offset == 1


def test_packed_tensors_without_config_is_explained(ckpts, tmp_path):
    bad = _edit(ckpts["gptq4"][0], tmp_path / "nocfg", config=lambda c: c.pop("quantization_config"))
    with pytest.raises(ValueError, match=r"unexpected keys for Qwen2-VL \(packed quantized tensors, but "
                                         r"config.json has no quantization_config\)"):
        load_model(bad)
