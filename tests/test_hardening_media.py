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
