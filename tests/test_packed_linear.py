"""Prepacked few-row linears (CPU bf16): exact mode gives F.linear's bits, the engine's mode packs every
shape within bf16 rounding; state_dict untouched. Skipped where oneDNN has no bf16 kernels. The engine
on the packed path: tests/test_cpu_runtime.py."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from qvl.layers.packed_linear import MAX_ROWS, pack_linears, packing_supported, unpack_linears

pytestmark = pytest.mark.skipif(not packing_supported(torch.bfloat16, torch.device("cpu")),
                                reason="oneDNN bf16 kernels not available on this CPU")


@torch.no_grad()
def test_single_rows_bit_identical_and_state_dict_unchanged():
    torch.manual_seed(0)
    mods = nn.ModuleList([nn.Linear(96, 160), nn.Linear(160, 96, bias=False), nn.Linear(96, 32)]).bfloat16()
    keys = list(mods.state_dict())
    x = torch.randn(40, 96).bfloat16()
    ref = [mods[0](x[:m]) for m in (1, 2, 5, 40)]
    # Which shapes pass the bit-identity probe depends on the CPU's oneDNN kernels (all three on AMX
    # machines, two on some AVX-512 ones): whatever is packed must give F.linear's bits.
    packed = pack_linears(mods)
    assert packed >= 1 and packed == sum("forward" in m.__dict__ for m in mods)
    assert pack_linears(mods) == packed                   # already packed: left as they are
    assert all(torch.equal(a, mods[0](x[:m])) for a, m in zip(ref, (1, 2, 5, 40)))   # 40 rows: F.linear
    h = torch.randn(1, 160).bfloat16()
    assert torch.equal(mods[1](h), F.linear(h, mods[1].weight))
    for m in mods:
        if "forward" in m.__dict__:
            rows = torch.randn(m.forward.max_rows, m.in_features).bfloat16()
            assert torch.equal(m(rows), F.linear(rows, m.weight, m.bias))
    assert list(mods.state_dict()) == keys
    unpack_linears(mods)
    assert "forward" not in mods[0].__dict__


@torch.no_grad()
def test_not_exact_packs_every_shape_close_to_f_linear():
    torch.manual_seed(2)
    mods = [nn.Linear(96, 160), nn.Linear(160, 96, bias=False), nn.Linear(1000, 24)]
    mods = [m.bfloat16() for m in mods]
    assert pack_linears(mods, exact=False) == 3
    for m in mods:
        assert m.forward.max_rows == MAX_ROWS
        x = torch.randn(MAX_ROWS, m.in_features).bfloat16()
        ref = F.linear(x.float(), m.weight.float(), None if m.bias is None else m.bias.float())
        assert torch.allclose(m(x).float(), ref, rtol=2 ** -7, atol=1e-2)


def test_budget_too_small_packs_nothing():
    mods = [nn.Linear(64, 64).bfloat16()]
    assert pack_linears(mods, max_bytes=100) == 0
    assert "forward" not in mods[0].__dict__
