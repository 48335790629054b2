"""One request never hurts another (issue #9): sampling fields checked against their real range when a
request is added, and a step that still raises fails only the request it can blame."""
from __future__ import annotations

import pytest

from qvl.engine.llm_engine import LLMEngine
from qvl.multimodal.prompt import ProcessedPrompt
from qvl.sampling_params import SamplingParams
from tiny import tiny_engine


@pytest.fixture(scope="module")
def eng(tiny_ckpt) -> LLMEngine:
    return tiny_engine(tiny_ckpt, max_num_seqs=8)


def _prompt(*ids):
    return ProcessedPrompt.from_token_ids(list(ids) or [5, 6, 7])


def _drain(eng) -> dict:
    done = {}
    while eng.has_unfinished_requests():
        for o in eng.step():
            if o.finished:
                done[o.request_id] = o
    return done


@pytest.mark.parametrize("bad, field", [
    (dict(seed=2**64, temperature=0), "seed"),
    (dict(seed=2**63), "seed"),
    (dict(seed=-2**63 - 1), "seed"),
    (dict(temperature=float("inf")), "temperature"),
    (dict(top_p=float("nan")), "top_p"),
])
def test_sampling_params_refuse_out_of_range(bad, field):
    with pytest.raises(ValueError, match=f"SamplingParams.{field}"):
        SamplingParams(**bad)


def test_seed_range_edges_run(eng):
    for seed in (-2**63, 2**63 - 1):
        eng.add_request(f"s{seed}", _prompt(), SamplingParams(seed=seed, n=2, max_tokens=2))
    outs = _drain(eng)
    assert all(o.outputs[0].finish_reason == "length" for o in outs.values()) and len(outs) == 2


@pytest.mark.parametrize("bad, field", [
    (dict(stop_token_ids=[448], min_tokens=1), "stop_token_ids"),
    (dict(stop_token_ids=[10**6]), "stop_token_ids"),
    (dict(logprobs=449), "logprobs"),
    (dict(n=9), "n"),
])
def test_add_request_refuses_model_ranges(eng, bad, field):
    """Refused when added (nothing queued, the batch-mate unharmed), naming the field and the limit."""
    total = eng.stats()["kv_blocks_total"]
    eng.add_request("mate", _prompt(), SamplingParams(temperature=0, max_tokens=3))
    with pytest.raises(ValueError, match=f"SamplingParams.{field} .*must be"):
        eng.add_request("bad", _prompt(), SamplingParams(max_tokens=3, **bad))
    assert "bad" not in eng.requests
    outs = _drain(eng)
    assert list(outs) == ["mate"] and len(outs["mate"].outputs[0].token_ids) == 3
    assert eng.stats()["kv_blocks_free"] == total


def test_failing_request_does_not_fail_its_batch_mates(eng, monkeypatch):
    """A step that raises because of one request's data: only that request fails (blocks freed, its
    error kept), the others get exactly the tokens they get alone."""
    params = SamplingParams(temperature=0, max_tokens=6, min_tokens=6)
    eng.add_request("alone", _prompt(9, 10, 11), params)
    alone = _drain(eng)["alone"].outputs[0].token_ids

    real = eng.runner.execute
    poison = 13

    def execute(out, *a, **k):
        if any(poison in s.token_ids for s in out.seqs):
            raise RuntimeError("kernel fault on request 'bad'")
        return real(out, *a, **k)

    monkeypatch.setattr(eng.runner, "execute", execute)
    total = eng.stats()["kv_blocks_total"]
    eng.add_request("a", _prompt(9, 10, 11), params)
    eng.add_request("bad", _prompt(12, poison), params)
    eng.add_request("b", _prompt(9, 10, 11), params)
    outs = eng.step()
    assert eng.last_failed_request_ids == ["bad"]
    assert isinstance(eng.last_step_errors["bad"], RuntimeError)
    assert [o.request_id for o in outs if o.finished] == ["bad"]
    assert next(o for o in outs if o.request_id == "bad").outputs[0].finish_reason == "abort"
    rest = _drain(eng)
    assert rest["a"].outputs[0].token_ids == alone and rest["b"].outputs[0].token_ids == alone
    assert eng.stats()["kv_blocks_free"] == total


def test_step_failing_for_everyone_still_raises(eng, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("device lost")
    monkeypatch.setattr(eng.runner, "execute", boom)
    total = eng.stats()["kv_blocks_total"]
    eng.add_request("x", _prompt(), SamplingParams(max_tokens=2))
    eng.add_request("y", _prompt(), SamplingParams(max_tokens=2))
    with pytest.raises(RuntimeError, match="device lost"):
        eng.step()
    assert eng.last_failed_request_ids == ["x", "y"] and not eng.has_unfinished_requests()
    assert eng.stats()["kv_blocks_free"] == total


def test_async_engine_fails_only_the_blamed_stream(eng, monkeypatch):
    import asyncio

    from qvl.engine.async_engine import AsyncEngine

    real = eng.runner.execute

    def execute(out, *a, **k):
        if any(13 in s.token_ids for s in out.seqs):
            raise RuntimeError("kernel fault")
        return real(out, *a, **k)

    monkeypatch.setattr(eng.runner, "execute", execute)
    aeng = AsyncEngine(engine=eng)

    async def collect(rid, prompt):
        it = await aeng.add_request(rid, prompt, SamplingParams(temperature=0, max_tokens=4, min_tokens=4))
        ids = []
        async for o in it:
            ids += o.outputs[0].token_ids
        return ids

    async def main():
        return await asyncio.gather(collect("good", _prompt(9, 10)), collect("bad", _prompt(13)),
                                    return_exceptions=True)
    try:
        good, bad = asyncio.run(main())
    finally:
        aeng.shutdown()
    assert isinstance(bad, RuntimeError) and len(good) == 4


def test_aborted_request_vision_stops_within_one_block(eng):
    """request_cancel (what AsyncEngine.abort calls from the server's thread) stops the encode before the
    next vision block; the request is aborted, its text batch-mate goes on, every block is freed."""
    import numpy as np
    from PIL import Image

    blocks = eng.model.visual.blocks
    assert len(blocks) >= 2
    ran = []

    def after_first(module, args, output):
        ran.append(0)
        eng.request_cancel("img")                 # as if the client left while block 0 ran
    hooks = [blocks[0].register_forward_hook(after_first),
             blocks[1].register_forward_hook(lambda m, a, o: ran.append(1))]
    try:
        img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (112, 112, 3), dtype=np.uint8))
        chat = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Hi<|im_end|>\n<|im_start|>assistant\n"
        total = eng.stats()["kv_blocks_total"]
        eng.add_request("txt", _prompt(9, 10), SamplingParams(temperature=0, max_tokens=3, min_tokens=3))
        eng.add_request("img", eng.processor.process_prompt(chat, {"image": [img]}), SamplingParams(max_tokens=3))
        outs = eng.step()                       # does not raise: only the cancelled request fails
        assert ran == [0] and eng.last_failed_request_ids == ["img"]
        assert [o.outputs[0].finish_reason for o in outs if o.request_id == "img"] == ["abort"]
        rest = _drain(eng)
        assert len(rest["txt"].outputs[0].token_ids) == 3 and eng.stats()["kv_blocks_free"] == total
    finally:
        for h in hooks:
            h.remove()


def test_cpu_default_visual_token_limit():
    """On a CPU the default per-request limit is what the vision tower encodes in seconds: 263 tokens for
    Qwen2-VL's 675M-parameter ViT (256 took 25-54 s on the shared 2-core test machine); none on CUDA."""
    from types import SimpleNamespace

    import torch

    from qvl.engine.runner import ModelRunner
    from qvl.models.qwen2_vl.config import VisionConfig
    from qvl.models.qwen2_vl.vision import VisionTransformer

    with torch.device("meta"):
        vit = VisionTransformer(VisionConfig(hidden_size=1536))
    cpu = SimpleNamespace(model=SimpleNamespace(visual=vit), device=torch.device("cpu"))
    assert ModelRunner.default_visual_token_limit(cpu) == 263
    cuda = SimpleNamespace(model=SimpleNamespace(visual=vit), device=torch.device("cuda"))
    assert ModelRunner.default_visual_token_limit(cuda) is None
