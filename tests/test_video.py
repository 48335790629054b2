"""Video: frame selection vs qwen-vl-utils 0.0.14, patch layout vs SPEC 4.3, a real PyAV video, errors."""
from __future__ import annotations

import base64
import math

import av
import numpy as np
import pytest
from tiny import qwen_vl_utils_vision_process
import torch
from PIL import Image

from qvl.multimodal.image import patchify, resize_rgb
from qvl.multimodal.spec import QWEN2_VL, PreprocessSpec
from qvl.multimodal.video import (VIDEO_MAX_PIXELS, VIDEO_MIN_PIXELS, VideoMeta, VideoOptions, frame_indices,
                                  frame_range, plan_video, process_video, smart_nframes, video_max_pixels,
                                  video_min_pixels)


@pytest.fixture(scope="module")
def qvu():
    """qwen-vl-utils' vision_process (see tests/tiny.py)."""
    return qwen_vl_utils_vision_process()


def _write_video(target, *, n=30, fps=10, w=64, h=48, fmt="mp4", codec="mpeg4"):
    container = av.open(target, "w", format=fmt)
    stream = container.add_stream(codec, rate=fps)
    stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
    for i in range(n):
        a = np.zeros((h, w, 3), np.uint8)
        a[..., 0] = (i * 8) % 256
        a[:, : (i * 2) % w, 1] = 255
        a[(i * 3) % h:, :, 2] = 200
        for packet in stream.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()


@pytest.fixture(scope="module")
def video_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    _write_video(str(path))  # 3 s of 64x48 at 10 fps
    return path


def _reference(path, indices, height, width):
    """Decode every frame with PyAV, pick `indices`, PIL-bicubic resize, normalise + patchify."""
    with av.open(str(path)) as c:
        frames = [f.to_image() for f in c.decode(c.streams.video[0])]
    return np.stack([resize_rgb(frames[i], height, width) for i in indices])


# -------------------------------------------------------------------------------- frame selection

def _both(fn_ref, fn_ours):
    try:
        ref = fn_ref()
    except (ValueError, AssertionError):
        ref = "error"
    try:
        ours = fn_ours()
    except ValueError:
        ours = "error"
    return ref, ours


def test_smart_nframes_matches_qwen_vl_utils(qvu):
    cases = 0
    for total in [1, 2, 3, 4, 5, 7, 8, 30, 31, 100, 299, 1000, 1537, 10000, 100000]:
        for video_fps in [1, 7.5, 10, 23.976, 25, 29.97, 30, 60]:
            for opt in [{}, {"fps": 0.5}, {"fps": 1}, {"fps": 2.0}, {"fps": 3.3}, {"fps": 24},
                        {"nframes": 2}, {"nframes": 3}, {"nframes": 5}, {"nframes": 16}, {"nframes": 64},
                        {"fps": 1, "min_frames": 7}, {"fps": 4, "max_frames": 33},
                        {"min_frames": 3, "max_frames": 9}, {"fps": 2, "nframes": 8}]:
                ref, ours = _both(lambda: qvu.smart_nframes(dict(opt), total, video_fps),
                                  lambda: smart_nframes(total, video_fps, **opt))
                assert ref == ours, (total, video_fps, opt)
                cases += 1
    assert cases > 1000


def test_frame_range_and_indices_match_qwen_vl_utils(qvu):
    for total, video_fps in [(30, 10), (300, 29.97), (1001, 23.976), (12, 2)]:
        for start, end in [(None, None), (0.5, None), (None, 2.0), (0.33, 1.71), (1.0, 1.0), (5.0, 0.1),
                           (-1, 100), (0, 0.05)]:
            ele = {k: v for k, v in (("video_start", start), ("video_end", end)) if v is not None}
            ref, ours = _both(lambda: qvu.calculate_video_frame_range(ele, total, video_fps),
                              lambda: frame_range(total, video_fps, start, end))
            assert ref == ours, (total, video_fps, start, end)
            if ref == "error":
                continue
            first, last, count = ref
            for opt in [{}, {"nframes": 4}, {"fps": 1}]:
                n_ref, n_ours = _both(lambda: qvu.smart_nframes(dict(opt), count, video_fps),
                                      lambda: smart_nframes(count, video_fps, **opt))
                assert n_ref == n_ours
                if n_ref != "error":
                    idx = torch.linspace(first, last, n_ref).round().long().tolist()
                    assert frame_indices(first, last, n_ours) == idx


def test_per_frame_budget_matches_qwen_vl_utils_formula(qvu):
    # max_model_len=None restores qwen-vl-utils' default budget (MODEL_SEQ_LEN 128000) and frame limits.
    for total, h, w in [(30, 48, 64), (600, 720, 1280), (20000, 1080, 1920), (90, 1920, 1080), (8, 30, 4000)]:
        for opt in [{}, {"min_pixels": 64 * 784}, {"max_pixels": 200 * 784}, {"total_pixels": 2000 * 784},
                    {"fps": 0.25}, {"nframes": 6}]:
            plan = plan_video(VideoMeta(total, 30.0, h, w), VideoOptions(max_model_len=None, **opt))
            n = qvu.smart_nframes({k: v for k, v in opt.items() if k in ("fps", "nframes")}, total, 30.0)
            lo = opt.get("min_pixels", 128 * 784)
            hi = max(min(768 * 784, opt.get("total_pixels", qvu.MODEL_SEQ_LEN * 784 * 0.9) / n * 2),
                     int(lo * 1.05))
            hi = min(opt.get("max_pixels", hi), hi)
            assert len(plan.indices) == n
            assert (plan.height, plan.width) == qvu.smart_resize(h, w, 28, lo, hi), (total, h, w, opt)


def test_default_budget_keeps_long_video_inside_context():
    meta = VideoMeta(total_frames=20 * 60 * 30, fps=30.0, height=1080, width=1920)  # 20 min
    qwen_like = plan_video(meta, VideoOptions(max_model_len=None))
    assert len(qwen_like.indices) == 768 and qwen_like.num_tokens > 32768
    for max_model_len in (8192, 32768, 128000):
        plan = plan_video(meta, VideoOptions(max_model_len=max_model_len))
        assert plan.num_tokens <= 0.9 * max_model_len, (max_model_len, plan.num_tokens)
    assert len(plan_video(meta, VideoOptions(max_frames=768)).indices) == 768  # explicit wins
    short = VideoMeta(total_frames=300, fps=30.0, height=480, width=640)  # 10 s: no change
    default, qwen = plan_video(short, VideoOptions()), plan_video(short, VideoOptions(max_model_len=None))
    assert default.indices == qwen.indices


# -------------------------------------------------------------------------------- layout

def test_video_patch_layout_matches_spec_4_3():
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (4, 56, 84, 3), dtype=np.uint8)  # (F, H, W, C)
    x = torch.from_numpy((frames.astype(np.float64) * (1 / 255)).astype(np.float32))
    x = (x - torch.tensor([0.48145466, 0.4578275, 0.40821073])) / torch.tensor(
        [0.26862954, 0.26130258, 0.27577711])
    x = x.permute(0, 3, 1, 2)[None]  # (B, F, C, H, W)
    b, gt, t, c, gh, gw, m, p = 1, 2, 2, 3, 4, 6, 2, 14
    ref = x.reshape(b, gt, t, c, gh // m, m, p, gw // m, m, p).permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)
    ref = ref.reshape(b, gt * gh * gw, c * t * p * p)[0]
    assert torch.equal(torch.from_numpy(patchify(frames)), ref)


# -------------------------------------------------------------------------------- real video

def test_real_video_decoded_and_processed(video_file):
    v = process_video(str(video_file))
    # 30 frames at 10 fps, fps 2 -> 6 frames; 48x64 upscaled to >= 128*28^2 pixels -> 280x392
    assert v.kind == "video" and v.grid_thw == (3, 20, 28) and v.num_tokens == 420
    assert v.original_size == (48, 64)
    idx = torch.linspace(0, 29, 6).round().long().tolist()
    ref = patchify(_reference(video_file, idx, 280, 392))
    assert np.abs(v.pixel_values.numpy() - ref).max() == 0

    data = video_file.read_bytes()
    same = [process_video(f"file://{video_file}"), process_video(data),
            process_video("data:video/mp4;base64," + base64.b64encode(data).decode())]
    assert {s.content_hash for s in same} == {v.content_hash}


def test_real_video_options(video_file):
    v = process_video(video_file, nframes=8, video_start=0.5, video_end=2.0, min_pixels=16 * 784,
                      max_pixels=50 * 784)
    first, last, _ = frame_range(30, 10.0, 0.5, 2.0)
    idx = torch.linspace(first, last, 8).round().long().tolist()
    assert v.grid_thw[0] == 4
    h, w = v.grid_thw[1] * 14, v.grid_thw[2] * 14
    assert np.abs(v.pixel_values.numpy() - patchify(_reference(video_file, idx, h, w))).max() == 0
    assert process_video(video_file, resized_height=100, resized_width=100).grid_thw == (3, 8, 8)


def test_container_without_frame_count(tmp_path):
    path = tmp_path / "clip.mkv"
    _write_video(str(path), n=20, fmt="matroska")
    assert av.open(str(path)).streams.video[0].frames == 0  # count estimated from duration * fps
    assert process_video(path, fps=2.0).grid_thw[0] == 2


def test_frame_list_like_qwen_vl_utils():
    frames = [Image.fromarray(np.full((50, 70, 3), i * 40, np.uint8)) for i in range(5)]
    v = process_video(frames)
    # image rules first (50x70 -> 56x56... via smart_resize), then padded to 6 frames, video budget
    assert v.grid_thw[0] == 3 and v.original_size == (50, 70)
    pv = v.pixel_values.numpy().reshape(3, -1, 3, 2, 196)
    assert np.array_equal(pv[2, :, :, 0], pv[2, :, :, 1])  # last frame repeated
    assert not np.array_equal(pv[1, :, :, 0], pv[1, :, :, 1])
    with pytest.raises(ValueError, match=r"^video 2: frame 1 .*frames must agree"):
        process_video([frames[0], Image.new("RGB", (500, 30))], label="video 2")


# -------------------------------------------------------------------------------- errors

def test_video_errors_name_the_item(video_file, tmp_path):
    with pytest.raises(ValueError, match=r"^video 1: cannot open video"):
        process_video(b"\x00\x00\x00\x18ftypmp42 definitely not a video" * 10, label="video 1")
    with pytest.raises(ValueError, match=r"^video 2: give either fps .* or nframes"):
        process_video(video_file, fps=2.0, nframes=4, label="video 2")
    with pytest.raises(ValueError, match=r"^video 3: empty time range"):
        process_video(video_file, video_start=2.5, video_end=1.0, label="video 3")
    with pytest.raises(ValueError, match=r"^video 5: min_pixels 100352 is larger than max_pixels 39200"):
        process_video(video_file, max_pixels=50 * 784, label="video 5")
    with pytest.raises(ValueError, match=r"^video: empty frame list"):
        process_video([])
    one = tmp_path / "one.mp4"
    _write_video(str(one), n=1)
    with pytest.raises(ValueError, match=r"^video 4: nframes should be in \[2, 1\]"):
        process_video(one, nframes=2, label="video 4")         # without nframes: the frame, repeated


def test_playlist_demuxers_are_refused(video_file, tmp_path):
    # An HLS playlist makes FFmpeg open the files / URLs it lists; the demuxer allow-list refuses it.
    playlist = tmp_path / "list.m3u8"
    playlist.write_text(f"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\n{video_file}\n#EXT-X-ENDLIST\n")
    with av.open(str(playlist)) as c:  # plain PyAV follows it
        assert c.format.name == "hls"
    with pytest.raises(ValueError, match=r"^video: cannot open video"):
        process_video(playlist)
    with pytest.raises(ValueError, match=r"^video: cannot open video"):
        process_video(playlist.read_bytes())


def test_frame_count_math_is_even():
    for total in range(2, 50):
        n = smart_nframes(total, 10.0)
        assert n % 2 == 0 and 2 <= n <= total and n == min(max(math.floor(total / 10 * 2 / 2) * 2, 4),
                                                            total // 2 * 2)


# -------------------------------------------------------------------------------- PreprocessSpec

QWEN3_LIKE = PreprocessSpec(patch_size=16, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5),
                            min_pixels=65536, max_pixels=16777216)  # factor 32
T3 = PreprocessSpec(temporal_patch_size=3)


def test_spec_per_frame_budget_uses_the_spec_factor(qvu):
    f = 32
    assert (video_min_pixels(QWEN3_LIKE), video_max_pixels(QWEN3_LIKE)) == (128 * f * f, 768 * f * f)
    assert (video_min_pixels(), video_max_pixels()) == (VIDEO_MIN_PIXELS, VIDEO_MAX_PIXELS)
    assert (VIDEO_MIN_PIXELS, VIDEO_MAX_PIXELS) == (100352, 602112)
    for total, h, w in [(30, 48, 64), (600, 720, 1280), (20000, 1080, 1920), (90, 1920, 1080)]:
        for opt in [{}, {"min_pixels": 64 * f * f}, {"max_pixels": 200 * f * f},
                    {"total_pixels": 2000 * f * f}, {"nframes": 6}]:
            plan = plan_video(VideoMeta(total, 30.0, h, w), VideoOptions(max_model_len=None, **opt),
                              spec=QWEN3_LIKE)
            n = qvu.smart_nframes({k: v for k, v in opt.items() if k == "nframes"}, total, 30.0)
            lo = opt.get("min_pixels", 128 * f * f)
            hi = max(min(768 * f * f, opt.get("total_pixels", qvu.MODEL_SEQ_LEN * f * f * 0.9) / n * 2),
                     int(lo * 1.05))
            hi = min(opt.get("max_pixels", hi), hi)
            assert len(plan.indices) == n and plan.height % f == 0 and plan.width % f == 0
            assert (plan.height, plan.width) == qvu.smart_resize(h, w, f, lo, hi), (total, h, w, opt)
            assert plan.grid_thw == (n // 2, plan.height // 16, plan.width // 16)
            assert plan.num_tokens == QWEN3_LIKE.num_tokens(plan.grid_thw)


def test_spec_default_budget_keeps_long_video_inside_context():
    meta = VideoMeta(total_frames=20 * 60 * 30, fps=30.0, height=1080, width=1920)
    for max_model_len in (8192, 32768):
        plan = plan_video(meta, VideoOptions(max_model_len=max_model_len), spec=QWEN3_LIKE)
        assert plan.num_tokens <= 0.9 * max_model_len
        assert plan.height % 32 == 0 and plan.width % 32 == 0


def test_spec_temporal_patch_size_rounds_frame_counts():
    for total in range(3, 60):
        n = smart_nframes(total, 10.0, spec=T3)
        assert n % 3 == 0 and 3 <= n <= total
    assert smart_nframes(100, 10.0, nframes=7, spec=T3) == 6
    with pytest.raises(ValueError, match=r"nframes should be in \[3, 2\]"):
        smart_nframes(2, 10.0, spec=T3)
    plan = plan_video(VideoMeta(300, 30.0, 480, 640), VideoOptions(), spec=T3)
    assert len(plan.indices) % 3 == 0 and plan.grid_thw[0] == len(plan.indices) // 3


def test_spec_real_video(video_file):
    v = process_video(str(video_file), spec=QWEN3_LIKE)
    # 6 frames; 48x64 upscaled to >= 128*32^2 pixels -> 320x448, multiples of 32
    assert v.grid_thw == (3, 20, 28) and v.num_tokens == 420 and v.merge_size == 2
    assert tuple(v.pixel_values.shape) == (3 * 20 * 28, 1536)
    idx = torch.linspace(0, 29, 6).round().long().tolist()
    ref = patchify(_reference(video_file, idx, 320, 448), spec=QWEN3_LIKE)
    assert np.abs(v.pixel_values.numpy() - ref).max() == 0
    assert v.content_hash != process_video(str(video_file)).content_hash
    t3 = process_video(str(video_file), spec=T3)
    assert t3.grid_thw[0] * 3 == 6 and t3.pixel_values.shape[1] == 3 * 3 * 14 * 14


def test_spec_frame_list():
    frames = [Image.fromarray(np.full((50, 70, 3), i * 40, np.uint8)) for i in range(5)]
    v = process_video(frames, spec=QWEN3_LIKE)
    assert v.grid_thw[0] == 3 and (v.grid_thw[1] * 16) % 32 == 0 and (v.grid_thw[2] * 16) % 32 == 0
    t3 = process_video(frames, spec=T3)  # 5 frames padded to 6 = 2 temporal patches of 3
    assert t3.grid_thw[0] == 2
    pv = t3.pixel_values.numpy().reshape(2, -1, 3, 3, 196)
    assert np.array_equal(pv[1, :, :, 1], pv[1, :, :, 2])  # frames 4, 5: the last frame repeated
    assert not np.array_equal(pv[1, :, :, 0], pv[1, :, :, 1])


def test_default_spec_video_unchanged(video_file):
    base = process_video(str(video_file))
    same = process_video(str(video_file), spec=QWEN2_VL)
    assert same.grid_thw == base.grid_thw and same.content_hash == base.content_hash
    assert torch.equal(same.pixel_values, base.pixel_values)


# ------------------------------------------------ Qwen3-VL policy vs transformers' Qwen3VLVideoProcessor

def _qwen3_spec(video_config=None):
    from qvl.models.qwen3_vl import processing

    return processing.preprocess_spec(None, video_config)


def _hf_video_processor(**kw):
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    return Qwen3VLVideoProcessor(**kw)   # imports and samples without torchvision (4.57)


def _hf_plan(proc, total, video_fps, h, w, fps=None, nframes=None):
    """transformers' sample_frames + module-level smart_resize + _preprocess's grid (frames padded to T)."""
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize as hf_smart_resize
    from transformers.video_utils import VideoMetadata

    idx = proc.sample_frames(VideoMetadata(total_num_frames=total, fps=video_fps), num_frames=nframes, fps=fps)
    size = hf_smart_resize(num_frames=len(idx), height=h, width=w, temporal_factor=proc.temporal_patch_size,
                           factor=proc.patch_size * proc.merge_size, min_pixels=proc.size["shortest_edge"],
                           max_pixels=proc.size["longest_edge"])
    out = proc._preprocess([torch.zeros(len(idx), 3, 32, 32)], do_resize=False, do_rescale=False,
                           do_normalize=False, patch_size=16, temporal_patch_size=2, merge_size=2)
    return idx.tolist(), size, int(out["video_grid_thw"][0][0])


# (total frames, video fps, requested fps, nframes, height, width)
QWEN3_CASES = [
    (30, 10.0, None, None, 48, 64), (300, 30.0, None, None, 480, 640), (301, 29.97, None, None, 720, 1280),
    (25, 10.0, None, None, 64, 96), (7, 25.0, None, None, 240, 320), (3, 1.0, None, None, 100, 100),
    (100000, 30.0, None, None, 1080, 1920), (9000, 25.0, None, None, 360, 640), (61, 24.0, 1.0, None, 90, 160),
    (61, 24.0, 0.5, None, 1080, 1920), (500, 30.0, 4.0, None, 2160, 3840), (45, 15.0, 3.3, None, 33, 1000),
    (120, 60.0, 0.1, None, 500, 40), (10, 2.0, 8.0, None, 256, 256), (1000, 23.976, 2.0, None, 405, 720),
    (30, 10.0, None, 5, 48, 64), (30, 10.0, None, 8, 480, 640), (300, 30.0, None, 16, 1080, 1920),
    (10, 10.0, None, 25, 64, 64), (2000, 30.0, None, 768, 720, 1280), (50, 12.5, None, 3, 111, 777),
    (77, 7.0, None, None, 1000, 33), (1, 1.0, None, 2, 64, 64), (300, 30.0, 2.0, None, 6000, 32),
]


@pytest.mark.parametrize("config", [None, {"size": {"shortest_edge": 4096, "longest_edge": 25165824}},
                                    {"fps": 1, "min_frames": 2, "max_frames": 64,
                                     "size": {"shortest_edge": 65536, "longest_edge": 16777216}}])
def test_qwen3_vl_plan_matches_transformers_sample_frames_and_smart_resize(config):
    spec = _qwen3_spec(config)
    assert spec.video_sampling == "qwen3_vl" and spec.factor == 32
    proc = _hf_video_processor(**(config or {}))
    assert (spec.video_fps, spec.video_min_frames, spec.video_max_frames, spec.video_min_pixels,
            spec.video_max_pixels) == (proc.fps, proc.min_frames, proc.max_frames, proc.size["shortest_edge"],
                                       proc.size["longest_edge"])
    for total, vfps, fps, nframes, h, w in QWEN3_CASES:
        idx, size, grid_t = _hf_plan(proc, total, vfps, h, w, fps=fps, nframes=nframes)
        plan = plan_video(VideoMeta(total, vfps, h, w), VideoOptions(fps=fps, nframes=nframes), spec=spec)
        case = (total, vfps, fps, nframes, h, w)
        assert plan.indices[:len(idx)] == idx and set(plan.indices[len(idx):]) <= {idx[-1]}, case
        assert (plan.height, plan.width) == size and plan.grid_thw[0] == grid_t, case
        assert plan.grid_thw == (grid_t, size[0] // 16, size[1] // 16), case


def test_qwen3_vl_request_options_map_onto_the_processors():
    """min/max_frames are the processor's attributes, min/max_pixels its size (the t*h*w volume)."""
    spec = _qwen3_spec()
    for kw, hf in [({"min_frames": 8}, {"min_frames": 8}), ({"max_frames": 10}, {"max_frames": 10}),
                   ({"min_pixels": 1 << 20}, {"size": {"shortest_edge": 1 << 20, "longest_edge": 786432 * 4}}),
                   ({"max_pixels": 200000}, {"size": {"shortest_edge": 131072, "longest_edge": 200000}})]:
        proc = _hf_video_processor(**hf)
        opts = dict(kw)
        if "min_pixels" in kw:
            opts["max_pixels"] = 786432 * 4
        for total, vfps, fps, nframes, h, w in QWEN3_CASES[:12]:
            idx, size, _ = _hf_plan(proc, total, vfps, h, w, fps=fps, nframes=nframes)
            plan = plan_video(VideoMeta(total, vfps, h, w), VideoOptions(fps=fps, nframes=nframes, **opts),
                              spec=spec)
            assert plan.indices[:len(idx)] == idx and (plan.height, plan.width) == size, (kw, total)
    with pytest.raises(ValueError, match="video: give either fps"):
        plan_video(VideoMeta(30, 10.0, 64, 64), VideoOptions(fps=1, nframes=4), spec=spec)
    with pytest.raises(ValueError, match="smaller than the 32-px"):
        plan_video(VideoMeta(30, 10.0, 20, 64), VideoOptions(), spec=spec)


def test_qwen3_vl_real_video_grid_equals_the_header_count(tmp_path):
    """25 frames at 10 fps, 70x100: transformers samples int(2.5 s * 2) = 5 frames (padded to 6 by the last),
    sized by the volume rule; process_video decodes exactly those and the header count gives its grid."""
    from qvl.multimodal.budget import video_num_tokens

    path = tmp_path / "q3.mp4"
    _write_video(str(path), n=25, fps=10, w=100, h=70)
    spec = _qwen3_spec()
    idx, size, grid_t = _hf_plan(_hf_video_processor(), 25, 10.0, 70, 100)
    assert len(idx) == 5
    v = process_video(str(path), spec=spec)
    count = video_num_tokens(str(path), spec=spec)
    assert v.grid_thw == count.grid_thw == (grid_t, size[0] // 16, size[1] // 16)
    assert v.num_tokens == count.num_tokens and count.resized_size == size
    assert v.frame_times == count.frame_times == tuple(i / 10 for i in idx + idx[-1:])
    ref = patchify(_reference(path, idx + idx[-1:], *size), spec=spec)
    assert np.abs(v.pixel_values.numpy() - ref).max() == 0
    opts = {"fps": 4.0, "max_pixels": 300000}
    assert process_video(str(path), spec=spec, **opts).grid_thw == video_num_tokens(str(path), spec=spec,
                                                                                    **opts).grid_thw
