"""Server hardening (issue #9): what a new user and a hostile client hit, through a real uvicorn process.

One server for the module, started the way the README's Serving section says (a checkpoint folder named
Qwen2-VL-7B-Instruct, `--api-key secret`, no --served-model-name), plus small timeouts and a connection
cap so slow clients can be shown. Covers: the README openai snippet run exactly as printed (only the port
differs), the served name = folder name with the path accepted too and /v1/models/{id}, HEAD /health,
OPTIONS needing the key, CORS preflight, /version, /detokenize, null fields, OpenAPI request bodies, per-
prompt finish reasons of a non-streamed multi-prompt completion (body, log line, metrics), X-Request-Id,
vLLM options (honoured or a 400 naming them; unknown fields logged), header/body read timeouts and the
connection cap. Own servers: SIGTERM past the grace period (streams end "abort", others get a 503 body,
exit 0 in time) and running out of file descriptors (one log line, not megabytes). Unit tests: the
accept-error log filter, the text-length pre-check, strict fields.
"""
from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from test_server import ServerProcess, metric, metrics_values, png_data_url

openai = pytest.importorskip("openai")

ROOT = Path(__file__).resolve().parents[1]
NAME = "Qwen2-VL-7B-Instruct"
KEY = "secret"
ORIGIN = "https://app.example.com"


@pytest.fixture(scope="module")
def server(tiny_ckpt, tmp_path_factory):
    base = tmp_path_factory.mktemp("models")
    (base / NAME).symlink_to(tiny_ckpt, target_is_directory=True)
    log = base / "server.log"
    srv = ServerProcess(base / NAME, ["--api-key", KEY, "--max-model-len", "1024", "--allowed-origins", ORIGIN,
                                      "--header-read-timeout", "1", "--body-read-timeout", "1.5",
                                      "--limit-concurrency", "12"], log)
    srv.path = str(base / NAME)
    yield srv
    rc = srv.stop()
    assert rc == 0, srv.log()[-3000:]
    log_text = srv.log_path.read_text()
    assert "Traceback" not in log_text, log_text[-5000:]


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as c:
        yield c


def readme_serving_snippet() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Serving"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_server_example_runs_as_printed(server):
    """The README's `qvl serve` line and openai snippet, as printed: the served id is the folder name."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Serving"):]
    serve_line = re.search(r"```bash\n(qvl serve .*?)\n```", section, re.S).group(1)
    assert f"/{NAME} " in serve_line and f"--api-key {KEY}" in serve_line and "--served-model-name" not in serve_line
    code = readme_serving_snippet()
    assert "http://127.0.0.1:8000/v1" in code and f'model="{NAME}"' in code
    code = code.replace("http://127.0.0.1:8000", server.url)          # the only change: this test's port
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip(), run.stdout


def test_model_ids(server, http):
    assert [m["id"] for m in http.get("/v1/models").json()["data"]] == [NAME]
    assert http.get(f"/v1/models/{NAME}").json()["id"] == NAME
    assert http.get(f"/v1/models/{server.path}").json()["id"] == NAME      # the path as given, slashes too
    r = http.get("/v1/models/gpt-9")
    assert r.status_code == 404 and "gpt-9" in r.json()["error"]["message"]
    for model in (NAME, server.path):
        r = http.post("/v1/chat/completions", json={"model": model, "max_tokens": 2,
                                                    "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200, r.text


def test_head_options_cors_version_detokenize(server, http):
    assert httpx.head(server.url + "/health").status_code == 200           # load balancers, no key
    r = httpx.options(server.url + "/v1/chat/completions")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.options(server.url + "/v1/chat/completions",
                      headers={"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
                               "Access-Control-Request-Headers": "authorization,content-type"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    r = httpx.options(server.url + "/v1/chat/completions",
                      headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
    r = http.get("/v1/models", headers={"Origin": ORIGIN})
    assert r.headers["access-control-allow-origin"] == ORIGIN
    assert httpx.get(server.url + "/v1/models", headers={"Origin": ORIGIN}).headers[
        "access-control-allow-origin"] == ORIGIN                            # a 401 is readable by the page too
    assert http.get("/version").json()["version"] == __import__("qvl").__version__
    ids = http.post("/tokenize", json={"prompt": "red green blue", "return_token_ids": True}).json()["tokens"]
    assert http.post("/detokenize", json={"tokens": ids}).json() == {"prompt": "red green blue"}
    r = http.post("/detokenize", json={"tokens": [10**7]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tokens"


def test_null_fields_take_defaults(http):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "n": None, "stream": None,
            "logprobs": None, "top_logprobs": None, "stream_options": None, "temperature": None,
            "ignore_eos": None, "min_tokens": None}
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 1 and r.json()["choices"][0]["logprobs"] is None
    r = http.post("/v1/completions", json={"prompt": "a", "max_tokens": 2, "n": None, "echo": None,
                                           "logprobs": None, "stream": None})
    assert r.status_code == 200, r.text


def test_openapi_describes_request_bodies(http):
    doc = http.get("/openapi.json").json()
    schemas = doc["components"]["schemas"]
    for path, model, field in (("/v1/chat/completions", "ChatCompletionRequest", "messages"),
                               ("/v1/completions", "CompletionRequest", "prompt"),
                               ("/tokenize", "TokenizeRequest", "messages"),
                               ("/detokenize", "DetokenizeRequest", "tokens")):
        ref = doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        assert ref == f"#/components/schemas/{model}"
        assert field in schemas[model]["properties"]
    refs = re.findall(r'"#/components/schemas/([^"]+)"', json.dumps(doc))
    assert refs and all(r in schemas for r in refs)                       # every nested model is there too


def test_multi_prompt_completion_finish_reasons(server, http):
    """Not streamed: each prompt's choices get that prompt's finish reason (and the log and metrics too)."""
    def greedy(prompt):
        r = http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 8, "temperature": 0,
                                               "ignore_eos": True})
        return r.json()["choices"][0]["text"]

    a, b = greedy("red red red"), greedy("blue green")
    stop = next(a[i:i + 2] for i in range(1, len(a) - 1) if a[i:i + 2] not in b and a[i:i + 2].strip())
    before = metrics_values(http.get("/metrics").text)
    r = http.post("/v1/completions", json={"prompt": ["red red red", "blue green"], "max_tokens": 8,
                                           "temperature": 0, "ignore_eos": True, "stop": [stop], "n": 2})
    choices = r.json()["choices"]
    assert [c["finish_reason"] for c in choices] == ["stop", "stop", "length", "length"], choices
    assert [c["text"] for c in choices] == [a[:a.index(stop)]] * 2 + [b] * 2
    after = metrics_values(http.get("/metrics").text)
    for reason, n in (("stop", 2), ("length", 2)):
        assert metric(after, "qvl:request_success_total", finished_reason=reason) - metric(
            before, "qvl:request_success_total", finished_reason=reason) == n
    rid = r.json()["id"]
    line = next(ln for ln in server.log().splitlines() if rid in ln and "status=200" in ln)
    assert "finish=stop,stop,length,length" in line, line


def test_x_request_id(http):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    r = http.post("/v1/chat/completions", json=body, headers={"X-Request-Id": "trace-42 <b>;\x7f"})
    assert r.headers["x-request-id"] == "trace-42b" and r.json()["id"] == "chatcmpl-trace-42b"
    r = http.post("/v1/chat/completions", json=body, headers={"X-Request-Id": "x" * 5000})
    assert r.headers["x-request-id"] == "x" * 128
    results = []                                  # the same id twice at once: both served (engine ids differ)

    def go():
        results.append(http.post("/v1/chat/completions", json={**body, "max_tokens": 20, "ignore_eos": True},
                                 headers={"X-Request-Id": "same"}).status_code)

    threads = [threading.Thread(target=go) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [200, 200]
    r = http.post("/v1/completions", json={"prompt": "a", "max_tokens": 1, "request_id": "from-body"})
    assert r.headers["x-request-id"] == "from-body" and r.json()["id"] == "cmpl-from-body"
    r = http.post("/v1/chat/completions", json=body, headers={"X-Request-Id": "<<>>"})
    assert re.fullmatch(r"[0-9a-f]{32}", r.headers["x-request-id"].removeprefix("chatcmpl-"))


def test_vllm_options_honoured_or_refused(server, http):
    msgs = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "My answer is"}]
    cont = {"add_generation_prompt": False, "continue_final_message": True, "max_tokens": 3, "temperature": 0}
    r = http.post("/v1/chat/completions", json={"messages": msgs, "echo": True, **cont})
    plain = http.post("/v1/chat/completions", json={"messages": msgs, **cont}).json()
    assert r.json()["choices"][0]["message"]["content"] == "My answer is" + plain["choices"][0]["message"]["content"]
    with http.stream("POST", "/v1/chat/completions", json={"messages": msgs, "echo": True, "stream": True,
                                                           **cont}) as s:
        deltas = [json.loads(ln[6:]) for ln in s.iter_lines() if ln.startswith("data: {")]
    streamed = "".join(d["choices"][0]["delta"].get("content") or "" for d in deltas if d["choices"])
    assert streamed == r.json()["choices"][0]["message"]["content"]

    img = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_data_url(112, 84)}},
                                        {"type": "text", "text": "?"}]}]
    full = http.post("/tokenize", json={"messages": img}).json()
    low = http.post("/tokenize", json={"messages": img, "mm_processor_kwargs": {"max_pixels": 56 * 56}}).json()
    assert full["items"][0]["tokens"] == 12 and low["items"][0]["tokens"] == 2
    c = http.post("/v1/chat/completions", json={"messages": img, "max_tokens": 2,
                                                "mm_processor_kwargs": {"max_pixels": 56 * 56}}).json()
    assert c["usage"]["prompt_tokens"] == low["count"]

    g = http.post("/v1/completions", json={"prompt": "red", "max_tokens": 12, "temperature": 0,
                                           "ignore_eos": True}).json()["choices"][0]["text"]
    stop = next(g[i:i + 2] for i in range(2, len(g) - 1) if g[i:i + 2].strip() and g[i:i + 2].isascii())
    inc = http.post("/v1/completions", json={"prompt": "red", "max_tokens": 12, "temperature": 0, "stop": [stop],
                                             "ignore_eos": True, "include_stop_str_in_output": True}).json()
    assert inc["choices"][0]["text"] == g[:g.index(stop) + len(stop)]

    base = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for extra, param, words in (
            ({"chat_template": "{{ messages }}"}, "chat_template", "--chat-template"),
            ({"guided_whitespace_pattern": r"\s*", "guided_json": {"type": "object"}}, "guided_whitespace_pattern",
             "not supported"),
            ({"use_beam_search": True}, "use_beam_search", "beam search"),
            ({"priority": 3}, "priority", "priorit"),
            ({"truncate_prompt_tokens": 5}, "truncate_prompt_tokens", "not supported"),
            ({"allowed_token_ids": [1, 2]}, "allowed_token_ids", "not supported"),
            ({"modalities": ["text", "audio"]}, "modalities", "text"),
            ({"mm_processor_kwargs": {"size": 3}}, "mm_processor_kwargs.size", "not permitted")):
        r = http.post("/v1/chat/completions", json={**base, **extra})
        assert r.status_code == 400, (extra, r.text)
        err = r.json()["error"]
        assert err["param"] == param and words in err["message"], err
    assert http.post("/v1/chat/completions", json={**base, "priority": 0, "use_beam_search": False}).status_code == 200
    r = http.post("/v1/chat/completions", json={**base, "frobnicate": 1, "zz_top": 2})
    assert r.status_code == 200
    assert "request fields ignored (not read by qvl): 'frobnicate', 'zz_top'" in server.log()


def _raw(server) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    return s


def _read_all(s: socket.socket) -> bytes:
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    return out


def test_slow_clients(server, http):
    """Headers not complete in time: closed. A body that trickles: 408. Idle sockets past the cap get
    a 503 for a real client only until the header timeout closes them."""
    t0 = time.monotonic()
    s = _raw(server)
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")     # and never the rest
    assert _read_all(s) == b"" and time.monotonic() - t0 < 5             # closed after ~1 s
    s.close()

    t0 = time.monotonic()
    s = _raw(server)
    s.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
              "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"messages\"".encode())
    reply = _read_all(s).decode()
    s.close()
    assert reply.startswith("HTTP/1.1 408") and time.monotonic() - t0 < 6, reply
    assert "body_read_timeout" in json.loads(reply.split("\r\n\r\n", 1)[1])["error"]["message"]

    for raw in (b"GET /health HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 20_000,     # headers past h11's 16 KiB
                b"NOT HTTP AT ALL\r\n\r\n"):
        s = _raw(server)
        s.sendall(raw)
        reply = _read_all(s).decode()
        s.close()
        assert reply.startswith("HTTP/1.1 400"), reply
        assert json.loads(reply.split("\r\n\r\n", 1)[1])["error"]["code"] == "invalid_http_request"

    idle = [_raw(server) for _ in range(14)]                              # over --limit-concurrency 12
    try:
        time.sleep(0.2)
        r = httpx.get(server.url + "/health")
        assert r.status_code == 503
        time.sleep(1.5)                                                   # the header timeout frees them
        assert httpx.get(server.url + "/health").status_code == 200
        assert all(_read_all(s) == b"" for s in idle)
    finally:
        for s in idle:
            s.close()


# ---------------------------------------------------------------------------------------- unit tests

def test_accept_error_log_is_rate_limited():
    import logging

    from qvl.server.connections import AcceptErrorLogFilter, install_accept_error_filter

    f = AcceptErrorLogFilter(interval_s=0.3)
    logger = logging.getLogger("test.accept")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    logger.addFilter(f)
    logger.propagate = False
    try:
        err = OSError(24, "Too many open files")
        for _ in range(1000):
            logger.error("socket.accept() out of system resource\nsocket: <x>", exc_info=(OSError, err, None))
        logger.error("something else")
        time.sleep(0.35)
        logger.error("socket.accept() out of system resource\nsocket: <x>")
    finally:
        logger.removeHandler(handler)
    msgs = [r.getMessage() for r in records]
    assert len(msgs) == 3 and msgs[1] == "something else"
    assert "(999 more in the last 0.3 s not logged)" in msgs[2] and records[0].exc_info is None
    assert install_accept_error_filter() is install_accept_error_filter()


class _Tok:
    """A tokenizer that records what it was asked to encode (one token per character)."""

    def __init__(self):
        self.encoded: list[int] = []

    def get_vocab(self, with_added_tokens=True):
        return {"a" * 20: 0, "x": 1}

    def encode(self, text, add_special_tokens=False):
        self.encoded.append(len(text))
        return type("E", (), {"ids": list(range(len(text)))})()


class _Ctx:
    def __init__(self, max_model_len):
        self.max_model_len = max_model_len
        self.processor = type("P", (), {"tokenizer": _Tok()})()

    async def run_blocking(self, fn, *a, **k):
        return fn(*a, **k)


def test_text_length_checked_before_tokenizing_it_all():
    import asyncio

    from qvl.server.errors import APIError
    from qvl.server.prepare import PREFIX_CHARS_PER_TOKEN, check_text_length

    ctx = _Ctx(max_model_len=100)
    with pytest.raises(APIError, match=r"2001 characters, more than 100 tokens can hold \(at most 2000\)") as e:
        asyncio.run(check_text_length(ctx, ["a" * 2000, "b"], "messages"))    # > 100 tokens x 20 chars
    assert e.value.code == "context_length_exceeded" and ctx.processor.tokenizer.encoded == []
    with pytest.raises(APIError, match="more than .* tokens in its first") as e:
        asyncio.run(check_text_length(ctx, ["a b " * 400], "prompt"))         # 1600 chars: a prefix tokenized
    assert e.value.param == "prompt"
    assert max(ctx.processor.tokenizer.encoded) <= 100 * PREFIX_CHARS_PER_TOKEN
    ctx = _Ctx(max_model_len=100)
    asyncio.run(check_text_length(ctx, ["a" * 800], "prompt"))                # cheap to tokenize: the plan does
    assert ctx.processor.tokenizer.encoded == []


def test_strict_request_fields():
    from qvl.config import ServerLimits
    from qvl.server.body import parse_object, validate
    from qvl.server.errors import APIError
    from qvl.server.protocol import ChatCompletionRequest

    data = parse_object(b'{"messages": [{"role": "user", "content": "hi"}], "frobnicate": 1}')
    assert validate(data, ChatCompletionRequest, ServerLimits()).messages[0].role == "user"
    with pytest.raises(APIError, match="frobnicate") as e:
        validate(data, ChatCompletionRequest, ServerLimits(strict_request_fields=True))
    assert e.value.status == 400 and e.value.param == "frobnicate"


def test_shutdown_deadline_aborts_cleanly(tiny_ckpt, tmp_path):
    """SIGTERM with a stream and a non-streamed request still running past a 3 s grace: the stream ends with
    finish_reason "abort" and [DONE], the other gets a 503 OpenAI error body, the process exits 0 in time."""
    import signal

    grace = 3.0
    srv = ServerProcess(tiny_ckpt, ["--max-model-len", "4096", "--graceful-shutdown-timeout", str(grace)],
                        tmp_path / "server.log")
    body = {"messages": [{"role": "user", "content": "Talk."}], "max_tokens": 4000, "ignore_eos": True}
    lines, started, full = [], threading.Event(), {}

    def streamer():
        with httpx.stream("POST", srv.url + "/v1/chat/completions", json={**body, "stream": True}, timeout=120) as r:
            for line in r.iter_lines():
                lines.append(line)
                started.set()

    def waiter():
        r = httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=120)
        full["status"], full["body"] = r.status_code, r.json()

    threads = [threading.Thread(target=streamer), threading.Thread(target=waiter)]
    for t in threads:
        t.start()
    try:
        assert started.wait(60)
        time.sleep(0.5)
        t0 = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        rc = srv.proc.wait(60)
        elapsed = time.monotonic() - t0
    finally:
        for t in threads:
            t.join(30)
        srv.stop()
    assert rc == 0 and elapsed < grace + 2.5, (rc, elapsed)
    chunks = [json.loads(ln[6:]) for ln in lines if ln.startswith("data: {")]
    lines = [ln for ln in lines if ln]
    assert lines[-1] == "data: [DONE]" and chunks[-1]["choices"][0]["finish_reason"] == "abort", lines[-3:]
    assert full["status"] == 503 and full["body"]["error"]["code"] == "shutting_down", full
    assert "Traceback" not in srv.log_path.read_text()


def test_out_of_file_descriptors_logs_one_line(tiny_ckpt, tmp_path):
    """More connections than the process may open: asyncio's accept-error records (thousands a second,
    each with a traceback, plus one per pending retry at shutdown) come out as one line, and the server
    serves again once the sockets close."""
    import resource

    from test_server import free_port

    port, limit = free_port(), 256
    log_path = tmp_path / "server.log"

    def low_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "qvl.server.launch", str(tiny_ckpt), "--port", str(port),
                                 "--device", "cpu", "--threads", "1", "--header-read-timeout", "30"],
                                stdout=log, stderr=subprocess.STDOUT, preexec_fn=low_limit)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        flood = []
        for _ in range(limit + 50):
            s = socket.socket()
            s.setblocking(False)
            try:
                s.connect(("127.0.0.1", port))
            except BlockingIOError:
                pass
            flood.append(s)
        time.sleep(3)
        for s in flood:
            s.close()
        time.sleep(0.5)
        assert httpx.get(url + "/health", timeout=10).status_code == 200
    finally:
        proc.terminate()
        rc = proc.wait(60)
    text = log_path.read_text()
    assert rc == 0, text[-3000:]
    assert 1 <= text.count("socket.accept() out of system resource") <= 2, text[-3000:]
    assert "Traceback" not in text and len(text) < 20_000, (len(text), text[-3000:])
