"""GPTQ-Int4 and AWQ checkpoints of the other families (Qwen2.5-VL's window-attention tower, Qwen3-VL's Qwen3
decoder with q/k norms and DeepStack rows), packed by tests/quant_fixtures.py from tiny random float
checkpoints, loaded by qvl in float32: greedy tokens and their logprobs equal to transformers running the
exactly dequantized weights, with an image; only the decoder's linears are quantized."""
from __future__ import annotations

import pytest
import torch

from qvl.layers.linear import QuantLinear
from quant_fixtures import quantize_checkpoint
from tiny import IMG, chat, hf_media_kwargs, image, tiny_engine, write_tiny_qwen2_5_vl, write_tiny_qwen3_vl

N_NEW = 10


def _hf(family, path):
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen3VLForConditionalGeneration

    cls = Qwen2_5_VLForConditionalGeneration if family == "qwen2_5_vl" else Qwen3VLForConditionalGeneration
    return cls.from_pretrained(path, attn_implementation="sdpa", dtype=torch.float32).eval()


@pytest.mark.parametrize("family, fmt", [("qwen2_5_vl", "awq"), ("qwen2_5_vl", "gptq"), ("qwen3_vl", "awq"),
                                         ("qwen3_vl", "gptq")])
def test_quantized_family_equals_transformers_on_dequantized_weights(tmp_path, family, fmt):
    from qvl.llm import LLM
    from qvl.sampling_params import SamplingParams

    write = write_tiny_qwen2_5_vl if family == "qwen2_5_vl" else write_tiny_qwen3_vl
    src = write(tmp_path / "float", seed=3)
    deq = quantize_checkpoint(src, tmp_path / "quant", fmt)
    hf = _hf(family, src)
    with torch.no_grad():
        for key, w in deq.items():                                   # the hub key -> transformers' module
            name = key[:-len(".weight")]
            if not name.startswith("model.language_model."):
                name = name.replace("model.", "model.language_model.", 1)
            hf.get_submodule(name).weight.copy_(w)
    eng = tiny_engine(tmp_path / "quant")
    quantized = [m for m in eng.model.modules() if isinstance(m, QuantLinear)]
    assert len(quantized) == len(deq) == 7 * hf.config.text_config.num_hidden_layers
    assert eng.model.quantization.method == fmt and all(m.kernel == "dequant" for m in quantized)
    assert not any(isinstance(m, QuantLinear) for m in eng.model.visual.modules())
    prompts = [eng.processor.process_prompt(chat(IMG + "Describe this image."), {"image": [image(0, 224, 280)]}),
               eng.processor.process_prompt(chat("How many shapes are there?"), None)]
    params = SamplingParams(temperature=0, max_tokens=N_NEW, min_tokens=N_NEW, logprobs=1)
    outs = LLM.from_engine(eng).generate(prompts, params, use_tqdm=False)
    for p, o in zip(prompts, outs):
        ids = torch.tensor([p.token_ids])
        with torch.no_grad():
            ref = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                              max_new_tokens=N_NEW, eos_token_id=None, pad_token_id=0, output_logits=True,
                              return_dict_in_generate=True, **hf_media_kwargs(p))
        toks = o.outputs[0].token_ids
        assert toks == ref.sequences[0, ids.shape[1]:].tolist()
        ref_lp = [torch.log_softmax(step[0], -1)[t].item() for step, t in zip(ref.logits, toks)]
        ours = [lp[t] for lp, t in zip(o.outputs[0].logprobs, toks)]                   # {token id: logprob}
        assert max(abs(a - b) for a, b in zip(ours, ref_lp)) <= 1e-4 and len(set(toks)) > 1
