"""Prepacked single-row linears (CPU bf16): same bits as F.linear, state_dict untouched, engine greedy
tokens unchanged. Skipped where oneDNN has no bf16 kernels."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from qvl.engine.llm_engine import LLMEngine
from qvl.layers.cpu_runtime import probe_cpu
from qvl.layers.packed_linear import pack_linears, packing_supported, unpack_linears
from qvl.llm import LLM
from qvl.sampling_params import SamplingParams

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


def test_budget_too_small_packs_nothing():
    mods = [nn.Linear(64, 64).bfloat16()]
    assert pack_linears(mods, max_bytes=100) == 0
    assert "forward" not in mods[0].__dict__


@pytest.mark.skipif(not probe_cpu().native_bf16, reason="the engine packs only where bf16 is native")
def test_engine_bf16_greedy_unchanged_by_packing(tiny_ckpt):
    eng = LLMEngine.from_pretrained(str(tiny_ckpt), dtype="bfloat16", device="cpu", max_model_len=256,
                                    kv_cache_memory=4 << 20, enable_prefix_caching=False)
    assert eng.cpu_runtime.mode == "onednn-packed" and eng.cpu_runtime.num_linears > 0
    chats = [f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n"
             for q in ("Describe this image.", "How many shapes are there? 1 2 3")]
    params = SamplingParams(temperature=0, max_tokens=16, min_tokens=16)
    llm = LLM.from_engine(eng)

    def outs():   # each alone (one-row decode steps), then both at once (two rows)
        alone = [llm.generate([c], params, use_tqdm=False)[0].outputs[0].token_ids for c in chats]
        return alone, [o.outputs[0].token_ids for o in llm.generate(chats, params, use_tqdm=False)]

    packed = outs()
    linears = [m for m in eng.model.model.modules() if isinstance(m, nn.Linear)] + [eng.model.lm_head]
    unpack_linears(linears)
    assert outs() == packed
