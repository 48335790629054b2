"""process_image vs transformers 4.57 Qwen2VLImageProcessor (slow PIL path), smart_resize, image errors."""
from __future__ import annotations

import importlib.util
import io
import json

import numpy as np
import pytest
from tiny import qwen_vl_utils_vision_process
from PIL import Image

from qvl.multimodal.image import (FACTOR, MAX_PIXELS, MIN_PIXELS, PATCH_DIM, PATCH_SIZE, VisionInput,
                                  content_hash, normalize_lut, patchify, process_image, smart_resize)
from qvl.multimodal.spec import QWEN2_VL, PreprocessSpec

HUB = dict(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)


@pytest.fixture(scope="module")
def hf_processor(tmp_path_factory):
    """transformers' processor as a checkpoint loads it, with use_fast=False (the PIL path)."""
    from transformers import AutoImageProcessor, Qwen2VLImageProcessor
    from transformers.image_processing_utils_fast import BaseImageProcessorFast

    assert importlib.util.find_spec("torchvision") is None  # so even use_fast=True would be this class
    cache = {}

    def get(min_pixels, max_pixels):
        key = (min_pixels, max_pixels)
        if key not in cache:
            path = tmp_path_factory.mktemp("preproc")
            (path / "preprocessor_config.json").write_text(json.dumps({
                "image_processor_type": "Qwen2VLImageProcessor", "min_pixels": min_pixels,
                "max_pixels": max_pixels, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2}))
            proc = AutoImageProcessor.from_pretrained(str(path), use_fast=False)
            assert type(proc) is Qwen2VLImageProcessor and not isinstance(proc, BaseImageProcessorFast)
            assert (proc.min_pixels, proc.max_pixels) == key
            cache[key] = proc
        return cache[key]

    return get


@pytest.fixture(scope="module")
def qwen_to_rgb():
    """qwen-vl-utils' vision_process.to_rgb (see tests/tiny.py)."""
    return qwen_vl_utils_vision_process().to_rgb


def _noise(h, w, mode="RGB", seed=0):
    rng = np.random.default_rng(seed + h * 7919 + w)
    if mode in ("RGB", "RGBA"):
        return Image.fromarray(rng.integers(0, 256, (h, w, len(mode)), dtype=np.uint8), mode)
    if mode == "LA":
        return Image.fromarray(rng.integers(0, 256, (h, w, 2), dtype=np.uint8), "LA")
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)


def _assert_same(ours: VisionInput, ref_image: Image.Image, proc):
    ref = proc(images=[ref_image], return_tensors="np", input_data_format="channels_last")
    ref_pixels = ref["pixel_values"]
    assert ours.grid_thw == tuple(int(x) for x in ref["image_grid_thw"][0])
    assert ours.pixel_values.shape == ref_pixels.shape
    assert ours.pixel_values.dtype.is_floating_point and ours.pixel_values.numpy().dtype == np.float32
    assert np.abs(ours.pixel_values.numpy() - ref_pixels).max() == 0


# (height, width, min_pixels, max_pixels); None = hub defaults
RGB_CASES = [
    (28, 28, None, None), (10, 10, None, None), (1, 200, None, None), (200, 1, None, None),
    (333, 517, None, None), (517, 333, None, None), (14, 14, None, None), (27, 29, None, None),
    (56, 56, None, None), (70, 98, None, None), (299, 299, None, None), (37, 1001, None, None),
    (100, 2000, None, None), (1000, 10, None, None), (768, 1024, None, None), (720, 1280, None, None),
    (4000, 3000, None, None), (4000, 3000, 3136, 1280 * 28 * 28), (1080, 1920, 3136, 1003520),
    (640, 480, 256 * 28 * 28, 1024 * 28 * 28), (50, 50, 512 * 28 * 28, 16384 * 28 * 28),
    (2000, 150, 3136, 100 * 28 * 28), (333, 517, 3136, 200 * 28 * 28), (5, 900, None, None),
]


@pytest.mark.parametrize("h,w,lo,hi", RGB_CASES)
def test_rgb_matches_transformers(hf_processor, h, w, lo, hi):
    lo, hi = lo or MIN_PIXELS, hi or MAX_PIXELS
    img = _noise(h, w)
    ours = process_image(img, min_pixels=lo, max_pixels=hi)
    assert ours.original_size == (h, w)
    _assert_same(ours, img, hf_processor(lo, hi))


@pytest.mark.parametrize("mode", ["L", "CMYK", "P", "1", "I", "I;16", "YCbCr"])
def test_other_modes_match_transformers(hf_processor, mode):
    img = _noise(45, 61, mode)
    assert img.mode == mode
    _assert_same(process_image(img), img, hf_processor(*HUB.values()))


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_alpha_over_white_matches_qwen_vl_utils_then_transformers(hf_processor, qwen_to_rgb, mode):
    if mode == "P":  # palette with a transparent index
        img = _noise(47, 83).quantize(64)
        img.info["transparency"] = 3
    else:
        img = _noise(47, 83, mode)
    ours = process_image(img)
    ref_rgb = qwen_to_rgb(img if mode == "RGBA" else img.convert("RGBA"))
    _assert_same(ours, ref_rgb, hf_processor(*HUB.values()))


def test_transparent_becomes_white():
    img = Image.new("RGBA", (56, 56), (0, 0, 0, 0))
    white = process_image(Image.new("RGB", (56, 56), (255, 255, 255)))
    assert process_image(img).content_hash == white.content_hash
    assert process_image(img.convert("LA")).content_hash == white.content_hash


def test_image_through_encoded_png_and_jpeg(hf_processor):
    img = _noise(120, 90)
    for fmt in ("PNG", "JPEG"):
        buf = io.BytesIO()
        img.save(buf, fmt)
        decoded = Image.open(io.BytesIO(buf.getvalue()))
        _assert_same(process_image(buf.getvalue()), decoded, hf_processor(*HUB.values()))


def test_vision_input_contract():
    v = process_image(_noise(333, 517))
    assert v.kind == "image" and v.grid_thw == (1, 24, 36) and v.num_tokens == 216
    assert tuple(v.pixel_values.shape) == (24 * 36, 1176)
    assert len(v.content_hash) == 64
    assert process_image(_noise(333, 517)).content_hash == v.content_hash
    assert process_image(_noise(333, 517, seed=1)).content_hash != v.content_hash
    assert process_image(_noise(333, 517), max_pixels=100 * 784).content_hash != v.content_hash


def test_patch_layout_matches_spec_4_2():
    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, (56, 84, 3), dtype=np.uint8)
    norm = (x.astype(np.float64) * (1 / 255)).astype(np.float32)
    norm = (norm - np.array([0.48145466, 0.4578275, 0.40821073], np.float32)) / np.array(
        [0.26862954, 0.26130258, 0.27577711], np.float32)
    c, gh, gw, m, p = 3, 4, 6, 2, 14
    ref = norm.transpose(2, 0, 1).reshape(c, gh // m, m, p, gw // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)
    ref = np.broadcast_to(ref[:, :, :, :, :, None], ref.shape[:5] + (2, p, p)).reshape(gh * gw, 1176)
    assert np.array_equal(patchify(x), ref)


# SPEC 4.1 worked examples: (h, w, max_pixels) -> (h', w')
SPEC_TABLE = [
    (333, 517, MAX_PIXELS, (336, 504)), (1080, 1920, MAX_PIXELS, (1092, 1932)),
    (4000, 3000, MAX_PIXELS, (4004, 2996)), (20, 600, MAX_PIXELS, (28, 588)),
    (1080, 1920, 1003520, (728, 1316)), (4000, 3000, 1003520, (1148, 840)),
    (10, 10, MAX_PIXELS, (56, 56)), (20, 20, MAX_PIXELS, (56, 56)),
    (70, 700, MAX_PIXELS, (56, 700)), (98, 700, MAX_PIXELS, (112, 700)),  # half-to-even: 2.5->2, 3.5->4
]


@pytest.mark.parametrize("h,w,hi,expected", SPEC_TABLE)
def test_smart_resize_spec_table(h, w, hi, expected):
    assert smart_resize(h, w, 28, MIN_PIXELS, hi) == expected


def test_smart_resize_equals_transformers_on_a_grid():
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as hf_smart_resize

    rng = np.random.default_rng(0)
    sizes = [(int(a), int(b)) for a, b in rng.integers(1, 5000, (400, 2))] + [(1, 1), (1, 150), (13, 2600)]
    for lo, hi in [(MIN_PIXELS, MAX_PIXELS), (3136, 1003520), (256 * 784, 1280 * 784), (3136, 3136)]:
        for h, w in sizes:
            if max(h, w) / min(h, w) > 200:
                continue
            assert smart_resize(h, w, 28, lo, hi) == hf_smart_resize(h, w, 28, lo, hi), (h, w, lo, hi)


def test_aspect_ratio_over_200_refused_with_both_dims():
    assert smart_resize(1, 200) == (28, 812)  # h rounds to 0, so the min_pixels branch (as transformers)
    with pytest.raises(ValueError, match=r"height 1, width 201"):
        smart_resize(1, 201)
    with pytest.raises(ValueError, match=r"^image 2: .*height 2010, width 10"):
        process_image(Image.new("RGB", (10, 2010)), label="image 2")


def _png(img):
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def test_bad_images_raise_value_error_naming_the_item():
    with pytest.raises(ValueError, match=r"^image 3: .*not a recognised image"):
        process_image(b"this is not an image at all", label="image 3")
    with pytest.raises(ValueError, match=r"^image: empty"):
        process_image(b"")
    data = _png(_noise(64, 64))
    with pytest.raises(ValueError, match=r"^image 1: (corrupt or truncated|cannot decode)"):
        process_image(data[: len(data) // 2], label="image 1")
    with pytest.raises(ValueError, match=r"^image 1: .*zero size"):
        process_image(Image.new("RGB", (0, 5)), label="image 1")
    with pytest.raises(ValueError, match=r"^image 1: unsupported source type int"):
        process_image(123, label="image 1")


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_decompression_bomb_guard(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ValueError, match=r"^image 5: decompression-bomb guard: 40x40 = 1600 pixels .* 1000"):
        process_image(_png(Image.new("RGB", (40, 40))), label="image 5")  # Pillow's warning range
    with pytest.raises(ValueError, match=r"^image 5: decompression-bomb guard: 10000 pixels .* 2000"):
        process_image(_png(Image.new("RGB", (100, 100))), label="image 5")  # Pillow's error range


def test_resized_height_width():
    v = process_image(_noise(100, 100), resized_height=300, resized_width=500)
    assert v.grid_thw == (1, 22, 36)  # snapped to (308, 504)
    with pytest.raises(ValueError, match="resized_height and resized_width go together"):
        process_image(_noise(100, 100), resized_height=300)


# -------------------------------------------------------------------------------- PreprocessSpec

QWEN3_LIKE = PreprocessSpec(patch_size=16, merge_size=2, temporal_patch_size=2, image_mean=(0.5, 0.5, 0.5),
                            image_std=(0.5, 0.5, 0.5), min_pixels=65536, max_pixels=16777216)
OTHER_SPECS = [
    QWEN3_LIKE,
    PreprocessSpec(patch_size=14, merge_size=2, temporal_patch_size=3),                 # T = 3
    PreprocessSpec(patch_size=16, merge_size=1, image_mean=(0.1, 0.2, 0.3), image_std=(0.3, 0.2, 0.1)),
]


def _hf_for(spec):
    from transformers import Qwen2VLImageProcessor

    return Qwen2VLImageProcessor(patch_size=spec.patch_size, merge_size=spec.merge_size,
                                 temporal_patch_size=spec.temporal_patch_size,
                                 image_mean=list(spec.image_mean), image_std=list(spec.image_std),
                                 min_pixels=spec.min_pixels, max_pixels=spec.max_pixels)


def test_spec_smart_resize_uses_the_spec_factor_and_limits():
    assert QWEN3_LIKE.factor == 32 and QWEN3_LIKE.patch_dim == 1536
    for h, w in [(333, 517), (1080, 1920), (10, 10), (4000, 3000), (100, 2000)]:
        rh, rw = smart_resize(h, w, spec=QWEN3_LIKE)
        assert rh % 32 == 0 and rw % 32 == 0
        assert QWEN3_LIKE.min_pixels <= rh * rw <= QWEN3_LIKE.max_pixels
        assert (rh, rw) == smart_resize(h, w, 32, 65536, 16777216)
    assert smart_resize(333, 517, spec=QWEN3_LIKE) == (320, 512)
    assert smart_resize(10, 10, spec=QWEN3_LIKE) == (256, 256)   # min_pixels 65536 from the spec
    assert smart_resize(333, 517, 28, spec=QWEN3_LIKE) == (336, 504)  # an explicit factor wins


@pytest.mark.parametrize("spec", OTHER_SPECS, ids=["qwen3-like", "t3", "merge1"])
@pytest.mark.parametrize("h,w", [(333, 517), (10, 10), (45, 61), (1080, 1920)])
def test_spec_image_matches_transformers_configured_alike(spec, h, w):
    img = _noise(h, w)
    ours = process_image(img, spec=spec)
    _assert_same(ours, img, _hf_for(spec))
    t, gh, gw = ours.grid_thw
    assert t == 1 and ours.pixel_values.shape[1] == spec.patch_dim
    assert spec.patch_dim == 3 * spec.temporal_patch_size * spec.patch_size ** 2
    assert (gh * spec.patch_size) % spec.factor == 0 and (gw * spec.patch_size) % spec.factor == 0
    assert ours.merge_size == spec.merge_size and ours.num_tokens == spec.num_tokens(ours.grid_thw)


def test_spec_pixel_values_by_hand():
    white = process_image(Image.new("RGB", (64, 64), (255, 255, 255)), spec=QWEN3_LIKE)
    assert white.grid_thw == (1, 16, 16) and tuple(white.pixel_values.shape) == (256, 1536)
    assert white.num_tokens == 64
    assert (white.pixel_values == 1.0).all()                      # (1.0 - 0.5) / 0.5
    black = process_image(Image.new("RGB", (64, 64)), spec=QWEN3_LIKE)
    assert (black.pixel_values == -1.0).all()                     # (0.0 - 0.5) / 0.5
    clip_white = process_image(Image.new("RGB", (56, 56), (255, 255, 255)))
    assert float(clip_white.pixel_values[0, 0]) == np.float32((np.float32(1.0) - np.float32(0.48145466))
                                                              / np.float32(0.26862954))


def test_spec_patch_layout_generalises_spec_4_2():
    rng = np.random.default_rng(5)
    for spec in OTHER_SPECS:
        p, m, tp = spec.patch_size, spec.merge_size, spec.temporal_patch_size
        gh, gw = 2 * m, 3 * m
        x = rng.integers(0, 256, (gh * p, gw * p, 3), dtype=np.uint8)
        norm = (x.astype(np.float64) * (1 / 255)).astype(np.float32)
        norm = (norm - np.array(spec.image_mean, np.float32)) / np.array(spec.image_std, np.float32)
        ref = norm.transpose(2, 0, 1).reshape(3, gh // m, m, p, gw // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)
        ref = np.broadcast_to(ref[:, :, :, :, :, None], ref.shape[:5] + (tp, p, p))
        assert np.array_equal(patchify(x, spec=spec), ref.reshape(gh * gw, spec.patch_dim))
        with pytest.raises(ValueError, match=f"multiples of {spec.factor}"):
            patchify(x[: p * m - 1], spec=spec)


def test_normalisation_table_cached_per_mean_std():
    a = normalize_lut(QWEN3_LIKE)
    assert normalize_lut(PreprocessSpec(patch_size=14, image_mean=(0.5,) * 3, image_std=(0.5,) * 3)) is a
    assert normalize_lut() is normalize_lut(QWEN2_VL) is not a
    assert a.shape == (3, 256) and a.dtype == np.float32 and not a.flags.writeable
    assert a[0, 255] == 1.0 and a[0, 0] == -1.0


def test_default_spec_path_unchanged():
    assert (PATCH_SIZE, FACTOR, PATCH_DIM, MIN_PIXELS, MAX_PIXELS) == (14, 28, 1176, 3136, 12845056)
    img = _noise(333, 517)
    base = process_image(img)
    for spec in (QWEN2_VL, PreprocessSpec()):
        same = process_image(img, spec=spec)
        assert same.grid_thw == base.grid_thw and same.content_hash == base.content_hash
        assert np.array_equal(same.pixel_values.numpy(), base.pixel_values.numpy())
    assert base.merge_size == 2 and smart_resize(333, 517) == smart_resize(333, 517, spec=QWEN2_VL)


def test_content_hash_tells_specs_apart():
    img = Image.new("RGB", (64, 64), (10, 20, 30))
    a = process_image(img, spec=QWEN3_LIKE)
    b = process_image(img, spec=PreprocessSpec(patch_size=16, min_pixels=65536, max_pixels=16777216))
    assert a.grid_thw == b.grid_thw and a.content_hash != b.content_hash  # same pixels, other mean/std
    pixels = np.zeros((56, 56, 3), np.uint8)
    assert content_hash("image", (1, 4, 4), pixels) == content_hash("image", (1, 4, 4), pixels, spec=QWEN2_VL)


def test_spec_resized_height_width_snaps_to_the_spec_factor():
    v = process_image(_noise(100, 100), resized_height=300, resized_width=500, spec=QWEN3_LIKE)
    assert v.grid_thw == (1, 18, 32)  # snapped to (288, 512)
