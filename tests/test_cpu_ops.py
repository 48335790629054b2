"""qvl.layers.cpu_ops (the small ops of a CPU bf16 decode step, one C++ call each) against the torch
expressions they replace: rotary bit for bit; RMSNorm and silu(gate) * up within one bf16 ulp on a few
outputs; decode attention against the fp32 matmul formula; strided inputs, masks, batch and thread-count
invariance; and fast() only where the library applies (bf16, CPU, no grad, ENABLED)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qvl.layers import cpu_ops
from qvl.layers.decode_attention import _fp32_matmuls
from qvl.models.qwen2_vl.rope import mrope_cos_sin

pytestmark = pytest.mark.skipif(cpu_ops._glue() is None, reason="qvl's CPU library or AVX2 + FMA missing here")


def _ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| in bf16 ulps of b (a, b bf16)."""
    return ((a.float() - b.float()).abs() / (b.float().abs() * 2.0 ** -7).clamp_min(2.0 ** -133))


def _rand(*shape, seed=0, scale=1.0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).bfloat16()


def test_fast_only_where_it_applies(monkeypatch):
    x = _rand(2, 16)
    with torch.no_grad():
        assert cpu_ops.fast(x) and not cpu_ops.fast(x.float()) and not cpu_ops.fast(x.half())
        monkeypatch.setattr(cpu_ops, "ENABLED", False)
        assert not cpu_ops.fast(x)
    monkeypatch.setattr(cpu_ops, "ENABLED", True)
    with torch.enable_grad():
        assert not cpu_ops.fast(x)


@pytest.mark.parametrize("strided", [False, True])
def test_rotary_same_bits(strided):
    pos = torch.randint(0, 4000, (3, 5), generator=torch.Generator().manual_seed(1))
    cos, sin = mrope_cos_sin(pos, 128, 1e6, [16, 24, 24], torch.bfloat16)                 # (N, D)
    qkv = _rand(5, 20, 128, seed=2, scale=3)
    x = qkv[:, 2:16] if strided else qkv[:, :14].contiguous()                                # (N, 14, D)
    ref = (x * cos[:, None]).add_(x.roll(64, -1).mul_(sin[:, None]))
    assert torch.equal(cpu_ops.rotary(x, cos[:, None], sin[:, None]), ref)
    assert torch.equal(cpu_ops.rotary(x, cos, sin), ref)


@pytest.mark.parametrize("rows,h", [(1, 1536), (7, 96), (3, 40)])
def test_rms_norm_within_one_ulp(rows, h):
    x, w = _rand(rows, h, seed=3, scale=30), _rand(h, seed=4)
    xf = x.float()
    ref = w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).bfloat16()
    got = cpu_ops.rms_norm(x, w, 1e-6)
    d = _ulps(got, ref)
    assert got.shape == ref.shape and d.max() <= 1 and (d > 0).float().mean() < 0.01
    wide = _rand(rows, h + 8, seed=3, scale=30)                                              # rows of a wider buffer
    assert torch.equal(cpu_ops.rms_norm(wide[:, :h], w, 1e-6), cpu_ops.rms_norm(wide[:, :h].contiguous(), w, 1e-6))


def test_silu_mul_within_one_ulp_and_in_place():
    gate, up = _rand(4, 8960, seed=5, scale=6), _rand(4, 8960, seed=6)
    ref = F.silu(gate) * up
    g = gate.clone()
    got = cpu_ops.silu_mul(g, up)
    d = _ulps(got, ref)
    assert got.data_ptr() == g.data_ptr() and d.max() <= 1 and (d > 0).float().mean() < 0.01
    fused = torch.cat((gate, up), 1)                                                          # split views
    assert torch.equal(cpu_ops.silu_mul(fused[:, :8960], fused[:, 8960:]), got)
    assert torch.equal(fused[:, :8960], gate)                                                 # a view is not written


@pytest.mark.parametrize("b,length,masked", [(1, 1, False), (1, 130, False), (5, 37, True)])
def test_decode_attention_matches_fp32_formula(b, length, masked):
    q, k, v = _rand(b, 12, 128, seed=7), _rand(b, length, 2, 128, seed=8), _rand(b, length, 2, 128, seed=9)
    mask = None
    if masked:
        lens = torch.tensor([37, 1, 20, 36, 5])
        mask = (torch.arange(length)[None] < lens[:, None]).view(b, 1, 1, length)
    got = cpu_ops.decode_attention(q, k, v, scale=128 ** -0.5, mask=mask)
    ref = _fp32_matmuls(q, k, v, scale=128 ** -0.5, mask=mask)
    assert got.shape == ref.shape and _ulps(got, ref).max() <= 1
    if masked:                               # each sequence alone, over its own keys: the same bits
        for i, n in enumerate(lens.tolist()):
            alone = cpu_ops.decode_attention(q[i:i + 1], k[i:i + 1, :n], v[i:i + 1, :n], scale=128 ** -0.5)
            assert torch.equal(alone, got[i:i + 1])


def test_decode_attention_strided_cache_and_threads():
    cache_k, cache_v = _rand(1, 64, 4, 128, seed=10), _rand(1, 64, 4, 128, seed=11)       # (1, L, nKV, D)
    k, v = cache_k[:, 3:40, 1:3], cache_v[:, 3:40, 1:3]                                     # heads not contiguous
    q = _rand(2, 12, 128, seed=12)
    kb, vb = k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_ops.decode_attention(q, kb, vb, scale=0.1)
        torch.set_num_threads(2)
        two = cpu_ops.decode_attention(q, kb, vb, scale=0.1)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
    assert torch.equal(one, cpu_ops.decode_attention(q, kb.contiguous(), vb.contiguous(), scale=0.1))


def test_shapes_the_library_refuses_take_the_torch_expressions():
    from qvl.models.qwen2_vl.rope import apply_rotary
    from qvl.models.qwen2_vl.text import RMSNorm

    norm = RMSNorm(12, eps=1e-6).bfloat16()
    x = _rand(3, 12, seed=13, scale=5)
    xf = x.float()
    with torch.inference_mode():
        assert torch.equal(norm(x), norm.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).bfloat16())
        q, cos, sin = _rand(2, 3, 8, seed=14), _rand(2, 8, seed=15), _rand(2, 8, seed=16)      # head_dim 8
        assert torch.equal(apply_rotary(q, cos, sin), (q * cos[:, None]).add_(q.roll(4, -1).mul_(sin[:, None])))
    with pytest.raises(ValueError, match="rms_norm refused shape"):
        cpu_ops.rms_norm(x, norm.weight, 1e-6)
