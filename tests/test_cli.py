"""The `qvl` command end to end, in subprocesses, with the shipped demo checkpoint."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def qvl(*args, stdin=None, timeout=240):
    return subprocess.run([sys.executable, "-m", "qvl.cli", *args], input=stdin, capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def test_run_json_answers_the_example_question():
    r = qvl("run", "--image", str(EXAMPLES / "shapes.png"), "What color is the circle?", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["text"] == "red"
    assert out["prompt_tokens"] > 100 and out["completion_tokens"] >= 1
    assert out["finish_reason"] == "stop" and out["boxes"] == []


def test_run_streams_and_draws_grounding(tmp_path):
    png = tmp_path / "boxes.png"
    r = qvl("run", "--image", str(EXAMPLES / "shapes.png"), "Where is the blue square?",
            "--draw", str(png))
    assert r.returncode == 0, r.stderr
    assert "<|box_start|>" in r.stdout and png.exists()
    from PIL import Image

    with Image.open(png) as im, Image.open(EXAMPLES / "shapes.png") as src:
        assert im.size == src.size


def test_chat_through_a_pipe_keeps_history():
    script = (f"/image {EXAMPLES / 'shapes.png'}\nWhat color is the circle?\n"
              "What shape is green?\n/reset\n/bogus\n/quit\n")
    r = qvl("chat", stdin=script)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[0] == "red"
    assert len(lines) == 2                               # the second turn answered with history
    assert "image attached" in r.stderr and "history cleared" in r.stderr and "unknown command" in r.stderr


def test_tokens_needs_no_model(tmp_path):
    r = qvl("tokens", str(EXAMPLES / "shapes.png"), str(EXAMPLES / "moving.mp4"), "--json")
    assert r.returncode == 0, r.stderr
    img, vid = json.loads(r.stdout)
    assert img["kind"] == "image" and img["num_tokens"] == img["grid_thw"][1] * img["grid_thw"][2] // 4
    assert vid["kind"] == "video" and vid["grid_thw"][0] == vid["nframes"] // 2


@pytest.mark.parametrize("args, message", [
    (["run", "--image", "missing.png", "hi"], "not found"),
    (["tokens", "missing.png"], "not found"),
    (["run", "--model", "/", "hi"], "not a Hugging Face checkpoint"),
    (["bench", "--new-tokens", "0"], "new_tokens must be >= 1, got 0"),
])
def test_errors_are_one_line_with_nonzero_exit(args, message):
    r = qvl(*args)
    assert r.returncode != 0
    assert message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_unsupported_format_is_one_line(tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    r = qvl("run", "--image", str(bad), "hi")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "notes.png" in r.stderr


def test_bench_reports_every_concurrency():
    r = qvl("bench", "--concurrency", "1", "3", "--new-tokens", "4", "--image-size", "84", "56", "--json",
            "--threads", "1")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["device"] == "cpu" and out["image_size"] == [84, 56]
    assert [row["concurrency"] for row in out["rows"]] == [1, 3]
    for row in out["rows"]:
        n = row["concurrency"]
        assert row["new_tokens"] == 4 and row["prompt_tokens"] > 6      # 3x2 merged tokens + text
        assert row["output_tok_s"] == pytest.approx(n * 4 / row["wall_s"], rel=0.05)
        assert 0 < row["ttft_ms_median"] <= row["ttft_ms_p90"] <= 1000 * row["wall_s"]
        assert row["tpot_ms_median"] > 0


def test_run_json_schema_constrains_the_demo_answer(tmp_path):
    import jsonschema

    schema = {"type": "object", "properties": {
        "color": {"enum": ["red", "green", "blue", "yellow", "purple", "orange"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 4}},
        "required": ["color", "count"], "additionalProperties": False}
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(schema))
    r = qvl("run", "--image", str(EXAMPLES / "shapes.png"), "What color is the circle?", "--json",
            "--json-schema", str(path))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["finish_reason"] == "stop"
    jsonschema.validate(json.loads(out["text"]), schema)
    path.write_text('{"type": "strin"}')
    r = qvl("run", "x", "--json-schema", str(path))
    assert r.returncode == 2 and "strin" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = qvl("run", "x", "--json-schema", str(tmp_path / "missing.json"))
    assert r.returncode == 2 and "not found" in r.stderr
