"""The CPU runtime transform (qvl.layers.cpu_runtime) and its kernels: the ISA decision from injected
CPU features, the fp32-from-bf16 linear (qvl.layers.widened_linear) and the CPU decode attention
(qvl.layers.decode_attention) against float32 references, and the engine on the forced AVX2 path held
to the bf16 criterion against the float32 engine."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from qvl.engine.llm_engine import LLMEngine
from qvl.layers import cpu_runtime
from qvl.layers import quant_kernels as qk
from qvl.layers.cpu_runtime import CpuFeatures, prepare_cpu_model, probe_cpu, restore_cpu_model
from qvl.layers.decode_attention import decode_attention
from qvl.layers.widened_linear import is_widened, unwiden_linears, widen_linears
from qvl.llm import LLM
from qvl.sampling_params import SamplingParams

AVX2 = CpuFeatures("AVX2", False, frozenset({"avx", "avx2", "fma", "f16c"}))


def test_native_bf16_needs_onednn_avx512_and_the_flag():
    assert not AVX2.native_bf16
    assert CpuFeatures("AVX512", True, frozenset({"avx512f", "avx512_bf16"})).native_bf16
    assert CpuFeatures("AVX512", True, frozenset({"avx512f", "amx_bf16"})).native_bf16
    assert not CpuFeatures("AVX512", True, frozenset({"avx512f", "avx512bw"})).native_bf16  # emulated bf16
    assert not CpuFeatures("AVX512", False, frozenset({"avx512_bf16"})).native_bf16         # ISA capped
    assert CpuFeatures("AVX512", True, None).native_bf16                                   # flags unknown
    f = probe_cpu()
    assert f.capability == torch.backends.cpu.get_cpu_capability() and isinstance(f.onednn_bf16, bool)


@torch.no_grad()
@pytest.mark.parametrize("library", [pytest.param(True, marks=pytest.mark.skipif(
    qk.bf16_isa() == 0, reason="qvl's bf16 GEMM needs g++ and AVX2 + FMA")), False])
def test_widened_linear_is_fp32_arithmetic_on_bf16_weights(library):
    torch.manual_seed(0)
    mods = nn.ModuleList([nn.Linear(96, 300), nn.Linear(300, 40, bias=False), nn.Linear(8, 8)]).bfloat16()
    mods.append(nn.Linear(8, 8))                                              # float32: left alone
    keys, w0 = list(mods.state_dict()), mods[0].weight.data_ptr()
    # library: qvl's GEMM; else torch's fp32 GEMM on 64-row blocks: 5 for 300
    assert widen_linears(mods, block_elems=96 * 64, library=library) == 3
    assert widen_linears(mods) == 3 and not is_widened(mods[3])
    x = torch.randn(3, 20, 96).bfloat16()                                    # (3, 20, in): 60 rows
    for m, inp in ((mods[0], x), (mods[1], torch.randn(32, 300).bfloat16())):
        y = m(inp)
        ref = F.linear(inp.float(), m.weight.float(), None if m.bias is None else m.bias.float())
        assert y.dtype == torch.bfloat16 and y.shape == ref.shape
        # fp32 sums in another order than ref's, then one rounding to bf16: at most one bf16 step apart
        assert torch.allclose(y.float(), ref, rtol=2 ** -7, atol=1e-3)
        assert (y == ref.bfloat16()).float().mean() > 0.98
    few = torch.randn(15, 96).bfloat16()                                      # under MIN_ROWS: F.linear
    assert torch.equal(mods[0](few), F.linear(few, mods[0].weight, mods[0].bias))
    assert list(mods.state_dict()) == keys and mods[0].weight.data_ptr() == w0   # weights stay bf16
    with torch.enable_grad():                                                # training: plain F.linear
        assert torch.equal(mods[0](x), F.linear(x, mods[0].weight, mods[0].bias))
    unwiden_linears(mods)
    assert not any(is_widened(m) for m in mods)


@pytest.mark.parametrize("masked", [False, True])
def test_decode_attention_bf16_close_to_fp32_and_fp32_unchanged(masked):
    torch.manual_seed(1)
    b, nh, nkv, length, d = 5, 8, 2, 37, 16
    q, k, v = torch.randn(b, nh, d), torch.randn(b, length, nkv, d), torch.randn(b, length, nkv, d)
    mask = (torch.arange(length)[None, :] < torch.tensor([37, 30, 1, 12, 36])[:, None])[:, None, None, :] \
        if masked else None                                                  # (B, 1, 1, L)
    ref = F.scaled_dot_product_attention(q[:, :, None], k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                         scale=0.25, enable_gqa=True)[:, :, 0]    # (B, nH, D)
    assert torch.equal(decode_attention(q, k, v, scale=0.25, mask=mask), ref)       # fp32: SDPA itself
    out = decode_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), scale=0.25, mask=mask)
    ref16 = F.scaled_dot_product_attention(q.bfloat16()[:, :, None], k.bfloat16().transpose(1, 2),
                                           v.bfloat16().transpose(1, 2), attn_mask=mask, scale=0.25,
                                           enable_gqa=True)[:, :, 0]
    assert out.dtype == torch.bfloat16 and out.shape == (b, nh, d)
    # from bf16 inputs, fp32 arithmetic: closer to the fp32 result than bf16 SDPA is, or as close
    err, err_sdpa = (out.float() - ref).abs().max(), (ref16.float() - ref).abs().max()
    assert err <= max(err_sdpa, 2e-2)


def test_prepare_picks_by_dtype_and_features(tiny_ckpt):
    from qvl.build import load_model
    fp32, _ = load_model(tiny_ckpt, dtype=torch.float32)
    assert prepare_cpu_model(fp32, features=AVX2) == cpu_runtime.CpuRuntime("plain", 0, None)
    bf16, _ = load_model(tiny_ckpt, dtype=torch.bfloat16)
    n_all = sum(isinstance(m, nn.Linear) for m in bf16.modules())
    rt = prepare_cpu_model(bf16, features=AVX2)
    assert rt.mode == "fp32-from-bf16" and rt.num_linears == n_all and rt.features == AVX2
    assert rt.gemm == (qk.bf16_isa() > 0)                                    # qvl's AVX2 GEMM for many rows
    assert is_widened(bf16.visual.blocks[0].mlp.fc1)                          # the vision tower too
    decoder = [m for m in bf16.model.modules() if isinstance(m, nn.Linear)] + [bf16.lm_head]
    if qk.bf16_isa():                      # and the decoder's on AVX2 panels for few rows, widened beyond
        assert rt.panel_linears == len(decoder) and rt.fused_groups > 0
        mlp = bf16.model.layers[0].mlp
        x = torch.randn(40, mlp.down_proj.in_features).bfloat16()
        with torch.no_grad():
            want = F.linear(x.float(), mlp.down_proj.weight.float())
            for rows in (1, 5, 40):                                       # panels, panels, widened (GEMM)
                assert (mlp.down_proj(x[:rows]).float() - want[:rows]).abs().max() <= 0.01 * want.abs().max()
    restore_cpu_model(bf16)
    assert not any("forward" in m.__dict__ for m in bf16.modules())
    no_bf16 = CpuFeatures("AVX512", False, frozenset({"avx2", "fma", "avx512f"}))  # AVX-512F, no BF16
    rt = prepare_cpu_model(bf16, features=no_bf16)
    assert rt.mode == "fp32-from-bf16" and not rt.gemm                        # torch's wider fp32 GEMM
    restore_cpu_model(bf16)
    native = CpuFeatures("AVX512", True, frozenset({"avx512_bf16"}))
    if native.native_bf16 and probe_cpu().native_bf16:
        rt = prepare_cpu_model(bf16, features=native, max_bytes=0)              # no room: nothing packed
        assert rt.mode == "plain" and rt.num_linears == 0


def _generate(eng, prompts, n):
    params = SamplingParams(temperature=0, max_tokens=n, min_tokens=n, logprobs=5)
    outs = LLM.from_engine(eng).generate(prompts, params, use_tqdm=False)
    return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in outs]


def assert_bf16_criterion(ref, test):
    """vLLM's check_logprobs_close: tokens equal until the first difference, where each side's token is
    in the other's top-5 (then the sequences may diverge)."""
    for (ta, la), (tb, lb) in zip(ref, test):
        for i, (a, b) in enumerate(zip(ta, tb)):
            if a != b:
                assert a in lb[i] and b in la[i], f"step {i}: {a} vs {b} not in each other's top-5"
                break


def test_engine_forced_avx2_path_meets_bf16_criterion(tiny_ckpt, monkeypatch):
    monkeypatch.setattr(cpu_runtime, "probe_cpu", lambda: AVX2)
    kw = dict(device="cpu", max_model_len=256, kv_cache_memory=4 << 20, enable_prefix_caching=False)
    eng = LLMEngine.from_pretrained(str(tiny_ckpt), dtype="bfloat16", **kw)
    assert eng.cpu_runtime.mode == "fp32-from-bf16" and eng.cpu_runtime.features == AVX2
    assert eng.cpu_runtime.panel_linears > 0 or not qk.bf16_isa()
    chats = [f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n"
             for q in ("Describe this image in every detail you can see, please.", "How many? 1 2 3")]
    ref = _generate(LLMEngine.from_pretrained(str(tiny_ckpt), dtype="float32", **kw), chats, 12)
    widened = _generate(eng, chats, 12)
    assert_bf16_criterion(ref, widened)
    assert all(len(t) == 12 for t, _ in widened)


@pytest.mark.skipif(not probe_cpu().native_bf16, reason="the engine packs only where bf16 is native")
def test_engine_packed_path_meets_bf16_criterion_alone_and_batched(tiny_ckpt):
    kw = dict(device="cpu", max_model_len=256, kv_cache_memory=4 << 20, enable_prefix_caching=False)
    eng = LLMEngine.from_pretrained(str(tiny_ckpt), dtype="bfloat16", **kw)
    decoder = [m for m in eng.model.model.modules() if isinstance(m, nn.Linear)] + [eng.model.lm_head]
    assert eng.cpu_runtime.mode == "onednn-packed" and eng.cpu_runtime.num_linears == len(decoder)
    chats = [f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n"
             for q in ("Describe this image.", "How many shapes are there? 1 2 3")]
    ref = _generate(LLMEngine.from_pretrained(str(tiny_ckpt), dtype="float32", **kw), chats, 16)
    alone = [_generate(eng, [c], 16)[0] for c in chats]            # one-row decode steps
    assert_bf16_criterion(ref, alone)
    assert_bf16_criterion(ref, _generate(eng, chats, 16))          # two rows
