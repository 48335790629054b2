"""The Triton kernels of qvl.layers.attention_paged against dense references written here: per sequence, its
context gathered through its block table and fp32 SDPA with the causal offset; per segment SDPA for
varlen_attention. Also the backend's cache write, its refusals, and the vision towers' CUDA branch against
their SDPA groups.

Without CUDA (the normal case) the kernels run on CPU tensors through Triton's interpreter; with CUDA they
run compiled on the GPU, so the same file is the GPU check (`pytest tests/test_attention_paged.py`)."""
from __future__ import annotations

import importlib
import os
import types

import pytest
import torch
import torch.nn.functional as F

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":  # read when a kernel is decorated, so before attention_paged is imported
    os.environ["TRITON_INTERPRET"] = "1"

pytest.importorskip("triton")
import qvl.layers.attention_paged as ap  # noqa: E402

if DEVICE == "cpu" and not ap._INTERPRETED:     # imported (compiled) before this module set the variable
    ap = importlib.reload(ap)
assert DEVICE == "cuda" or ap._INTERPRETED

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
       torch.float16: dict(atol=4e-3, rtol=4e-3)}


def dense_reference(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale):
    """fp32 (N, nH, D) on the CPU: each sequence's context gathered through its table, causal SDPA with the
    offset."""
    q, k_cache, v_cache, block_tables, query_start_loc, seq_lens = (
        t.cpu() for t in (q, k_cache, v_cache, block_tables, query_start_loc, seq_lens))
    out = torch.full(q.shape, float("nan"))
    bs, g = k_cache.shape[1], q.shape[1] // k_cache.shape[2]
    flat_k, flat_v = k_cache.flatten(0, 1).float(), v_cache.flatten(0, 1).float()  # (blocks*bs, nKV, D)
    for b, length in enumerate(seq_lens.tolist()):
        a, e = query_start_loc[b].item(), query_start_loc[b + 1].item()
        pos = torch.arange(length)
        slots = block_tables[b, pos // bs].long() * bs + pos % bs                      # (L,)
        k = flat_k[slots].repeat_interleave(g, 1).transpose(0, 1)                      # (nH, L, D)
        v = flat_v[slots].repeat_interleave(g, 1).transpose(0, 1)
        mask = pos[None, :] <= torch.arange(length - (e - a), length)[:, None]         # (lq, L)
        out[a:e] = F.scaled_dot_product_attention(q[a:e].float().transpose(0, 1), k, v, attn_mask=mask,
                                                  scale=scale).transpose(0, 1)
    return out


def make_batch(seqs, *, nh, nkv, d, block_size, dtype, width=None, seed=0):
    """Caches full of NaN except the slots the sequences own; block tables with owned blocks in random
    order and random (valid, possibly foreign) block ids past each sequence's need.
    seqs: [(seq_len, lq)]. Returns q and the paged_attention keyword arguments."""
    gen = torch.Generator().manual_seed(seed)
    needs = [-(-length // block_size) for length, _ in seqs]
    width = width or max(needs)
    num_blocks = sum(needs) + 3                     # three blocks nobody owns
    owned = torch.randperm(num_blocks, generator=gen)[:sum(needs)].int()
    tables = torch.randint(0, num_blocks, (len(seqs), width), generator=gen, dtype=torch.int32)
    k_cache = torch.full((num_blocks, block_size, nkv, d), float("nan"), dtype=dtype)
    v_cache = torch.full_like(k_cache, float("nan"))
    first = 0
    for b, ((length, _), need) in enumerate(zip(seqs, needs)):
        tables[b, :need] = owned[first:first + need]
        first += need
        pos = torch.arange(length)
        blk, off = tables[b, pos // block_size].long(), pos % block_size
        k_cache[blk, off] = torch.randn(length, nkv, d, generator=gen).to(dtype)
        v_cache[blk, off] = torch.randn(length, nkv, d, generator=gen).to(dtype)
    lqs = [lq for _, lq in seqs]
    qsl = torch.tensor([0] + lqs, dtype=torch.int32).cumsum(0).int()
    q = torch.randn(sum(lqs), nh, d, generator=gen).to(dtype)
    kw = dict(block_tables=tables.to(DEVICE), query_start_loc=qsl.to(DEVICE),
              seq_lens=torch.tensor([s for s, _ in seqs]).int().to(DEVICE), max_query_len=max(lqs),
              scale=d ** -0.5)
    return q.to(DEVICE), k_cache.to(DEVICE), v_cache.to(DEVICE), kw


def mixed(bs):
    """Decode, a one-token context, contexts on and one past a block boundary, a prefill chunk over cached
    context, fresh prompts."""
    return [(1, 1), (2 * bs, 1), (2 * bs + 1, 1), (3 * bs + 2, 5), (7, 7), (bs, bs), (bs + 1, 2)]


def check(q, k_cache, v_cache, kw, out):
    ref = dense_reference(q, k_cache, v_cache, kw["block_tables"], kw["query_start_loc"], kw["seq_lens"],
                          kw["scale"])
    assert out.dtype == q.dtype and out.shape == q.shape
    assert out.device == q.device and not out.isnan().any()
    torch.testing.assert_close(out.float().cpu(), ref, **TOL[q.dtype])


@pytest.mark.parametrize("nh, nkv, d, block_size, dtype", [
    (4, 4, 32, 4, torch.float32),       # MHA
    (4, 2, 16, 1, torch.float32),       # GQA 2, one-token blocks
    (14, 2, 128, 16, torch.float32),    # GQA 7, Qwen2-VL-2B's heads
    (14, 2, 80, 4, torch.float32),      # head_dim 80: a padded D block
    (14, 2, 128, 4, torch.bfloat16),
    (4, 2, 80, 16, torch.bfloat16),
    (6, 2, 64, 4, torch.float16),
])
def test_prefill_and_decode_mix_matches_dense(nh, nkv, d, block_size, dtype):
    q, kc, vc, kw = make_batch(mixed(block_size), nh=nh, nkv=nkv, d=d, block_size=block_size, dtype=dtype)
    check(q, kc, vc, kw, ap.paged_attention(q, kc, vc, **kw))


@pytest.mark.parametrize("nh, nkv, d, block_size, dtype", [
    (2, 2, 16, 1, torch.float32), (14, 2, 128, 16, torch.float32), (14, 2, 80, 4, torch.bfloat16),
    (8, 1, 64, 16, torch.bfloat16)])
def test_decode_matches_dense(nh, nkv, d, block_size, dtype):
    """max_query_len 1: the decode tiling. Tables 320 positions wide make the heuristic split the context
    (splits past every context are empty and must merge to nothing)."""
    seqs = [(1, 1), (block_size, 1), (block_size + 1, 1), (3 * block_size + 5, 1), (40, 1)]
    q, kc, vc, kw = make_batch(seqs, nh=nh, nkv=nkv, d=d, block_size=block_size, dtype=dtype,
                               width=320 // block_size)
    assert ap._num_splits(q.device, len(seqs) * nkv, 320, 1) > 1
    assert ap._num_splits(q.device, 1000, 320, 1) == ap._num_splits(q.device, 10, 320, 4) == 1
    check(q, kc, vc, kw, ap.paged_attention(q, kc, vc, **kw))


@pytest.mark.parametrize("decode", [True, False])
@pytest.mark.parametrize("splits", [3, 4])
def test_forced_splits_match_dense(decode, splits):
    """Split-K with several non-empty splits per sequence, merged by _merge_kernel; also under the
    prefill tiling (the kernel allows it though the heuristic never asks)."""
    seqs = [(100, 1), (1, 1), (64, 1), (97, 1)] if decode else [(100, 9), (1, 1), (64, 64), (97, 1)]
    q, kc, vc, kw = make_batch(seqs, nh=6, nkv=2, d=32, block_size=4, dtype=torch.float32, seed=splits)
    g = 3
    block_q, block_h = (1, 16) if decode else (16, 4)
    out = torch.empty_like(q)
    ap._launch_paged(q, kc, vc, out, kw["block_tables"], kw["query_start_loc"], kw["seq_lens"], kw["scale"],
                     block_q=block_q, block_h=block_h, splits=splits)
    assert block_h >= g
    check(q, kc, vc, kw, out)


def test_non_contiguous_queries():
    """q as a strided view (a slice of a fused qkv projection)."""
    q, kc, vc, kw = make_batch(mixed(4), nh=4, nkv=2, d=32, block_size=4, dtype=torch.float32)
    fused = torch.cat([q, torch.randn_like(q)], dim=1)  # (N, 2*nH, D)
    view = fused[:, :4]
    assert not view.is_contiguous()
    check(q, kc, vc, kw, ap.paged_attention(view, kc, vc, **kw))


@pytest.mark.parametrize("d, dtype", [(80, torch.float32), (16, torch.float32), (128, torch.bfloat16)])
def test_varlen_matches_per_segment_sdpa(d, dtype):
    lengths = [5, 1, 70, 14, 1]             # unequal, 1-row segments, one longer than a 64-row query tile
    gen = torch.Generator().manual_seed(d)
    x = torch.randn(sum(lengths), 3, 3, d, generator=gen).to(dtype)
    q, k, v = x.to(DEVICE).unbind(1)        # (S, nH, D) strided views, as the vision tower's qkv split
    cu = torch.tensor([0] + lengths).cumsum(0).int()
    out = ap.varlen_attention(q, k, v, cu_seqlens=cu.to(DEVICE), max_seqlen=max(lengths), scale=d ** -0.5)
    ref = torch.cat([F.scaled_dot_product_attention(*(t[a:b].float().transpose(0, 1) for t in x.unbind(1)))
                     .transpose(0, 1) for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())])
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out.float().cpu(), ref, **TOL[dtype])


def test_backend_writes_slots_then_attends():
    seqs = mixed(4)
    q, kc, vc, kw = make_batch(seqs, nh=4, nkv=2, d=16, block_size=4, dtype=torch.float32)
    k_new, v_new = torch.randn(q.shape[0], 2, 16, device=DEVICE), torch.randn(q.shape[0], 2, 16, device=DEVICE)
    slots = []                              # this step's rows: the last lq positions of each context
    for b, (length, lq) in enumerate(seqs):
        pos = torch.arange(length - lq, length, device=DEVICE)
        slots.append(kw["block_tables"][b, pos // 4].long() * 4 + pos % 4)
    slots = torch.cat(slots)
    untouched = torch.ones(kc.shape[0] * 4, dtype=torch.bool, device=DEVICE)
    untouched[slots] = False
    before_k = kc.flatten(0, 1)[untouched].clone()
    meta = types.SimpleNamespace(slot_mapping=slots, block_tables=kw["block_tables"],
                                 query_start_loc=kw["query_start_loc"], seq_lens=kw["seq_lens"],
                                 max_query_len=kw["max_query_len"])
    out = ap.PagedAttentionBackend().forward(q, k_new, v_new, scale=kw["scale"], metadata=meta,
                                             k_cache=kc, v_cache=vc)
    assert ap.PagedAttentionBackend.name == "paged"
    torch.testing.assert_close(kc.flatten(0, 1)[slots], k_new, rtol=0, atol=0)
    torch.testing.assert_close(vc.flatten(0, 1)[slots], v_new, rtol=0, atol=0)
    torch.testing.assert_close(kc.flatten(0, 1)[untouched], before_k, rtol=0, atol=0, equal_nan=True)
    check(q, kc, vc, kw, out)


def test_backend_refuses_missing_metadata_or_cache():
    q, kc, vc, kw = make_batch([(3, 3)], nh=2, nkv=1, d=16, block_size=4, dtype=torch.float32)
    meta = types.SimpleNamespace(slot_mapping=torch.arange(3, device=DEVICE), **kw)
    backend = ap.PagedAttentionBackend()
    k = torch.randn(3, 1, 16, device=DEVICE)
    with pytest.raises(ValueError, match="metadata"):
        backend.forward(q, k, k, scale=0.25, metadata=None, k_cache=kc, v_cache=vc)
    with pytest.raises(ValueError, match="k_cache"):
        backend.forward(q, k, k, scale=0.25, metadata=meta, k_cache=None, v_cache=vc)
    with pytest.raises(ValueError, match="v_cache"):
        backend.forward(q, k, k, scale=0.25, metadata=meta, k_cache=kc, v_cache=None)


def test_bad_inputs_name_the_item():
    q, kc, vc, kw = make_batch([(5, 2)], nh=4, nkv=2, d=16, block_size=4, dtype=torch.float32)
    with pytest.raises(ValueError, match="k_cache has dtype"):
        ap.paged_attention(q, kc.bfloat16(), vc, **kw)
    with pytest.raises(ValueError, match="head_dim 16"):
        ap.paged_attention(q, kc[..., :8], vc[..., :8], **kw)
    with pytest.raises(ValueError, match="power of two"):
        ap.paged_attention(q, kc[:, :3], vc[:, :3], **kw)
    with pytest.raises(ValueError, match="seq_lens"):
        ap.paged_attention(q, kc, vc, **{**kw, "seq_lens": kw["seq_lens"].float()})
    with pytest.raises(ValueError, match="max_query_len 3"):
        ap.paged_attention(q, kc, vc, **{**kw, "max_query_len": 3})
    with pytest.raises(ValueError, match="k has shape"):
        ap.varlen_attention(q, q[:1], q, cu_seqlens=torch.tensor([0, 2], device=DEVICE).int(), max_seqlen=2,
                            scale=1.0)


def _tower(family):
    if family == "qwen2_vl":
        from qvl.models.qwen2_vl.config import VisionConfig
        from qvl.models.qwen2_vl.vision import VisionTransformer
        cfg = VisionConfig(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2)
    elif family == "qwen2_5_vl":
        from qvl.models.qwen2_5_vl.config import VisionConfig
        from qvl.models.qwen2_5_vl.vision import VisionTransformer
        cfg = VisionConfig(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64,
                           fullatt_block_indexes=[1])
    else:
        from qvl.models.qwen3_vl.config import VisionConfig
        from qvl.models.qwen3_vl.vision import VisionTransformer
        cfg = VisionConfig.from_dict({
            "model_type": "qwen3_vl", "depth": 2, "hidden_size": 32, "intermediate_size": 48, "num_heads": 2,
            "hidden_act": "gelu_pytorch_tanh", "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
            "out_hidden_size": 64, "num_position_embeddings": 64, "deepstack_visual_indexes": [0]})
    torch.manual_seed(0)
    return VisionTransformer(cfg).eval().to(DEVICE), cfg


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_vision_varlen_path_matches_sdpa_groups(family, monkeypatch):
    """The towers' CUDA branch (one varlen_attention over all frames / windows; forced on a CPU tensor)
    equals their SDPA groups (all three families' blocks use Qwen2-VL's VisionAttention)."""
    from qvl.models.qwen2_vl import vision
    tower, cfg = _tower(family)
    grid = torch.tensor([[1, 12, 20], [2, 4, 4], [1, 8, 8]])     # windows partial at the edges; a video
    n = int(grid.prod(1).sum())
    pixels = torch.randn(n, 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        monkeypatch.setattr(vision, "_varlen_for", lambda x: None)
        expected = tower(pixels, grid)
        calls = []

        def varlen(*a, **kw):
            calls.append(kw["cu_seqlens"].tolist())
            return ap.varlen_attention(*a, **kw)
        monkeypatch.setattr(vision, "_varlen_for", lambda x: varlen)
        got = tower(pixels, grid)
    assert len(calls) == cfg.depth and calls[0][-1] == n
    for a, b in zip(*(o if isinstance(o, tuple) else (o,) for o in (got, expected))):   # + DeepStack
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_query_tiles_across_many_sequences():
    """Chunks of lengths around the 8-query tile of GQA 8 (tile map found by binary search), and decodes."""
    lqs = [1, 17, 8, 9, 1, 16, 3, 24, 1, 7]
    seqs = [(lq + extra, lq) for lq, extra in zip(lqs, [0, 5, 0, 30, 12, 1, 0, 8, 1, 3])]
    q, kc, vc, kw = make_batch(seqs, nh=8, nkv=1, d=16, block_size=4, dtype=torch.float32, seed=7)
    assert ap._query_tile(8, decode=False) == (8, 8)
    check(q, kc, vc, kw, ap.paged_attention(q, kc, vc, **kw))
