"""The decode step's fewer-op paths give the same bits as the expressions they replace.

  * the reference backend's lone-decode-sequence view (consecutive blocks) == its gather (scattered blocks),
    fp32 and bf16, and the view is taken only when the blocks are consecutive; new K/V written by a slice
    when their slots are one run land exactly where index_copy_ puts them;
  * decode_attention's one-row bmm path (bf16 on the CPU) == the batched matmul formula;
  * apply_rotary with (N, D) or (N, 1, D) tables == x * cos + rotate_half(x) * sin (transformers' form);
  * RMSNorm == fp32 x * rsqrt(mean(x^2) + eps), cast, then weight (QWEN2VL_SPEC 6);
    these three also through qvl.layers.cpu_ops's single calls (bf16, where the library runs: the same
    bits on these inputs; tests/test_cpu_ops.py holds them to the expressions more widely);
  * argmax_rows == torch.argmax (first maximum, NaN counts as the maximum, all -inf rows);
  * the sampler's ban-only path (min_tokens) bans in the caller's logits and gives them back bit for bit.
"""
from __future__ import annotations

import pytest
import torch

from qvl.layers import cpu_ops
from qvl.layers.attention import REFERENCE, AttentionMetadata
from qvl.layers.decode_attention import decode_attention
from qvl.layers.sampler import Sampler, SamplingBatch, argmax_rows
from qvl.models.qwen2_vl.rope import apply_rotary, mrope_cos_sin, rotate_half
from qvl.models.qwen2_vl.text import RMSNorm
from qvl.sampling_params import SamplingParams

NB, BS, NKV, NH, D = 12, 4, 2, 6, 16          # cache blocks (the last one is the padding block), block size


def _decode_once(blocks: list[int], length: int, dtype, seed: int = 0):
    """One decode token at position length-1 of a sequence whose context lives in `blocks`."""
    g = torch.Generator().manual_seed(seed)
    kc = torch.randn(NB, BS, NKV, D, generator=g).to(dtype)
    vc = torch.randn(NB, BS, NKV, D, generator=g).to(dtype)
    kc[-1].zero_(), vc[-1].zero_()
    ctx_k = torch.randn(length, NKV, D, generator=g).to(dtype)      # the context, wherever it is stored
    ctx_v = torch.randn(length, NKV, D, generator=g).to(dtype)
    slots = torch.tensor([blocks[i // BS] * BS + i % BS for i in range(length)])
    kc.view(-1, NKV, D)[slots] = ctx_k
    vc.view(-1, NKV, D)[slots] = ctx_v
    q = torch.randn(1, NH, D, generator=g).to(dtype)
    md = AttentionMetadata([1], [length], slot_mapping=slots[-1:], block_tables=[blocks])
    out = REFERENCE.forward(q, ctx_k[-1:], ctx_v[-1:], scale=D ** -0.5, metadata=md, k_cache=kc, v_cache=vc)
    return out, md.plan(BS, torch.device("cpu"), (NB - 1) * BS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("length", [1, 4, 11])
def test_lone_decode_view_equals_gather(dtype, length):
    need = -(-length // BS)
    view_out, view_plan = _decode_once(list(range(3, 3 + need)), length, dtype)
    gather_out, gather_plan = _decode_once([7, 2, 9][:need][::-1] if need > 1 else [7], length, dtype)
    assert view_plan.decode_start == 3 * BS and view_plan.decode_slots is None
    if need > 1:
        assert gather_plan.decode_start is None and gather_plan.decode_slots is not None
    assert view_out.dtype == dtype and torch.equal(view_out, gather_out)


def _mixed_step(decode_blocks: list[int], dtype):
    """A prefill chunk of 3 tokens (context 3, blocks [10]) then a decode row of context 6 in decode_blocks."""
    g = torch.Generator().manual_seed(5)
    kc, vc = (torch.randn(NB + 1, BS, NKV, D, generator=g).to(dtype) for _ in range(2))
    kc[-1].zero_(), vc[-1].zero_()
    slots = [10 * BS + i for i in range(3)] + [decode_blocks[i // BS] * BS + i % BS for i in range(6)]
    ctx_k, ctx_v = (torch.randn(9, NKV, D, generator=g).to(dtype) for _ in range(2))
    kc.view(-1, NKV, D)[slots] = ctx_k
    vc.view(-1, NKV, D)[slots] = ctx_v
    q = torch.randn(4, NH, D, generator=g).to(dtype)
    rows = [0, 1, 2, 8]                                                    # the new tokens' context rows
    md = AttentionMetadata([3, 1], [3, 6], slot_mapping=torch.tensor([slots[r] for r in rows]),
                           block_tables=[[10], decode_blocks])
    out = REFERENCE.forward(q, ctx_k[rows], ctx_v[rows], scale=D ** -0.5, metadata=md, k_cache=kc, v_cache=vc)
    return out, md.plan(BS, torch.device("cpu"), NB * BS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lone_decode_row_beside_a_prefill_chunk(dtype):
    view_out, view_plan = _mixed_step([4, 5], dtype)
    gather_out, gather_plan = _mixed_step([8, 1], dtype)
    assert view_plan.decode_start == 4 * BS and gather_plan.decode_start is None
    assert view_plan.decode_rows.tolist() == [3]
    assert torch.equal(view_out, gather_out)


@pytest.mark.parametrize("slots, run", [([9, 10, 11, 12, 13], 9), ([9, 10, 12], None), ([17], 17)])
def test_new_kv_land_on_their_slots(slots, run):
    g = torch.Generator().manual_seed(3)
    kc, vc = (torch.randn(NB, BS, NKV, D, generator=g).bfloat16() for _ in range(2))
    before_k, before_v = kc.clone(), vc.clone()
    n = len(slots)
    k, v = torch.randn(n, NKV, D, generator=g), torch.randn(n, NKV, D, generator=g)   # fp32: cast on write
    ctx = max(slots) + 1                                    # one sequence whose context is blocks 0.. in order
    md = AttentionMetadata([n], [ctx], slot_mapping=torch.tensor(slots),
                           block_tables=[list(range(-(-ctx // BS)))])
    REFERENCE.forward(torch.randn(n, NH, D).bfloat16(), k, v, scale=0.25, metadata=md, k_cache=kc, v_cache=vc)
    assert md.plan(BS, torch.device("cpu"), (NB - 1) * BS).write_start == run
    ref_k, ref_v = before_k.view(-1, NKV, D), before_v.view(-1, NKV, D)
    ref_k.index_copy_(0, torch.tensor(slots), k.bfloat16())
    ref_v.index_copy_(0, torch.tensor(slots), v.bfloat16())
    assert torch.equal(kc, before_k) and torch.equal(vc, before_v)


def test_view_not_taken_with_several_decode_rows_or_a_table_gap():
    md = AttentionMetadata([1, 1], [5, 5], slot_mapping=torch.tensor([4, 12]), block_tables=[[0, 1], [2, 3]])
    assert md.plan(BS, torch.device("cpu"), (NB - 1) * BS).decode_start is None
    md = AttentionMetadata([1], [6], slot_mapping=torch.tensor([21]), block_tables=[[0, 5]])
    assert md.plan(BS, torch.device("cpu"), (NB - 1) * BS).decode_start is None


@pytest.mark.parametrize("glue", [True, False])          # qvl.layers.cpu_ops's one call, or torch's ops
@pytest.mark.parametrize("length", [1, 7, 130])
def test_one_row_bf16_decode_attention_equals_matmul_formula(length, glue, monkeypatch):
    monkeypatch.setattr(cpu_ops, "ENABLED", glue)
    g = torch.Generator().manual_seed(length)
    q = torch.randn(1, 12, 128, generator=g).bfloat16()
    k, v = (torch.randn(1, length, 2, 128, generator=g).bfloat16() for _ in range(2))
    scale = 128 ** -0.5
    qg = q.view(1, 2, 6, 128).float()                                      # (1, nKV, g, D)
    probs = torch.matmul(qg, k.permute(0, 2, 3, 1).float()).mul_(scale).softmax(dim=-1)
    ref = torch.matmul(probs, v.transpose(1, 2).float()).view(1, 12, 128).bfloat16()
    assert torch.equal(decode_attention(q, k, v, scale=scale), ref)


@pytest.mark.parametrize("glue", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_rotary_matches_rotate_half_form(dtype, glue, monkeypatch):
    monkeypatch.setattr(cpu_ops, "ENABLED", glue)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 7, 32, generator=g).to(dtype)
    pos = torch.randint(0, 4000, (3, 5), generator=g)
    cos, sin_signed = mrope_cos_sin(pos, 32, 1e6, [4, 6, 6], dtype)       # (N, D) each
    emb = (pos.float()[torch.repeat_interleave(torch.arange(3), torch.tensor([4, 6, 6]))].t()
           * (1.0 / (1e6 ** (torch.arange(0, 32, 2).float() / 32))))
    emb = torch.cat((emb, emb), -1)
    ref = x * emb.cos().to(dtype)[:, None] + rotate_half(x) * emb.sin().to(dtype)[:, None]
    assert torch.equal(apply_rotary(x, cos, sin_signed), ref)
    assert torch.equal(apply_rotary(x, cos[:, None], sin_signed[:, None]), ref)


@pytest.mark.parametrize("glue", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_bits(dtype, glue, monkeypatch):
    monkeypatch.setattr(cpu_ops, "ENABLED", glue)
    g = torch.Generator().manual_seed(1)
    norm = RMSNorm(96, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(96, generator=g))
    norm = norm.to(dtype)
    x = (torch.randn(9, 96, generator=g) * 30).to(dtype)
    xf = x.float()
    ref = norm.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype)
    with torch.inference_mode():
        assert torch.equal(norm(x), ref)
    assert torch.equal(norm(x), ref) and torch.equal(x.float(), xf)          # input untouched (fp32: x is xf)


def test_argmax_rows_is_torch_argmax():
    inf, nan = float("inf"), float("nan")
    rows = torch.tensor([[1., 3., 3., 2.], [nan, 1., nan, 5.], [-inf, -inf, -inf, -inf], [0., 0., 0., 0.],
                         [1., inf, 2., inf]])
    wide = torch.randint(0, 4, (6, 151936), generator=torch.Generator().manual_seed(2)).float()
    for t in (rows, wide, wide[:, ::3]):
        got = argmax_rows(t)
        assert got.dtype == torch.int64 and torch.equal(got, t.argmax(dim=-1))


def test_ban_only_sampling_restores_the_callers_logits():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 50, generator=g)
    logits[0, 7] = logits[1, 3] = logits[2, 9] = 100.0                     # each row's best is banned
    before = logits.clone()
    greedy, hot = SamplingParams(temperature=0), SamplingParams(temperature=1.0, seed=1, logprobs=2)
    banned = [[7, 7], [3, 11], [9]]
    out = Sampler()(logits, SamplingBatch([greedy, greedy, hot], [[1], [2], [3]], [1, 1, 1],
                                         [None, None, torch.Generator().manual_seed(0)], banned_token_ids=banned))
    assert torch.equal(logits, before)
    masked = before.clone()
    for i, ids in enumerate(banned):
        masked[i, ids] = float("-inf")
    assert out.token_ids[:2] == masked[:2].argmax(-1).tolist()
    assert out.token_ids[2] != 9 and out.logprobs[2] == torch.log_softmax(before[2], -1)[out.token_ids[2]].item()
