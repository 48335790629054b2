"""int8 / int4 quantization of a float checkpoint while loading: the integers and scales, float32 logits and
greedy tokens equal to transformers running qvl's own dequantized weights (with an image), the skip list,
the memory the model keeps, and the three entry points (LLMEngine, qvl.LLM, `qvl run --quantization`)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from qvl.build import load_model
from qvl.layers.linear import QuantLinear
from tiny import IMG, chat
from quant_fixtures import write_quantized

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def float_ckpt(tmp_path_factory):
    """A float32 tiny Qwen2-VL with hidden 128 / intermediate 256 (the reference half of the fixture)."""
    return write_quantized(tmp_path_factory.mktemp("otf"), "gptq", seed=7)[1]


@pytest.mark.parametrize("method, bits, groups", [("int8", 8, {128: 1, 256: 1}), ("int4", 4, {128: 1, 256: 2})])
def test_integers_scales_and_skip_list(float_ckpt, method, bits, groups):
    model, _ = load_model(float_ckpt, quantization=method)
    ref, _ = load_model(float_ckpt)
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert len(quantized) == 14 and all(n.startswith("model.layers.") for n in quantized)
    assert isinstance(model.lm_head, torch.nn.Linear) and model.lm_head.weight.dtype == torch.float32
    assert not any(isinstance(m, QuantLinear) for m in model.visual.modules())
    sd = ref.state_dict()
    for name, m in quantized.items():
        assert m.scales.shape == (groups[m.in_features], m.out_features)
        assert bool((m.zeros == 1 << (bits - 1)).all())
        w, deq = sd[f"{name}.weight"], m.dequantized_weight()
        step = m.scales.t().repeat_interleave(m.in_features // m.scales.shape[0], 1)   # (N, K)
        assert bool(((w - deq).abs() <= step / 2 + 1e-7).all())                      # round to nearest
        assert torch.equal(m.scales, m.scales.half().float())                        # fp16 scales (the kernels')
        assert m.dequantized_weight().abs().amax() > 0


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_fp32_equals_transformers_on_own_dequantized_weights(float_ckpt, method):
    from transformers import Qwen2VLForConditionalGeneration
    from tiny import greedy_tokens, hf_processor, tiny_engine

    eng = tiny_engine(float_ckpt, quantization=method)
    hf = Qwen2VLForConditionalGeneration.from_pretrained(float_ckpt).eval()
    with torch.no_grad():
        for name, m in eng.model.named_modules():
            if isinstance(m, QuantLinear):
                hf.get_submodule(name.replace("model.", "model.language_model.", 1)).weight.copy_(
                    m.dequantized_weight())
    image = Image.fromarray(np.random.default_rng(5).integers(0, 255, (84, 112, 3), dtype=np.uint8))
    text = chat(IMG + "What color is the circle?")
    inp = hf_processor(float_ckpt)(text=[text], images=[image], return_tensors="pt")
    prompt = eng.processor.process_prompt(text, {"image": [image]})
    ids = inp["input_ids"][0]
    with torch.no_grad():
        ref = hf(**inp).logits[0]
        feats = eng.model.encode_vision(inp["pixel_values"], inp["image_grid_thw"])
        ours = eng.model.compute_logits(eng.model(ids, torch.as_tensor(prompt.positions),
                                                  inputs_embeds=eng.model.embed(ids, feats)))
        ref_tokens = hf.generate(**inp, max_new_tokens=10, min_new_tokens=10, do_sample=False)
    assert (ours - ref).abs().max().item() <= 1e-4 and ref.std().item() > 0.1
    assert greedy_tokens(eng, [prompt], 10)[0] == ref_tokens[0, ids.shape[0]:].tolist()


def test_scales_beyond_fp16_are_refused_by_name():
    from qvl.quant import onthefly

    w = torch.zeros(16, 128)
    w[3, 5] = 9e6                                                # int8: 9e6 / 127 > 65504
    with pytest.raises(ValueError, match=r"^layers.0.q.weight: int8 on the fly keeps fp16 scales, which hold "
                                         r"\|w\| up to 8.31901e\+06; this weight reaches 9e\+06$"):
        onthefly.quantize(w, 8, -1, "layers.0.q.weight")
    qz = onthefly.quantize(w / 20, 4, 128)                       # 4.5e5 / 7 fits; the zero rows get 2^-24
    assert float(qz.scales.max()) == float(torch.tensor(4.5e5 / 7).half()) and float(qz.scales.min()) == 2.0 ** -24


def test_memory_is_the_integers_not_a_float_copy(float_ckpt):
    """bf16 int4: the decoder linears keep ~0.5 byte per weight (+ scales), no float weight."""
    model, config = load_model(float_ckpt, dtype=torch.bfloat16, quantization="int4")
    quantized = [m for m in model.modules() if isinstance(m, QuantLinear)]
    weights = sum(m.in_features * m.out_features for m in quantized)
    held = sum(t.numel() * t.element_size() for m in quantized for n, t in m.named_buffers() if n != "bias")
    assert all(m.kernel in ("int4pack", "qk-int4") for m in quantized)
    assert weights / 2 <= held <= weights * (0.5 + 2 / 128)                         # + an fp16 scale per 128
    assert not any(p.dtype != torch.bfloat16 for p in model.parameters())


def test_llm_facade_and_cli_flag():
    from qvl import LLM, SamplingParams

    llm = LLM(quantization="int8", kv_cache_memory="8MiB")              # the shipped demo checkpoint
    assert llm.engine.model.quantization.method == "int8"
    out = llm.generate(["<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"],
                       SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) >= 1
    r = subprocess.run([sys.executable, "-m", "qvl.cli", "run", "--quantization", "int4", "--image",
                        str(ROOT / "examples" / "shapes.png"), "What color is the circle?", "--json"],
                       capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["text"] == "red"
    r = subprocess.run([sys.executable, "-m", "qvl.cli", "run", "--quantization", "int3", "hi"],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode != 0 and "int3" in r.stderr and "Traceback" not in r.stderr
