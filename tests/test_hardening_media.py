"""Media hardening (issue #9): a request's pixel options never raise the server's limits, engine-wide
media defaults (mm_processor_kwargs), frame-list pixel budgets, refusals that do not depend on what is on
disk, EXIF orientation, 1-frame videos."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from qvl.config import EngineConfig
from qvl.models import load_config
from qvl.multimodal.prompt import PromptProcessor

CAP_TOKENS = 256                       # tiny_ckpt's preprocessor_config.json: max_pixels 200704 = 256 * 28^2


@pytest.fixture(scope="module")
def pp(tiny_ckpt) -> PromptProcessor:
    _, cfg = load_config(tiny_ckpt)
    return PromptProcessor.from_pretrained(tiny_ckpt, cfg)


def _png(w: int, h: int, seed: int = 0, **save) -> bytes:
    img = Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="PNG", **save)
    return buf.getvalue()


def _tokens(pp, kind, source, **opts) -> int:
    msgs = [{"role": "user", "content": [{"type": kind, kind: source, **opts}, {"type": "text", "text": "hi"}]}]
    counted = pp.count_tokens(msgs, max_model_len=32768)["items"][0]["tokens"]
    loaded = pp.process_messages(msgs, max_model_len=32768).items[0].num_tokens
    assert counted == loaded
    return loaded


@pytest.mark.parametrize("opts", [
    dict(min_pixels=12845056, max_pixels=12845056),
    dict(resized_height=3584, resized_width=3584, max_pixels=12845056),
    dict(resized_height=3584, resized_width=3584),
    dict(max_pixels=10**9),
    dict(min_pixels=10**7),
])
def test_request_pixel_options_never_raise_the_checkpoint_limit(pp, opts):
    assert _tokens(pp, "image", _png(224, 224), **opts) <= CAP_TOKENS


def test_request_may_lower_the_limits(pp):
    big = _png(448, 448)
    assert _tokens(pp, "image", big) == CAP_TOKENS
    assert _tokens(pp, "image", big, max_pixels=100_000) < 128
    assert _tokens(pp, "image", big, resized_height=112, resized_width=112) == 16


def test_video_options_capped(pp):
    frames = [_png(112, 112, seed=i) for i in range(4)]
    ceiling = 768                                      # qwen-vl-utils' per-frame ceiling, in tokens
    n = _tokens(pp, "video", frames, resized_height=3584, resized_width=3584)
    assert n <= 2 * ceiling                           # 4 frames = 2 temporal patches
    assert _tokens(pp, "video", frames, min_pixels=10**8, max_pixels=10**8) <= 2 * ceiling


def test_engine_wide_mm_processor_kwargs(tiny_ckpt):
    from tiny import tiny_engine

    cfg = EngineConfig(mm_processor_kwargs='{"max_pixels": 50176, "fps": 1}')
    assert cfg.mm_processor_kwargs == {"max_pixels": 50176, "fps": 1}
    eng = tiny_engine(tiny_ckpt, mm_processor_kwargs={"max_pixels": 50176, "fps": 1.0})
    assert eng.processor.max_pixels == 50176 and eng.processor.default_fps == 1.0
    assert _tokens(eng.processor, "image", _png(448, 448)) == 64
    assert _tokens(eng.processor, "image", _png(448, 448), max_pixels=10**8) == 64   # never above it
    for bad in ('{"max_pixel": 5}', '{"fps": -1}', '[1]', '{"min_pixels": 9, "max_pixels": 5}', "{bad"):
        with pytest.raises(ValueError, match="mm_processor_kwargs"):
            EngineConfig(mm_processor_kwargs=bad)


def test_engine_wide_fps_is_a_limit(tmp_path):
    from qvl.multimodal.limits import request_options
    from qvl.multimodal.spec import QWEN2_VL

    assert request_options("video", {}, QWEN2_VL, default_fps=1.0)["fps"] == 1.0
    assert request_options("video", {"fps": 8}, QWEN2_VL, default_fps=1.0)["fps"] == 1.0
    assert request_options("video", {"fps": 0.5}, QWEN2_VL, default_fps=1.0)["fps"] == 0.5
    assert "fps" not in request_options("video", {"nframes": 4}, QWEN2_VL, default_fps=1.0)


# ------------------------------------------------------------------------------- frame-list budget

@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")    # the 9500x9500 frame's header
def test_frame_list_refused_from_headers_before_decoding():
    from test_server_errors import png_header_only

    from qvl.multimodal.budget import video_num_tokens
    from qvl.multimodal.video import process_video

    frames = [png_header_only(9000, 9000) for _ in range(6)]     # each under Pillow's limit, 486 Mpx in all
    for fn in (process_video, video_num_tokens):
        with pytest.raises(ValueError, match=r"6 frames decode to 486000000 pixels .* frame-list limit"):
            fn(frames)
    with pytest.raises(ValueError, match=r"frame 1: decompression-bomb guard"):
        process_video([_png(56, 56), png_header_only(9500, 9500)])


# ---------------------------------------------------------------------- no file-existence oracle

def test_refusal_does_not_depend_on_what_exists(tmp_path):
    from qvl.multimodal.media import MediaPolicy, fetch_bytes

    (tmp_path / "a b.png").write_bytes(_png(8, 8))
    allowed = tmp_path / "allowed"
    allowed.mkdir()

    def refusal(url, policy):
        with pytest.raises(ValueError) as e:
            fetch_bytes(url, policy=policy)
        return str(e.value)

    for policy in (MediaPolicy(), MediaPolicy(allowed_local_media_path=str(allowed))):
        there = refusal(f"file://{tmp_path}/a%20b.png", policy)
        missing = refusal(f"file://{tmp_path}/zz%20b.png", policy)
        assert there.replace("a%20b", "X") == missing.replace("zz%20b", "X"), (there, missing)
        assert "a b.png" not in there


# ------------------------------------------------------------------------------------ EXIF orientation

def _exif_jpeg(w: int, h: int, orientation: int) -> bytes:
    img = Image.new("RGB", (w, h), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, w // 2, h // 4))         # a blue block in the stored top-left
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif, quality=95)
    return buf.getvalue()


def test_exif_orientation_applied_for_every_source_kind(tmp_path, pp):
    from PIL import ImageOps

    from qvl.multimodal.budget import image_num_tokens
    from qvl.multimodal.image import process_image

    raw = _exif_jpeg(224, 112, 6)                          # stored 224 wide; upright 112 wide, 224 high
    path = tmp_path / "phone.jpg"
    path.write_bytes(raw)
    upright = ImageOps.exif_transpose(Image.open(io.BytesIO(raw)))
    ref = process_image(upright.copy())
    pil = Image.open(io.BytesIO(raw))
    for source in (raw, str(path), pil):
        vi = process_image(source)
        assert vi.original_size == (224, 112) and vi.content_hash == ref.content_hash
        assert image_num_tokens(source).original_size == (224, 112)
    assert _tokens(pp, "image", raw) == ref.num_tokens and pil.size == (224, 112)   # the caller's image untouched


def test_grounding_boxes_in_upright_pixels():
    from qvl import grounding
    from qvl.models.qwen2_vl import processing
    from qvl.multimodal.image import process_image

    vi = process_image(_exif_jpeg(224, 112, 6))
    parsed, to_original = grounding.read_boxes("<|box_start|>(0,0),(1000,1000)<|box_end|>", processing,
                                               vi.original_size, vi.resized_size)
    box = grounding.to_json(parsed, to_original=to_original)[0]
    assert box["pixels"][2:] == [112, 224], box                  # x up to the upright width, y the height


# ---------------------------------------------------------------------------------- 1-frame videos

def test_one_frame_video_repeats_the_frame(tmp_path):
    from test_server import make_video

    from qvl.multimodal.budget import video_num_tokens
    from qvl.multimodal.video import process_video

    path = tmp_path / "v1.mp4"
    make_video(path, frames=1, size=56, fps=4)
    vi = process_video(str(path))
    assert vi.grid_thw[0] == 1 and video_num_tokens(str(path)).num_tokens == vi.num_tokens
    pv = vi.pixel_values.reshape(vi.grid_thw[0], -1, 3, 2, 14 * 14)            # (t, h*w, C, T, P*P)
    assert np.array_equal(pv[0, :, :, 0].numpy(), pv[0, :, :, 1].numpy())    # the frame, twice
