"""Parity of qvl.model with transformers 4.57 (the reference) on tiny random checkpoints, fp32 on CPU.

Covers M-RoPE positions, rotary tables, vision tower, full logits (text, images, video, interleaved),
the paged-KV attention path (chunked prefill + decode) and greedy generation token for token.
"""
from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch

from qvl.models.qwen2_vl.rope import mrope_positions

IMG, VID, VS, VE = 900, 901, 902, 903


def _build(items, rng):
    """items: int (that many text tokens) or (kind 'i'|'v', grid). -> ids, grids, image grids, video grids."""
    ids, grids, ig, vg = [], [], [], []
    for it in items:
        if isinstance(it, int):
            ids += [rng.randrange(100) for _ in range(it)]
        else:
            kind, g = it
            n = g[0] * g[1] * g[2] // 4
            ids += [VS] + [IMG if kind == "i" else VID] * n + [VE]
            grids.append(g)
            (ig if kind == "i" else vg).append(g)
    return ids, grids, ig, vg


ROPE_CASES = {
    "text_only": [7],
    "one_image": [3, ("i", (1, 4, 6)), 5],
    "two_images": [2, ("i", (1, 4, 4)), 3, ("i", (1, 6, 2)), 4],
    "video": [1, ("v", (3, 4, 4)), 2],
    "long_video": [4, ("v", (10, 4, 4)), 3],
    "interleaved": [3, ("i", (1, 2, 4)), 2, ("v", (10, 4, 4)), 1, ("i", (1, 8, 8)), 6],
    "image_only": [("i", (1, 2, 2))],
}


@pytest.mark.parametrize("case", list(ROPE_CASES))
def test_mrope_positions_match_transformers(case):
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLModel

    ids, grids, ig, vg = _build(ROPE_CASES[case], random.Random(0))
    cfg = SimpleNamespace(vision_config=SimpleNamespace(spatial_merge_size=2), image_token_id=IMG,
                          video_token_id=VID, vision_start_token_id=VS)
    ref, ref_delta = Qwen2VLModel.get_rope_index(
        SimpleNamespace(config=cfg), torch.tensor([ids]),
        torch.tensor(ig) if ig else None, torch.tensor(vg) if vg else None,
    )
    pos, delta = mrope_positions(ids, grids, IMG, VID)
    assert pos.dtype == torch.long and pos.shape == (3, len(ids))
    assert torch.equal(pos, ref[:, 0])
    assert delta == int(ref_delta)


def test_mrope_positions_count_errors():
    ids, grids, _, _ = _build([2, ("i", (1, 4, 4)), 2], random.Random(0))
    with pytest.raises(ValueError, match="needs 8 consecutive pad tokens at index 3, found 4"):
        mrope_positions(ids, [(1, 4, 8)], IMG, VID)
    with pytest.raises(ValueError, match="no vision item"):
        mrope_positions(ids, [], IMG, VID)
    with pytest.raises(ValueError, match="2 vision grids"):
        mrope_positions(ids, grids + [(1, 2, 2)], IMG, VID)
    with pytest.raises(ValueError, match="multiples of spatial_merge_size"):
        mrope_positions(ids, [(1, 3, 4)], IMG, VID)


# ------------------------------------------------------------------------------------ full model parity

def _hf(path, attn="sdpa", dtype=torch.float32):
    from transformers import Qwen2VLForConditionalGeneration as HFModel

    # dtype at load time, never `.to(dtype)` after: that would also round the fp32 rotary inv_freq buffers
    return HFModel.from_pretrained(path, attn_implementation=attn, dtype=dtype).eval()


@pytest.fixture(scope="module")
def pair(tiny_ckpt):
    from qvl.build import load_model

    model, config = load_model(tiny_ckpt)
    return model, config, _hf(tiny_ckpt)


@pytest.fixture(scope="module")
def pair_tied(tiny_ckpt_tied):
    from qvl.build import load_model

    model, config = load_model(tiny_ckpt_tied)
    return model, config, _hf(tiny_ckpt_tied)


# (kind, grid) items and text runs; grids in 14-px patches.
PROMPTS = {
    "text_only": [9],
    "one_image": [4, ("i", (1, 4, 6)), 5],
    "two_images": [3, ("i", (1, 4, 4)), 2, ("i", (1, 6, 8)), 4],
    "video": [2, ("v", (3, 4, 6)), 3],
    "interleaved": [3, ("i", (1, 2, 4)), 2, ("v", (2, 4, 4)), 1, ("i", (1, 6, 4)), 5],
}


def _prompt(config, items, seed=0):
    """-> ids, grids (placeholder order), pixel rows per item, HF kwargs (images and videos split)."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    ids, grids, pixels = [], [], []
    hf = {"pixel_values": [], "image_grid_thw": [], "pixel_values_videos": [], "video_grid_thw": []}
    for it in items:
        if isinstance(it, int):
            ids += [rng.randrange(300) for _ in range(it)]
            continue
        kind, g = it
        pad = config.image_token_id if kind == "i" else config.video_token_id
        ids += [config.vision_start_token_id] + [pad] * (g[0] * g[1] * g[2] // 4) + [config.vision_end_token_id]
        pv = torch.randn(g[0] * g[1] * g[2], config.vision.patch_dim, generator=gen)
        grids.append(g)
        pixels.append(pv)
        pre = "" if kind == "i" else "_videos"
        hf["pixel_values" + pre].append(pv)
        hf[("image" if kind == "i" else "video") + "_grid_thw"].append(g)
    kwargs = {}
    for k in ("pixel_values", "pixel_values_videos"):
        if hf[k]:
            kwargs[k] = torch.cat(hf[k])
    for k in ("image_grid_thw", "video_grid_thw"):
        if hf[k]:
            kwargs[k] = torch.tensor(hf[k])
    return ids, grids, pixels, kwargs


def _qvl_embeds(model, config, ids, grids, pixels):
    ids_t = torch.tensor(ids)
    feats = model.encode_vision(torch.cat(pixels), torch.tensor(grids)) if grids else None
    positions, delta = mrope_positions(ids, grids, config.image_token_id, config.video_token_id)
    return ids_t, model.embed(ids_t, feats), positions, delta


@torch.no_grad()
def _qvl_logits(model, config, ids, grids, pixels):
    ids_t, embeds, positions, _ = _qvl_embeds(model, config, ids, grids, pixels)
    return model.compute_logits(model(ids_t, positions, inputs_embeds=embeds))


@torch.no_grad()
def _hf_logits(hf, ids, kwargs):
    return hf(input_ids=torch.tensor([ids]), **kwargs).logits[0].float()


@pytest.mark.parametrize("case", list(PROMPTS))
def test_logits_match_transformers(pair, case):
    model, config, hf = pair
    ids, grids, pixels, kwargs = _prompt(config, PROMPTS[case])
    ours, ref = _qvl_logits(model, config, ids, grids, pixels), _hf_logits(hf, ids, kwargs)
    assert ours.dtype == torch.float32 and ours.shape == ref.shape == (len(ids), config.vocab_size)
    assert (ours - ref).abs().max().item() <= 1e-4
    assert ref.std().item() > 0.1  # the comparison is not between flat logits


def test_logits_match_transformers_eager_and_tied(pair_tied, tiny_ckpt_tied):
    model, config, hf_sdpa = pair_tied
    assert config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    ids, grids, pixels, kwargs = _prompt(config, PROMPTS["interleaved"], seed=3)
    ours = _qvl_logits(model, config, ids, grids, pixels)
    for hf in (hf_sdpa, _hf(tiny_ckpt_tied, attn="eager")):
        assert (ours - _hf_logits(hf, ids, kwargs)).abs().max().item() <= 1e-4


def test_vision_features_match_transformers(pair):
    model, config, hf = pair
    gen = torch.Generator().manual_seed(1)
    grids = torch.tensor([[1, 4, 6], [3, 2, 4], [1, 4, 6], [1, 8, 2]])
    pv = torch.randn(int(grids.prod(-1).sum()), 1176, generator=gen)
    with torch.no_grad():
        ours = model.encode_vision(pv, grids)
        ref = hf.model.visual(pv, grid_thw=grids)
    assert ours.shape == (int(grids.prod(-1).sum()) // 4, config.hidden_size)
    assert (ours - ref).abs().max().item() <= 1e-5


def test_embed_count_mismatch(pair):
    model, config, _ = pair
    ids, grids, pixels, _ = _prompt(config, PROMPTS["one_image"])
    feats = model.encode_vision(torch.cat(pixels), torch.tensor(grids))
    with pytest.raises(ValueError, match=r"6 image/video pad tokens in input_ids but 5 vision embeddings"):
        model.embed(torch.tensor(ids), feats[:5])
    with pytest.raises(ValueError, match=r"6 image/video pad tokens in input_ids but 0 vision embeddings"):
        model.embed(torch.tensor(ids), None)


# --------------------------------------------------------------------------------- paged KV attention

class PagedCache:
    """A minimal stand-in for the runner: per-layer caches and shuffled (non-contiguous) block tables.
    Unwritten slots hold NaN (as recycled memory may); only the reserved last block is zeroed."""

    def __init__(self, model, config, num_blocks=64, block_size=4, seed=0):
        self.block_size = block_size
        shape = (num_blocks + 1, block_size, config.num_key_value_heads, config.head_dim)
        for attn in model.attention_modules():
            attn.k_cache = torch.full(shape, float("nan"))
            attn.v_cache = torch.full(shape, float("nan"))
            attn.k_cache[-1] = attn.v_cache[-1] = 0
        self.free = list(range(num_blocks))
        random.Random(seed).shuffle(self.free)
        self.tables: dict[int, list[int]] = {}
        self.lens: dict[int, int] = {}

    def step(self, chunks: dict[int, int]):
        """chunks: {seq: new tokens}. Allocate blocks, -> AttentionMetadata."""
        from qvl.layers.attention import AttentionMetadata

        slots, seq_q, ctx, tables = [], [], [], []
        for s, n in chunks.items():
            start = self.lens.get(s, 0)
            table = self.tables.setdefault(s, [])
            while len(table) * self.block_size < start + n:
                table.append(self.free.pop())
            slots += [table[p // self.block_size] * self.block_size + p % self.block_size
                      for p in range(start, start + n)]
            self.lens[s] = start + n
            seq_q.append(n)
            ctx.append(start + n)
            tables.append(list(table))
        return AttentionMetadata(seq_q, ctx, torch.tensor(slots), tables)

    @staticmethod
    def detach(model):
        for attn in model.attention_modules():
            attn.k_cache = attn.v_cache = None


@torch.no_grad()
def test_paged_chunked_prefill_and_batched_decode_match_no_cache(pair):
    """Two sequences (with vision) in one flat batch: chunked prefill, mixed prefill/decode steps, decodes."""
    model, config, _ = pair
    seqs = []
    for case, seed in (("interleaved", 0), ("two_images", 1)):
        ids, grids, pixels, _ = _prompt(config, PROMPTS[case], seed=seed)
        ids_t, embeds, positions, delta = _qvl_embeds(model, config, ids, grids, pixels)
        extra = [random.Random(seed).randrange(300) for _ in range(5)]  # decode tokens
        all_ids = torch.tensor(ids + extra)
        n = len(ids)
        dec_pos = torch.arange(n, n + 5).view(1, -1).expand(3, -1) + delta
        all_embeds = torch.cat([embeds, model.embed(torch.tensor(extra))])
        all_pos = torch.cat([positions, dec_pos], dim=1)
        ref = model.compute_logits(model(all_ids, all_pos, inputs_embeds=all_embeds))
        seqs.append((all_ids, all_embeds, all_pos, ref, n))

    cache = PagedCache(model, config)
    try:
        n0, n1 = seqs[0][4], seqs[1][4]
        schedule = [
            {0: n0 // 2},                                   # seq 0 prefill chunk 1
            {0: n0 - n0 // 2, 1: 7},                         # seq 0 chunk 2 + seq 1 chunk 1
            {0: 1, 1: n1 - 7},                               # seq 0 decodes while seq 1 finishes prefill
            {0: 1, 1: 1}, {1: 1, 0: 1}, {0: 1, 1: 1}, {0: 1, 1: 1}, {1: 1},
        ]
        done = {0: 0, 1: 0}
        for step in schedule:
            meta = cache.step(step)
            sl = [(s, slice(done[s], done[s] + k)) for s, k in step.items()]
            embeds = torch.cat([seqs[s][1][r] for s, r in sl])
            positions = torch.cat([seqs[s][2][:, r] for s, r in sl], dim=1)
            ids = torch.cat([seqs[s][0][r] for s, r in sl])
            logits = model.compute_logits(model(ids, positions, meta, inputs_embeds=embeds))
            ref = torch.cat([seqs[s][3][r] for s, r in sl])
            assert (logits - ref).abs().max().item() <= 1e-4, step
            for s, k in step.items():
                done[s] += k
        assert done == {0: len(seqs[0][0]), 1: len(seqs[1][0])}
    finally:
        PagedCache.detach(model)


@torch.no_grad()
def test_multi_sequence_no_cache_matches_alone(pair):
    from qvl.layers.attention import AttentionMetadata

    model, config, _ = pair
    a, b = torch.arange(3, 12), torch.arange(40, 46)
    pa, pb = torch.arange(9).expand(3, -1), torch.arange(6).expand(3, -1)
    meta = AttentionMetadata([9, 6], [9, 6])
    both = model(torch.cat([a, b]), torch.cat([pa, pb], 1), meta)
    assert torch.allclose(both, torch.cat([model(a, pa), model(b, pb)]), atol=1e-5)
    with pytest.raises(ValueError, match="context_lens=10 > seq_lens_q=9"):
        model(torch.cat([a, b]), torch.cat([pa, pb], 1), AttentionMetadata([9, 6], [10, 6]))


@torch.no_grad()
@pytest.mark.parametrize("case", ["one_image", "text_only"])
def test_greedy_generation_matches_transformers(pair, case):
    model, config, hf = pair
    ids, grids, pixels, kwargs = _prompt(config, PROMPTS[case], seed=5)
    n_new = 32
    ref = hf.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                      do_sample=False, max_new_tokens=n_new, eos_token_id=None,
                      pad_token_id=0, **kwargs)[0, len(ids):].tolist()
    ids_t, embeds, positions, delta = _qvl_embeds(model, config, ids, grids, pixels)
    cache = PagedCache(model, config, seed=2)
    try:
        out = []
        meta = cache.step({0: len(ids)})
        hidden = model(ids_t, positions, meta, inputs_embeds=embeds)
        tok = int(model.compute_logits(hidden[-1:]).argmax(-1))
        while True:
            out.append(tok)
            if len(out) == n_new:
                break
            pos = torch.full((3, 1), len(ids) + len(out) - 1 + delta)
            hidden = model(torch.tensor([tok]), pos, cache.step({0: 1}))
            tok = int(model.compute_logits(hidden).argmax(-1))
    finally:
        PagedCache.detach(model)
    assert out == ref
    assert len(set(out)) > 3  # not a degenerate repetition of one token


# ------------------------------------------------------------------- CUDA (skipped where there is none)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(scope="module")
def cuda_bf16(tiny_ckpt):
    from qvl.build import load_model

    model, config = load_model(tiny_ckpt, dtype=torch.bfloat16, device="cuda")
    hf = _hf(tiny_ckpt, dtype=torch.bfloat16).to("cuda")
    return model, config, hf


@cuda
@torch.no_grad()
def test_cuda_bf16_logits_and_greedy_match_transformers(cuda_bf16):
    """bf16 on CUDA: logits close to transformers', and transformers' greedy tokens reproduced step by step
    through the paged cache (teacher-forced). bf16 logits tie often on a 448-token random model, so a step
    may pick the other token of an exact tie, never a token that is clearly worse."""
    model, config, hf = cuda_bf16
    ids, grids, pixels, kwargs = _prompt(config, PROMPTS["interleaved"], seed=7)
    kwargs = {k: v.cuda() for k, v in kwargs.items()}
    pixels = [p.cuda() for p in pixels]
    ours = _qvl_logits(model, config, ids, grids, pixels)
    ref = hf(input_ids=torch.tensor([ids], device="cuda"), **kwargs).logits[0].float()
    assert ours.device.type == "cuda" and torch.isfinite(ours).all()
    assert (ours - ref).abs().max().item() <= 0.05 * ref.abs().max().item()

    n_new = 24
    gen = hf.generate(input_ids=torch.tensor([ids], device="cuda"), do_sample=False, max_new_tokens=n_new,
                      eos_token_id=None, pad_token_id=0, output_logits=True, return_dict_in_generate=True,
                      **kwargs)
    tokens = gen.sequences[0, len(ids):].tolist()
    hf_logits = torch.stack(gen.logits)[:, 0].float()  # (n_new, V)
    ids_t, embeds, positions, delta = _qvl_embeds(model, config, ids, grids, pixels)
    cache = PagedCache(model, config, seed=2)
    for attn in model.attention_modules():
        attn.k_cache = attn.k_cache.to("cuda", torch.bfloat16)
        attn.v_cache = attn.v_cache.to("cuda", torch.bfloat16)
    try:
        steps = [model.compute_logits(model(ids_t, positions, cache.step({0: len(ids)}), inputs_embeds=embeds)[-1])]
        for i, tok in enumerate(tokens[:-1]):
            pos = torch.full((3, 1), len(ids) + i + delta)
            steps.append(model.compute_logits(model(torch.tensor([tok], device="cuda"), pos, cache.step({0: 1})))[0])
    finally:
        PagedCache.detach(model)
    ours = torch.stack(steps)  # (n_new, V)
    picks = ours.argmax(-1)
    same = picks == torch.tensor(tokens, device="cuda")
    # where we differ, transformers' own logits rank our pick (within bf16 rounding) as good as its token
    gap = hf_logits.max(-1).values - hf_logits.gather(1, picks[:, None])[:, 0]
    assert bool((same | (gap <= 1e-2 * hf_logits.abs().max())).all()), (picks.tolist(), tokens, gap.tolist())
    assert same.float().mean().item() >= 0.75


@cuda
@torch.no_grad()
def test_cuda_fp32_matches_cpu(pair, tiny_ckpt):
    from qvl.build import load_model

    model_cpu, config, _ = pair
    model, _ = load_model(tiny_ckpt, device="cuda")
    ids, grids, pixels, _ = _prompt(config, PROMPTS["interleaved"], seed=8)
    ref = _qvl_logits(model_cpu, config, ids, grids, pixels)
    got = _qvl_logits(model, config, ids, grids, [p.cuda() for p in pixels]).cpu()
    assert (got - ref).abs().max().item() <= 1e-3  # TF32-free fp32; kernels differ only in summation order
