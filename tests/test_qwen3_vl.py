"""Qwen3-VL (dense) family: parity with transformers 4.57 `Qwen3VLForConditionalGeneration` on tiny random
checkpoints (fp32, CPU): DeepStack, interleaved M-RoPE, the QK-norm decoder, timestamped video prompts,
and the engine's DeepStack path (encoder cache, chunked prefill through an image, preemption).

Pixels come from qvl's preprocessing; the same pixel_values and grids are fed to transformers.
Preprocessing: transformers' Qwen3-VL image processor is `Qwen2VLImageProcessorFast`, which needs
torchvision (not importable here), so qvl's pixels are compared with the slow `Qwen2VLImageProcessor`
configured as the Qwen3-VL checkpoints are (patch 16, merge 2, mean = std = 0.5). Video prompt ids:
`Qwen3VLProcessor.__call__` itself expands the text (timestamps from its `_calculate_timestamps`), with its
video processor (its resize needs torchvision) replaced by a stand-in returning qvl's grid and the frames'
metadata. Frame sampling and sizing are compared with Qwen3VLVideoProcessor itself in tests/test_video.py.
"""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import IMG, VID, chat, greedy_tokens, hf_media_kwargs, image, tiny_engine

from qvl.models.qwen3_vl import processing

N_NEW = 16


def video(seed: int, fps: float | None, frames: int = 6, h: int = 128, w: int = 160) -> dict:
    v = {"video": [image(seed + i, h, w) for i in range(frames)], "resized_height": h, "resized_width": w}
    if fps is not None:
        v["fps"] = fps
    return v


# 256x392 -> grid (1, 16, 24) (merged 8x12); 140x84 -> (1, 8, 6) after the 32-px snap; videos: 6 frames of
# 128x160 -> grid (3, 8, 10): three timestamped groups of 20 tokens.
CASES = {
    "text_only": ("Describe the weather in words.", {}),
    "one_image": (IMG + "Describe this image.", {"image": [image(0, 256, 392)]}),
    "two_images": (IMG + "and" + IMG + "How many shapes are there?",
                   {"image": [image(1, 256, 392), image(2, 140, 84)]}),
    "video": (VID + "What happens?", {"video": [video(3, fps=2)]}),
    "image_video": (IMG + "then" + VID + "Compare.", {"image": [image(5, 140, 84)], "video": [video(7, fps=1)]}),
}


@pytest.fixture(scope="module")
def pair(tiny_qwen3_vl_ckpt):
    from transformers import Qwen3VLForConditionalGeneration as HFModel

    from qvl.build import load_model
    from qvl.multimodal.prompt import PromptProcessor

    model, config = load_model(tiny_qwen3_vl_ckpt)
    hf = HFModel.from_pretrained(tiny_qwen3_vl_ckpt, attn_implementation="sdpa", dtype=torch.float32).eval()
    return model, config, hf, PromptProcessor.from_pretrained(tiny_qwen3_vl_ckpt, config)


# ----------------------------------------------------------------------------------- config, weights

def test_config_and_weights(pair, tiny_qwen3_vl_ckpt_tied):
    from qvl.build import load_model
    from qvl.models import load_config
    from qvl.models.qwen3_vl.config import VisionConfig

    model, c, _, proc = pair
    v = c.vision
    assert (c.hidden_size, c.head_dim, c.num_attention_heads, c.mrope_section) == (64, 32, 4, [6, 5, 5])
    assert (c.attention_bias, c.tie_word_embeddings) == (False, False)
    assert (v.patch_size, v.patch_dim, v.num_grid_per_side, v.deepstack_visual_indexes) == (16, 1536, 8, [0, 2])
    assert (proc.spec.patch_size, proc.spec.factor, proc.spec.image_mean) == (16, 32, (0.5, 0.5, 0.5))
    names = dict(model.named_parameters())
    for k in ("visual.pos_embed.weight", "visual.patch_embed.proj.bias", "visual.merger.norm.weight",
              "visual.deepstack_merger_list.1.linear_fc2.bias", "model.layers.2.self_attn.q_norm.weight"):
        assert k in names
    assert "model.layers.0.self_attn.q_proj.bias" not in names
    family, tied_cfg = load_config(tiny_qwen3_vl_ckpt_tied)
    assert family.DISPLAY_NAME == "Qwen3-VL" and tied_cfg.tie_word_embeddings
    tied, _ = load_model(tiny_qwen3_vl_ckpt_tied)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    with pytest.raises(ValueError, match="deepstack_visual_indexes \\[5\\]"):
        VisionConfig(depth=4, hidden_size=32, num_heads=2, deepstack_visual_indexes=[1, 5])
    with pytest.raises(ValueError, match="must be a square"):
        VisionConfig(num_position_embeddings=50)
    # hub defaults where preprocessor_config.json is silent
    spec = processing.preprocess_spec(c, {})
    assert (spec.image_std, spec.min_pixels, spec.max_pixels) == ((0.5,) * 3, 65536, 16777216)


def test_interleaved_mrope_streams():
    from qvl.models.qwen2_vl.rope import _stream_ids

    s = _stream_ids((24, 20, 20), "cpu", True).tolist()
    assert s[:6] == [0, 1, 2, 0, 1, 2] and s[57:60] == [0, 1, 2] and s[60:] == [0, 0, 0, 0]
    assert s.count(1) == 20 and s.count(2) == 20
    assert _stream_ids((16, 24, 24), "cpu").tolist() == [0] * 16 + [1] * 24 + [2] * 24   # Qwen2-VL unchanged


# ---------------------------------------------------------------------------------------- preprocessing

def test_image_preprocessing_bit_identical_on_many_sizes(tiny_qwen3_vl_ckpt, pair):
    from transformers import Qwen2VLImageProcessor

    _, _, _, proc = pair
    ref = Qwen2VLImageProcessor.from_pretrained(tiny_qwen3_vl_ckpt)
    assert (ref.patch_size, ref.merge_size, ref.image_mean) == (16, 2, [0.5, 0.5, 0.5])
    from qvl.multimodal.image import process_image

    sizes = [(32, 32), (33, 47), (64, 64), (100, 30), (30, 100), (127, 255), (256, 392), (140, 84), (500, 375),
             (375, 500), (48, 640), (640, 48), (200, 201), (90, 60), (57, 113), (320, 240), (12, 400),
             (700, 700), (81, 333), (1000, 90), (31, 31), (129, 65)]
    for i, (h, w) in enumerate(sizes):
        img = image(100 + i, h, w)
        ours = process_image(img, spec=proc.spec)
        r = ref(images=[img], return_tensors="pt")
        assert tuple(r["image_grid_thw"][0].tolist()) == ours.grid_thw, (h, w)
        assert torch.equal(ours.pixel_values, r["pixel_values"]), (h, w)


# ------------------------------------------------------------------------------- model parity (fp32)

def test_vision_features_match_transformers(pair):
    model, config, hf, _ = pair
    grids = torch.tensor([[1, 16, 24], [3, 8, 10], [1, 10, 6], [1, 50, 4]])   # 50 > the 8-wide learned grid
    pv = torch.randn(int(grids.prod(-1).sum()), 1536, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model.encode_vision(pv, grids)
        main, deep = hf.model.visual(pv, grid_thw=grids)
    assert len(ours) == 1 + len(deep) == 3
    for a, b in zip(ours, (main, *deep)):
        assert a.shape == (int(grids.prod(-1).sum()) // 4, config.hidden_size)
        assert (a - b).abs().max().item() <= 1e-4 and b.std().item() > 0.1


@torch.no_grad()
def _qvl_logits(model, config, p):
    ids = torch.tensor(p.token_ids)
    feats, extra = None, {}
    if p.items:
        sets = model.encode_vision(torch.cat([it.pixel_values for it in p.items]),
                                   torch.tensor([list(it.grid_thw) for it in p.items]))
        mask = (ids == config.image_token_id) | (ids == config.video_token_id)
        feats, extra = sets[0], {"deepstack_embeds": sets[1:], "vision_mask": mask}
    return model.compute_logits(model(ids, p.positions, inputs_embeds=model.embed(ids, feats), **extra))


@pytest.mark.parametrize("case", list(CASES))
def test_logits_and_positions_match_transformers(pair, case):
    model, config, hf, proc = pair
    text, mm = CASES[case]
    p = proc.process_prompt(chat(text), mm or None)
    kw = hf_media_kwargs(p)
    ids = torch.tensor([p.token_ids])
    pos, delta = hf.model.get_rope_index(ids, kw.get("image_grid_thw"), kw.get("video_grid_thw"))
    assert torch.equal(p.positions, pos[:, 0]) and p.rope_delta == int(delta)
    with torch.no_grad():
        ref = hf(input_ids=ids, **kw).logits[0].float()
    ours = _qvl_logits(model, config, p)
    diff = (ours - ref).abs().max().item()
    assert diff <= 1e-4, diff
    assert ref.std().item() > 0.1


# ------------------------------------------------------------------------------ video timestamps

def _hf_processor_ids(path, text: str, p, source_fps: list | None = None) -> list[int]:
    """transformers' Qwen3VLProcessor expansion of `text` for p's videos (its video processor stubbed to
    report qvl's grids and the frames' metadata: indices 0..n-1 at the given fps, or fps None)."""
    from transformers import AutoTokenizer, Qwen2VLImageProcessor
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
    from transformers.video_utils import VideoMetadata

    videos = [it for it in p.items if it.kind == "video"]
    metas = []
    for it, fps in zip(videos, source_fps or [None] * len(videos)):
        n = it.grid_thw[0] * 2
        if it.frame_times is None or fps is None:      # frame lists: indices 0..n-1 at the given fps
            fps = None if it.frame_times is None else (1 / it.frame_times[1])
            indices = list(range(n))
        else:                                           # a file: the sampled source frames
            indices = [round(t * fps) for t in it.frame_times]
        metas.append(VideoMetadata(total_num_frames=n, fps=fps, frames_indices=indices))

    base = Qwen3VLProcessor.get_possibly_dynamic_module("BaseVideoProcessor")

    class StubVideoProcessor(base):
        def __call__(self, videos=None, **kw):
            return {"video_grid_thw": torch.tensor([list(it.grid_thw) for it in videos_]),
                    "video_metadata": metas}

    videos_ = videos
    stub = object.__new__(StubVideoProcessor)
    stub.merge_size = 2
    tok = AutoTokenizer.from_pretrained(path)
    proc = Qwen3VLProcessor(image_processor=Qwen2VLImageProcessor.from_pretrained(path), tokenizer=tok,
                            video_processor=stub, chat_template=tok.chat_template)
    images = [Image.new("RGB", (it.resized_size[1], it.resized_size[0])) for it in p.items if it.kind == "image"]
    out = proc(text=[text], images=images or None, videos=[[0]] * len(videos), return_tensors="pt")
    return out["input_ids"][0].tolist()


@pytest.mark.parametrize("case", ["video", "image_video"])
def test_video_prompt_ids_match_transformers_processor(pair, tiny_qwen3_vl_ckpt, case):
    _, _, _, proc = pair
    text, mm = CASES[case]
    p = proc.process_prompt(chat(text), mm)
    assert p.token_ids == _hf_processor_ids(tiny_qwen3_vl_ckpt, chat(text), p)
    decoded = proc.decode(p.token_ids)
    fps = mm["video"][0]["fps"]
    stamps = [f"<{(2 * k + 2 * k + 1) / 2 / fps:.1f} seconds>" for k in range(3)]   # frames 2k, 2k+1
    assert all(s in decoded for s in stamps), decoded
    # the header count (plan) is the loaded prompt's length, timestamps included
    plan = proc.plan(prompt=chat(text), multi_modal_data=mm)
    assert plan.num_tokens == len(p.token_ids) == len(proc.expanded_token_ids(plan))
    assert proc.count_tokens([{"role": "user", "content": [{"type": "video", **mm["video"][0]},
                                                           {"type": "text", "text": "x"}]}])["prompt_tokens"] > 60


def test_frame_list_without_fps_counts_at_24_with_a_warning(pair, tiny_qwen3_vl_ckpt):
    _, _, _, proc = pair
    mm = {"video": [video(9, fps=None)]}
    with pytest.warns(UserWarning, match="24 fps"):
        p = proc.process_prompt(chat(VID + "What happens?"), mm)
    assert "<0.0 seconds>" in proc.decode(p.token_ids) and "<0.1 seconds>" in proc.decode(p.token_ids)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert p.token_ids == _hf_processor_ids(tiny_qwen3_vl_ckpt, chat(VID + "What happens?"), p)


def _write_clip(path) -> None:
    """3 s of 96x64 at 10 fps (mpeg4)."""
    av = pytest.importorskip("av")
    container = av.open(str(path), "w", format="mp4")
    stream = container.add_stream("mpeg4", rate=10)
    stream.width, stream.height, stream.pix_fmt = 96, 64, "yuv420p"
    for i in range(30):
        a = np.full((64, 96, 3), (i * 8) % 256, np.uint8)
        for packet in stream.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()


def test_video_file_timestamps_use_the_containers_fps(pair, tiny_qwen3_vl_ckpt, tmp_path):
    """A 3 s clip at 10 fps sampled at 2 fps: 6 frames, the ones Qwen3VLVideoProcessor.sample_frames picks
    (0, 6, 12, 17, 23, 29), each group at the mean of its two source frames' times; ids as transformers'
    processor makes them from that metadata."""
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor
    from transformers.video_utils import VideoMetadata

    path = tmp_path / "clip.mp4"
    _write_clip(path)
    _, _, _, proc = pair
    text = chat(VID + "What happens?")
    p = proc.process_prompt(text, {"video": [{"video": str(path), "fps": 2}]})
    times = p.items[0].frame_times
    assert times is not None and len(times) == 2 * p.items[0].grid_thw[0]
    hf = Qwen3VLVideoProcessor.from_pretrained(tiny_qwen3_vl_ckpt).sample_frames(
        VideoMetadata(total_num_frames=30, fps=10.0), fps=2)
    assert [round(t * 10) for t in times] == hf.tolist() == [0, 6, 12, 17, 23, 29]
    stamps = processing.frame_timestamps(times, 2)
    decoded = proc.decode(p.token_ids)
    assert all(f"<{t:.1f} seconds>" in decoded for t in stamps) and stamps[-1] > 2.0, decoded
    assert p.token_ids == _hf_processor_ids(tiny_qwen3_vl_ckpt, text, p, source_fps=[10.0])


@pytest.mark.parametrize("video_config", [None, {"size": {"shortest_edge": 4096, "longest_edge": 25165824},
                                                  "fps": 2, "min_frames": 4, "max_frames": 768},
                                          {"size": {"shortest_edge": 8192, "longest_edge": 1 << 20}, "fps": 1.5,
                                           "min_frames": 6, "max_frames": 100}])
def test_spec_video_numbers_are_the_checkpoints_video_processors(tiny_qwen3_vl_ckpt, tmp_path, video_config):
    """The spec's video numbers are what Qwen3VLVideoProcessor.from_pretrained loads: video_preprocessor_config
    .json, else (as its loader falls back) preprocessor_config.json."""
    import shutil

    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    from qvl.models import load_preprocess_spec

    for name in ("config.json", "preprocessor_config.json"):
        shutil.copy(tiny_qwen3_vl_ckpt / name, tmp_path / name)
    if video_config is not None:
        (tmp_path / "video_preprocessor_config.json").write_text(json.dumps(video_config))
    hf = Qwen3VLVideoProcessor.from_pretrained(tmp_path)
    spec = load_preprocess_spec(tmp_path)
    assert spec.video_sampling == "qwen3_vl"
    assert (spec.video_fps, spec.video_min_frames, spec.video_max_frames, spec.video_min_pixels,
            spec.video_max_pixels) == (hf.fps, hf.min_frames, hf.max_frames, hf.size["shortest_edge"],
                                       hf.size["longest_edge"])


# -------------------------------------------------------------------------------------------- engine

def _engine(path, **kw):
    return tiny_engine(path, **kw)


def _run(eng, prompts, num=N_NEW) -> list[list[int]]:
    return greedy_tokens(eng, prompts, num)


@pytest.fixture(scope="module")
def engine_reference(tiny_qwen3_vl_ckpt):
    """Every case alone: no prefix or encoder cache, whole prefill."""
    eng = _engine(tiny_qwen3_vl_ckpt, enable_prefix_caching=False, encoder_cache_memory=0)
    prompts = [eng.processor.process_prompt(chat(t), mm or None) for t, mm in CASES.values()]
    return prompts, [_run(eng, [p])[0] for p in prompts]


def test_greedy_engine_matches_transformers(pair, engine_reference):
    """>= 16 greedy tokens of every case through the engine (paged KV, DeepStack rows) == transformers'."""
    _, _, hf, _ = pair
    prompts, got = engine_reference
    for case, p, toks in zip(CASES, prompts, got):
        ids = torch.tensor([p.token_ids])
        with torch.no_grad():
            ref = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                              max_new_tokens=N_NEW, eos_token_id=None, pad_token_id=0, **hf_media_kwargs(p))
        assert toks == ref[0, ids.shape[1]:].tolist(), case
    assert len({tuple(t) for t in got}) == len(got)


def test_engine_batched_chunked_and_preempted_equal_alone(tiny_qwen3_vl_ckpt, engine_reference):
    prompts, ref = engine_reference
    assert _run(_engine(tiny_qwen3_vl_ckpt), prompts) == ref
    # 16-token chunks: every image (48 / 96 tokens) and video group (20) is split across steps, so the
    # DeepStack rows of one item are sliced over several steps like the main rows
    assert _run(_engine(tiny_qwen3_vl_ckpt, max_num_batched_tokens=16), prompts) == ref
    # a KV pool too small for all at once: requests are preempted and recomputed
    small = _engine(tiny_qwen3_vl_ckpt, kv_cache_memory=_pool_bytes(tiny_qwen3_vl_ckpt, 20))
    assert _run(small, prompts) == ref
    assert small.stats()["num_preemptions"] >= 1


def _pool_bytes(path, blocks: int) -> int:
    from types import SimpleNamespace

    from qvl.engine.kv_cache import kv_bytes_per_block
    from qvl.models import load_config

    _, c = load_config(path)
    layer = SimpleNamespace(num_kv_heads=c.num_key_value_heads, head_dim=c.head_dim)
    return blocks * kv_bytes_per_block([layer] * c.num_hidden_layers, 16, torch.float32)


def test_encoder_cache_hit_equals_miss(tiny_qwen3_vl_ckpt, engine_reference):
    prompts, ref = engine_reference
    eng = _engine(tiny_qwen3_vl_ckpt)
    assert _run(eng, prompts) == ref
    text, mm = CASES["image_video"]
    q = eng.processor.process_prompt(chat("Other words first. " + text), mm)
    before = eng.stats()["encoder_cache_hits"]
    hit = _run(eng, [q])
    assert eng.stats()["encoder_cache_hits"] >= before + 4      # the image and the video's 3 groups
    entry = eng.runner.encoder_cache.get(q.items[0].content_hash)
    assert isinstance(entry, tuple) and len(entry) == 3         # main + both DeepStack sets
    cold = _engine(tiny_qwen3_vl_ckpt, enable_prefix_caching=False, encoder_cache_memory=0)
    assert _run(cold, [q]) == hit


# ---------------------------------------------------------------------------------------------- CLI

def test_cli_run_and_tokens(tiny_qwen3_vl_ckpt, tmp_path):
    from test_cli import qvl

    path = tmp_path / "photo.png"
    Image.new("RGB", (640, 480), (200, 30, 30)).save(path)
    r = qvl("run", "--model", str(tiny_qwen3_vl_ckpt), "--image", str(path), "Describe this image.",
            "--json", "--max-tokens", "6", "--temperature", "0")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert 1 <= out["completion_tokens"] <= 6 and out["prompt_tokens"] > 100
    r = qvl("tokens", "--model", str(tiny_qwen3_vl_ckpt), str(path), "--json")
    assert r.returncode == 0, r.stderr
    ckpt = json.loads(r.stdout)
    # max_pixels 262144 with factor 32: 448 x 576 -> (14 x 18) merged tokens
    assert ckpt["resized_size"][0] % 32 == 0 and ckpt["num_tokens"] == (ckpt["resized_size"][0] // 32) * (
        ckpt["resized_size"][1] // 32)
    assert ckpt["prompt_tokens"] == ckpt["num_tokens"] + 2
    clip = tmp_path / "clip.mp4"
    _write_clip(clip)
    r = qvl("tokens", "--model", str(tiny_qwen3_vl_ckpt), str(clip), "--fps", "2", "--json")
    assert r.returncode == 0, r.stderr
    vid = json.loads(r.stdout)
    from qvl.multimodal.prompt import PromptProcessor
    from qvl.models import load_config

    proc = PromptProcessor.from_pretrained(tiny_qwen3_vl_ckpt, load_config(tiny_qwen3_vl_ckpt)[1])
    p = proc.process_prompt(VID, {"video": [{"video": str(clip), "fps": 2}]})
    # the timestamps and per-group vision start/end counted from the header, as the loaded prompt has them
    assert vid["prompt_tokens"] == len(p.token_ids) > vid["num_tokens"] + 2


def test_serve_usage_equals_tokenize_with_timestamps(tiny_qwen3_vl_ckpt, tmp_path):
    """`qvl serve` on a Qwen3-VL checkpoint with the openai client: an image and a video (data: URL); the
    reply's prompt_tokens equal /tokenize's header count, timestamps included."""
    import base64

    import httpx

    openai = pytest.importorskip("openai")
    from test_server import ServerProcess, png_data_url

    clip = tmp_path / "clip.mp4"
    _write_clip(clip)
    msgs = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": png_data_url(90, 60)}},
        {"type": "video_url", "video_url": {"url": "data:video/mp4;base64," + base64.b64encode(
            clip.read_bytes()).decode(), "fps": 2}},
        {"type": "text", "text": "Compare."}]}]
    server = ServerProcess(tiny_qwen3_vl_ckpt, ["--max-model-len", "1024"], tmp_path / "serve.log")
    try:
        c = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)
        r = c.chat.completions.create(model=str(tiny_qwen3_vl_ckpt), messages=msgs, max_tokens=5,
                                      temperature=0)
        assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens <= 5
        tok = httpx.post(server.url + "/tokenize", json={"messages": msgs}, timeout=60).json()
        assert r.usage.prompt_tokens == tok["count"]
        if "tokens" in tok:
            assert len(tok["tokens"]) == tok["count"]
    finally:
        assert server.stop() == 0, server.log()
