"""PromptProcessor vs transformers 4.57 (Qwen2VLProcessor on the tiny tokenizer, slow image processor):
rendered text, token ids and M-RoPE positions; message formats; errors."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from tiny import CHAT_TEMPLATE, hf_processor, tiny_config_dict, write_tokenizer

from qvl.multimodal.prompt import PromptProcessor

MAX_PIXELS = 200704


# ------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """Tokenizer + preprocessor config only (no weights needed for prompts)."""
    d = tmp_path_factory.mktemp("prompt_ckpt")
    ids = write_tokenizer(d)
    (d / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2VLProcessor",
        "do_resize": True, "do_rescale": True, "do_normalize": True, "do_convert_rgb": True,
        "rescale_factor": 1 / 255, "resample": 3,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "min_pixels": 3136, "max_pixels": MAX_PIXELS, "patch_size": 14, "temporal_patch_size": 2,
        "merge_size": 2,
    }))
    (d / "config.json").write_text(json.dumps(tiny_config_dict(ids)))
    return d


@pytest.fixture(scope="module")
def pp(ckpt):
    return PromptProcessor.from_pretrained(ckpt)


@pytest.fixture(scope="module")
def hf(ckpt):
    return hf_processor(ckpt)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Two small images of different sizes and one frame sequence, as files and PIL objects."""
    d = tmp_path_factory.mktemp("prompt_media")
    out = {}
    for name, (w, h), color in (("a", (90, 60), (200, 30, 30)), ("b", (40, 130), (20, 160, 240))):
        img = Image.new("RGB", (w, h), color)
        for x in range(0, w, 7):        # some structure so resizing is not trivial
            for y in range(0, h, 5):
                img.putpixel((x, y), ((x * 13) % 256, (y * 29) % 256, (x * y) % 256))
        path = d / f"{name}.png"
        img.save(path)
        out[name] = (str(path), Image.open(path).convert("RGB"))
    frames = []
    for k in range(4):
        f = Image.new("RGB", (64, 56), (10 * k, 100, 200 - 20 * k))
        p = d / f"frame{k}.png"
        f.save(p)
        frames.append(str(p))
    out["frames"] = frames
    return out


@pytest.fixture(scope="module")
def hf_model(ckpt):
    """transformers' Qwen2VLModel, only for get_rope_index (tiny dims, random weights)."""
    from transformers import Qwen2VLConfig, Qwen2VLModel

    cfg = json.loads((ckpt / "config.json").read_text())
    return Qwen2VLModel(Qwen2VLConfig(**cfg)).eval()


def _img(url, text="Describe this image."):
    return [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]


CONVERSATIONS = {
    "text": [{"role": "user", "content": "Hello, world!"}],
    "text_parts": [{"role": "user", "content": [{"type": "text", "text": "Hello,"},
                                                {"type": "text", "text": " world"}]}],
    "one_image": [{"role": "user", "content": _img("file:///x.png")}],
    "two_images": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "a.png"}}, {"type": "text", "text": "and"},
        {"type": "image", "image": "b.png"}, {"type": "text", "text": "What color is the circle?"}]}],
    "video": [{"role": "user", "content": [{"type": "video", "video": "v.mp4"}, {"type": "text", "text": "What?"}]}],
    "system": [{"role": "system", "content": "You are a cat."}, {"role": "user", "content": _img("x.png")}],
    "multi_turn": [
        {"role": "user", "content": _img("x.png")},
        {"role": "assistant", "content": "A red circle."},
        {"role": "user", "content": [{"type": "text", "text": "Où est la gare? 你好 🙂"},
                                     {"type": "video", "video": "v.mp4"}]},
    ],
}


def test_video_url_renders_like_video_item(pp):
    # The hub template only knows {"type": "video"}; OpenAI-style video_url parts are normalised to it.
    as_url = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "v.mp4"}}]}]
    as_item = [{"role": "user", "content": [{"type": "video", "video": "v.mp4"}]}]
    assert pp.render(as_url) == pp.render(as_item)
    assert "<|video_pad|>" in pp.render(as_url)


# ------------------------------------------------------------------------------------- rendering


@pytest.mark.parametrize("name", list(CONVERSATIONS))
@pytest.mark.parametrize("gen", [True, False])
def test_render_matches_transformers(pp, hf, name, gen):
    msgs = CONVERSATIONS[name]
    want = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
    assert pp.render(msgs, add_generation_prompt=gen) == want


def test_render_add_vision_id(pp, hf):
    msgs = CONVERSATIONS["multi_turn"]
    want = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, add_vision_id=True)
    assert pp.render(msgs, add_vision_id=True) == want
    assert "Picture 1: " in want and "Video 1: " in want


def test_builtin_template_and_precedence(tmp_path, pp):
    bare = tmp_path / "bare"
    write_tokenizer(bare)
    cfg = json.loads((bare / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (bare / "tokenizer_config.json").write_text(json.dumps(cfg))
    msgs = CONVERSATIONS["multi_turn"]
    builtin = PromptProcessor.from_pretrained(bare)
    assert builtin.chat_template == CHAT_TEMPLATE
    assert builtin.render(msgs) == pp.render(msgs)
    # chat_template.json wins over tokenizer_config.json; a list of named templates picks "default".
    (bare / "chat_template.json").write_text(json.dumps({"chat_template": [
        {"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": "X{{ messages|length }}"}]}))
    assert PromptProcessor.from_pretrained(bare).render(msgs) == "X3"
    assert PromptProcessor.from_pretrained(bare, chat_template="{{ eos_token }}").render(msgs) == "<|im_end|>"


def test_template_features(ckpt):
    tpl = ("{% for m in messages %}{% if m.role not in ['user', 'tool'] %}{{ raise_exception('bad role') }}"
           "{% endif %}{{ m.content|tojson }}{% endfor %}")
    p = PromptProcessor.from_pretrained(ckpt, chat_template=tpl)
    assert p.roles == ("system", "user", "assistant", "tool")
    assert p.render([{"role": "tool", "content": "<é>"}]) == '"<é>"'
    with pytest.raises(ValueError, match="bad role"):
        p.render([{"role": "assistant", "content": "x"}])


def test_decode_and_no_bos(pp, hf):
    text = "<|im_start|>user\nHello, world!<|im_end|>"
    ids = pp.encode(text)
    assert ids == hf.tokenizer(text)["input_ids"]
    assert pp.decode(ids) == text
    assert pp.decode(ids, skip_special_tokens=True) == hf.tokenizer.decode(ids, skip_special_tokens=True)


def test_special_ids_checked_against_model_config(ckpt):
    from qvl.models.qwen2_vl.config import ModelConfig

    cfg = ModelConfig.from_pretrained(ckpt)
    assert PromptProcessor.from_pretrained(ckpt, model_config=cfg).image_token_id == cfg.image_token_id
    bad = json.loads((ckpt / "config.json").read_text())
    bad["image_token_id"] = bad["video_token_id"]
    with pytest.raises(ValueError, match="image_token_id"):
        PromptProcessor.from_pretrained(ckpt, model_config=ModelConfig.from_dict(bad))


def test_pixel_limits_from_preprocessor_config(tmp_path, pp):
    assert (pp.min_pixels, pp.max_pixels) == (3136, MAX_PIXELS)
    write_tokenizer(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"size": {"shortest_edge": 6272,
                                                                            "longest_edge": 100352}}))
    p = PromptProcessor.from_pretrained(tmp_path)
    assert (p.min_pixels, p.max_pixels) == (6272, 100352)
    (tmp_path / "preprocessor_config.json").unlink()
    p = PromptProcessor.from_pretrained(tmp_path)
    assert (p.min_pixels, p.max_pixels) == (3136, 12845056)


# --------------------------------------------------------------------------- tokens and positions


def test_text_only_prompt(pp, hf):
    msgs = CONVERSATIONS["text"]
    out = pp.process_messages(msgs)
    want = hf(text=[hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)])["input_ids"][0]
    assert out.token_ids == want
    n = len(out.token_ids)
    assert torch.equal(out.positions, torch.arange(n).expand(3, n)) and out.rope_delta == 0
    assert out.items == [] and out.item_offsets == []


def _hf_inputs(hf, msgs, pil_images):
    text = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return hf(text=[text], images=pil_images, return_tensors="pt")


def test_one_image_ids_pixels_positions(pp, hf, hf_model, images):
    path, pil = images["a"]
    msgs = [{"role": "user", "content": _img(path)}]
    out = pp.process_messages(msgs)
    ref = _hf_inputs(hf, msgs, [pil])
    assert out.token_ids == ref["input_ids"][0].tolist()
    assert list(out.items[0].grid_thw) == ref["image_grid_thw"][0].tolist()
    assert torch.equal(out.items[0].pixel_values, ref["pixel_values"])
    assert out.item_offsets == [out.token_ids.index(pp.image_token_id)]
    pos, delta = hf_model.get_rope_index(ref["input_ids"], ref["image_grid_thw"], None, ref["attention_mask"])
    assert torch.equal(out.positions, pos[:, 0]) and out.rope_delta == int(delta[0])


def test_two_images_interleaved(pp, hf, hf_model, images):
    (pa, ia), (pb, ib) = images["a"], images["b"]
    msgs = [{"role": "user", "content": [{"type": "text", "text": "First"}, *_img(pa, "then"),
                                         {"type": "image", "image": pb}, {"type": "text", "text": "end"}]},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": _img(pb, "again")}]
    out = pp.process_messages(msgs)
    ref = _hf_inputs(hf, msgs, [ia, ib, ib])
    assert out.token_ids == ref["input_ids"][0].tolist()
    assert [list(it.grid_thw) for it in out.items] == ref["image_grid_thw"].tolist()
    assert torch.equal(torch.cat([it.pixel_values for it in out.items]), ref["pixel_values"])
    pos, delta = hf_model.get_rope_index(ref["input_ids"], ref["image_grid_thw"], None, ref["attention_mask"])
    assert torch.equal(out.positions, pos[:, 0]) and out.rope_delta == int(delta[0])
    assert [out.token_ids[o - 1] for o in out.item_offsets] == [pp.vision_start_token_id] * 3


def test_video_and_images_positions(pp, hf, hf_model, images):
    """Video pads expanded from our grid; ids equal the HF tokenizer on the same expansion, positions equal
    get_rope_index (the HF video processor needs torchvision, so its pixels are not compared here)."""
    (pa, ia) = images["a"]
    msgs = [{"role": "user", "content": [{"type": "video", "video": images["frames"]}, *_img(pa, "both?")]}]
    out = pp.process_messages(msgs)
    video, image = out.items
    assert video.kind == "video" and image.kind == "image"
    text = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    text = text.replace("<|video_pad|>", "<|video_pad|>" * video.num_tokens)
    text = text.replace("<|image_pad|>", "<|image_pad|>" * image.num_tokens)
    ids = hf.tokenizer(text, return_tensors="pt")["input_ids"]
    assert out.token_ids == ids[0].tolist()
    pos, delta = hf_model.get_rope_index(ids, torch.tensor([image.grid_thw]), torch.tensor([video.grid_thw]),
                                         torch.ones_like(ids))
    assert torch.equal(out.positions, pos[:, 0]) and out.rope_delta == int(delta[0])


def test_qwen_vl_utils_items_equal_openai_parts(pp, images):
    (pa, _), (pb, _) = images["a"], images["b"]
    frames = images["frames"]
    openai = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "file://" + pa, "detail": "high", "max_pixels": 3136}},
        {"type": "text", "text": "x"},
        {"type": "video_url", "video_url": {"url": frames, "nframes": 4}},
        {"type": "image_url", "image_url": {"url": pb}}]}]
    qwen = [{"role": "user", "content": [
        {"type": "image", "image": pa, "max_pixels": 3136}, {"text": "x"},
        {"video": frames, "nframes": 4},
        {"image": "file://" + pb}]}]
    a, b = pp.process_messages(openai), pp.process_messages(qwen)
    assert a.token_ids == b.token_ids and torch.equal(a.positions, b.positions)
    assert [it.grid_thw for it in a.items] == [it.grid_thw for it in b.items]
    assert all(torch.equal(x.pixel_values, y.pixel_values) for x, y in zip(a.items, b.items))
    assert a.items[0].num_tokens < pp.process_messages([{"role": "user", "content": _img(pa)}]).items[0].num_tokens


def test_process_prompt_and_count_tokens(pp, images):
    (pa, ia), (pb, _) = images["a"], images["b"]
    msgs = [{"role": "user", "content": [*_img(pa), {"type": "image", "image": pb}]}]
    via_msgs = pp.process_messages(msgs)
    raw = pp.render(msgs)
    via_prompt = pp.process_prompt(raw, {"image": [ia, {"image": pb}]})
    assert via_prompt.token_ids == via_msgs.token_ids
    assert torch.equal(via_prompt.positions, via_msgs.positions)
    counted = pp.count_tokens(msgs)
    assert counted["prompt_tokens"] == len(via_msgs.token_ids)
    assert [it["tokens"] for it in counted["items"]] == [it.num_tokens for it in via_msgs.items]
    first = counted["items"][0]
    assert first["type"] == "image" and first["original_size"] == (60, 90)
    assert tuple(first["grid_thw"]) == tuple(via_msgs.items[0].grid_thw)
    # a text-only raw prompt needs no data
    assert pp.process_prompt("hi").token_ids == pp.encode("hi")


# ------------------------------------------------------------------------------------------- errors


def test_unknown_role(pp):
    with pytest.raises(ValueError, match=r"messages\[1\].*'critic'"):
        pp.render([{"role": "user", "content": "a"}, {"role": "critic", "content": "b"}])
    with pytest.raises(ValueError, match="'tool'"):
        pp.render([{"role": "tool", "content": "b"}])


@pytest.mark.parametrize("part, match", [
    ({"type": "image_url", "image_url": {}}, "needs a 'url'"),
    ({"type": "image_url", "image_url": {"url": 3}}, "source"),
    ({"type": "text"}, "'text'"),
    ({"type": "text", "text": 5}, "'text'"),
    ({"type": "audio_url", "audio_url": {"url": "x"}}, "unsupported.*'audio_url'"),
    ({"type": "image", "image": "a.png", "min_pixels": "big"}, "min_pixels"),
    ({"type": "image", "image": "a.png", "resized_height": 56}, "together"),
    ({"type": "video", "video": "v.mp4", "fps": 1, "nframes": 4}, "not both"),
    ({"type": "video", "video": []}, "empty"),
    ({"foo": 1}, "no 'type'"),
    ("just text", "must be an object"),
])
def test_malformed_part_names_message_and_part(pp, part, match):
    msgs = [{"role": "system", "content": "s"},
            {"role": "user", "content": [{"type": "text", "text": "ok"}, part]}]
    with pytest.raises(ValueError, match=match) as e:
        pp.render(msgs)
    assert "messages[1].content[1]" in str(e.value)


def test_placeholder_count_mismatch(pp, images):
    _, ia = images["a"]
    raw = "<|vision_start|><|image_pad|><|vision_end|>two?<|vision_start|><|image_pad|><|vision_end|>"
    with pytest.raises(ValueError, match="2 <\\|image_pad\\|> placeholder.*1 image"):
        pp.process_prompt(raw, {"image": ia})
    with pytest.raises(ValueError, match="0 <\\|video_pad\\|>.*1 video"):
        pp.process_prompt("no placeholders", {"video": [images["frames"]]})
    with pytest.raises(ValueError, match="unsupported modality"):
        pp.process_prompt("x", {"audio": [b"x"]})


def test_over_max_model_len_lists_items(pp, images):
    (pa, _), (pb, _) = images["a"], images["b"]
    msgs = [{"role": "user", "content": [*_img(pa), {"type": "image", "image": pb}]}]
    n = pp.count_tokens(msgs)["prompt_tokens"]
    assert len(pp.process_messages(msgs, max_model_len=n).token_ids) == n
    with pytest.raises(ValueError) as e:
        pp.process_messages(msgs, max_model_len=n - 1)
    msg = str(e.value)
    assert f"{n} tokens" in f"{msg}" and f"max_model_len {n - 1}" in msg
    assert "image 1 (messages[0].content[0])" in msg and "image 2 (messages[0].content[2])" in msg


def test_missing_image_names_item(pp, tmp_path, images):
    missing = str(tmp_path / "nope.png")
    msgs = [{"role": "user", "content": [*_img(images["a"][0]), {"type": "image", "image": missing}]}]
    for call in (pp.process_messages, pp.count_tokens):
        with pytest.raises(ValueError, match=r"image 2 \(messages\[0\].content\[2\]\)"):
            call(msgs)


def _write_mp4(path, frames=8, size=(56, 84), fps=4):
    import av
    import numpy as np

    with av.open(str(path), "w", format="mp4") as c:
        s = c.add_stream("mpeg4", rate=fps)
        s.height, s.width = size
        s.pix_fmt = "yuv420p"
        for k in range(frames):
            arr = np.full((*size, 3), (30 * k) % 256, dtype=np.uint8)
            for pkt in s.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)
    return str(path)


def test_video_file_counted_equals_processed(pp, tmp_path, images):
    clip = _write_mp4(tmp_path / "clip.mp4")
    msgs = [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": "file://" + clip, "fps": 2}},
        {"type": "image", "image": images["a"][0]}, {"type": "text", "text": "?"}]}]
    counted = pp.count_tokens(msgs, max_model_len=4096)
    out = pp.process_messages(msgs, max_model_len=4096)
    assert counted["prompt_tokens"] == len(out.token_ids)
    assert counted["items"][0]["type"] == "video" and counted["items"][0]["original_size"] == (56, 84)
    assert tuple(counted["items"][0]["grid_thw"]) == tuple(out.items[0].grid_thw)
    assert out.token_ids[out.item_offsets[0]:out.item_offsets[0] + out.items[0].num_tokens] == \
        [pp.video_token_id] * out.items[0].num_tokens


def test_refused_before_pixels_are_decoded(pp, images, monkeypatch):
    import qvl.multimodal.prompt as prompt_mod

    def no_decode(*a, **k):
        raise AssertionError("pixels decoded before the context check")

    monkeypatch.setattr(prompt_mod, "process_image", no_decode)
    msgs = [{"role": "user", "content": _img(images["a"][0])}]
    with pytest.raises(ValueError, match="max_model_len 10"):
        pp.process_messages(msgs, max_model_len=10)


def test_remote_media_downloaded_once(pp, images, monkeypatch):
    import qvl.multimodal.plan as plan_mod      # plan() fetches; load() reuses the bytes

    raw = open(images["b"][0], "rb").read()
    calls = []

    def fake_fetch(src, *, policy=None, label=""):
        calls.append((src, label))
        return raw

    monkeypatch.setattr(plan_mod, "fetch_bytes", fake_fetch)
    url = "https://example.test/b.png"
    out = pp.process_messages([{"role": "user", "content": _img(url)}], max_model_len=4096)
    local = pp.process_messages([{"role": "user", "content": _img(images["b"][0])}])
    assert calls == [(url, "image 1 (messages[0].content[0])")]
    assert out.token_ids == local.token_ids
    assert torch.equal(out.items[0].pixel_values, local.items[0].pixel_values)
