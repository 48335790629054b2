"""budget.py: header-only token counts equal the counts from processing the pixels; context check."""
from __future__ import annotations

import io
import json

import av
import numpy as np
import pytest
from PIL import Image

from qvl.multimodal.budget import ItemBudget, check_context, describe, image_num_tokens, video_num_tokens
from qvl.multimodal.image import process_image
from qvl.multimodal.spec import PreprocessSpec
from qvl.multimodal.video import process_video


def _png(h, w, seed=0):
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def _write_video(path, *, n=30, fps=10, w=64, h=48, fmt=None):
    container = av.open(str(path), "w", format=fmt)
    stream = container.add_stream("mpeg4", rate=fps)
    stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
    for i in range(n):
        a = np.full((h, w, 3), (i * 9) % 256, np.uint8)
        for packet in stream.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()


@pytest.mark.parametrize("h,w,opts", [
    (333, 517, {}), (10, 10, {}), (1080, 1920, {"max_pixels": 1280 * 784}), (100, 2000, {}),
    (640, 480, {"min_pixels": 256 * 784, "max_pixels": 1024 * 784}),
    (300, 300, {"resized_height": 200, "resized_width": 500}),
])
def test_image_budget_equals_processing(h, w, opts):
    data = _png(h, w)
    b = image_num_tokens(data, **opts)
    v = process_image(data, **opts)
    assert (b.grid_thw, b.num_tokens, b.original_size) == (v.grid_thw, v.num_tokens, v.original_size)
    assert b.resized_size == (v.grid_thw[1] * 14, v.grid_thw[2] * 14)


def test_image_budget_reads_only_the_header():
    data = _png(200, 300)
    truncated = data[:100]  # header intact, pixel data gone
    assert image_num_tokens(truncated).original_size == (200, 300)
    with pytest.raises(ValueError, match="corrupt or truncated"):
        process_image(truncated)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("clips")
    _write_video(root / "a.mp4")                                 # 30 frames, 10 fps, 64x48
    _write_video(root / "b.mp4", n=75, fps=25, w=320, h=180)     # 3 s, 25 fps
    _write_video(root / "c.mkv", n=20, fmt="matroska")          # no frame count in the header
    return root


@pytest.mark.parametrize("name", ["a.mp4", "b.mp4", "c.mkv"])
@pytest.mark.parametrize("opts", [{}, {"fps": 1.0}, {"nframes": 6}, {"video_start": 0.4, "video_end": 1.9},
                                  {"min_pixels": 16 * 784, "max_pixels": 64 * 784},
                                  {"total_pixels": 300 * 784, "min_pixels": 8 * 784},
                                  {"resized_height": 112, "resized_width": 168}])
def test_video_budget_equals_processing(clips, name, opts):
    b = video_num_tokens(clips / name, **opts)
    v = process_video(clips / name, **opts)
    assert (b.grid_thw, b.num_tokens, b.original_size) == (v.grid_thw, v.num_tokens, v.original_size)
    assert b.nframes == 2 * v.grid_thw[0]


def test_frame_list_budget_equals_processing():
    frames = [_png(90, 120, seed=i) for i in range(7)]
    b = video_num_tokens(frames)
    v = process_video(frames)
    assert (b.grid_thw, b.num_tokens, b.nframes) == (v.grid_thw, v.num_tokens, 8)


def test_check_context():
    img = ItemBudget("image", (1080, 1920), (1092, 1932), (1, 78, 138), 2691, label="image 1")
    vid = ItemBudget("video", (48, 64), (280, 392), (3, 20, 28), 420, nframes=6, label="video 1")
    assert check_context([img, vid], 100, 4096) == 3211
    with pytest.raises(ValueError) as e:
        check_context([img, vid], 1000, 4000)
    msg = str(e.value)
    assert "4111 tokens" in msg and "1000 text" in msg and "max_model_len 4000" in msg
    assert "image 1: 2691 tokens" in msg and "video 1: 420 tokens" in msg


def test_describe(clips, tmp_path):
    image = tmp_path / "x.png"
    image.write_bytes(_png(333, 517))
    d = describe(image)
    assert d["kind"] == "image" and d["num_tokens"] == 216 and d["grid_thw"] == [1, 24, 36] and d["fits"]
    d = describe(clips / "a.mp4", fps=1.0)
    assert d["kind"] == "video" and d["nframes"] == 4 and d["total_frames"] == 30
    odd = tmp_path / "clip.bin"  # unknown extension: image header fails, falls back to video
    odd.write_bytes((clips / "a.mp4").read_bytes())
    assert describe(odd)["kind"] == "video"
    assert describe(image, max_model_len=100)["fits"] is False
    json.dumps(describe(clips / "c.mkv"))
    with pytest.raises(ValueError, match="kind must be"):
        describe(image, kind="audio")


# -------------------------------------------------------------------------------- PreprocessSpec

QWEN3_LIKE = PreprocessSpec(patch_size=16, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5),
                            min_pixels=65536, max_pixels=16777216)  # factor 32


@pytest.mark.parametrize("h,w,opts", [
    (333, 517, {}), (10, 10, {}), (1080, 1920, {"max_pixels": 1280 * 1024}),
    (300, 300, {"resized_height": 200, "resized_width": 500}),
])
def test_spec_image_budget_equals_processing(h, w, opts):
    data = _png(h, w)
    b = image_num_tokens(data, spec=QWEN3_LIKE, **opts)
    v = process_image(data, spec=QWEN3_LIKE, **opts)
    assert (b.grid_thw, b.num_tokens, b.original_size) == (v.grid_thw, v.num_tokens, v.original_size)
    assert b.resized_size == (v.grid_thw[1] * 16, v.grid_thw[2] * 16)
    assert b.resized_size[0] % 32 == 0 and b.resized_size[1] % 32 == 0
    assert b.num_tokens == QWEN3_LIKE.num_tokens(b.grid_thw)


@pytest.mark.parametrize("spec", [QWEN3_LIKE, PreprocessSpec(temporal_patch_size=3)], ids=["f32", "t3"])
@pytest.mark.parametrize("opts", [{}, {"fps": 1.0}, {"nframes": 6}, {"total_pixels": 300 * 1024,
                                                                      "min_pixels": 8 * 1024}])
def test_spec_video_budget_equals_processing(clips, spec, opts):
    for name in ("a.mp4", "c.mkv"):
        b = video_num_tokens(clips / name, spec=spec, **opts)
        v = process_video(clips / name, spec=spec, **opts)
        assert (b.grid_thw, b.num_tokens, b.original_size) == (v.grid_thw, v.num_tokens, v.original_size)
        assert b.nframes == spec.temporal_patch_size * v.grid_thw[0]
        assert b.resized_size[0] % spec.factor == 0 and b.resized_size[1] % spec.factor == 0


def test_spec_frame_list_budget_and_describe(clips, tmp_path):
    frames = [_png(90, 120, seed=i) for i in range(7)]
    b, v = video_num_tokens(frames, spec=QWEN3_LIKE), process_video(frames, spec=QWEN3_LIKE)
    assert (b.grid_thw, b.num_tokens, b.nframes) == (v.grid_thw, v.num_tokens, 8)
    image = tmp_path / "x.png"
    image.write_bytes(_png(333, 517))
    d = describe(image, spec=QWEN3_LIKE)
    assert d["grid_thw"] == [1, 20, 32] and d["num_tokens"] == 160 and d["resized_size"] == [320, 512]
    assert describe(image)["num_tokens"] == 216  # the default spec: unchanged
    d = describe(clips / "a.mp4", spec=QWEN3_LIKE)
    assert d["num_tokens"] == process_video(clips / "a.mp4", spec=QWEN3_LIKE).num_tokens
