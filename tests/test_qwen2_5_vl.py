"""Qwen2.5-VL family: parity with transformers 4.57 `Qwen2_5_VLForConditionalGeneration` on tiny random
checkpoints (fp32, CPU) in both key layouts, window order, absolute-time M-RoPE, engine invariants, and the
registry's refusal of unsupported model types.

Pixels come from qvl's own preprocessing (PromptProcessor -> process_image / process_video); the same
pixel_values, grids and second_per_grid_ts are fed to transformers. transformers 4.57 casts
second_per_grid_t to int64 before multiplying (fps 4 -> 0.5 -> 0); qvl multiplies in float (QWEN2VL_SPEC
8.4), so for fps 4 the positions are checked against hand-computed values and transformers gets qvl's
position_ids explicitly.
"""
from __future__ import annotations

import json
import random
from types import SimpleNamespace

import pytest
import torch
from tiny import IMG, VID, chat, greedy_tokens, hf_media_kwargs, image, tiny_engine

from qvl.models.qwen2_5_vl import processing
from qvl.models.qwen2_5_vl.vision import window_order

N_NEW = 32


def video(seed: int, fps: float, frames: int = 6, h: int = 112, w: int = 168) -> dict:
    return {"video": [image(seed + i, h, w) for i in range(frames)], "fps": fps,
            "resized_height": h, "resized_width": w}


# Images of 252x392 px -> grid (1, 18, 28), merged 9x14: 3x4 windows of 4x4, the last row and column
# partial. 140x84 -> merged 5x3 (2x1 windows, partial). Videos: 6 frames of 112x168 -> grid (3, 8, 12).
CASES = {
    "text_only": ("Describe the weather in words.", {}),
    "one_image": (IMG + "Describe this image.", {"image": [image(0, 252, 392)]}),
    "two_images": (IMG + "and" + IMG + "How many shapes are there?",
                   {"image": [image(1, 252, 392), image(2, 140, 84)]}),
    "video_fps1": (VID + "What happens?", {"video": [video(3, fps=1)]}),
    "video_fps4": (VID + "What happens?", {"video": [video(4, fps=4)]}),
    "image_video": (IMG + "then" + VID + "and" + IMG + "Compare.",
                    {"image": [image(5, 140, 84), image(6, 252, 392)], "video": [video(7, fps=2)]}),
}


def _hf_inputs(p) -> dict:
    """transformers kwargs for a ProcessedPrompt: images and videos split, second_per_grid_ts per video."""
    kw = hf_media_kwargs(p)
    videos = [it for it in p.items if it.kind == "video"]
    if videos:
        kw["second_per_grid_ts"] = torch.tensor([2 / it.sample_fps for it in videos])
    return kw


def _int_time(p) -> bool:
    """True when every video's second_per_grid_t is an integer (transformers' int cast does not bite)."""
    return all(float(2 / it.sample_fps).is_integer() for it in p.items if it.kind == "video")


# ----------------------------------------------------------------------------------- config, weights

def test_config_reads_checkpoint_values(tiny_qwen2_5_vl_ckpt, tiny_qwen2_5_vl_ckpt_nested):
    from qvl.models import load_config
    from qvl.models.qwen2_5_vl.config import ModelConfig, VisionConfig

    for path, tied in ((tiny_qwen2_5_vl_ckpt, False), (tiny_qwen2_5_vl_ckpt_nested, True)):
        family, c = load_config(path)
        assert family.MODEL_TYPE == "qwen2_5_vl" and family.DISPLAY_NAME == "Qwen2.5-VL"
        v = c.vision
        assert (c.hidden_size, c.tie_word_embeddings, c.mrope_section) == (64, tied, [2, 3, 3])
        assert (v.embed_dim, v.head_dim, v.out_hidden_size, v.intermediate_size, v.patch_dim) == (32, 16, 64, 48, 1176)
        assert (v.window_size, v.merged_window, v.fullatt_block_indexes, v.tokens_per_second) == (112, 4, [1], 2)
    # missing fields take transformers' class defaults, not the hub's
    v = VisionConfig.from_dict({"hidden_size": 1280, "in_channels": 3, "out_hidden_size": 3584})
    assert (v.tokens_per_second, v.depth, v.intermediate_size) == (4, 32, 3420)
    assert v.fullatt_block_indexes == [7, 15, 23, 31]
    with pytest.raises(ValueError, match="out_hidden_size=3584 .* must equal hidden_size=64"):
        ModelConfig.from_dict({"model_type": "qwen2_5_vl", "hidden_size": 64, "intermediate_size": 8,
                               "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 4,
                               "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
                               "vision_config": {"hidden_size": 32, "num_heads": 2}})
    with pytest.raises(ValueError, match="fullatt_block_indexes \\[5\\]"):
        VisionConfig(depth=4, hidden_size=32, num_heads=2, fullatt_block_indexes=[1, 5])
    with pytest.raises(ValueError, match="not a VisionConfig vision tower"):
        VisionConfig.from_dict({"model_type": "qwen2_vl"})


@pytest.mark.parametrize("model_type", ["qwen2", "llava", None])
def test_unsupported_model_type_is_refused(tmp_path, model_type):
    from qvl.build import load_model
    from qvl.models import family_for

    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type, "hidden_size": 8}))
    for call in (lambda: load_model(tmp_path), lambda: family_for(model_type)):
        with pytest.raises(ValueError, match=rf"model_type={model_type!r} is not supported; qvl runs "
                                             r"'qwen2_5_vl', 'qwen2_vl'"):
            call()


# ------------------------------------------------------------------------------------ rope and windows

def _rope_prompt(spec, rng):
    """spec: int (text tokens) or (kind, grid, fps) -> ids, items, HF grids and second_per_grid_ts."""
    ids, items, ig, vg, spg = [], [], [], [], []
    for it in spec:
        if isinstance(it, int):
            ids += [rng.randrange(100) for _ in range(it)]
            continue
        kind, g, fps = it
        ids += [902] + [900 if kind == "image" else 901] * (g[0] * g[1] * g[2] // 4) + [903]
        items.append(SimpleNamespace(kind=kind, grid_thw=g, sample_fps=fps))
        if kind == "image":
            ig.append(g)
        else:
            vg.append(g)
            spg.append(2 / fps)
    return ids, items, ig, vg, spg


def _rope_config(tokens_per_second=2):
    v = SimpleNamespace(spatial_merge_size=2, temporal_patch_size=2, tokens_per_second=tokens_per_second)
    return SimpleNamespace(vision=v, vision_config=v, image_token_id=900, video_token_id=901,
                           vision_start_token_id=902)


ROPE_CASES = {
    "text_only": [7],
    "one_image": [3, ("image", (1, 4, 6), None), 5],
    "video_fps1": [2, ("video", (5, 4, 4), 1.0), 3],
    "video_fps2": [4, ("video", (10, 4, 4), 2.0), 3],
    "video_fps_half": [1, ("video", (3, 2, 6), 0.5), 2],
    "interleaved": [3, ("image", (1, 2, 4), None), 2, ("video", (4, 4, 4), 1.0), 1, ("image", (1, 8, 8), None),
                    2, ("video", (2, 6, 4), 2.0), 6],
    "image_only": [("image", (1, 2, 2), None)],
}


@pytest.mark.parametrize("tps", [2, 25])
@pytest.mark.parametrize("case", list(ROPE_CASES))
def test_rope_index_matches_transformers(case, tps):
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel

    ids, items, ig, vg, spg = _rope_prompt(ROPE_CASES[case], random.Random(0))
    cfg = _rope_config(tps)
    ref, ref_delta = Qwen2_5_VLModel.get_rope_index(
        SimpleNamespace(config=cfg), torch.tensor([ids]), torch.tensor(ig) if ig else None,
        torch.tensor(vg) if vg else None, second_per_grid_ts=torch.tensor(spg) if spg else None)
    pos, delta = processing.rope_index(ids, items, cfg)
    assert pos.dtype == torch.long and pos.shape == (3, len(ids))
    assert torch.equal(pos, ref[:, 0]) and delta == int(ref_delta)


def test_rope_index_fractional_seconds_per_grid_float_rule():
    """fps 4 (0.5 s per grid) and fps 3 (2/3 s): floor(k * s * tokens_per_second) in fp32, by hand."""
    cfg = _rope_config(2)
    ids, items, *_ = _rope_prompt([2, ("video", (3, 4, 4), 4.0), 3], random.Random(0))
    pos, delta = processing.rope_index(ids, items, cfg)
    # text 0, 1; vision_start 2; the 12 video tokens start at cur = 3; 0.5 s * 2 tok/s = 1 step per grid
    assert pos[:, :3].tolist() == [[0, 1, 2]] * 3
    assert pos[:, 3:15].tolist() == [[3 + k for k in (0, 1, 2) for _ in range(4)],
                                     [3 + i for _ in range(3) for i in (0, 0, 1, 1)],
                                     [3 + j for _ in range(3) for j in (0, 1, 0, 1)]]
    # vision_end and the text after it start at the video's max (5) + 1; transformers 4.57 would give
    # temporal 3, 3, 3 (0.5 cast to 0) and continue at 5 as well, so only the t stream differs
    assert pos[:, 15:].tolist() == [[6, 7, 8, 9]] * 3 and delta == 10 - len(ids)
    ids, items, *_ = _rope_prompt([("video", (4, 2, 2), 3.0)], random.Random(0))
    pos, _ = processing.rope_index(ids, items, cfg)
    assert pos[0, 1:5].tolist() == [1 + v for v in (0, 1, 2, 4)]   # 2/3 s * 2: 0, 1.33, 2.67, 4.0


def test_window_order_by_hand_and_against_transformers():
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    # merged 6x5 -> windows 4x4 (16 tokens), 4x1 (4), 2x4 (8), 2x1 (2); rows = 4 per merged token
    order, lengths = window_order(torch.tensor([[1, 12, 10]]), window=4, merge=2)
    assert lengths == [64, 16, 32, 8]
    assert order[:20].tolist() == [0, 1, 2, 3, 5, 6, 7, 8, 10, 11, 12, 13, 15, 16, 17, 18, 4, 9, 14, 19]
    assert sorted(order.tolist()) == list(range(30))
    hf_self = SimpleNamespace(window_size=112, spatial_merge_size=2, patch_size=14, spatial_merge_unit=4)
    grids = torch.tensor([[1, 12, 10], [3, 8, 16], [1, 2, 2], [2, 18, 28], [1, 16, 8], [1, 6, 34]])
    ref_index, ref_cu = Qwen2_5_VisionTransformerPretrainedModel.get_window_index(hf_self, grids)
    ref_lengths = torch.diff(torch.unique_consecutive(torch.tensor(ref_cu))).tolist()
    order, lengths = window_order(grids, window=4, merge=2)
    assert torch.equal(order, ref_index) and lengths == ref_lengths


# ------------------------------------------------------------------------------- model parity (fp32)

def _hf(path):
    from transformers import Qwen2_5_VLForConditionalGeneration as HFModel

    return HFModel.from_pretrained(path, attn_implementation="sdpa", dtype=torch.float32).eval()


@pytest.fixture(scope="module", params=["hub", "nested"])
def pair(request, tiny_qwen2_5_vl_ckpt, tiny_qwen2_5_vl_ckpt_nested):
    """(our model, config, transformers' model, PromptProcessor, path) for one key layout."""
    from qvl.build import load_model
    from qvl.multimodal.prompt import PromptProcessor

    path = tiny_qwen2_5_vl_ckpt if request.param == "hub" else tiny_qwen2_5_vl_ckpt_nested
    model, config = load_model(path)
    return model, config, _hf(path), PromptProcessor.from_pretrained(path, config), path


def test_both_key_layouts_load(pair):
    model, config, _, _, path = pair
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    nested = "model.visual.merger.ln_q.weight" in keys
    assert nested == ("visual.merger.ln_q.weight" not in keys)
    assert ("model.language_model.embed_tokens.weight" in keys) == nested
    assert config.tie_word_embeddings == nested and (model.lm_head.weight is model.model.embed_tokens.weight) == nested
    names = dict(model.named_parameters())
    for k in ("visual.blocks.0.norm1.weight", "visual.blocks.2.mlp.gate_proj.bias", "visual.merger.ln_q.weight",
              "visual.blocks.1.attn.qkv.bias", "model.layers.1.mlp.up_proj.weight"):
        assert k in names


def test_vision_features_match_transformers(pair):
    model, config, hf, _, _ = pair
    grids = torch.tensor([[1, 18, 28], [3, 8, 12], [1, 10, 6], [1, 16, 16], [2, 4, 4]])
    pv = torch.randn(int(grids.prod(-1).sum()), 1176, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, ref = model.encode_vision(pv, grids), hf.model.visual(pv, grid_thw=grids)
    assert ours.shape == (int(grids.prod(-1).sum()) // 4, config.hidden_size)
    assert (ours - ref).abs().max().item() <= 1e-4 and ref.std().item() > 0.1


@torch.no_grad()
def _qvl_logits(model, p):
    ids = torch.tensor(p.token_ids)
    feats = None
    if p.items:
        feats = model.encode_vision(torch.cat([it.pixel_values for it in p.items]),
                                    torch.tensor([list(it.grid_thw) for it in p.items]))
    return model.compute_logits(model(ids, p.positions, inputs_embeds=model.embed(ids, feats)))


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(pair, case):
    model, config, hf, proc, _ = pair
    text, mm = CASES[case]
    p = proc.process_prompt(chat(text), mm or None)
    kw = _hf_inputs(p)
    if not _int_time(p):      # transformers 4.57's int cast would flatten time: give it our positions
        kw["position_ids"] = p.positions[:, None, :]
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor([p.token_ids]), **kw).logits[0].float()
    ours = _qvl_logits(model, p)
    assert ours.shape == ref.shape == (len(p.token_ids), config.vocab_size)
    diff = (ours - ref).abs().max().item()
    assert diff <= 1e-4, diff
    assert ref.std().item() > 0.1
    if case == "one_image":
        assert p.items[0].grid_thw == (1, 18, 28)             # 3x4 windows, partial at both edges
    if case == "video_fps4":
        t = p.positions[0, p.item_offsets[0]:p.item_offsets[0] + p.items[0].num_tokens]
        assert t.unique().numel() == 3                        # 0.5 s * 2 tok/s: one step per grid, not flat


@torch.no_grad()
def _hf_greedy(hf, p) -> list[int]:
    """transformers' greedy tokens: generate() where its rope index is exact, else a cached loop fed with
    qvl's prompt positions and then `index + rope_delta` (what generate does with the right positions)."""
    kw, ids = _hf_inputs(p), torch.tensor([p.token_ids])
    if _int_time(p):
        out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                          max_new_tokens=N_NEW, eos_token_id=None, pad_token_id=0, **kw)
        return out[0, len(p.token_ids):].tolist()
    n = len(p.token_ids)
    out = hf(input_ids=ids, position_ids=p.positions[:, None, :], use_cache=True, **kw)
    toks = [int(out.logits[0, -1].argmax())]
    while len(toks) < N_NEW:
        i = n + len(toks) - 1
        out = hf(input_ids=torch.tensor([[toks[-1]]]), position_ids=torch.full((3, 1, 1), i + p.rope_delta),
                 past_key_values=out.past_key_values, cache_position=torch.tensor([i]), use_cache=True)
        toks.append(int(out.logits[0, -1].argmax()))
    return toks


def _engine(path, **kw):
    return tiny_engine(path, **kw)


def _run(eng, prompts, num=N_NEW) -> list[list[int]]:
    return greedy_tokens(eng, prompts, num)


def test_greedy_engine_matches_transformers(pair):
    """>= 32 greedy tokens of every case through the engine (paged KV, scheduler) == transformers'."""
    _, _, hf, _, path = pair
    eng = _engine(path)
    prompts = {case: eng.processor.process_prompt(chat(t), mm or None) for case, (t, mm) in CASES.items()}
    got = dict(zip(prompts, _run(eng, list(prompts.values()))))
    refs = {case: _hf_greedy(hf, p) for case, p in prompts.items()}
    for case, ref in refs.items():
        assert len(ref) == N_NEW and got[case] == ref, case
    # not a degenerate comparison: the inputs steer the (random) model, and it says more than one token
    assert len({tuple(r) for r in refs.values()}) == len(refs)
    assert len({t for r in refs.values() for t in r}) > 10


# -------------------------------------------------------------------------------------------- engine

ENGINE_CASES = ["one_image", "text_only", "image_video", "video_fps4", "two_images"]


@pytest.fixture(scope="module")
def engine_reference(tiny_qwen2_5_vl_ckpt):
    """Each request of ENGINE_CASES alone: no prefix or encoder cache, whole prefill."""
    eng = _engine(tiny_qwen2_5_vl_ckpt, enable_prefix_caching=False, encoder_cache_memory=0)
    prompts = [eng.processor.process_prompt(chat(CASES[c][0]), CASES[c][1] or None) for c in ENGINE_CASES]
    return prompts, [_run(eng, [p], 12)[0] for p in prompts]


def test_engine_batched_and_chunked_equal_alone(tiny_qwen2_5_vl_ckpt, engine_reference):
    prompts, ref = engine_reference
    assert _run(_engine(tiny_qwen2_5_vl_ckpt), prompts, 12) == ref
    assert _run(_engine(tiny_qwen2_5_vl_ckpt, max_num_batched_tokens=7), prompts, 12) == ref


def test_engine_prefix_and_encoder_cache_hits_equal_miss(tiny_qwen2_5_vl_ckpt, engine_reference):
    prompts, ref = engine_reference
    eng = _engine(tiny_qwen2_5_vl_ckpt)
    assert _run(eng, prompts, 12) == ref
    s1 = eng.stats()
    assert _run(eng, prompts, 12) == ref
    s2 = eng.stats()
    assert s2["prefix_cache_hits"] > s1["prefix_cache_hits"]
    # encoder-cache hit with a prefix miss: the same image and video after different text
    text, mm = CASES["image_video"]
    q = eng.processor.process_prompt(chat("Other words first. " + text), mm)
    before = eng.stats()["encoder_cache_hits"]
    hit = _run(eng, [q], 12)
    assert eng.stats()["encoder_cache_hits"] >= before + 3
    cold = _engine(tiny_qwen2_5_vl_ckpt, enable_prefix_caching=False, encoder_cache_memory=0)
    assert _run(cold, [q], 12) == hit
