"""The fast CPU bf16 kernels of QuantLinear (qvl's qk-int4 / qk-int8 and bf16 kernels, torch's int4pack,
int8pack, int8group) against the float32 dequant reference: per layer at 1 to 40 rows and odd widths,
the library's portable fallbacks and its refusal to build, and end to end by the bf16 criterion (vLLM's check_logprobs_close:
greedy tokens equal until the first difference, where each side's token is in the other's top 5)."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from PIL import Image

from tiny import IMG, chat

from qvl.layers import linear as qlinear
from qvl.layers import quant_kernels as qk
from qvl.layers.linear import QuantLinear, choose_kernel
from qvl.quant import formats
from qvl.quant.formats import Quantized
from qvl.quant.spec import QuantSpec
from quant_fixtures import write_quantized

NATIVE = qk.native_int()                  # the integer kernels (AVX-512 VNNI or AVX2); the bf16 one needs qk.native()
CASES = {  # tag -> (fixture format, bits, group, on-the-fly method or None, kernel in bf16)
    "gptq4": ("gptq", 4, 32, None, "qk-int4" if NATIVE else "int4pack"),
    "gptq8": ("gptq", 8, 32, None, "qk-int8" if NATIVE else "int8group"),
    "awq": ("awq", 4, 32, None, "qk-int4" if NATIVE else "int4pack"), "awq-g64": ("awq", 4, 64, None, "qk-int4" if NATIVE else "int4pack"),
    "int8": ("gptq", 4, 32, "int8", "qk-int8" if NATIVE else "int8pack"),
    "int4": ("gptq", 4, 32, "int4", "qk-int4" if NATIVE else "int4pack"),
    "gptq4-act": ("gptq-act", 4, 32, None, "qk-int4" if NATIVE else "int4pack"),    # desc_act: x[:, perm]
}
needs_native = pytest.mark.skipif(not NATIVE, reason="qvl's integer CPU kernels need g++ and AVX-512 VNNI or AVX2")
needs_bf16 = pytest.mark.skipif(not qk.native(), reason="qvl's bf16 CPU kernel needs g++ and AVX-512 BF16")


def _layer(spec, kernel_dtype, qz, n, k, bias, kernel=None):
    m = QuantLinear(k, n, bias is not None, spec, dtype=kernel_dtype, device=torch.device("cpu"), name="t")
    m.kernel = kernel or m.kernel
    m._set_kernel_tensors(qz)
    if bias is not None:
        m._buffers_set(bias=bias.to(kernel_dtype))
    return m


def _random(bits, group, n, k, seed, zeros="awq"):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 1 << bits, (n, k), generator=g, dtype=torch.uint8)
    groups = k // group
    z = (torch.randint(0, 16, (groups, n), generator=g).float() if zeros == "awq"
         else torch.full((groups, n), float(1 << (bits - 1))))
    scales = (torch.rand(groups, n, generator=g) * 0.02 + 0.001).half().float()     # fp16 values, as checkpoints
    return Quantized(q, z, scales, group), g


def _close(got, want):
    """bf16 output of an fp32-accumulating kernel: within a few bf16 ulps of the largest output."""
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    assert (got.float() - want).abs().max().item() <= 0.01 * want.abs().max().item()


# Every fast kernel, forced, against the float32 dequant reference: 1 to 40 rows (the qk kernels' tiles of
# 4, 2 and 1 rows, and at 40 rows both the in-register and the dequant + GEMM path), odd widths (112 rows: 7 panels of 16,
# fewer than a block of 8), varying (AWQ) and constant (GPTQ / on-the-fly) zeros, with and without bias.
@pytest.mark.parametrize("bits, group, zeros, kernel", [
    (4, 32, "awq", "int4pack"), (4, 128, "awq", "int4pack"), (8, 256, "sym", "int8pack"),
    (8, 64, "sym", "int8group"),
    pytest.param(4, 128, "awq", "qk-int4", marks=needs_native), pytest.param(4, 64, "sym", "qk-int4", marks=needs_native),
    pytest.param(4, 32, "awq", "qk-int4", marks=needs_native),
    pytest.param(8, 256, "sym", "qk-int8", marks=needs_native), pytest.param(8, 32, "sym", "qk-int8", marks=needs_native)])
@pytest.mark.parametrize("rows", [1, 3, 16, 40])
@pytest.mark.parametrize("n, has_bias", [(96, True), (112, False)])
def test_kernel_matches_fp32_reference(bits, group, zeros, kernel, rows, n, has_bias, monkeypatch):
    if kernel == "int4pack" and n % 16:
        pytest.skip("int4pack needs out % 16 == 0 (choose_kernel never picks it there)")
    k = 256 if group != 64 else 192
    qz, g = _random(bits, group, n, k, bits * 1000 + group + rows + n, zeros)
    spec = QuantSpec("awq" if bits == 4 else "gptq", bits, group)
    bias = torch.randn(n, generator=g) if has_bias else None
    fast = _layer(spec, torch.bfloat16, qz, n, k, bias, kernel)
    ref = _layer(spec, torch.float32, qz, n, k, bias)
    assert fast.kernel == kernel and ref.kernel == "dequant"
    x = torch.randn(rows, k, generator=g).bfloat16()
    with torch.no_grad():
        _close(fast(x), ref(x.float()))
        if kernel.startswith("qk") and rows == 40:       # both many-row paths, whichever this CPU takes
            monkeypatch.setattr(qlinear, "MANY_ROWS", 32)
            _close(fast(x), ref(x.float()))
    with pytest.raises(ValueError, match=rf"t: the {kernel} kernel runs bf16 on CPU, got torch.float32"):
        fast(x.float())


@pytest.mark.skipif(not qk.available(), reason="no C++ compiler for qvl's CPU kernels")
@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("il", [1, 8])
def test_scalar_fallbacks_match(rows, il):
    """The library's portable paths (isa=0 and the target_clones dequantizers) on any CPU, on both panel
    orders (il 8: 48 rows = a partial block of 3 panels)."""
    qz, g = _random(4, 64, 48, 192, rows)
    w = formats.dequantize(qz)                                                            # (N, K) fp32
    x = torch.randn(rows, 192, generator=g).bfloat16()
    bias = torch.randn(48, generator=g)
    want = x.float() @ w.t() + bias
    w4, s4 = qk.pack_int4(qz.q, il), qk.pack_scales(qz.scales)
    z = qk.pack_groups(qz.zeros.to(torch.uint8))
    b4 = qk.QuantWeight(4, w4, s4, z, 0, 64, il)
    _close(b4.matmul(x, bias, isa=0), want)
    blk = b4.dequant_rows(0, 48, torch.empty(48, 192, dtype=torch.bfloat16))
    assert torch.equal(blk, w.bfloat16())                                    # RNE, as torch rounds
    q8, _ = _random(8, 32, 48, 192, rows, "sym")
    w8 = qk.pack_int8((q8.q.to(torch.int16) - 128).to(torch.int8), il)
    want8 = x.float() @ formats.dequantize(q8).t()
    s8 = qk.pack_scales(q8.scales)
    b8 = qk.QuantWeight(8, w8, s8, group=32, il=il)
    _close(b8.matmul(x, isa=0), want8)
    blk8 = b8.dequant_rows(0, 48, torch.empty(48, 192, dtype=torch.bfloat16))
    assert torch.equal(blk8, formats.dequantize(q8).bfloat16())
    with pytest.raises(ValueError, match="qvl CPU kernel int8 refused its input"):      # N % 16 != 0
        qk.QuantWeight(8, w8[:36].contiguous(), s8, group=32, il=il).matmul(x, isa=0)
    with pytest.raises(ValueError, match="qvl CPU kernel int4 refused its input"):      # K = 96: not whole groups
        qk.QuantWeight(4, w4[:, :48].contiguous(), s4, z, 0, 64, il).matmul(x[:, :96].contiguous(), isa=0)
    with pytest.raises(ValueError, match="qvl CPU kernel int4 refused its input"):      # no such panel order
        qk.QuantWeight(4, w4, s4, z, 0, 64, il=4).matmul(x, isa=0)


@needs_native
@pytest.mark.parametrize("bits, zeros", [(4, "awq"), (4, "sym"), (8, "sym")])
@pytest.mark.parametrize("rows", [1, 2, 3, 16])
@pytest.mark.parametrize("long", [False, True])
@pytest.mark.parametrize("il", [1, 8])
def test_avx2_and_vnni_kernels_agree(bits, zeros, rows, long, il):
    """The AVX2 integer kernel (every x86-64 CPU with AVX2 + FMA) against the exact fp32 reference, and,
    where the CPU has AVX-512 VNNI too, bit for bit equal to the VNNI kernel (the same int32 block sums and
    fp32 epilogue). 144 rows: a block of 8 panels and a partial one of 1. Long inputs: 25 (int4) / 14 (int8)
    x blocks, which the one-row AVX2 kernel reads on il 8 as 4 segments of 7 / 4 blocks, the last ones short
    (on il 1: 4-panel tiles, each panel a stream). Both panel orders, whatever this CPU packs by default."""
    group = 64 if bits == 4 else 256
    k = (1600 if bits == 4 else 1792) if long else 256
    qz, g = _random(bits, group, 144, k, bits + rows, zeros)
    w = _bound(bits, qz, zeros, il)
    x = torch.randn(rows, k, generator=g).bfloat16()
    bias = torch.randn(144, generator=g)
    want = x.float() @ formats.dequantize(qz).t() + bias
    avx2 = w.matmul(x, bias, isa=2)
    _close(avx2, want)
    if qk.int_isa() == 1:
        assert torch.equal(w.matmul(x, bias, isa=1), avx2)


def _bound(bits, qz, zeros, il=None):
    if bits == 4:
        z = qk.pack_groups(qz.zeros.to(torch.uint8)) if zeros == "awq" else None
        return qk.QuantWeight(4, qk.pack_int4(qz.q, il), qk.pack_scales(qz.scales), z, 8, qz.group, il)
    return qk.QuantWeight(8, qk.pack_int8((qz.q.to(torch.int16) - 128).to(torch.int8), il), qk.pack_scales(qz.scales),
                          group=qz.group, il=il)


# The many-row path's dequantizers: Wᵀ blocks (AVX-512 BF16, dequant.h, and the scalar code) and W rows,
# into strided outputs, equal formats.dequantize rounded to bf16 bit for bit, at 1 and 3 threads; 208 rows =
# 13 panels (blocks of 8 and 5: the vector code's whole-block, pair and single-panel steps; a thread each),
# from panel 0 and from panel 1 (no whole block).
@pytest.mark.skipif(not qk.available(), reason="no C++ compiler for qvl's CPU kernels")
@pytest.mark.parametrize("bits, group, zeros", [(4, 32, "awq"), (4, 128, "sym"), (8, 64, "sym"), (8, 256, "sym")])
@pytest.mark.parametrize("il", [1, 8])
def test_dequantizers_exact_over_threads(bits, group, zeros, il, monkeypatch):
    qz, g = _random(bits, group, 208, 512, bits + group, zeros)
    want = formats.dequantize(qz).bfloat16()                                             # (N, K)
    w = _bound(bits, qz, zeros, il)
    threads = torch.get_num_threads()
    try:
        for nt in (1, 3):
            torch.set_num_threads(nt)
            for isa, n0 in itertools.product((0, 1) if qk.native() else (0,), (0, 16)):
                out = torch.zeros(512, 224, dtype=torch.bfloat16)                         # (K, ld)
                w.dequant_t(n0, 208, out[:, :208 - n0], isa=isa)
                assert torch.equal(out[:, :208 - n0], want[n0:].t()) and not out[:, 208 - n0:].any(), (nt, isa)
            rows = torch.zeros(208, 520, dtype=torch.bfloat16)                            # (N, ld)
            assert torch.equal(w.dequant_rows(0, 208, rows[:, :512]), want) and not rows[:, 512:].any()
    finally:
        torch.set_num_threads(threads)
    monkeypatch.setattr(qk, "BLOCK_ELEMS", 48 * 512)                   # blocks of 48 columns: 4 + a tail of 16
    x = torch.randn(40, 512, generator=g).bfloat16()
    bias = torch.randn(208, generator=g).bfloat16()
    _close(w.dequant_matmul(x, bias), x.float() @ want.float().t() + bias.float())
    for bad in (lambda: w.dequant_t(0, 200, torch.empty(512, 200, dtype=torch.bfloat16)),     # n1 % 16
                lambda: w.dequant_t(0, 32, torch.empty(512, 48, dtype=torch.bfloat16)),       # wrong shape
                lambda: w.dequant_t(0, 32, torch.empty(32, 512, dtype=torch.bfloat16).t()),   # column stride 32
                lambda: w.dequant_rows(0, 32, torch.empty(32, 512))):                         # float32
        with pytest.raises(ValueError, match="qvl CPU (kernel dequant|dequantizer)"):
            bad()


@pytest.mark.skipif(not qk.available(), reason="no C++ compiler for qvl's CPU kernels")
def test_fp16_scales_exact_and_their_range():
    """The kernels' scales are fp16: subnormal fp16 scales dequantize exactly in the scalar and the vector
    code (their smallest product, 2^-24, is a normal fp32), a float32 tensor is refused, and a layer whose
    scales pass fp16's range runs the float dequant path instead of a wrong kernel."""
    s = torch.tensor([2.0 ** -24, 3 * 2.0 ** -20, 2.0 ** -14, 1e-3, 0.02, 65504.0]).repeat(3)[:16].half().float()
    qz = Quantized(torch.arange(16, dtype=torch.uint8).repeat(16, 8), torch.zeros(1, 16), s.view(1, 16), 128)
    w = _bound(4, qz, "awq")
    for isa in (1, 0) if qk.native() else (0,):
        got = w.dequant_t(0, 16, torch.empty(128, 16, dtype=torch.bfloat16), isa=isa)
        assert torch.equal(got, formats.dequantize(qz).bfloat16().t()), isa
    with pytest.raises(ValueError, match="take fp16 scales .* got torch.float32"):
        qk.QuantWeight(4, w.w, qk.pack_groups(qz.scales), None, 8, 128)
    assert not qk.fp16_holds(torch.tensor([1e5])) and not qk.fp16_holds(torch.tensor([float("inf")]))
    with pytest.raises(ValueError, match=r"fp16 scales \(\|s\| <= 65504\); these reach 100000"):
        qk.pack_scales(torch.tensor([[1e5] * 16]))
    big = qz._replace(scales=s.view(1, 16) * 4)                                          # up to 262016
    layer = _layer(QuantSpec("awq", 4, 128), torch.bfloat16, big, 16, 128, None, "qk-int4")
    assert layer.kernel == "dequant"
    x = torch.randn(2, 128).bfloat16()
    _close(layer(x), x.float() @ formats.dequantize(big).t())


@pytest.mark.parametrize("isa", [pytest.param(1, marks=needs_bf16),
                                 pytest.param(2, marks=pytest.mark.skipif(qk.bf16_isa() == 0, reason="no AVX2 + FMA"))])
@pytest.mark.parametrize("rows", [1, 4, 7, 19])
def test_bf16_kernel_and_threads(rows, isa):
    """The bf16 panel kernel, AVX-512 BF16 (isa 1) and AVX2 + FMA (isa 2): fp32 sums of exact products."""
    g = torch.Generator().manual_seed(rows)
    w = (torch.randn(208, 320, generator=g) * 0.05).bfloat16()         # 13 panels of 16: 4 + 4 + 4 + 1
    x = torch.randn(rows, 320, generator=g).bfloat16()
    bias = torch.randn(208, generator=g)
    panels = qk.pack_bf16(w)
    _close(qk.bf16_mm(x, panels, bias, isa=isa), x.float() @ w.float().t() + bias)
    with pytest.raises(ValueError, match="qvl CPU kernel bf16 refused its input"):
        qk.bf16_mm(x, w[:200].contiguous(), isa=isa)                      # N % 16 != 0
    threads = torch.get_num_threads()
    try:                                      # columns split over threads: each output's sum is unchanged
        torch.set_num_threads(1)
        wide = qk.pack_bf16((torch.randn(2048, 320, generator=g) * 0.05).bfloat16())   # 128 panels: split
        one = qk.bf16_mm(x, wide, isa=isa)
        torch.set_num_threads(3)
        assert torch.equal(qk.bf16_mm(x, wide, isa=isa), one)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.skipif(qk.bf16_isa() == 0, reason="qvl's bf16 GEMM needs g++ and AVX2 + FMA")
@pytest.mark.parametrize("m,n,k", [(1, 16, 8), (7, 33, 13), (37, 100, 300), (200, 257, 520), (400, 48, 264)])
def test_bf16_gemm_fp32_sums_row_and_thread_invariant(m, n, k):
    """gemm.h (plain (N, K) bf16 weight, any shape: partial panels, tails of 6-row tiles and 8-column
    blocks, several row blocks and KC chunks): fp32 sums of exact products, rounded once; each output's
    bits independent of the other rows and of the thread count."""
    g = torch.Generator().manual_seed(m * n + k)
    w = (torch.randn(n, k, generator=g) * 0.05).bfloat16()
    x = torch.randn(m, k, generator=g).bfloat16()
    bias = torch.randn(n, generator=g).bfloat16()
    y = qk.bf16_gemm(x, w, bias)
    want = x.double() @ w.double().t() + bias.double()
    assert y.dtype == torch.bfloat16 and y.shape == (m, n)
    # fp32 sums of k exact products: within k · 2^-24 of the sum of |terms|, then one bf16 rounding
    terms = x.double().abs() @ w.double().abs().t() + bias.double().abs()
    assert ((y.double() - want).abs() <= want.abs() * 2 ** -8 + terms * k * 2 ** -24).all()
    assert (y == (x.float() @ w.float().t() + bias.float()).bfloat16()).float().mean() > 0.98
    for a, b in ((0, 1), (m // 3, m // 3 + 7), (m - 1, m)):                   # rows alone or beside others
        assert torch.equal(qk.bf16_gemm(x[a:b].contiguous(), w, bias), y[a:b])
    threads = torch.get_num_threads()
    try:
        wide = (torch.randn(2064, k, generator=g) * 0.05).bfloat16()          # 129 panels: split over threads
        torch.set_num_threads(1)
        one = qk.bf16_gemm(x, wide)
        torch.set_num_threads(3)
        assert torch.equal(qk.bf16_gemm(x, wide), one)
    finally:
        torch.set_num_threads(threads)


def test_kernel_choice(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    if NATIVE:
        assert choose_kernel(4, 128, 1536, 8960, torch.bfloat16, cpu) == "qk-int4"
        assert choose_kernel(8, 128, 1536, 256, torch.bfloat16, cpu) == "qk-int8"
        assert choose_kernel(8, 1536, 1536, 256, torch.bfloat16, cpu) == "qk-int8"
        assert choose_kernel(4, 32, 1536, 8960, torch.bfloat16, cpu) == "qk-int4"
        assert choose_kernel(4, 16, 1536, 8960, torch.bfloat16, cpu) == "dequant"       # group 16: no fast kernel
        assert choose_kernel(8, 1536, 1536, 100, torch.bfloat16, cpu) == "int8pack"     # out % 16 != 0
    monkeypatch.setitem(qk._state, "lib", None)            # no library (no g++, QVL_CPU_KERNELS=0, failed build)
    assert not qk.native()
    assert choose_kernel(4, 128, 1536, 8960, torch.bfloat16, cpu) == "int4pack"
    assert choose_kernel(4, 128, 1536, 8, torch.bfloat16, cpu) == "dequant"       # out % 16 != 0
    assert choose_kernel(8, 1536, 1536, 256, torch.bfloat16, cpu) == "int8pack"
    assert choose_kernel(8, 128, 1536, 256, torch.bfloat16, cpu) == "int8group"
    assert choose_kernel(4, 128, 1536, 256, torch.float32, cpu) == "dequant"
    assert choose_kernel(4, 128, 1536, 256, torch.bfloat16, cuda) == "dequant"


def test_failed_compile_falls_back(monkeypatch, tmp_path):
    monkeypatch.setenv("QVL_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "false")                     # a "compiler" that always fails
    assert qk._build() is None
    monkeypatch.setenv("CXX", "no-such-compiler-qvl")
    assert qk._build() is None
    monkeypatch.setenv("QVL_CPU_KERNELS", "0")
    assert qk._build() is None


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """(format, bits) -> (quantized dir, float dir); on-the-fly cases quantize the float one."""
    return {key: write_quantized(tmp_path_factory.mktemp(f"{key[0]}{key[1]}g{key[2]}"), key[0].split("-")[0],
                                 bits=key[1], group=key[2], seed=11, act_order=key[0].endswith("-act"))
            for key in {c[:3] for c in CASES.values()}}


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

    fmt, bits, group, method, kernel = CASES[tag]
    ref_eng, fast_eng = (LLMEngine.from_config(EngineConfig(
        model=str(ckpts[(fmt, bits, group)][method is not None]), quantization=method, dtype=dtype, device="cpu", max_model_len=1024,
        kv_cache_memory=8 << 20)) for dtype in ("float32", "bfloat16"))
    kernels = {m.kernel for m in fast_eng.model.modules() if isinstance(m, QuantLinear)}
    assert kernels == {kernel}
    if fmt.endswith("-act"):                  # permuted columns; gate/up (one order) still one call
        from qvl.layers.fused_linear import _KEY
        assert all(m.perm is not None for m in fast_eng.model.modules() if isinstance(m, QuantLinear))
        mlp = fast_eng.model.model.layers[0].mlp
        assert torch.equal(mlp.gate_proj.perm, mlp.up_proj.perm) and not torch.equal(mlp.up_proj.perm, mlp.down_proj.perm)
        assert not NATIVE or ("gate_proj", "up_proj") in mlp.__dict__.get(_KEY, {})
    image = Image.fromarray(np.random.default_rng(2).integers(0, 255, (84, 112, 3), dtype=np.uint8))
    texts = [(chat(IMG + "Describe this image."), [image]), (chat("How many shapes are there?"), None)]
    params = SamplingParams(temperature=0, max_tokens=16, min_tokens=16, logprobs=5)
    outs = []
    for eng in (ref_eng, fast_eng):
        ps = [eng.processor.process_prompt(t, {"image": ims} if ims else None) for t, ims in texts]
        res = LLM.from_engine(eng).generate(ps, params, use_tqdm=False)
        outs.append([(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in res])
    _check_logprobs_close(outs[0], outs[1], tag)


@needs_native
def test_bound_layer_pickles_and_rebinds():
    """The ctypes binding is not state: a pickled (or deep-copied) layer binds again on its first call."""
    import copy
    import pickle

    qz, g = _random(4, 64, 32, 128, 3)
    m = _layer(QuantSpec("awq", 4, 64), torch.bfloat16, qz, 32, 128, None, "qk-int4")
    x = torch.randn(2, 128, generator=g).bfloat16()
    with torch.no_grad():
        want = m(x)
        for other in (pickle.loads(pickle.dumps(m)), copy.deepcopy(m)):
            assert torch.equal(other(x), want)


@needs_native
@pytest.mark.parametrize("bits", [4, 8])
def test_integer_kernels_split_over_threads_unchanged(bits):
    """Output panels split over threads: every output's sum is the same, bit for bit."""
    qz, g = _random(bits, 128, 2048, 256, bits, "awq" if bits == 4 else "sym")     # 128 panels: split
    spec = QuantSpec("awq" if bits == 4 else "gptq", bits, 128)
    m = _layer(spec, torch.bfloat16, qz, 2048, 256, None, f"qk-int{bits}")
    x = torch.randn(5, 256, generator=g).bfloat16()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        with torch.no_grad():
            one = m(x)
            torch.set_num_threads(3)
            assert torch.equal(m(x), one)
    finally:
        torch.set_num_threads(threads)
