"""plan -> check -> load: the plan reads headers only and knows the prompt's length; check() is the one
context / limit check (on a plan or a loaded prompt); load() decodes from the plan's bytes and rechecks;
a remote image is downloaded once per prompt (a real local HTTP server counts the GETs); the chat
template flags continue_final_message / chat_template_kwargs match transformers."""
from __future__ import annotations

import http.server
import io
import threading
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from test_prompt import _img, ckpt, hf, images, pp  # noqa: F401 (fixtures)

from qvl.multimodal.media import MediaPolicy
from qvl.multimodal.plan import PromptLimitError, PromptLimits, PromptPlan, check


def png_bytes(w: int, h: int, seed: int = 0) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


class CountingMediaServer:
    """http.server in a thread serving PNGs at /<name>.png and counting GET hits per path."""

    def __init__(self, files: dict[str, bytes]):
        hits: dict[str, int] = {}
        self.hits = hits

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                hits[self.path] = hits.get(self.path, 0) + 1
                body = files.get(self.path.lstrip("/"))
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def media_server():
    srv = CountingMediaServer({"cat.png": png_bytes(84, 56), "dog.png": png_bytes(56, 112, 1)})
    yield srv
    srv.close()


OPEN = MediaPolicy(allow_private_addresses=True)    # the counting server is on loopback


# ------------------------------------------------------------------------------------------- plan


def test_plan_reads_headers_and_knows_the_length(pp, images, monkeypatch):
    import qvl.multimodal.prompt as prompt_mod

    (pa, _), (pb, _) = images["a"], images["b"]
    msgs = [{"role": "user", "content": [*_img(pa), {"type": "video", "video": images["frames"]},
                                         {"type": "image", "image": pb}]}]
    loaded = pp.process_messages(msgs)

    def no_decode(*a, **k):
        raise AssertionError("plan decoded pixels")

    monkeypatch.setattr(prompt_mod, "process_image", no_decode)
    monkeypatch.setattr(prompt_mod, "process_video", no_decode)
    plan = pp.plan(msgs)
    assert isinstance(plan, PromptPlan)
    assert plan.num_tokens == len(loaded.token_ids)
    assert plan.text_tokens + plan.visual_tokens == plan.num_tokens
    assert [b.num_tokens for b in plan.budgets] == [it.num_tokens for it in loaded.items]
    assert [b.kind for b in plan.budgets] == ["image", "video", "image"]
    assert [tuple(b.grid_thw) for b in plan.budgets] == [tuple(it.grid_thw) for it in loaded.items]
    assert plan.token_ids.count(pp.image_token_id) == 2 and plan.token_ids.count(pp.video_token_id) == 1
    assert pp.expanded_token_ids(plan) == loaded.token_ids
    assert plan.counts() == pp.count_tokens(msgs)


def test_load_equals_process_messages(pp, images):
    msgs = [{"role": "user", "content": _img(images["a"][0])}]
    a, b = pp.load(pp.plan(msgs)), pp.process_messages(msgs)
    assert a.token_ids == b.token_ids and a.item_offsets == b.item_offsets and a.rope_delta == b.rope_delta
    assert torch.equal(a.positions, b.positions)
    assert torch.equal(a.items[0].pixel_values, b.items[0].pixel_values)
    assert a.labels == ["image 1 (messages[0].content[0])"]


def test_plan_of_a_raw_prompt(pp, images):
    raw = "<|vision_start|><|image_pad|><|vision_end|>What?"
    plan = pp.plan(prompt=raw, multi_modal_data={"image": images["a"][1]})
    assert plan.text == raw and len(plan.items) == 1
    assert pp.load(plan).token_ids == pp.process_prompt(raw, {"image": images["a"][1]}).token_ids
    with pytest.raises(ValueError, match="exactly one"):
        pp.plan([{"role": "user", "content": "x"}], prompt="x")
    with pytest.raises(ValueError, match="exactly one"):
        pp.plan()
    with pytest.raises(ValueError, match="multi_modal_data goes with a raw prompt"):
        pp.plan([{"role": "user", "content": "x"}], multi_modal_data={"image": []})
    with pytest.raises(ValueError, match="chat messages"):
        pp.plan(prompt="x", continue_final_message=True)


# ------------------------------------------------------------------------------------------ check


def test_check_limits_codes_and_fields(pp, images):
    msgs = [{"role": "user", "content": _img(images["a"][0])}]
    plan = pp.plan(msgs)
    n, vis = plan.num_tokens, plan.visual_tokens
    assert check(plan, PromptLimits(n)) == n                          # the prompt alone may fill the context
    with pytest.raises(PromptLimitError) as e:                        # ... but not when a completion must fit
        check(plan, PromptLimits(n, max_new_tokens=1))
    assert e.value.code == "context_length_exceeded" and e.value.field == "prompt"
    assert "leaves no room for the completion" in str(e.value)
    with pytest.raises(PromptLimitError) as e:
        check(plan, PromptLimits(n - 1))
    msg = str(e.value)
    assert f"maximum context length is {n - 1} tokens" in msg and f"max_model_len {n - 1}" in msg
    assert f"the prompt has {n} tokens" in msg and f"image 1: {vis} tokens (60x90 -> 56x84)" in msg
    assert "image 1 (messages[0].content[0])" in msg                  # names where to lower max_pixels
    with pytest.raises(PromptLimitError) as e:
        check(plan, PromptLimits(4096, max_visual_tokens_per_request=vis - 1))
    assert e.value.code == "too_many_visual_tokens" and f"{vis} > max_visual_tokens_per_request" in str(e.value)
    with pytest.raises(PromptLimitError) as e:
        check(plan, PromptLimits(n + 5, max_new_tokens=10))
    assert e.value.code == "context_length_exceeded" and e.value.field == "max_tokens"
    assert f"you requested {n + 10} tokens ({n} in the prompt, 10 for the completion)" in str(e.value)
    assert check(plan, PromptLimits(n + 10, max_new_tokens=10, max_visual_tokens_per_request=vis)) == n
    # the same check on the loaded prompt (exact counts) gives the same answers
    loaded = pp.load(plan)
    assert check(loaded, PromptLimits(n)) == n
    with pytest.raises(PromptLimitError, match=f"image 1: {vis} tokens"):
        check(loaded, PromptLimits(n - 1))


def test_load_rechecks_the_exact_length(pp, images):
    """A header that under-counts (as a video container may) is caught after decoding."""
    msgs = [{"role": "user", "content": _img(images["a"][0])}]
    plan = pp.plan(msgs, max_model_len=4096)
    n = plan.num_tokens
    item = plan.items[0]
    lying = replace(plan, items=[replace(item, budget=replace(item.budget, num_tokens=1))])
    limits = PromptLimits(n - 1)
    check(lying, limits)                                             # the header says it fits
    with pytest.raises(PromptLimitError, match=f"the prompt has {n} tokens"):
        pp.load(lying, limits)
    assert len(pp.load(plan, PromptLimits(n)).token_ids) == n


# ------------------------------------------------------------------------------ one download each


def test_remote_image_fetched_once_per_prompt(pp, media_server):
    url = media_server.url + "/cat.png"
    msgs = [{"role": "user", "content": _img(url)}]
    for kwargs in ({}, {"max_model_len": 4096}):
        before = media_server.hits.get("/cat.png", 0)
        out = pp.process_messages(msgs, policy=OPEN, **kwargs)
        assert media_server.hits["/cat.png"] - before == 1, kwargs
        assert out.items[0].grid_thw == (1, 4, 6)
    before = media_server.hits["/cat.png"]
    assert pp.count_tokens(msgs, policy=OPEN)["items"][0]["tokens"] == 6
    assert media_server.hits["/cat.png"] - before == 1
    # the same URL twice in one prompt is two items, each fetched once; a frame list fetches each frame
    two = [{"role": "user", "content": [*_img(url), {"type": "video", "video": [url, url]}]}]
    before = media_server.hits["/cat.png"]
    pp.process_messages(two, policy=OPEN, max_model_len=4096)
    assert media_server.hits["/cat.png"] - before == 3


def test_remote_image_refused_by_the_strict_policy(pp, media_server):
    before = dict(media_server.hits)
    with pytest.raises(ValueError, match="127.0.0.1"):
        pp.plan([{"role": "user", "content": _img(media_server.url + "/dog.png")}], policy=MediaPolicy())
    assert media_server.hits == before                               # refused before connecting


# --------------------------------------------------------------------------------- template flags


CONTINUE = {
    "string": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "The answer is "}],
    "parts": [{"role": "user", "content": [{"type": "image", "image": "x.png"}, {"type": "text", "text": "what"}]},
              {"role": "assistant", "content": [{"type": "text", "text": "It is"}]}],
    "empty": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}],
}


@pytest.mark.parametrize("name", list(CONTINUE))
def test_continue_final_message_matches_transformers(pp, hf, name):
    msgs = CONTINUE[name]
    want = hf.apply_chat_template(msgs, tokenize=False, continue_final_message=True)
    got = pp.render(msgs, add_generation_prompt=False, continue_final_message=True)
    assert got == want
    assert not got.endswith("<|im_end|>\n")
    plan = pp.plan([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "The answer is "}],
                   add_generation_prompt=False, continue_final_message=True)
    assert plan.text.endswith("<|im_start|>assistant\nThe answer is ")


def test_continue_final_message_errors(pp):
    with pytest.raises(ValueError, match="cannot both be true"):
        pp.plan(CONTINUE["string"], add_generation_prompt=True, continue_final_message=True)
    with pytest.raises(ValueError, match="last message to be the assistant's.*'user'"):
        pp.plan([{"role": "user", "content": "Hi"}], add_generation_prompt=False, continue_final_message=True)
    only_image = [{"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": [{"type": "image", "image": "x.png"}]}]
    with pytest.raises(ValueError, match="no text to continue"):
        pp.render(only_image, add_generation_prompt=False, continue_final_message=True)


def test_chat_template_kwargs(pp, hf, images):
    msgs = [{"role": "user", "content": [{"type": "image", "image": images["a"][0]}, {"type": "text", "text": "?"}]}]
    plan = pp.plan(msgs, chat_template_kwargs={"add_vision_id": True})
    assert plan.text == hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True,
                                               add_vision_id=True)
    assert "Picture 1: " in plan.text
    with pytest.raises(ValueError, match="may not set messages"):
        pp.plan(msgs, chat_template_kwargs={"messages": []})
