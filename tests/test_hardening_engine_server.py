"""End to end through a real server (issue #9): a request with a sampling value outside its real range is
a 400 naming the field while another client's stream completes untouched; client pixel options never buy
more visual tokens than the server allows (checkpoint limit, or --mm-processor-kwargs)."""
from __future__ import annotations

import threading

import httpx
import pytest

from test_server import ServerProcess, png_data_url, wait_kv_free


@pytest.fixture(scope="module")
def server(tiny_ckpt, tmp_path_factory):
    log = tmp_path_factory.mktemp("hardening_engine_log") / "server.log"
    srv = ServerProcess(tiny_ckpt, ["--served-model-name", "tiny", "--max-model-len", "1024",
                                    "--mm-processor-kwargs", '{"max_pixels": 100352}'], log)
    yield srv
    assert srv.stop() == 0, srv.log()[-3000:]


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def _chat(**kw) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": "Talk."}], **kw}


BAD = [
    ("seed_over_64_bits_greedy", _chat(seed=2**64, temperature=0, max_tokens=4), "seed"),
    ("seed_over_int64", _chat(seed=2**63, max_tokens=4), "seed"),
    ("stop_token_past_vocab_min_tokens", _chat(stop_token_ids=[10**6], min_tokens=1, max_tokens=4),
     "stop_token_ids"),
    ("stop_token_past_vocab", _chat(stop_token_ids=[448], max_tokens=4), "stop_token_ids"),
]


def test_bad_sampling_values_are_400_while_a_stream_completes(server, http):
    body = _chat(max_tokens=120, min_tokens=120, temperature=0, stream=True)
    lines, status = [], []

    def stream():
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=120) as r:
            status.append(r.status_code)
            lines.extend(line for line in r.iter_lines() if line)

    t = threading.Thread(target=stream)
    t.start()
    for name, bad, field in BAD:
        r = http.post("/v1/chat/completions", json=bad)
        assert r.status_code == 400, (name, r.text)
        err = r.json()["error"]
        assert field in err["message"] and err["type"] == "invalid_request_error", (name, err)
    t.join(120)
    assert status == [200]
    assert lines[-1] == "data: [DONE]" and '"finish_reason":"length"' in "".join(lines).replace(" ", "")
    assert not any('"error"' in line for line in lines)
    wait_kv_free(http)
    assert "Traceback" not in server.log()


@pytest.mark.parametrize("opts", [dict(min_pixels=12845056, max_pixels=12845056),
                                  dict(resized_height=3584, resized_width=3584, max_pixels=12845056)])
def test_client_pixel_options_capped_by_server(http, opts):
    """--mm-processor-kwargs max_pixels 100352 (128 tokens): no client option buys more."""
    part = {"type": "image_url", "image_url": {"url": png_data_url(224, 224)}, **opts}
    r = http.post("/tokenize", json={"model": "tiny", "messages": [{"role": "user", "content": [part]}]})
    assert r.status_code == 200, r.text
    text_only = http.post("/tokenize", json={"model": "tiny", "messages": [
        {"role": "user", "content": [{"type": "text", "text": ""}]}]}).json()["count"]
    assert r.json()["count"] - text_only <= 128 + 2           # + vision start / end
