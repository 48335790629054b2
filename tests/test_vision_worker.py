"""The VisionWorker: a request's images encode on a worker thread while the other requests keep stepping.

The tiny tower is far below MIN_VISION_PARAMS, so these engines turn the worker on explicitly; a forward
pre-hook that sleeps before every vision block makes the tower slow enough to watch.
"""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from PIL import Image

from qvl.engine.runner import VisionCancelled
from qvl.engine.vision_worker import MIN_VISION_PARAMS
from qvl.multimodal.prompt import ProcessedPrompt
from qvl.sampling_params import SamplingParams
from tiny import tiny_engine

CHAT = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Hi<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def engines(tiny_ckpt):
    """(worker engine, inline engine) on the same checkpoint."""
    on, off = tiny_engine(tiny_ckpt, max_num_seqs=8), tiny_engine(tiny_ckpt, max_num_seqs=8)
    assert not on.vision.enabled, "the tiny tower must encode inline by default"
    on.vision.enabled = True
    return on, off


@pytest.fixture
def slow_blocks(engines):
    """Sleep `delay[0]` s before every vision block of the worker engine; yields the per-block start times."""
    eng = engines[0]
    starts, delay = [], [0.0]

    def pre(module, args):
        starts.append(time.perf_counter())
        time.sleep(delay[0])
    hooks = [b.register_forward_pre_hook(pre) for b in eng.model.visual.blocks]
    yield starts, delay
    for h in hooks:
        h.remove()


def _image(seed: int, size: int = 112):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8))


def _drain(eng, on_finish=None) -> dict:
    done = {}
    while eng.has_unfinished_requests():
        for o in eng.step():
            if o.finished:
                done[o.request_id] = o
                if on_finish is not None:
                    on_finish(o.request_id)
    return done


def _greedy(n):
    return SamplingParams(temperature=0, max_tokens=n, min_tokens=n)


def test_text_request_decodes_while_a_large_image_encodes(engines, slow_blocks):
    """Inline (today's path), the text request's first step waits for the whole encode; with the worker it
    finishes (prefill + 2 decode steps) before the image's encode does."""
    eng = engines[0]
    starts, delay = slow_blocks
    delay[0] = 0.5                                   # x 2 blocks: a 1 s encode
    finished_at = {}
    eng.add_request("img", eng.processor.process_prompt(CHAT, {"image": [_image(1, 224)]}), _greedy(2))
    eng.add_request("txt", ProcessedPrompt.from_token_ids([5, 6, 7]), _greedy(2))
    done = _drain(eng, lambda rid: finished_at.setdefault(rid, time.perf_counter()))
    assert len(done["txt"].outputs[0].token_ids) == 2 and len(done["img"].outputs[0].token_ids) == 2
    encode_end = starts[-1] + delay[0]               # the last block starts, sleeps, then runs (ms)
    assert len(starts) == len(eng.model.visual.blocks)
    assert finished_at["txt"] < encode_end < finished_at["img"]


def test_tokens_match_the_inline_path(engines):
    """float32: the worker's features are the inline encode's, so the greedy tokens are identical, for a
    request alone and next to a text batch-mate, and a repeated image is a cache hit (no job)."""
    on, off = engines
    outs = []
    for eng in engines:
        eng.add_request("a", eng.processor.process_prompt(CHAT, {"image": [_image(2)]}), _greedy(6))
        eng.add_request("b", ProcessedPrompt.from_token_ids([9, 10, 11]), _greedy(6))
        eng.add_request("c", eng.processor.process_prompt(CHAT, {"image": [_image(3)]}), _greedy(6))
        done = _drain(eng)
        outs.append({rid: o.outputs[0].token_ids for rid, o in done.items()})
    assert outs[0] == outs[1]
    hits = on.stats()["encoder_cache_hits"]
    on.add_request("again", on.processor.process_prompt(CHAT, {"image": [_image(2)]}), _greedy(6))
    assert on.vision.is_ready("again") and on.vision.num_pending == 0     # cached: nothing to encode
    assert _drain(on)["again"].outputs[0].token_ids == outs[0]["a"]
    assert on.stats()["encoder_cache_hits"] == hits + 1


def test_abort_during_the_worker_encode_stops_it_and_frees_everything(engines, slow_blocks):
    eng = engines[0]
    starts, delay = slow_blocks
    delay[0] = 0.3
    total = eng.stats()["kv_blocks_total"]
    eng.add_request("img", eng.processor.process_prompt(CHAT, {"image": [_image(4, 224)]}), _greedy(2))
    eng.add_request("txt", ProcessedPrompt.from_token_ids([5, 6, 7]), _greedy(3))
    job = eng.vision._jobs["img"]
    done = {}
    while not starts:                                # the worker is inside block 0's pre-hook
        done.update((o.request_id, o) for o in eng.step() if o.finished)   # txt may finish meanwhile
    eng.abort_request("img")
    with pytest.raises(VisionCancelled):
        job.future.result(timeout=5)
    assert len(starts) == 1 and eng.vision.num_pending == 0 and "img" not in eng.vision._jobs
    done.update(_drain(eng))
    assert len(done["txt"].outputs[0].token_ids) == 3 and eng.stats()["kv_blocks_free"] == total

    # request_cancel (the server's thread) stops the job too; the next step aborts the request
    starts.clear()
    eng.add_request("img2", eng.processor.process_prompt(CHAT, {"image": [_image(5, 224)]}), _greedy(2))
    eng.add_request("txt2", ProcessedPrompt.from_token_ids([5, 6, 8]), _greedy(8))
    done = {}
    while not starts:
        done.update((o.request_id, o) for o in eng.step() if o.finished)
    eng.request_cancel("img2")
    done.update(_drain(eng))
    assert done["img2"].outputs[0].finish_reason == "abort" and len(starts) == 1
    assert len(done["txt2"].outputs[0].token_ids) == 8 and eng.stats()["kv_blocks_free"] == total


def test_an_encode_error_fails_only_its_request(engines):
    eng = engines[0]

    def boom(module, args):
        if threading.current_thread().name.startswith("qvl-vision"):
            raise ValueError("vision tower exploded on this image")
    hook = eng.model.visual.blocks[0].register_forward_pre_hook(boom)
    try:
        total = eng.stats()["kv_blocks_total"]
        eng.add_request("txt", ProcessedPrompt.from_token_ids([5, 6, 7]), _greedy(6))
        eng.step()                                   # the text request is running when the error surfaces
        eng.add_request("bad", eng.processor.process_prompt(CHAT, {"image": [_image(6)]}), _greedy(2))
        eng.vision._jobs["bad"].future.exception(timeout=5)
        errors, done = {}, {}
        while eng.has_unfinished_requests():
            for o in eng.step():
                done[o.request_id] = o
            errors.update(eng.last_step_errors)
        assert done["bad"].outputs[0].finish_reason == "abort"
        assert "exploded" in str(errors["bad"]) and list(errors) == ["bad"]
        assert len(done["txt"].outputs[0].token_ids) == 6 and eng.stats()["kv_blocks_free"] == total
        assert "bad" not in eng.vision._jobs
    finally:
        hook.remove()


def test_enabled_by_default_only_for_large_towers(engines):
    from types import SimpleNamespace

    from qvl.engine.vision_worker import VisionWorker

    tower = SimpleNamespace(parameters=lambda: [SimpleNamespace(numel=lambda: MIN_VISION_PARAMS)])
    assert VisionWorker(SimpleNamespace(model=SimpleNamespace(visual=tower))).enabled
    inline = engines[1]
    try:
        assert not VisionWorker(inline.runner).enabled
    finally:
        inline.runner.vision_worker = inline.vision          # the probe attached itself to the runner


@pytest.mark.parametrize("ckpt", ["tiny_qwen2_5_vl_ckpt", "tiny_qwen3_vl_ckpt"])
def test_tokens_match_the_inline_path_other_families(ckpt, request):
    """Qwen2.5-VL (windowed tower) and Qwen3-VL (DeepStack: an item's features are a tuple of sets)."""
    path = request.getfixturevalue(ckpt)
    outs = []
    for worker in (True, False):
        eng = tiny_engine(path, max_num_seqs=4)
        eng.vision.enabled = worker
        eng.add_request("a", eng.processor.process_prompt(CHAT, {"image": [_image(7)]}), _greedy(5))
        eng.add_request("b", ProcessedPrompt.from_token_ids([9, 10, 11]), _greedy(5))
        assert ("a" in eng.vision._jobs) == worker           # the worker took the image, or the step will
        outs.append({rid: o.outputs[0].token_ids for rid, o in _drain(eng).items()})
    assert outs[0] == outs[1]
