"""Bad input never hurts the server: a table of malformed / hostile requests, each answered with the
right 4xx and an OpenAI error body ({"error": {"message", "type", "param", "code"}}) naming the problem —
malformed media and limits, malformed JSON, lone surrogates, over-long text, refused vLLM options; the
whole table again while another client streams, which completes untouched; afterwards a normal request
still succeeds and every KV block is free again.

One real server process (tiny checkpoint, small limits) for the whole module.
"""
from __future__ import annotations

import base64
import io
import struct
import time
import zlib

import httpx
import numpy as np
import pytest

from test_server import ServerProcess, kv_state, png_data_url, wait_kv_free

MAX_MODEL_LEN = 512
MAX_REQUEST_BYTES = 3_000_000


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height, with one tiny (wrong-sized) IDAT: header readers see the
    claimed size; decoding fails or trips the bomb guard."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
            + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + _png_chunk(b"IEND", b""))


def data_url(raw: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(raw).decode()


def empty_video() -> bytes:
    """An mp4 with a video stream and no frames."""
    import av

    buf = io.BytesIO()
    c = av.open(buf, "w", format="mp4")
    s = c.add_stream("mpeg4", rate=4)
    s.width = s.height = 56
    s.pix_fmt = "yuv420p"
    c.start_encoding()
    c.close()
    return buf.getvalue()


def wide_png(w: int, h: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((h, w, 3), 128, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def user(*parts) -> list[dict]:
    return [{"role": "user", "content": [*parts, {"type": "text", "text": "What is this?"}]}]


def img(url: str, **opts) -> dict:
    return {"type": "image_url", "image_url": {"url": url, **opts}}


def chat(**kw) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **kw}


def _raw_chat(extra: bytes) -> bytes:
    """A chat body with one more raw JSON member (for what json.dumps cannot write)."""
    return b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, ' + extra + b"}"


OK_IMAGE = png_data_url(56, 56)

# (id, route, body (dict -> JSON, bytes -> raw), status, substrings of the message, param or None)
CASES = [
    ("invalid_json", "/v1/chat/completions", b'{"messages": [', 400, ["Invalid JSON"], None),
    ("empty_body", "/v1/chat/completions", b"", 400, ["empty"], None),
    ("body_not_object", "/v1/chat/completions", b"[1, 2]", 400, ["JSON object"], None),
    ("missing_messages", "/v1/chat/completions", {"model": "tiny"}, 400, ["messages"], "messages"),
    ("messages_not_list", "/v1/chat/completions", chat(messages="hello"), 400, ["list"], "messages"),
    ("empty_messages", "/v1/chat/completions", chat(messages=[]), 400, ["at least 1"], "messages"),
    ("unknown_role", "/v1/chat/completions", chat(messages=[{"role": "wizard", "content": "hi"}]), 400,
     ["role", "wizard"], "messages[0].role"),
    ("content_wrong_type", "/v1/chat/completions", chat(messages=[{"role": "user", "content": 42}]), 400,
     ["content must be a string or a list"], "messages[0].content"),
    ("unknown_part_type", "/v1/chat/completions",
     chat(messages=[{"role": "user", "content": [{"type": "audio", "audio": "x"}]}]), 400, ["audio"],
     "messages[0].content[0]"),
    ("image_url_without_url", "/v1/chat/completions",
     chat(messages=user({"type": "image_url", "image_url": {"detail": "high"}})), 400, ["url"],
     "messages[0].content[0].image_url.url"),
    ("negative_max_tokens", "/v1/chat/completions", chat(max_tokens=-5), 400, ["greater than or equal to 1"],
     "max_tokens"),
    ("huge_max_tokens", "/v1/chat/completions", chat(max_tokens=10**9), 400, ["maximum context length"],
     "max_tokens"),
    ("max_tokens_string", "/v1/chat/completions", chat(max_tokens="lots"), 400, ["integer"], "max_tokens"),
    ("negative_temperature", "/v1/chat/completions", chat(temperature=-0.5), 400,
     ["greater than or equal to 0"], "temperature"),
    ("top_p_over_one", "/v1/chat/completions", chat(top_p=1.5), 400, ["less than or equal to 1"], "top_p"),
    ("n_zero", "/v1/chat/completions", chat(n=0), 400, ["greater than or equal to 1"], "n"),
    ("stop_wrong_type", "/v1/chat/completions", chat(stop=[1, 2]), 400, ["string"], "stop[0]"),
    ("top_logprobs_without_logprobs", "/v1/chat/completions", chat(top_logprobs=3), 400, ["logprobs"], None),
    ("stream_options_without_stream", "/v1/chat/completions", chat(stream_options={"include_usage": True}),
     400, ["stream_options"], None),
    ("tools_malformed", "/v1/chat/completions", chat(tools=[{"type": "function"}]), 400, ["tools[0]"], None),
    ("functions_deprecated", "/v1/chat/completions", chat(functions=[{"name": "f"}]), 400, ["use tools"], None),
    ("unknown_model", "/v1/chat/completions", chat(model="gpt-9"), 404, ["gpt-9", "does not exist"], "model"),
    ("min_over_max_pixels", "/v1/chat/completions",
     chat(messages=user(img(OK_IMAGE, min_pixels=10000, max_pixels=5000))), 400, ["min_pixels", "max_pixels"],
     None),
    ("corrupt_base64", "/v1/chat/completions", chat(messages=user(img("data:image/png;base64,@@@not base64!!"))),
     400, ["base64"], None),
    ("non_image_bytes", "/v1/chat/completions",
     chat(messages=user(img(data_url(b"this is plainly not an image" * 10)))), 400, ["image"], None),
    ("zero_size_image", "/v1/chat/completions", chat(messages=user(img(data_url(png_header_only(0, 0))))), 400,
     ["image"], None),
    ("aspect_ratio_201", "/v1/chat/completions", chat(messages=user(img(data_url(wide_png(402, 2))))), 400,
     ["aspect ratio"], None),
    ("decompression_bomb", "/v1/chat/completions",
     chat(messages=user(img(data_url(png_header_only(40000, 40000))))), 400, ["decompression"], None),
    ("url_loopback", "/v1/chat/completions", chat(messages=user(img("http://127.0.0.1:8000/x.png"))), 400,
     ["127.0.0.1", "loopback"], None),
    ("url_private", "/v1/chat/completions", chat(messages=user(img("http://10.1.2.3/x.png"))), 400,
     ["10.1.2.3", "private"], None),
    ("url_metadata", "/v1/chat/completions",
     chat(messages=user(img("http://169.254.169.254/latest/meta-data/"))), 400, ["169.254.169.254"], None),
    ("file_url_not_allowed", "/v1/chat/completions", chat(messages=user(img("file:///etc/passwd"))), 400,
     ["local media is not allowed"], None),
    ("unsupported_scheme", "/v1/chat/completions", chat(messages=user(img("ftp://example.com/x.png"))), 400,
     ["unsupported URL scheme", "ftp"], None),
    ("too_many_images", "/v1/chat/completions", chat(messages=user(*[img(OK_IMAGE)] * 3)), 400,
     ["Too many images", "3 > max_images_per_request 2"], "messages"),
    ("too_many_videos", "/v1/chat/completions",
     chat(messages=user(*[{"type": "video", "video": [OK_IMAGE, OK_IMAGE]}] * 2)), 400, ["Too many videos"],
     "messages"),
    ("prompt_over_context", "/v1/chat/completions",
     chat(messages=[{"role": "user", "content": "red green blue " * 400}]), 400,
     ["maximum context length is 512", "text"], "messages"),
    ("image_over_context", "/v1/chat/completions",
     chat(messages=user(img(png_data_url(644, 644), max_pixels=644 * 644))), 400,
     ["maximum context length is 512", "image 1: 529 tokens (644x644 -> 644x644)"], "messages"),
    ("too_many_visual_tokens", "/v1/chat/completions",
     chat(messages=user(img(png_data_url(504, 504), max_pixels=504 * 504))), 400,
     ["Too many visual tokens", "324 > max_visual_tokens_per_request 300"], "messages"),
    # the context check reads only the header: a PNG that claims 2800x2800 but has no real pixel data is
    # refused for its size (10000 tokens), not as a corrupt image, so nothing was decoded
    ("over_context_from_header", "/v1/chat/completions",
     chat(messages=user(img(data_url(png_header_only(2800, 2800)), max_pixels=2800 * 2800))), 400,
     ["maximum context length is 512", "image 1: 10000 tokens"], "messages"),
    ("video_no_frames", "/v1/chat/completions",
     chat(messages=user({"type": "video_url", "video_url": {"url": data_url(empty_video(), "video/mp4")}})),
     400, ["video"], None),
    ("empty_frame_list", "/v1/chat/completions", chat(messages=user({"type": "video", "video": []})), 400,
     ["at least 1"], None),
    ("too_many_frame_urls", "/v1/chat/completions",
     chat(messages=user({"type": "video", "video": ["data:,x"] * 769})), 400, ["at most 768"],
     "messages[0].content[0].video"),
    ("fps_and_nframes", "/v1/chat/completions",
     chat(messages=user({"type": "video", "video": [OK_IMAGE] * 2, "fps": 2, "nframes": 2})), 400,
     ["fps or nframes"], None),
    ("body_too_large", "/v1/chat/completions", b'{"pad": "' + b"x" * (MAX_REQUEST_BYTES + 10) + b'"}', 413,
     ["too large"], None),
    ("completion_empty_prompt", "/v1/completions", {"model": "tiny", "prompt": ""}, 400, ["prompt"], "prompt"),
    ("completion_token_out_of_vocab", "/v1/completions", {"model": "tiny", "prompt": [1, 2, 10**7]}, 400,
     ["out of range"], "prompt"),
    ("completion_suffix", "/v1/completions", {"model": "tiny", "prompt": "a", "suffix": "b"}, 400,
     ["suffix"], None),
    ("tokenize_neither", "/tokenize", {"model": "tiny"}, 400, ["messages or prompt"], None),
    # malformed JSON that Python's parser takes (or dies on): 400s, never 500s
    ("json_nested_1001_levels", "/v1/chat/completions", b'{"messages": ' + b"[" * 1001 + b"]" * 1001 + b"}", 400,
     ["nested deeper than 64"], None),
    ("json_nested_100_levels", "/v1/chat/completions", b'{"x": ' + b"[" * 100 + b"]" * 100 + b"}", 400,
     ["nested deeper than 64"], None),
    ("json_int_5000_digits", "/v1/chat/completions", _raw_chat(b'"seed": ' + b"9" * 5000), 400,
     ["5000 digits"], None),
    ("json_nan", "/v1/chat/completions", _raw_chat(b'"temperature": NaN'), 400, ["NaN is not valid JSON"], None),
    ("json_float_overflow", "/v1/chat/completions", _raw_chat(b'"temperature": 1e999'), 400, ["out of range"],
     None),
    ("json_not_utf8", "/v1/chat/completions", b'{"messages": "\xff\xfe"}', 400, ["Invalid JSON"], None),
    ("surrogate_in_message_text", "/v1/chat/completions",
     b'{"messages": [{"role": "user", "content": "hi \\ud800 there"}]}', 400, ["lone UTF-16 surrogate"],
     "messages[0].content"),
    ("surrogate_in_model_name", "/v1/chat/completions", _raw_chat(b'"model": "tiny\\udfff"'), 400,
     ["surrogate"], "model"),
    ("surrogate_in_tokenize_prompt", "/tokenize", b'{"prompt": "\\ud83d"}', 400, ["surrogate"], "prompt"),
    ("surrogate_in_key", "/v1/chat/completions", _raw_chat(b'"\\ud800": 1'), 400, ["surrogate"], None),
    # a text far over the context is refused from its length, before it is tokenized whole
    ("text_over_context_by_characters", "/v1/chat/completions",
     chat(messages=[{"role": "user", "content": "x" * 2_000_000}]), 400, ["2000000 characters"], "messages"),
    ("completion_text_over_context", "/v1/completions", {"prompt": "red green " * 100_000}, 400,
     ["maximum context length is 512"], "prompt"),
    ("tokenize_text_over_context", "/tokenize", {"prompt": "y" * 2_000_000}, 400, ["characters"], "prompt"),
    ("too_many_prompts", "/v1/completions", {"prompt": ["a"] * 300}, 400, ["at most 256 prompts"], "prompt"),
    ("too_many_choices", "/v1/completions", {"prompt": ["a"] * 100, "n": 3}, 400, ["300 choices", "at most 256"],
     None),
    # vLLM options qvl does not implement: refused by name rather than silently ignored
    ("chat_template_per_request", "/v1/chat/completions", chat(chat_template="{{ 1 }}"), 400,
     ["--chat-template"], "chat_template"),
    ("beam_search", "/v1/chat/completions", chat(use_beam_search=True), 400, ["beam search"], "use_beam_search"),
    ("bad_words", "/v1/chat/completions", chat(bad_words=["x"]), 400, ["not supported"], "bad_words"),
    ("audio_output", "/v1/chat/completions", chat(modalities=["audio"]), 400, ["text"], "modalities"),
    ("mm_processor_kwargs_unknown_key", "/v1/chat/completions", chat(mm_processor_kwargs={"do_resize": False}),
     400, ["not permitted"], "mm_processor_kwargs.do_resize"),
    ("mm_processor_kwargs_bad_value", "/v1/chat/completions", chat(mm_processor_kwargs={"max_pixels": -1}),
     400, ["greater than 0"], "mm_processor_kwargs.max_pixels"),
    ("detokenize_out_of_vocab", "/detokenize", {"tokens": [1, 10**7]}, 400, ["out of range"], "tokens"),
    ("detokenize_negative", "/detokenize", {"tokens": [-1]}, 400, ["greater than or equal to 0"], "tokens[0]"),
]


@pytest.fixture(scope="module")
def server(tiny_ckpt, tmp_path_factory):
    log = tmp_path_factory.mktemp("server_err_log") / "server.log"
    srv = ServerProcess(tiny_ckpt, ["--served-model-name", "tiny", "--max-model-len", str(MAX_MODEL_LEN),
                                    "--max-images-per-request", "2", "--max-videos-per-request", "1",
                                    "--max-visual-tokens-per-request", "300",
                                    "--max-request-bytes", str(MAX_REQUEST_BYTES),
                                    "--graceful-shutdown-timeout", "0.5",
                                    # the cases below ask for more pixels than the checkpoint's 256 tokens
                                    "--mm-processor-kwargs", '{"max_pixels": 12845056}'], log)
    yield srv
    rc = srv.stop()
    assert rc == 0, f"server exit code {rc}:\n{srv.log_path.read_text()[-3000:]}"


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def test_table_has_enough_kinds():
    assert len(CASES) >= 25
    assert len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_request(http, case):
    _, route, body, status, needles, param = case
    if isinstance(body, bytes):
        r = http.post(route, content=body, headers={"Content-Type": "application/json"})
    else:
        r = http.post(route, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == ("not_found_error" if status == 404 else "invalid_request_error")
    for needle in needles:
        assert needle.lower() in err["message"].lower(), (needle, err["message"])
    if param is not None:
        assert err["param"] == param, err


def _send(client: httpx.Client, route: str, body) -> httpx.Response:
    if isinstance(body, bytes):
        return client.post(route, content=body, headers={"Content-Type": "application/json"})
    return client.post(route, json=body)


def test_table_while_another_client_streams(server, http):
    """Every case of the table, plus a chunked body over the limit, while another client streams: each gets
    its 4xx and the stream completes untouched (all its tokens, finish_reason "length", no error chunk)."""
    import json
    import threading

    body = chat(messages=[{"role": "user", "content": "Talk."}], max_tokens=400, ignore_eos=True, stream=True,
                stream_options={"include_usage": True}, temperature=0)
    events, first = [], threading.Event()

    def reader():
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    first.set()

    t = threading.Thread(target=reader)
    t.start()
    assert first.wait(60)
    wrong = []
    for name, route, case_body, status, _, _ in CASES:
        r = _send(http, route, case_body)
        if r.status_code != status:
            wrong.append((name, r.status_code, r.text[:200]))

    def chunks():
        yield b'{"pad": "'
        for _ in range(40):
            yield b"x" * 100_000
        yield b'"}'

    r = http.post("/v1/chat/completions", content=chunks(), headers={"Content-Type": "application/json"})
    if r.status_code != 413:
        wrong.append(("chunked_too_large", r.status_code, r.text[:200]))
    still_streaming = t.is_alive()
    t.join(120)
    assert not wrong, wrong
    assert still_streaming, "the stream ended before the table was through: make it longer"
    assert events[-1] == "[DONE]"
    payloads = [json.loads(e) for e in events[:-1]]
    assert not any("error" in p for p in payloads)
    assert [c["finish_reason"] for p in payloads for c in p["choices"] if c["finish_reason"]] == ["length"]
    assert payloads[-1]["usage"]["completion_tokens"] == 400


def test_routing_errors_have_bodies(http):
    r = http.get("/v1/nope")
    assert r.status_code == 404 and "error" in r.json()
    r = http.get("/v1/chat/completions")
    assert r.status_code == 405 and "error" in r.json()


def test_server_healthy_after_bad_inputs(server, http):
    """Run after the table (file order): a normal request works and the KV pool is full again."""
    r = http.post("/v1/chat/completions", json=chat(messages=user(img(OK_IMAGE)), max_tokens=5, temperature=0))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["finish_reason"] in ("stop", "length")
    assert body["usage"]["completion_tokens"] >= 1
    wait_kv_free(http)
    free, total, busy = kv_state(http)
    assert total > 0 and free == total and busy == 0
    assert "Traceback" not in server.log()


def test_nonstream_client_timeout_aborts(server, http):
    """A non-streaming client that gives up: the server notices the disconnect and frees the blocks."""
    body = chat(messages=[{"role": "user", "content": "Talk."}], max_tokens=470, ignore_eos=True)
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server.url + "/v1/chat/completions", json=body, timeout=0.1)
    wait_kv_free(http)
    assert "status=499" in server.log()


def test_sigterm_with_request_in_flight(server):
    """Last test of the module: SIGTERM while a stream runs -> the stream ends, the process exits 0."""
    import signal
    import threading

    body = chat(messages=[{"role": "user", "content": "Talk."}], max_tokens=450, ignore_eos=True, stream=True)
    seen, ended = [], threading.Event()

    def reader():
        try:
            with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    seen.append(line)
        except httpx.HTTPError:
            pass                      # cut off after the grace period: also acceptable
        ended.set()

    t = threading.Thread(target=reader)
    t.start()
    deadline = time.monotonic() + 30
    while len(seen) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert seen, "stream did not start"
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(30) == 0, server.log()[-3000:]
    assert ended.wait(10)
    t.join()
    assert "Traceback" not in server.log()
