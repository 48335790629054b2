"""Fused q/k/v and gate/up calls (qvl.layers.fused_linear): one kernel call gives each member's own output
bit for bit below MANY_ROWS rows (int4 with per-group and constant zeros, int8, bf16 panels), the members'
tensors become views of the fused weight (no new memory, the members still compute alone), groups that
mix kernels or whose integer panels cannot be concatenated are left alone, and unfusing goes back to the members' calls."""
import pytest
import torch
import torch.nn as nn

from qvl.layers import linear as qlinear
from qvl.layers import quant_kernels as qk
from qvl.layers.fused_linear import fuse_linears, linears, unfuse_linears
from qvl.layers.linear import QuantLinear
from qvl.layers.packed_linear import pack_linears
from qvl.quant import onthefly
from qvl.quant.formats import Quantized
from qvl.quant.spec import QuantSpec

NAMES = ("a", "b", "c")


class Block(nn.Module):
    fused_linears = (NAMES,)

    def __init__(self, mods) -> None:
        super().__init__()
        for n, m in zip(NAMES, mods):
            setattr(self, n, m)


def _quant(bits, n, k, seed, zeros):
    g = torch.Generator().manual_seed(seed)
    spec = QuantSpec("awq" if bits == 4 else "gptq", bits, 64)
    m = QuantLinear(k, n, seed % 2 == 0, spec, dtype=torch.bfloat16, device=torch.device("cpu"), name=f"m{seed}")
    q = torch.randint(0, 1 << bits, (n, k), generator=g, dtype=torch.uint8)
    z = (torch.randint(0, 16, (k // 64, n), generator=g).float() if zeros == "awq"
         else torch.full((k // 64, n), float(1 << (bits - 1))))
    m._set_kernel_tensors(Quantized(q, z, torch.rand(k // 64, n, generator=g) * 0.02 + 0.001, 64))
    if m.has_bias:
        m._buffers_set(bias=torch.randn(n, generator=g).bfloat16())
    return m


def _members(block, x):
    return tuple(getattr(block, n)(x) for n in NAMES)


@pytest.mark.skipif(not qk.native_int(), reason="qvl's integer CPU kernels need g++ and AVX-512 VNNI or AVX2")
@pytest.mark.parametrize("bits, zeros", [(4, "awq"), (4, "sym"), (8, "sym"), (4, "mixed")])
@torch.no_grad()
def test_fused_quant_equals_members(bits, zeros, monkeypatch):
    block = Block([_quant(bits, n, 192, i, "awq" if zeros == "mixed" and i == 1 else zeros)
                   for i, n in enumerate((128, 256, 48))])
    x = torch.randn(5, 192).bfloat16()
    want = _members(block, x)
    before = sum(t.numel() for m in block.children() for t in m.buffers())
    assert fuse_linears(block) == 1
    got = linears(block, NAMES, x)
    assert all(torch.equal(a, b) and a.is_contiguous() for a, b in zip(got, want))
    assert all(torch.equal(a, b) for a, b in zip(_members(block, x), want))       # members on their views
    w = block.a.w4 if bits == 4 else block.a.w8
    assert w._base is not None                                                     # a view of the fusion
    made = (128 + 48) * (192 // 64) if zeros == "mixed" else 0     # constant zeros written out beside per-group ones
    assert sum(t.numel() for m in block.children() for t in m.buffers()) == before + made
    monkeypatch.setattr(qlinear, "MANY_ROWS", 32)      # dequant + one GEMM (what CPUs with AMX take)
    many = torch.randn(32, 192).bfloat16()
    for a, b in zip(linears(block, NAMES, many), _members(block, many)):
        assert (a.float() - b.float()).abs().max() <= 0.01 * b.float().abs().max()
    unfuse_linears(block)
    assert all(torch.equal(a, b) for a, b in zip(linears(block, NAMES, x), want))


@pytest.mark.skipif(not qk.native(), reason="qvl's bf16 CPU kernel needs g++ and AVX-512 BF16")
@torch.no_grad()
def test_fused_bf16_panels_equal_members():
    torch.manual_seed(0)
    block = Block([nn.Linear(128, 64), nn.Linear(128, 32), nn.Linear(128, 32, bias=False)]).bfloat16()
    assert pack_linears(list(block.children()), exact=False) == 3
    x = torch.randn(3, 128).bfloat16()
    want = _members(block, x)
    assert fuse_linears(block) == 1
    assert all(torch.equal(a, b) for a, b in zip(linears(block, NAMES, x), want))
    assert all(torch.equal(a, b) for a, b in zip(_members(block, x), want))
    big = torch.randn(40, 128).bfloat16()                       # over the panels' row limit: each member's F.linear
    assert all(torch.equal(a, b) for a, b in zip(linears(block, NAMES, big), _members(block, big)))


@torch.no_grad()
def test_mixed_or_plain_groups_are_left_alone():
    torch.manual_seed(0)
    plain = Block([nn.Linear(64, 16), nn.Linear(64, 16), nn.Linear(64, 16)])        # fp32: F.linear
    assert fuse_linears(plain) == 0
    x = torch.randn(2, 64)
    assert all(torch.equal(a, b) for a, b in zip(linears(plain, NAMES, x), _members(plain, x)))
    if qk.native_int():
        w = torch.randn(32, 128) * 0.02
        mods = []
        for bits in (4, 8, 4):
            m = QuantLinear(128, 32, False, QuantSpec(f"int{bits}", bits, 128), dtype=torch.bfloat16,
                            device=torch.device("cpu"))
            m._set_kernel_tensors(onthefly.quantize(w, bits, 128))
            mods.append(m)
        assert fuse_linears(Block(mods)) == 0                                       # int4 beside int8
        partial = Block([_quant(4, n, 192, i, "sym") for i, n in enumerate((48, 128, 128))])
        assert fuse_linears(partial) == 0          # a first member of 48 rows ends inside a block of 128
