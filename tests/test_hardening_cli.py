"""The CLI as a new user meets it (issue #9): `qvl tokens` counts as the model does and keeps going past a
bad file; `qvl chat` drops a bad attachment instead of jamming; clear one-line errors for --device cuda
without CUDA and --draw without --image; the README's grounding example prints what the demo answers."""
import json
import re

import pytest
from PIL import Image

from test_cli import EXAMPLES, ROOT, qvl


def test_tokens_counts_like_the_model_and_keeps_going(tmp_path):
    photo = tmp_path / "photo.png"
    Image.new("RGB", (640, 480), (10, 20, 30)).save(photo)
    notes = tmp_path / "notes.png"
    notes.write_text("not an image")
    r = qvl("tokens", str(photo), str(notes), str(tmp_path / "missing.jpg"), str(EXAMPLES / "moving.mp4"))
    assert r.returncode != 0
    errors = r.stderr.strip().splitlines()
    assert len(errors) == 2 and "Traceback" not in r.stderr
    assert "notes.png: not a recognised image or video" in errors[0] and "cannot open video" not in errors[0]
    assert "missing.jpg: file not found" in errors[1]
    lines = r.stdout.strip().splitlines()
    assert lines[0].startswith(f"{photo}: image 640x480 -> 504x364") and " 234 tokens" in lines[0]   # demo limits
    assert lines[1].startswith(str(EXAMPLES / "moving.mp4")) and lines[2].startswith("total:")
    one = json.loads(qvl("tokens", str(photo), "--json").stdout)
    assert one["num_tokens"] == 234 and one["max_model_len"] == 32768 and one["prompt_tokens"] == 236


def test_chat_drops_a_bad_attachment(tmp_path):
    notes = tmp_path / "notes.png"
    notes.write_text("not an image")
    script = (f"/image {notes}\n/image {EXAMPLES / 'shapes.png'}\nWhat color is the circle?\n"
              "What shape is green?\n/quit\n")
    r = qvl("chat", "--threads", "1", stdin=script)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[0] == "red" and len(r.stdout.strip().splitlines()) == 2
    assert r.stderr.count("notes.png") == 1 and "not attached" in r.stderr


def test_device_cuda_without_cuda_is_one_line():
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    r = qvl("run", "--device", "cuda", "hi")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "AssertionError" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "no CUDA device" in r.stderr


def test_draw_without_image_is_checked_first(tmp_path):
    r = qvl("run", "--model", str(tmp_path / "nowhere"), "--draw", str(tmp_path / "b.png"), "hi")
    assert r.returncode == 2 and "--draw needs an --image" in r.stderr


def test_readme_grounding_example_is_what_the_demo_says():
    row = next(line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("| grounding"))
    command = re.search(r"`qvl run --image (\S+) \"([^\"]+)\"`", row)
    expected = re.search(r"→ `(.*?)` \|", row).group(1).replace("\\|", "|")
    r = qvl("run", "--image", command.group(1), command.group(2), "--threads", "1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == expected
