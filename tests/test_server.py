"""The OpenAI-compatible server, end to end: a real uvicorn process (one per module) on a tiny random
checkpoint, driven by the official `openai` client and by httpx for what the client hides.

Covers: /health without auth, API key refused/accepted, /v1/models, chat with a data: image
(non-stream and stream: role first, content deltas, finish_reason last, usage chunk, [DONE]), two images,
a PyAV video (file and data: URL) and a frame list, usage == /tokenize, n=2, seed reproducibility, stop
strings, logprobs, /v1/completions, /metrics moving, a disconnect mid-stream freeing its KV blocks,
concurrent requests, continue_final_message / chat_template_kwargs, and SIGTERM -> exit 0 (fixture
teardown). A second, in-process server (create_app over AsyncEngine(engine=LLMEngine)) with a media
policy opened for loopback shows one download per remote image per request, never on the event loop.
"""
from __future__ import annotations

import base64
import contextlib
import io
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

openai = pytest.importorskip("openai")

API_KEY = "test-key-123"
MAX_MODEL_LEN = 1024


# ------------------------------------------------------------------------------------------ helpers

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def app_server(app, name: str = "test-uvicorn"):
    """Serve an ASGI app under a real uvicorn in a daemon thread; yields (base URL, the thread); stops it
    on exit."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name=name, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "in-process server did not start"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}", thread
    finally:
        server.should_exit = True
        thread.join(30)


class ServerProcess:
    """`python -m qvl.server.launch MODEL ...` (or `command`, e.g. qvl.cli's serve) in a subprocess; waits for
    /health; SIGTERM on stop()."""

    def __init__(self, model: Path, extra_args: list[str], log_path: Path, env: dict | None = None,
                 command: list[str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        cmd = [*(command or [sys.executable, "-m", "qvl.server.launch"]), str(model), "--host", "127.0.0.1",
               "--port", str(self.port), "--device", "cpu", "--dtype", "float32", "--threads", "1", *extra_args]
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})})
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.proc.kill()
        raise RuntimeError(f"server did not become healthy in 180 s:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return Path(self.log_path).read_text()

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def metrics_values(text: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value} (labels kept verbatim)."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def metric(values: dict[str, float], name: str, **labels) -> float:
    """Sum of the series `name` whose labels include `labels`."""
    total = 0.0
    for key, v in values.items():
        base = key.split("{", 1)[0]
        if base != name:
            continue
        if all(f'{k}="{val}"' in key for k, val in labels.items()):
            total += v
    return total


def png_data_url(w: int, h: int, seed: int = 0) -> str:
    from PIL import Image

    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def make_video(path: Path, frames: int = 8, size: int = 56, fps: int = 4) -> bytes:
    import av

    with av.open(str(path), "w", format="mp4") as c:
        s = c.add_stream("mpeg4", rate=fps)
        s.width = s.height = size
        s.pix_fmt = "yuv420p"
        for i in range(frames):
            arr = np.zeros((size, size, 3), np.uint8)
            arr[:, : (i + 1) * size // frames] = (40 * i % 255, 200, 90)
            for p in s.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path.read_bytes()


def image_msg(*urls: str, text: str = "Describe this image.") -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


# ------------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def media_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("media")


@pytest.fixture(scope="module")
def server(tiny_ckpt, media_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("server_log") / "server.log"
    # the key comes from the environment (read at startup); --api-key KEY is the flag form
    srv = ServerProcess(tiny_ckpt, ["--served-model-name", "tiny-qwen2-vl",
                                    "--max-model-len", str(MAX_MODEL_LEN),
                                    "--allowed-local-media-path", str(media_dir),
                                    "--allowed-media-domains", "media.example.com,*.cdn.example.com"], log,
                        env={"QVL_API_KEY": API_KEY})
    yield srv
    rc = srv.stop()
    log_text = srv.log_path.read_text()
    assert rc == 0, f"server exit code {rc} after SIGTERM:\n{log_text[-3000:]}"
    assert "Traceback" not in log_text, log_text[-5000:]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120) as c:
        yield c


def tokenize(http, messages) -> dict:
    r = http.post("/tokenize", json={"messages": messages})
    assert r.status_code == 200, r.text
    return r.json()


def kv_state(http) -> tuple[float, float, float]:
    v = metrics_values(http.get("/metrics").text)
    return (metric(v, "qvl:kv_cache_blocks_free"), metric(v, "qvl:kv_cache_blocks_total"),
            metric(v, "qvl:num_requests_running") + metric(v, "qvl:num_requests_waiting"))


def wait_kv_free(http, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        free, total, busy = kv_state(http)
        if total > 0 and free == total and busy == 0:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"KV pool not back to full: free {free} / total {total}, busy {busy}")
        time.sleep(0.1)


# ------------------------------------------------------------------------------------------ tests

def test_health_models_and_auth(server, client, http):
    assert httpx.get(server.url + "/health").status_code == 200            # no key needed
    r = httpx.get(server.url + "/v1/models")
    assert r.status_code == 401
    err = r.json()["error"]
    assert err["type"] == "authentication_error" and "API key" in err["message"]
    r = httpx.get(server.url + "/v1/models", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"]["message"] == "Invalid API key"
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="tiny-qwen2-vl", messages=[{"role": "user", "content": "hi"}])
    for path in ("/metrics",):
        assert httpx.get(server.url + path).status_code == 401
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny-qwen2-vl"]
    assert models[0].max_model_len == MAX_MODEL_LEN


def test_chat_image_nonstream_and_stream(client, http):
    url = png_data_url(84, 56)
    msgs = image_msg(url)
    counts = tokenize(http, msgs)
    assert counts["items"][0]["type"] == "image"
    assert counts["items"][0]["tokens"] == (56 // 28) * (84 // 28)
    assert list(counts["items"][0]["resized_size"]) == [56, 84]

    r = client.chat.completions.create(model="tiny-qwen2-vl", messages=msgs, max_tokens=8, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    c = r.choices[0]
    assert c.message.role == "assistant" and isinstance(c.message.content, str)
    assert c.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens == counts["count"]
    assert 1 <= r.usage.completion_tokens <= 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.usage.prompt_tokens_details.cached_tokens >= 0

    chunks = list(client.chat.completions.create(model="tiny-qwen2-vl", messages=msgs, max_tokens=8,
                                                 temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [ch for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0] is [ch for ch in chunks if ch.choices][-1]
    assert finals[0].choices[0].finish_reason == c.finish_reason
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == c.message.content                                      # greedy: same text streamed
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == counts["count"]
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    assert all(ch.usage is None for ch in chunks[:-1])


def test_stream_wire_format(http):
    """Raw SSE: `data: {json}` lines, role first, finish last, `data: [DONE]` terminator."""
    body = {"model": "tiny-qwen2-vl", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4,
            "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert all(ln.startswith("data: ") for ln in lines)
    assert lines[-1] == "data: [DONE]"
    import json

    from qvl.server.protocol import ChatCompletionChunk
    chunks = [json.loads(ln[6:]) for ln in lines[:-1]]
    for ch in chunks:
        ChatCompletionChunk.model_validate(ch)                            # our own schema, field by field
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert all(ch["choices"][0]["finish_reason"] is None for ch in chunks[:-1])


def test_two_images_usage_matches_tokenize(client, http):
    msgs = image_msg(png_data_url(56, 56, 1), png_data_url(112, 84, 2), text="Compare the pictures.")
    counts = tokenize(http, msgs)
    assert [it["tokens"] for it in counts["items"]] == [4, 12]
    r = client.chat.completions.create(model="tiny-qwen2-vl", messages=msgs, max_tokens=4, temperature=0)
    assert r.usage.prompt_tokens == counts["count"]
    # per-image max_pixels lowers that image's tokens, and usage follows
    msgs[0]["content"][1]["image_url"]["max_pixels"] = 56 * 56
    counts2 = tokenize(http, msgs)
    assert [it["tokens"] for it in counts2["items"]] == [4, 2]           # 84x112 -> 28x56 (smart_resize)
    assert list(counts2["items"][1]["resized_size"]) == [28, 56]
    r = client.chat.completions.create(model="tiny-qwen2-vl", messages=msgs, max_tokens=4, temperature=0)
    assert r.usage.prompt_tokens == counts2["count"] == counts["count"] - 10


def test_video_file_data_url_and_frames(client, http, media_dir):
    raw = make_video(media_dir / "clip.mp4", frames=8, size=56, fps=4)
    data_url = "data:video/mp4;base64," + base64.b64encode(raw).decode()
    frames = [png_data_url(56, 56, k) for k in range(4)]
    cases = [
        {"type": "video_url", "video_url": {"url": f"file://{media_dir / 'clip.mp4'}", "fps": 2}},
        {"type": "video_url", "video_url": {"url": data_url, "nframes": 4}},
        {"type": "video", "video": frames},
    ]
    for part in cases:
        msgs = [{"role": "user", "content": [part, {"type": "text", "text": "What happens?"}]}]
        counts = tokenize(http, msgs)
        item = counts["items"][0]
        assert item["type"] == "video" and item["tokens"] > 0
        r = client.chat.completions.create(model="tiny-qwen2-vl", messages=msgs, max_tokens=4, temperature=0)
        assert r.usage.prompt_tokens == counts["count"], part


def test_n2_seed_and_stop(client):
    msgs = [{"role": "user", "content": "Tell me a story about a red circle."}]
    kw = dict(model="tiny-qwen2-vl", messages=msgs, max_tokens=12, temperature=1.0)
    r = client.chat.completions.create(n=2, seed=7, **kw)
    assert [c.index for c in r.choices] == [0, 1]
    assert r.usage.completion_tokens <= 24                                # both choices, prompt counted once
    a = client.chat.completions.create(seed=1234, **kw).choices[0].message.content
    b = client.chat.completions.create(seed=1234, **kw).choices[0].message.content
    assert a == b
    outs = {client.chat.completions.create(seed=s, **kw).choices[0].message.content for s in range(4)}
    assert len(outs) > 1                                                  # seeds matter

    # stop strings: cut a greedy answer at a substring of itself
    g = client.chat.completions.create(model="tiny-qwen2-vl", messages=msgs, max_tokens=24, temperature=0,
                                       extra_body={"ignore_eos": True})
    full = g.choices[0].message.content
    # a stop string of plain ASCII from the second half (byte-fallback tokens can decode to U+FFFD first)
    starts = [i for i in range(len(full) // 2, len(full) - 1)
              if full[i:i + 2].isascii() and full[i:i + 2].isprintable() and full[i:i + 2].strip()]
    assert starts, full
    stop = full[starts[0]:starts[0] + 2]
    s = client.chat.completions.create(model="tiny-qwen2-vl", messages=msgs, max_tokens=24, temperature=0,
                                       stop=[stop], extra_body={"ignore_eos": True})
    assert s.choices[0].finish_reason == "stop"
    assert s.choices[0].message.content == full[:full.index(stop)]


def test_n2_stream_choices(client):
    chunks = list(client.chat.completions.create(
        model="tiny-qwen2-vl", messages=[{"role": "user", "content": "hi"}], max_tokens=5, n=2,
        temperature=1.0, seed=3, stream=True))
    for i in (0, 1):
        mine = [ch.choices[0] for ch in chunks if ch.choices and ch.choices[0].index == i]
        assert mine[0].delta.role == "assistant"
        assert mine[-1].finish_reason in ("stop", "length")


def test_logprobs_and_completions(client):
    r = client.chat.completions.create(model="tiny-qwen2-vl", messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=4, temperature=0, logprobs=True, top_logprobs=3)
    lp = r.choices[0].logprobs.content
    assert len(lp) == r.usage.completion_tokens
    for t in lp:
        assert t.logprob <= 0 and len(t.top_logprobs) == 3
        assert t.top_logprobs[0].logprob >= t.top_logprobs[-1].logprob
        assert abs(t.top_logprobs[0].logprob - t.logprob) < 1e-4           # greedy picks the top token

    c = client.completions.create(model="tiny-qwen2-vl", prompt="The quick brown fox", max_tokens=5,
                                  temperature=0, logprobs=2)
    assert c.object == "text_completion" and len(c.choices) == 1
    assert len(c.choices[0].logprobs.tokens) == c.usage.completion_tokens
    chunks = list(client.completions.create(model="tiny-qwen2-vl", prompt="The quick brown fox", max_tokens=5,
                                            temperature=0, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks) == c.choices[0].text
    batch = client.completions.create(model="tiny-qwen2-vl", prompt=["red", "green blue"], max_tokens=3,
                                      temperature=0)
    assert [ch.index for ch in batch.choices] == [0, 1]
    ids = client.completions.create(model="tiny-qwen2-vl", prompt=[1, 2, 3], max_tokens=2, temperature=0)
    assert ids.usage.prompt_tokens == 3


def test_metrics_move(client, http):
    before = metrics_values(http.get("/metrics").text)
    client.chat.completions.create(model="tiny-qwen2-vl", messages=[{"role": "user", "content": "count"}],
                                   max_tokens=3, temperature=0, extra_body={"ignore_eos": True})
    text = http.get("/metrics").text
    after = metrics_values(text)
    for name in ("qvl:request_success_total", "qvl:prompt_tokens_total", "qvl:generation_tokens_total",
                 "qvl:time_to_first_token_seconds_count", "qvl:e2e_request_latency_seconds_count",
                 "qvl:request_prompt_tokens_count", "qvl:request_generation_tokens_count"):
        assert metric(after, name) > metric(before, name), name
    assert metric(after, "qvl:request_success_total", finished_reason="length") >= 1
    assert metric(after, "qvl:generation_tokens_total") - metric(before, "qvl:generation_tokens_total") == 3
    assert metric(after, "qvl:inter_token_latency_seconds_count") > metric(before,
                                                                          "qvl:inter_token_latency_seconds_count")
    for gauge in ("qvl:num_requests_running", "qvl:num_requests_waiting", "qvl:kv_cache_usage_perc",
                  "qvl:kv_cache_blocks_total", "qvl:kv_cache_blocks_free"):
        assert re.search(rf"^{re.escape(gauge)}\{{", text, re.M), gauge
    for counter in ("qvl:prefix_cache_queries_total", "qvl:prefix_cache_hits_total",
                    "qvl:mm_cache_queries_total", "qvl:mm_cache_hits_total", "qvl:num_preemptions_total",
                    "qvl:request_queue_time_seconds_count"):
        assert counter in text, counter


def test_disconnect_mid_stream_frees_blocks(server, http):
    wait_kv_free(http)
    body = {"model": "tiny-qwen2-vl", "messages": [{"role": "user", "content": "Go on forever."}],
            "max_tokens": MAX_MODEL_LEN - 100, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as c:
        with c.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()     # kept open: leaving a for-loop over it would close the connection
            got = 0
            while got < 4:
                got += next(lines).startswith("data: ")
            free, total, busy = kv_state(http)
            assert free < total and busy >= 1                              # it holds blocks right now
    wait_kv_free(http)                                                     # aborted, blocks back
    assert "client disconnected" in server.log() or "status=499" in server.log()


def test_concurrent_requests(server):
    results, errors = {}, []

    def worker(k):
        try:
            c = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
            r = c.chat.completions.create(model="tiny-qwen2-vl", max_tokens=6, temperature=0,
                                          messages=image_msg(png_data_url(56, 56, k % 3)))
            results[k] = r.choices[0].message.content
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 8
    assert results[0] == results[3] == results[6]                          # same image, greedy: same answer


def test_media_policy_flags(http, media_dir):
    """--allowed-media-domains refuses other hosts (checked before any network access); files outside
    --allowed-local-media-path are refused even via ../ or symlinks."""
    r = http.post("/v1/chat/completions", json={"messages": image_msg("https://example.org/cat.png"),
                                                "max_tokens": 2})
    assert r.status_code == 400 and "allowed_media_domains" in r.json()["error"]["message"]
    outside = media_dir.parent / "outside.png"
    outside.write_bytes(base64.b64decode(png_data_url(56, 56).split(",", 1)[1]))
    (media_dir / "link.png").symlink_to(outside)
    for url in (f"file://{media_dir}/../outside.png", f"file://{media_dir}/link.png"):
        r = http.post("/v1/chat/completions", json={"messages": image_msg(url), "max_tokens": 2})
        assert r.status_code == 400 and "outside allowed_local_media_path" in r.json()["error"]["message"], url


def test_continue_final_message_and_template_kwargs(client, http):
    """vLLM's chat fields: continue the last assistant message (no new turn), chat_template_kwargs."""
    msgs = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "My answer is"}]
    cont = {"add_generation_prompt": False, "continue_final_message": True}
    r = http.post("/tokenize", json={"messages": msgs, "return_token_ids": True, **cont})
    assert r.status_code == 200, r.text
    new_turn = http.post("/tokenize", json={"messages": msgs, "return_token_ids": True}).json()
    body = r.json()
    assert body["count"] == len(body["tokens"]) < new_turn["count"]       # cut right after "My answer is"
    assert new_turn["tokens"][:body["count"]] == body["tokens"]
    c = client.chat.completions.create(model="tiny-qwen2-vl", messages=msgs, max_tokens=3, temperature=0,
                                       extra_body=cont)
    assert c.usage.prompt_tokens == body["count"]
    r = http.post("/v1/chat/completions", json={"messages": msgs, "continue_final_message": True, "max_tokens": 2})
    assert r.status_code == 400 and "cannot both be true" in r.json()["error"]["message"]
    r = http.post("/v1/chat/completions", json={"messages": msgs[:1], "max_tokens": 2, **cont})
    assert r.status_code == 400 and "assistant" in r.json()["error"]["message"]
    img = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_data_url(56, 56)}},
                                        {"type": "text", "text": "?"}]}]
    plain = tokenize(http, img)["count"]
    r = http.post("/tokenize", json={"messages": img, "chat_template_kwargs": {"add_vision_id": True}})
    assert r.status_code == 200 and r.json()["count"] > plain             # "Picture 1: " rendered


# ------------------------------------------------------------------------- one download per image

@pytest.fixture(scope="module")
def inproc(tiny_ckpt):
    """create_app(AsyncEngine(engine=LLMEngine)) with a media policy opened for loopback, under uvicorn
    in a thread of this process (so the test can see which thread fetches), and a counting media server."""
    from test_plan import CountingMediaServer, png_bytes

    from qvl.engine.async_engine import AsyncEngine
    from qvl.engine.llm_engine import LLMEngine
    from qvl.multimodal.media import MediaPolicy
    from qvl.server.app import create_app

    media = CountingMediaServer({"cat.png": png_bytes(84, 56)})
    engine = AsyncEngine(engine=LLMEngine.from_pretrained(str(tiny_ckpt), device="cpu", dtype="float32",
                                                          max_model_len=MAX_MODEL_LEN))
    app = create_app(engine, served_model_name="tiny", media_policy=MediaPolicy(allow_private_addresses=True))
    with app_server(app) as (url, thread):
        yield url, media, thread
    media.close()


def test_one_download_per_remote_image(inproc, monkeypatch):
    import qvl.multimodal.plan as plan_mod

    url, media, loop_thread = inproc
    fetch_threads = []
    real_fetch = plan_mod.fetch_bytes

    def fetch(*a, **k):
        fetch_threads.append(threading.current_thread())
        return real_fetch(*a, **k)

    monkeypatch.setattr(plan_mod, "fetch_bytes", fetch)
    msgs = image_msg(media.url + "/cat.png")
    c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
    r = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=3, temperature=0)
    assert media.hits == {"/cat.png": 1}                                   # plan fetched it; load reused it
    assert fetch_threads and all(t is not loop_thread for t in fetch_threads)   # never on the event loop
    with httpx.Client(base_url=url, timeout=60) as h:
        counts = h.post("/tokenize", json={"messages": msgs}).json()
        assert media.hits == {"/cat.png": 2}                               # /tokenize is the plan alone
        assert counts["items"][0]["tokens"] == 6 and r.usage.prompt_tokens == counts["count"]
        chunks = list(c.chat.completions.create(model="tiny", messages=msgs, max_tokens=2, stream=True))
        assert chunks and media.hits == {"/cat.png": 3}
        assert h.get("/v1/models").json()["data"][0]["max_model_len"] == MAX_MODEL_LEN


# ------------------------------------------------------------------------------- structured output

INVOICE = {"type": "object", "properties": {
    "vendor": {"type": "string", "maxLength": 10},
    "total": {"type": "number", "minimum": 0, "maximum": 10000},
    "currency": {"enum": ["EUR", "USD"]},
    "lines": {"type": "array", "maxItems": 2, "items": {
        "type": "object", "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{2}$"},
                                         "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
        "required": ["sku", "qty"], "additionalProperties": False}}},
    "required": ["vendor", "total", "currency", "lines"], "additionalProperties": False}


def test_structured_output_json_schema_streamed_and_not(client):
    import jsonschema

    msgs = [{"role": "user", "content": "Extract the invoice."}]
    fmt = {"type": "json_schema", "json_schema": {"name": "invoice", "schema": INVOICE, "strict": True}}
    r = client.chat.completions.create(model="tiny-qwen2-vl", messages=msgs, response_format=fmt, n=2,
                                       temperature=1.0, seed=5, max_tokens=200)
    for c in r.choices:
        assert c.finish_reason == "stop"
        jsonschema.validate(__import__("json").loads(c.message.content), INVOICE)
    texts = ["", ""]
    for chunk in client.chat.completions.create(model="tiny-qwen2-vl", messages=msgs, response_format=fmt,
                                                n=2, temperature=1.0, seed=6, max_tokens=200, stream=True):
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
    for t in texts:
        jsonschema.validate(__import__("json").loads(t), INVOICE)
    r = client.chat.completions.create(model="tiny-qwen2-vl", messages=msgs, max_tokens=60, temperature=0,
                                       response_format={"type": "json_object"})
    assert r.choices[0].message.content.startswith("{")


def test_structured_outputs_extra_body_and_guided_aliases(client):
    msgs = [{"role": "user", "content": "Pick."}]
    rx = r"[a-z]{3}-[0-9]{2}"
    for body in ({"structured_outputs": {"regex": rx}}, {"guided_regex": rx}):
        r = client.chat.completions.create(model="tiny-qwen2-vl", messages=msgs, max_tokens=20, temperature=1.0,
                                           seed=1, extra_body=body)
        assert re.fullmatch(rx, r.choices[0].message.content)
    for body in ({"structured_outputs": {"choice": ["cat", "dog"]}}, {"guided_choice": ["cat", "dog"]}):
        r = client.chat.completions.create(model="tiny-qwen2-vl", messages=msgs, max_tokens=20, n=3,
                                           temperature=1.0, seed=2, extra_body=body)
        assert {c.message.content for c in r.choices} <= {"cat", "dog"}
    schema = {"type": "object", "properties": {"k": {"type": "integer"}}, "required": ["k"],
              "additionalProperties": False}
    r = client.chat.completions.create(model="tiny-qwen2-vl", messages=msgs, max_tokens=30, temperature=0,
                                       extra_body={"guided_json": schema})
    assert list(__import__("json").loads(r.choices[0].message.content)) == ["k"]
    r = client.completions.create(model="tiny-qwen2-vl", prompt="x", max_tokens=20, temperature=1.0, seed=3,
                                  extra_body={"structured_outputs": {"regex": rx}})
    assert re.fullmatch(rx, r.choices[0].text)


def test_structured_output_errors_are_400(client, http):
    msgs = [{"role": "user", "content": "x"}]
    cases = [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "b", "schema": {"type": "strin"}}}},
         "strin"),
        ({"response_format": {"type": "json_schema",
                              "json_schema": {"name": "b", "schema": {"$ref": "#/$defs/none"}}}}, "none"),
        ({"response_format": {"type": "grammar"}}, "not supported"),
        ({"structured_outputs": {"regex": "[a-"}}, "regex"),
        ({"guided_regex": "a+", "guided_choice": ["a"]}, "one structured-output constraint"),
        ({"structured_outputs": {"structural_tag": "x"}}, "structural_tag"),
    ]
    for extra, words in cases:
        r = http.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": 5, **extra})
        assert r.status_code == 400, (extra, r.text)
        assert words in r.json()["error"]["message"], r.text
    with pytest.raises(openai.BadRequestError, match="strin"):
        client.chat.completions.create(model="tiny-qwen2-vl", messages=msgs, stream=True, extra_body={
            "guided_json": {"type": "object", "properties": {"a": {"type": "strin"}}}})
    wait_kv_free(http)


def test_demo_model_parse_with_pydantic(tmp_path):
    """The shipped demo checkpoint behind create_app, the official client's `parse` with a pydantic model."""
    from typing import Literal

    import pydantic

    from qvl.engine.async_engine import AsyncEngine
    from qvl.engine.llm_engine import LLMEngine
    from qvl.server.app import create_app

    class Answer(pydantic.BaseModel):
        color: Literal["red", "green", "blue", "yellow", "purple", "orange"]
        count: int = pydantic.Field(ge=0, le=4)

    engine = AsyncEngine(engine=LLMEngine.from_pretrained(None, device="cpu", dtype="float32", max_model_len=1024))
    app = create_app(engine, served_model_name="demo")
    with app_server(app) as (base, _):
        c = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=120)
        shapes = Path(__file__).resolve().parents[1] / "examples" / "shapes.png"
        url = "data:image/png;base64," + base64.b64encode(shapes.read_bytes()).decode()
        r = c.chat.completions.parse(model="demo", messages=image_msg(url, text="What color is the circle?"),
                                     response_format=Answer, max_tokens=60, temperature=0)
        assert r.choices[0].finish_reason == "stop"
        parsed = r.choices[0].message.parsed
        assert isinstance(parsed, Answer), r.choices[0].message.content
