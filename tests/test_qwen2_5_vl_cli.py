"""Qwen2.5-VL through the front doors: `qvl run`, `qvl chat`, `qvl tokens`, `qvl serve` with the official
`openai` client, and a grounding reply mapped to the original image's pixels by Qwen2.5-VL's rule
(absolute pixels of the resized image), on a tiny random checkpoint written by transformers.

The grounding test scripts only the LM head's output (which tokens the reply consists of); the
template, the image preprocessing, the vision tower, prefill, the engine and the server are real.
"""
from __future__ import annotations

import json

import pytest
import torch

from test_cli import qvl
from test_server import ServerProcess, app_server, image_msg, png_data_url

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    from PIL import Image

    path = tmp_path_factory.mktemp("img25") / "photo.png"
    Image.new("RGB", (640, 480), (200, 30, 30)).save(path)
    return path


def test_run_json_and_chat(tiny_qwen2_5_vl_ckpt, image_file):
    r = qvl("run", "--model", str(tiny_qwen2_5_vl_ckpt), "--image", str(image_file), "Describe this image.",
            "--json", "--max-tokens", "6", "--temperature", "0")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert 1 <= out["completion_tokens"] <= 6 and out["prompt_tokens"] > 100
    r = qvl("chat", "--model", str(tiny_qwen2_5_vl_ckpt), "--max-tokens", "4",
            stdin=f"/image {image_file}\nWhat is this?\nAnd now?\n/quit\n")
    assert r.returncode == 0, r.stderr
    assert "image attached" in r.stderr and len(r.stdout.strip().splitlines()) >= 1


def test_tokens_uses_the_checkpoints_preprocessing(tiny_qwen2_5_vl_ckpt, image_file):
    demo = json.loads(qvl("tokens", str(image_file), "--json").stdout)       # default: the demo checkpoint
    r = qvl("tokens", "--model", str(tiny_qwen2_5_vl_ckpt), str(image_file), "--json")
    assert r.returncode == 0, r.stderr
    ckpt = json.loads(r.stdout)
    # both preprocessor_config.json files cap max_pixels at 200704: 364x504, not the hub's 476x644; the
    # context is each checkpoint's own
    assert demo["resized_size"] == [364, 504] and ckpt["resized_size"] == [364, 504]
    assert demo["max_model_len"] == 32768 and ckpt["max_model_len"] == 4096
    assert ckpt["num_tokens"] == (364 // 28) * (504 // 28)


def test_serve_with_the_openai_client(tiny_qwen2_5_vl_ckpt, tmp_path):
    server = ServerProcess(tiny_qwen2_5_vl_ckpt, ["--max-model-len", "1024"], tmp_path / "serve.log")
    try:
        c = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)
        msgs = image_msg(png_data_url(90, 60), png_data_url(56, 112, seed=1))
        r = c.chat.completions.create(model=str(tiny_qwen2_5_vl_ckpt), messages=msgs, max_tokens=5,
                                      temperature=0)
        assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens <= 5
        import httpx

        count = httpx.post(server.url + "/tokenize", json={"messages": msgs}, timeout=60).json()["count"]
        assert r.usage.prompt_tokens == count
        again = c.chat.completions.create(model=str(tiny_qwen2_5_vl_ckpt), messages=msgs, max_tokens=5,
                                          temperature=0)
        assert again.choices[0].message.content == r.choices[0].message.content
    finally:
        assert server.stop() == 0, server.log()


@pytest.fixture()
def scripted_server(tiny_qwen2_5_vl_ckpt):
    """An in-process uvicorn server over a real engine whose LM head is scripted to answer `reply`."""
    from qvl.engine.async_engine import AsyncEngine
    from qvl.engine.llm_engine import LLMEngine
    from qvl.server.app import create_app

    engine = LLMEngine.from_pretrained(str(tiny_qwen2_5_vl_ckpt), device="cpu", dtype="float32",
                                       max_model_len=1024)
    reply = ("<|object_ref_start|>the square<|object_ref_end|><|box_start|>(100,50),(300,150)"
             "<|box_end|><|im_end|>")
    script = engine.processor.encode(reply)
    real, step = engine.model.compute_logits, [0]

    def scripted(hidden):                       # (n, H) -> (n, V): the next scripted token wins
        logits = torch.full_like(real(hidden), -1e4)
        logits[:, script[min(step[0], len(script) - 1)]] = 0.0
        step[0] += 1
        return logits

    engine.model.compute_logits = scripted
    app = create_app(AsyncEngine(engine=engine), served_model_name="tiny25")
    with app_server(app) as (url, _):
        yield url


def test_grounding_reply_mapped_to_original_pixels(scripted_server):
    c = openai.OpenAI(base_url=scripted_server + "/v1", api_key="none", max_retries=0, timeout=120)
    r = c.chat.completions.create(model="tiny25", messages=image_msg(png_data_url(640, 480)), max_tokens=64,
                                  temperature=0)
    assert "<|box_start|>(100,50),(300,150)<|box_end|>" in r.choices[0].message.content
    (box,) = r.model_extra["qvl_boxes"][0]
    assert box["label"] == "the square" and box["coords"] == [100, 50, 300, 150]
    # Qwen2.5-VL answers in pixels of the image as resized for the vision tower: 480x640 -> 364x504 under
    # the checkpoint's max_pixels, so x scales by 640/504 and y by 480/364 (Qwen2-VL's 0..1000 rule would
    # give [64, 24, 192, 72]).
    assert box["pixels"] == [round(100 * 640 / 504), round(50 * 480 / 364), round(300 * 640 / 504),
                             round(150 * 480 / 364)]
