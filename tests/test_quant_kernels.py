"""The fast CPU bf16 kernels of QuantLinear (int4pack, int8pack, int8group) against the float32 dequant
reference: per layer at 1 and 16 rows, and end to end by the bf16 criterion (vLLM's check_logprobs_close:
greedy tokens equal until the first difference, where each side's token is in the other's top 5)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tiny import IMG, chat

from qvl.layers.linear import QuantLinear, choose_kernel
from qvl.quant.formats import Quantized
from qvl.quant.spec import QuantSpec
from quant_fixtures import write_quantized

CASES = {  # tag -> (fixture format, bits, on-the-fly method or None, kernel in bf16)
    "gptq4": ("gptq", 4, None, "int4pack"), "gptq8": ("gptq", 8, None, "int8group"),
    "awq": ("awq", 4, None, "int4pack"), "int8": ("gptq", 4, "int8", "int8pack"),
    "int4": ("gptq", 4, "int4", "int4pack"),
}


def _layer(spec, kernel_dtype, qz, n, k, bias):
    m = QuantLinear(k, n, bias is not None, spec, dtype=kernel_dtype, device=torch.device("cpu"), name="t")
    m._set_kernel_tensors(qz)
    if bias is not None:
        m._buffers_set(bias=bias.to(kernel_dtype))
    return m


@pytest.mark.parametrize("bits, group, zero_lo, kernel", [
    (4, 32, 0, "int4pack"), (4, 128, 0, "int4pack"), (8, 256, 128, "int8pack"), (8, 64, 128, "int8group")])
@pytest.mark.parametrize("rows", [1, 16])
def test_kernel_matches_fp32_reference(bits, group, zero_lo, kernel, rows):
    g = torch.Generator().manual_seed(bits * 1000 + group + rows)
    n, k = 96, 256
    q = torch.randint(0, 1 << bits, (n, k), generator=g, dtype=torch.uint8)
    groups = k // group
    zeros = (torch.randint(0, 16, (groups, n), generator=g).float() if bits == 4
             else torch.full((groups, n), float(zero_lo)))
    scales = torch.rand(groups, n, generator=g) * 0.02 + 0.001
    qz = Quantized(q, zeros, scales, group)
    spec = QuantSpec("awq" if bits == 4 else "gptq", bits, group)
    bias = torch.randn(n, generator=g)
    fast = _layer(spec, torch.bfloat16, qz, n, k, bias)
    ref = _layer(spec, torch.float32, qz, n, k, bias)
    assert fast.kernel == kernel and ref.kernel == "dequant"
    x = torch.randn(rows, k, generator=g).bfloat16()
    with torch.no_grad():
        want = ref(x.float())
        got = fast(x)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, n)
    assert (got.float() - want).abs().max().item() <= 0.02 * want.abs().max().item()
    with pytest.raises(ValueError, match=rf"t: the {kernel} kernel runs bf16 on CPU, got torch.float32"):
        fast(x.float())


def test_kernel_choice():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert choose_kernel(4, 128, 1536, 8960, torch.bfloat16, cpu) == "int4pack"
    assert choose_kernel(4, 128, 1536, 8, torch.bfloat16, cpu) == "dequant"       # out % 16 != 0
    assert choose_kernel(8, 1536, 1536, 256, torch.bfloat16, cpu) == "int8pack"
    assert choose_kernel(8, 128, 1536, 256, torch.bfloat16, cpu) == "int8group"
    assert choose_kernel(4, 128, 1536, 256, torch.float32, cpu) == "dequant"
    assert choose_kernel(4, 128, 1536, 256, torch.bfloat16, cuda) == "dequant"


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """(format, bits) -> (quantized dir, float dir); on-the-fly cases quantize the float one."""
    return {fmt_bits: write_quantized(tmp_path_factory.mktemp(f"{fmt_bits[0]}{fmt_bits[1]}"), fmt_bits[0],
                                      bits=fmt_bits[1], seed=11)
            for fmt_bits in {(c[0], c[1]) for c in CASES.values()}}


def _check_logprobs_close(ref, fast, tag):
    """vLLM's check_logprobs_close on (token_ids, logprobs) pairs."""
    for (ref_ids, ref_lp), (ids, lp) in zip(ref, fast):
        for i, (a, b) in enumerate(zip(ref_ids, ids)):
            if a != b:
                assert a in lp[i] and b in ref_lp[i], (tag, i, ref_ids, ids)
                break


@pytest.mark.parametrize("tag", list(CASES))
def test_bf16_kernels_meet_the_bf16_criterion(ckpts, tag):
    from qvl.config import EngineConfig
    from qvl.engine.llm_engine import LLMEngine
    from qvl.llm import LLM
    from qvl.sampling_params import SamplingParams

    fmt, bits, method, kernel = CASES[tag]
    ref_eng, fast_eng = (LLMEngine.from_config(EngineConfig(
        model=str(ckpts[(fmt, bits)][method is not None]), quantization=method, dtype=dtype, device="cpu", max_model_len=1024,
        kv_cache_memory=8 << 20)) for dtype in ("float32", "bfloat16"))
    kernels = {m.kernel for m in fast_eng.model.modules() if isinstance(m, QuantLinear)}
    assert kernels == {kernel}
    image = Image.fromarray(np.random.default_rng(2).integers(0, 255, (84, 112, 3), dtype=np.uint8))
    texts = [(chat(IMG + "Describe this image."), [image]), (chat("How many shapes are there?"), None)]
    params = SamplingParams(temperature=0, max_tokens=16, min_tokens=16, logprobs=5)
    outs = []
    for eng in (ref_eng, fast_eng):
        ps = [eng.processor.process_prompt(t, {"image": ims} if ims else None) for t, ims in texts]
        res = LLM.from_engine(eng).generate(ps, params, use_tqdm=False)
        outs.append([(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in res])
    _check_logprobs_close(outs[0], outs[1], tag)
