"""Engine invariants on a tiny random checkpoint: batching, chunking, caches, preemption and abort
change no greedy token; counters show the hits; seeded sampling ignores batch-mates; parity with
transformers' generate; stop strings, streaming, n > 1, logprobs, AsyncEngine."""
import asyncio

import pytest
import torch
from tiny import IMG, chat, image

from qvl.config import EngineConfig
from qvl.engine.async_engine import AsyncEngine
from qvl.engine.detokenizer import IncrementalDetokenizer
from qvl.engine.llm_engine import LLMEngine
from qvl.llm import LLM
from qvl.multimodal.prompt import ProcessedPrompt
from qvl.sampling_params import SamplingParams

QUESTIONS = ["Describe this image.", "What color is the circle?", "How many shapes are there?",
             "What is written in the picture? The quick brown fox jumps over the lazy dog."]


def greedy(num=12, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=num, min_tokens=num, **kw)


def make(ckpt, **kw) -> LLMEngine:
    kw.setdefault("max_model_len", 512)
    kw.setdefault("kv_cache_memory", 4 << 20)
    return LLMEngine.from_config(EngineConfig(model=str(ckpt), dtype="float32", device="cpu", **kw))


def prompts(eng: LLMEngine, items):
    """items: (text, [images]) -> ProcessedPrompts."""
    return [eng.processor.process_prompt(chat(IMG * len(ims) + q), {"image": ims} if ims else None)
            for q, ims in items]


def run(eng: LLMEngine, ps, params) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in LLM.from_engine(eng).generate(ps, params, use_tqdm=False)]


MIXED = [(QUESTIONS[0], [image(0)]), (QUESTIONS[1], []), (QUESTIONS[2], [image(1, 56, 84), image(2)]),
         (QUESTIONS[3], [])]


@pytest.fixture(scope="module")
def reference(tiny_ckpt):
    """Greedy outputs of MIXED, each request alone, no caches, whole prefill."""
    eng = make(tiny_ckpt, enable_prefix_caching=False, encoder_cache_memory=0)
    return [run(eng, [p], greedy())[0] for p in prompts(eng, MIXED)]


def test_batched_equals_alone(tiny_ckpt, reference):
    eng = make(tiny_ckpt)
    assert run(eng, prompts(eng, MIXED), greedy()) == reference


def test_chunked_prefill_equals_whole(tiny_ckpt, reference):
    eng = make(tiny_ckpt, max_num_batched_tokens=7)        # chunks end inside the images
    assert run(eng, prompts(eng, MIXED), greedy()) == reference


def test_forced_preemption_changes_nothing(tiny_ckpt, reference):
    per_block = 2 * 2 * 16 * 2 * 16 * 4                     # layers * K,V * block * kv heads * dim * fp32
    eng = make(tiny_ckpt, kv_cache_memory=9 * per_block, encoder_cache_memory=0)
    assert eng.block_manager.num_blocks == 9
    assert run(eng, prompts(eng, MIXED), greedy()) == reference
    s = eng.stats()
    assert s["num_preemptions"] > 0 and s["kv_blocks_free"] == 9 and s["num_running"] == 0


def test_prefix_and_encoder_cache_hit_equals_miss(tiny_ckpt, reference):
    eng = make(tiny_ckpt)
    ps = prompts(eng, MIXED)
    first = run(eng, ps, greedy())
    s1 = eng.stats()
    second = run(eng, ps, greedy())
    s2 = eng.stats()
    assert first == second == reference
    assert s2["prefix_cache_hits"] > s1["prefix_cache_hits"]
    # an encoder-cache hit with a prefix miss: the same image after different text
    p = prompts(eng, [("Different words first. " + QUESTIONS[0], [])])[0]
    q = eng.processor.process_prompt(chat("Other text " + IMG + QUESTIONS[0]), {"image": [image(0)]})
    before = eng.stats()["encoder_cache_hits"]
    hit = run(eng, [p, q], greedy())
    assert eng.stats()["encoder_cache_hits"] == before + 1
    cold = make(tiny_ckpt, enable_prefix_caching=False, encoder_cache_memory=0)
    assert run(cold, [p, q], greedy()) == hit


def test_same_image_twice_hits_different_image_does_not(tiny_ckpt):
    eng = make(tiny_ckpt, block_size=4)
    a, b, c = (eng.processor.process_prompt(chat(IMG + QUESTIONS[0]), {"image": [image(s)]})
               for s in (10, 10, 11))
    run(eng, [a], greedy(2))
    s0 = eng.stats()
    run(eng, [b], greedy(2))
    s1 = eng.stats()
    assert s1["prefix_cache_hits"] - s0["prefix_cache_hits"] == (len(b.token_ids) - 1) // 4 * 4
    run(eng, [c], greedy(2))
    s2 = eng.stats()
    text_before_image = c.item_offsets[0] // 4 * 4          # only whole blocks before the image
    assert s2["prefix_cache_hits"] - s1["prefix_cache_hits"] == text_before_image
    assert s2["encoder_cache_hits"] == s1["encoder_cache_hits"]   # different image: no feature hit


def test_padded_decode_never_reads_unwritten_slots(tiny_ckpt, monkeypatch):
    """Decode rows of unequal lengths are padded; the padding must read the reserved zero block, never
    a slot no token wrote (recycled memory may hold NaN, and 0 * NaN is NaN). Simulate a dirty heap by
    making every uninitialised allocation NaN."""
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: real_empty(*a, **k).fill_(float("nan")))
    eng = LLMEngine.from_pretrained(str(tiny_ckpt), dtype="bfloat16", device="cpu", max_model_len=256,
                                    kv_cache_memory=4 << 20)
    monkeypatch.setattr(torch, "empty", real_empty)
    for attn in eng.model.attention_modules():
        assert attn.k_cache[:-1].isnan().all() and not attn.k_cache[-1].any() and not attn.v_cache[-1].any()
    llm = LLM.from_engine(eng)
    short, long = chat("Hi."), chat("How many shapes are there? 1 2 3 4 5 6")   # unequal: padded decode
    alone = llm.generate([short], greedy(8), use_tqdm=False)[0].outputs[0].token_ids
    both = llm.generate([short, long], greedy(8), use_tqdm=False)[0].outputs[0].token_ids
    assert alone == both


def test_abort_frees_all_blocks(tiny_ckpt):
    eng = make(tiny_ckpt)
    total = eng.stats()["kv_blocks_total"]
    for i, p in enumerate(prompts(eng, MIXED)):
        eng.add_request(f"r{i}", p, greedy(50))
    for _ in range(4):
        eng.step()
    assert eng.stats()["kv_blocks_free"] < total
    outs = eng.abort_request([f"r{i}" for i in range(4)])
    assert all(o.finished and o.outputs[0].finish_reason == "abort" for o in outs)
    assert eng.stats()["kv_blocks_free"] == total and not eng.has_unfinished_requests()


def test_failed_step_frees_blocks(tiny_ckpt, monkeypatch):
    eng = make(tiny_ckpt)
    total = eng.stats()["kv_blocks_total"]
    eng.add_request("x", prompts(eng, MIXED[:1])[0], greedy())
    eng.step()

    def boom(*a, **k):
        raise RuntimeError("device lost")
    monkeypatch.setattr(eng.runner, "execute", boom)
    with pytest.raises(RuntimeError):
        eng.step()
    assert eng.last_failed_request_ids == ["x"] and eng.stats()["kv_blocks_free"] == total


def test_seeded_sampling_independent_of_batch(tiny_ckpt):
    eng = make(tiny_ckpt)
    ps = prompts(eng, MIXED)
    sp = SamplingParams(temperature=1.0, top_p=0.95, seed=1234, max_tokens=16, min_tokens=16)
    alone = run(eng, [ps[0]], sp)[0]
    others = SamplingParams(temperature=1.0, max_tokens=16)
    mixed = run(eng, [ps[2], ps[0], ps[1]], [others, sp, others])
    assert mixed[1] == alone
    assert run(eng, [ps[0]], sp.clone(seed=99))[0] != alone


def test_greedy_matches_transformers(tiny_ckpt):
    from transformers import Qwen2VLForConditionalGeneration
    from tiny import hf_processor

    eng = make(tiny_ckpt, max_num_batched_tokens=16)
    hf = Qwen2VLForConditionalGeneration.from_pretrained(tiny_ckpt).eval()
    proc = hf_processor(tiny_ckpt)
    text = chat(IMG + "Describe this image.")
    ours = run(eng, prompts(eng, [("Describe this image.", [image(3)])]),
               greedy(24, repetition_penalty=1.05))[0]
    inp = proc(text=[text], images=[image(3)], return_tensors="pt")
    with torch.no_grad():
        ref = hf.generate(**inp, max_new_tokens=24, min_new_tokens=24, do_sample=False,
                          repetition_penalty=1.05)
    assert ours == ref[0, inp["input_ids"].shape[1]:].tolist()


def test_generation_config_defaults_and_eos(tiny_ckpt):
    eng = make(tiny_ckpt)
    assert eng.default_sampling_params().greedy                    # no do_sample -> greedy
    tok = eng.processor.tokenizer
    assert eng.eos_token_ids == {tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")}
    out = LLM.from_engine(eng).generate(prompts(eng, MIXED[1:2]), SamplingParams(
        temperature=0, max_tokens=200), use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.token_ids[-1] in eng.eos_token_ids or \
        out.finish_reason == "length"


def test_stop_strings_and_streaming(tiny_ckpt):
    eng = make(tiny_ckpt)
    llm = LLM.from_engine(eng)
    p = prompts(eng, MIXED[1:2])[0]
    full = llm.generate([p], greedy(24), use_tqdm=False)[0].outputs[0]
    text = full.text.replace("\ufffd", "")
    stop = text[8:11] if len(text) > 12 else text[-2:]
    at = full.text.find(stop)
    out = llm.generate([p], SamplingParams(temperature=0, max_tokens=24, stop=[stop]),
                       use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == full.text[:at] and stop not in out.text
    pieces, final = [], None
    for delta, o in llm.stream(p, SamplingParams(temperature=0, max_tokens=24, stop=[stop])):
        pieces.append(delta)
        final = o
        assert stop not in "".join(pieces)
    assert "".join(pieces) == out.text == final.outputs[0].text and final.finished
    assert eng.stats()["kv_blocks_free"] == eng.stats()["kv_blocks_total"]


def test_stop_token_ids_and_max_model_len(tiny_ckpt):
    eng = make(tiny_ckpt)
    llm = LLM.from_engine(eng)
    p = prompts(eng, MIXED[1:2])[0]
    full = llm.generate([p], greedy(12), use_tqdm=False)[0].outputs[0]
    tok = full.token_ids[5]
    out = llm.generate([p], SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[tok]),
                       use_tqdm=False)[0].outputs[0]
    k = full.token_ids.index(tok)
    assert out.token_ids == full.token_ids[:k + 1] and out.stop_reason == tok
    short = make(tiny_ckpt, max_model_len=len(p.token_ids) + 3)
    out = LLM.from_engine(short).generate([p], greedy(12), use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 3 and out.finish_reason == "length"
    with pytest.raises(ValueError, match="max_model_len"):
        short.add_request("long", ProcessedPrompt.from_token_ids(range(len(p.token_ids) + 4)), greedy())


def test_add_request_takes_only_processed_prompts(tiny_ckpt):
    eng = make(tiny_ckpt)
    for raw in (chat(QUESTIONS[1]), [1, 2, 3], {"prompt_token_ids": [1, 2, 3]}):
        with pytest.raises(TypeError, match="ProcessedPrompt"):
            eng.add_request("raw", raw, greedy(2))
    assert not eng.has_unfinished_requests()
    eng.add_request("ids", ProcessedPrompt.from_token_ids([1, 2, 3]), greedy(2))
    while eng.has_unfinished_requests():
        outs = eng.step()
    assert outs[0].prompt_token_ids == [1, 2, 3] and len(outs[0].outputs[0].token_ids) == 2


def test_n_greater_than_one_shares_prompt_blocks(tiny_ckpt):
    eng = make(tiny_ckpt, block_size=4)
    p = prompts(eng, MIXED[:1])[0]
    o = LLM.from_engine(eng).generate([p], greedy(8, n=3), use_tqdm=False)[0]
    assert [c.index for c in o.outputs] == [0, 1, 2]
    assert o.outputs[0].token_ids == o.outputs[1].token_ids == o.outputs[2].token_ids
    assert eng.stats()["prefix_cache_hits"] == 2 * ((len(p.token_ids) - 1) // 4 * 4)
    o = LLM.from_engine(eng).generate([p], SamplingParams(n=2, seed=5, max_tokens=8, min_tokens=8),
                                      use_tqdm=False)[0]
    assert o.outputs[0].token_ids != o.outputs[1].token_ids


def test_logprobs(tiny_ckpt):
    eng = make(tiny_ckpt)
    p = prompts(eng, MIXED[1:2])[0]
    c = LLM.from_engine(eng).generate([p], greedy(4, logprobs=2), use_tqdm=False)[0].outputs[0]
    assert len(c.logprobs) == 4
    for t, lp in zip(c.token_ids, c.logprobs):
        assert t in lp and len(lp) <= 3 and lp[t] == max(lp.values())
    assert abs(c.cumulative_logprob - sum(lp[t] for t, lp in zip(c.token_ids, c.logprobs))) < 1e-4


def test_incremental_detokenizer_multibyte(tiny_ckpt):
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(tiny_ckpt / "tokenizer.json"))
    text = "Grüße 你好，世界 🙂 ok"
    ids = tok.encode(text).ids
    d = IncrementalDetokenizer(lambda i, s: tok.decode(i, skip_special_tokens=s))
    streamed = ""
    for t in ids:
        d.update([t])
        piece = d.stream_text(False)
        assert "\ufffd" not in piece
        streamed += piece
    d.finish()
    streamed += d.stream_text(True)
    assert streamed == text == d.text


def test_async_engine_stream_and_abort(tiny_ckpt):
    eng = make(tiny_ckpt)
    ae = AsyncEngine(engine=eng)
    ps = prompts(eng, MIXED[:2])

    async def main():
        it = await ae.add_request("a", ps[0], greedy(10))
        it2 = await ae.add_request("b", ps[1], greedy(200))
        with pytest.raises(ValueError, match="already running"):      # "b" (200 tokens) is surely still running
            await ae.add_request("b", ps[0], greedy(10))
        ids, text = [], ""
        async for d in it:
            ids += d.outputs[0].token_ids
            text += d.outputs[0].text
        assert d.finished and d.outputs[0].finish_reason == "length"
        async for _ in it2:
            break                                   # leaving early aborts "b"
        await it2.aclose()
        for _ in range(100):
            if ae.stats()["num_running"] == 0:
                break
            await asyncio.sleep(0.02)
        return ids, text

    try:
        ids, text = asyncio.run(main())
    finally:
        ae.shutdown()
    assert ids == run(make(tiny_ckpt), ps[:1], greedy(10))[0]
    assert eng.stats()["kv_blocks_free"] == eng.stats()["kv_blocks_total"]


def test_llm_generate_and_chat_public_inputs(tiny_ckpt):
    eng = make(tiny_ckpt)
    llm = LLM.from_engine(eng)
    sp = greedy(4)
    a = llm.generate({"prompt": chat(IMG + QUESTIONS[0]), "multi_modal_data": {"image": image(0)}},
                     sp, use_tqdm=False)[0]
    b = llm.chat([{"role": "user", "content": [{"type": "image", "image": image(0)},
                                               {"type": "text", "text": QUESTIONS[0]}]}], sp,
                 use_tqdm=False)[0]
    assert len(b.outputs[0].token_ids) == 4 and b.prompt_token_ids[1:4] != a.prompt_token_ids[1:4]
    c = llm.generate([chat(QUESTIONS[1]), {"prompt_token_ids": list(range(5))}], sp, use_tqdm=False)
    assert len(a.outputs[0].token_ids) == 4 and a.finished and a.metrics.ttft is not None
    assert len(c) == 2 and all(len(o.outputs[0].token_ids) == 4 for o in c)
    with pytest.raises(ValueError, match="pad tokens"):
        llm.generate({"prompt_token_ids": b.prompt_token_ids}, sp)
    assert not eng.has_unfinished_requests()
    assert eng.stats()["encoder_cache_hits"] >= 1 or eng.stats()["prefix_cache_hits"] > 0
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate("x " * 600, sp)


def test_sequence_outgrowing_the_pool_finishes_with_length(tiny_ckpt):
    per_block = 2 * 2 * 16 * 2 * 16 * 4
    eng = make(tiny_ckpt, kv_cache_memory=3 * per_block, enable_prefix_caching=False)
    p = prompts(eng, MIXED[1:2])[0]                       # 17 tokens; the pool holds 48
    out = LLM.from_engine(eng).generate([p], greedy(40), use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "length" and out.stop_reason == "kv_cache_full"
    assert len(p.token_ids) + len(out.token_ids) == 3 * 16 + 1      # + the last, never fed back
    assert eng.stats()["kv_blocks_free"] == 3
