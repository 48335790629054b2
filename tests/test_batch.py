"""`qvl batch` end to end on a tiny random checkpoint: the OpenAI Batch format in and out, error lines for
bad JSON / an unknown url / a broken image / a duplicate custom_id / a wrong model while the job goes on,
relative media paths, the exit status, and resuming: a run killed with SIGKILL in the middle (plus a torn
last line) and re-run gives exactly a clean run's lines, none twice."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qvl import cli
from qvl.batch import ResultFile, default_error_file, resolve_media_paths

ENGINE = ["--device", "cpu", "--dtype", "float32", "--threads", "1", "--max-model-len", "512"]


def _chat_line(cid: str, content, **body) -> str:
    return json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
                       "body": {"messages": [{"role": "user", "content": content}], "max_tokens": 6,
                                "temperature": 0, **body}})


def _image(path: Path, seed: int) -> None:
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (56, 56, 3), dtype=np.uint8)).save(path)


def _read(path: Path) -> list[dict]:
    raw = path.read_bytes()
    assert raw == b"" or raw.endswith(b"\n"), "torn last line"
    return [json.loads(x) for x in raw.splitlines()]


def _answers(records: list[dict]) -> dict[str, str]:
    out = {}
    for r in records:
        assert r["custom_id"] not in out, f"duplicate line for {r['custom_id']}"
        body = r["response"]["body"]
        c = body["choices"][0]
        out[r["custom_id"]] = c["message"]["content"] if "message" in c else c["text"]
    return out


def test_good_and_bad_lines(tiny_ckpt, tmp_path, capsys, monkeypatch):
    (tmp_path / "media").mkdir()
    _image(tmp_path / "media" / "cat.png", 0)
    (tmp_path / "media" / "broken.png").write_bytes(b"\x89PNG not really")
    lines = [
        _chat_line("img", [{"type": "image_url", "image_url": {"url": "media/cat.png"}},
                           {"type": "text", "text": "What is this?"}]),
        _chat_line("text", "Hello there"),
        "{this is not json",
        json.dumps({"custom_id": "emb", "method": "POST", "url": "/v1/embeddings", "body": {"input": "x"}}),
        _chat_line("broken", [{"type": "image", "image": "file://media/broken.png"}, {"type": "text", "text": "?"}]),
        "",
        _chat_line("text", "the same custom_id again"),
        _chat_line("model", "hi", model="some-other-model"),
        json.dumps({"custom_id": "cmpl", "method": "POST", "url": "/v1/completions",
                    "body": {"prompt": "Once upon", "max_tokens": 4, "temperature": 0}}),
    ]
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out.jsonl"
    monkeypatch.chdir("/")                           # relative media paths follow the input file, not the cwd
    rc = cli.main(["batch", str(src), "-o", str(out), "--no-progress", *ENGINE, "--model", str(tiny_ckpt)])
    assert rc == 1
    assert "3 succeeded, 5 failed" in capsys.readouterr().err

    good = _read(out)
    assert sorted(r["custom_id"] for r in good) == ["cmpl", "img", "text"]
    for r in good:
        assert r["error"] is None and r["id"].startswith("batch_req_")
        resp = r["response"]
        assert resp["status_code"] == 200 and resp["request_id"] == resp["body"]["id"]
        assert resp["body"]["usage"]["completion_tokens"] >= 1
    by_id = {r["custom_id"]: r["response"]["body"] for r in good}
    assert by_id["img"]["object"] == "chat.completion" and by_id["cmpl"]["object"] == "text_completion"
    assert by_id["img"]["usage"]["prompt_tokens"] > by_id["text"]["usage"]["prompt_tokens"]  # the image counted

    errors = _read(Path(default_error_file(out)))
    assert default_error_file(out) == str(tmp_path / "out.errors.jsonl")
    got = {(e["line"], e["custom_id"], e["error"]["code"]) for e in errors}
    assert got == {(3, None, "invalid_json"), (4, "emb", "invalid_url"), (5, "broken", "invalid_value"),
                   (7, "text", "duplicate_custom_id"), (8, "model", "model_not_found")}
    for e in errors:
        assert e["response"] is None and set(e["error"]) == {"code", "message"} and e["error"]["message"]
    assert "broken.png" in next(e for e in errors if e["custom_id"] == "broken")["error"]["message"]

    # Re-running a finished job does nothing: every line is already decided.
    rc = cli.main(["batch", str(src), "-o", str(out), "--no-progress", *ENGINE, "--model", str(tiny_ckpt)])
    assert rc == 1 and "0 succeeded, 0 failed, 8 already done" in capsys.readouterr().err
    assert len(_read(out)) == 3 and len(errors) == len(_read(tmp_path / "out.errors.jsonl"))


def test_all_good_exits_zero_and_missing_input_is_a_usage_error(tiny_ckpt, tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text(_chat_line("only", "hi") + "\n")
    args = ["--no-progress", *ENGINE, "--model", str(tiny_ckpt)]
    assert cli.main(["batch", str(src), "-o", str(tmp_path / "o.jsonl"), *args]) == 0
    assert not (tmp_path / "o.errors.jsonl").read_bytes()
    assert cli.main(["batch", str(src), "-o", str(tmp_path / "small.jsonl"), "--max-request-bytes", "50", *args]) == 1
    err = _read(tmp_path / "small.errors.jsonl")[0]
    assert err["error"]["code"] == "request_too_large" and "max_request_bytes 50" in err["error"]["message"]
    assert cli.main(["batch", str(tmp_path / "nope.jsonl"), "-o", str(tmp_path / "o.jsonl"), *args]) == 2
    assert "batch input not found" in capsys.readouterr().err


def test_sigkill_then_resume_equals_clean_run(tiny_ckpt, tmp_path):
    for k in range(3):
        _image(tmp_path / f"im{k}.png", k)
    lines = []
    for i in range(24):
        content = [{"type": "image_url", "image_url": {"url": f"im{i % 3}.png"}}, {"type": "text", "text": f"q{i}"}] \
            if i % 2 else f"question number {i}"
        lines.append(_chat_line(f"r{i}", content, max_tokens=24, ignore_eos=True))
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(lines) + "\n")
    engine = [*ENGINE, "--model", str(tiny_ckpt), "--max-in-flight", "2", "--no-progress"]

    clean = tmp_path / "clean.jsonl"
    assert cli.main(["batch", str(src), "-o", str(clean), *engine]) == 0
    want = _answers(_read(clean))
    assert len(want) == 24

    out = tmp_path / "out.jsonl"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    proc = subprocess.Popen([sys.executable, "-m", "qvl.cli", "batch", str(src), "-o", str(out), *engine],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if out.exists() and out.read_bytes().count(b"\n") >= 3:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the job finished before it could be killed"
    done_before = out.read_bytes().count(b"\n")
    assert 3 <= done_before < 24
    with open(out, "ab") as f:                      # what a kill in the middle of a write leaves behind
        f.write(b'{"id": "batch_req_x", "custom_id": "r23", "response": {"status_')

    assert cli.main(["batch", str(src), "-o", str(out), *engine]) == 0
    got = _answers(_read(out))                       # no torn line, no duplicate
    assert got == want


def test_result_file_recovery_and_paths(tmp_path):
    p = tmp_path / "o.jsonl"
    p.write_bytes(b'{"custom_id": "a"}\n{"custom_id": "b"}\n{"custom_id": "c", "resp')
    f = ResultFile(p)
    assert [r["custom_id"] for r in f.records] == ["a", "b"]
    f.append({"custom_id": "d"})
    f.close()
    assert p.read_bytes() == b'{"custom_id": "a"}\n{"custom_id": "b"}\n{"custom_id": "d"}\n'
    bad = tmp_path / "bad.jsonl"
    bad.write_text("hello\n")
    with pytest.raises(ValueError, match="not a qvl batch result file"):
        ResultFile(bad)

    body = {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "a.png"}}, {"type": "image_url", "image_url": "/abs/b.png"},
        {"type": "image", "image": "file://c.png"}, {"type": "image", "image": "https://x.org/d.png"},
        {"type": "video", "video": ["f1.jpg", "data:image/png;base64,AA"]}, {"type": "text", "text": "a.png"}]}]}
    resolve_media_paths(body, tmp_path)
    parts = body["messages"][0]["content"]
    assert parts[0]["image_url"]["url"] == str(tmp_path / "a.png")
    assert parts[1]["image_url"] == "/abs/b.png"
    assert parts[2]["image"] == str(tmp_path / "c.png")
    assert parts[3]["image"] == "https://x.org/d.png"
    assert parts[4]["video"] == [str(tmp_path / "f1.jpg"), "data:image/png;base64,AA"]
    assert parts[5]["text"] == "a.png"
