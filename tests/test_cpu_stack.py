"""A decode step's decoder layers in one C++ call (qvl.layers.cpu_stack) give the Python layers' results
bit for bit: greedy tokens and every logprob equal with the stack bound and unbound, over bf16 panels, int8
and int4 (on-the-fly) weights and act-order GPTQ-Int4 (permuted inputs), one sequence and several of different lengths whose blocks interleave in
the cache, for Qwen2-VL and Qwen3-VL (q/k norms; an image prompt, whose DeepStack prefill runs the Python
layers); the stack is bound only where every layer runs qvl's kernels, skips prefill, and refuses an
index outside the cache with a ValueError before writing anything."""
from __future__ import annotations

import pytest
import torch

from qvl.layers import cpu_stack
from qvl.layers import quant_kernels as qk
from qvl.layers.attention import AttentionMetadata

pytestmark = pytest.mark.skipif(not (qk.available() and qk.int_isa() > 0 and qk.bf16_isa() > 0),
                                reason="qvl's CPU kernels need g++ and AVX2 + FMA")

# q, k and v of 256 / 128 / 128 rows: each but the last fills whole 128-row blocks, so they fuse.
SHAPE = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
             num_hidden_layers=3, rope_scaling={"type": "mrope", "mrope_section": [8, 12, 12]})


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from tiny import make_tiny_checkpoint, tiny_config_dict, write_tokenizer

    path = tmp_path_factory.mktemp("stack")
    vision = dict(tiny_config_dict(write_tokenizer(path))["vision_config"], hidden_size=256)
    return make_tiny_checkpoint(path, seed=3, overrides=dict(SHAPE, vision_config=vision))


def _engine(ckpt, quantization):
    from qvl.config import EngineConfig
    from qvl.engine.llm_engine import LLMEngine

    return LLMEngine.from_config(EngineConfig(model=str(ckpt), dtype="bfloat16", device="cpu", max_model_len=512,
                                              kv_cache_memory=8 << 20, block_size=16, quantization=quantization))


def _generate(eng, prompts, n):
    from qvl.llm import LLM
    from qvl.sampling_params import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=n, min_tokens=n, logprobs=5)
    outs = LLM.from_engine(eng).generate(prompts, params, use_tqdm=False)
    return [(o.outputs[0].token_ids, [sorted(d.items()) for d in o.outputs[0].logprobs]) for o in outs]


@pytest.fixture(scope="module")
def ckpt3(tmp_path_factory):
    from tiny import write_tiny_qwen3_vl

    return write_tiny_qwen3_vl(tmp_path_factory.mktemp("stack3"), seed=4, text_overrides=dict(
        hidden_size=128, intermediate_size=256, head_dim=64,
        rope_scaling={"rope_type": "default", "mrope_section": [12, 10, 10], "mrope_interleaved": True}))


@pytest.fixture(scope="module")
def ckpt_act(tmp_path_factory):
    """An act-order GPTQ-Int4 checkpoint of SHAPE (its linears multiply x[:, perm])."""
    from quant_fixtures import write_quantized

    return write_quantized(tmp_path_factory.mktemp("stack_act"), "gptq", bits=4, group=32, seed=5, act_order=True,
                           overrides=dict(SHAPE, vision_config={"hidden_size": 256}))[0]


@pytest.mark.parametrize("family, quantization", [("qwen2", None), ("qwen2", "int8"), ("qwen2", "int4"),
                                                  ("qwen3", "int4"), ("qwen3", None), ("qwen2-act", None)])
def test_stack_equals_python_layers(ckpt, ckpt3, ckpt_act, family, quantization):
    from tiny import IMG, chat, image

    eng = _engine({"qwen2": ckpt, "qwen3": ckpt3, "qwen2-act": ckpt_act}[family], quantization)
    assert eng.cpu_runtime.decode_stack and cpu_stack.stack_of(eng.model.model) is not None
    prompts = ["Describe this image.", "What color is the circle? " * 3, "Hello"]       # 3 lengths
    if family == "qwen3":
        prompts[1] = {"prompt": chat(IMG + "What color is the circle?"), "multi_modal_data": {"image": image(1)}}
    calls = []
    real = cpu_stack.DecodeStack.__call__
    cpu_stack.DecodeStack.__call__ = lambda self, *a: calls.append(a[0].shape[0]) or real(self, *a)
    try:
        with_stack = [_generate(eng, [p], 20)[0] for p in prompts[:1]] + _generate(eng, prompts, 20)
    finally:
        cpu_stack.DecodeStack.__call__ = real
    assert calls and max(calls) == 3 and min(calls) == 1                  # batch 1 and 3 decode steps ran it
    cpu_stack.uninstall(eng.model.model)
    without = [_generate(eng, [p], 20)[0] for p in prompts[:1]] + _generate(eng, prompts, 20)
    assert with_stack == without


def test_bound_only_where_every_layer_runs_qvl_kernels(ckpt, monkeypatch):
    from qvl.layers import cpu_runtime, fused_linear

    monkeypatch.setattr(fused_linear, "fuse_linears", lambda model: 0)
    monkeypatch.setattr(cpu_runtime, "fuse_linears", lambda model: 0)   # q/k/v and gate/up stay separate calls
    eng = _engine(ckpt, "int4")
    assert not eng.cpu_runtime.decode_stack and cpu_stack.stack_of(eng.model.model) is None
    from tiny import tiny_engine

    assert cpu_stack.stack_of(tiny_engine(ckpt).model.model) is None   # float32: the reference path
    from qvl.models.qwen2_vl.text import Qwen2DecoderLayer

    class Other(Qwen2DecoderLayer):              # a subclass that does not say what it computes
        pass
    layer = eng.model.model.layers[0]
    other = Other.__new__(Other)
    other.__dict__ = layer.__dict__                  # the same modules, under the undeclared class
    assert cpu_stack._norms(layer) is not None and cpu_stack._norms(other) is None


@torch.no_grad()
def test_refuses_indices_outside_the_cache(ckpt):
    eng = _engine(ckpt, "int4")
    dec = eng.model.model
    stack = cpu_stack.stack_of(dec)
    kc = dec.layers[0].self_attn.k_cache
    nb, bs = kc.shape[0], kc.shape[1]
    x = torch.randn(1, SHAPE["hidden_size"]).bfloat16()
    cos, sin = dec.rope_tables(x, torch.tensor([4]))
    before = [(l.self_attn.k_cache.clone(), l.self_attn.v_cache.clone()) for l in dec.layers]
    bad = [AttentionMetadata([1], [5], slot_mapping=torch.tensor([nb * bs]), block_tables=[[0]]),      # slot
           AttentionMetadata([1], [5], slot_mapping=torch.tensor([4]), block_tables=[[nb]]),           # block
           AttentionMetadata([1], [bs + 1], slot_mapping=torch.tensor([4]), block_tables=[[0]])]       # table short
    for md in bad:
        assert stack.takes(x, md)
        with pytest.raises(ValueError, match="decode stack refused"):
            stack(x, cos, sin, md)
    bits = lambda t: t.view(torch.int16)                 # noqa: E731  (unwritten slots may hold NaN)
    assert all(torch.equal(bits(a), bits(l.self_attn.k_cache)) and torch.equal(bits(b), bits(l.self_attn.v_cache))
               for (a, b), l in zip(before, dec.layers))
    prefill = AttentionMetadata([2], [2], slot_mapping=torch.tensor([0, 1]), block_tables=[[0]])
    assert not stack.takes(torch.randn(2, SHAPE["hidden_size"]).bfloat16(), prefill)
