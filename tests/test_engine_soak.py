"""Randomized engine soak (seeded, so reproducible): requests arrive over time with 0-2 of a few shared
images, under random engine settings (block size, tiny KV pools that force preemption or refusal,
token budgets that chunk prefills inside images, prefix and encoder caches on or off, few sequence
slots), with random aborts and n = 2. Every output that ran to max_tokens must equal the same request
run alone on a cache-free engine (greedy, and seeded sampling too), and the pool must be whole at the
end."""
import random

import numpy as np
import pytest
from PIL import Image

from tiny import IMG

from qvl.engine.llm_engine import LLMEngine
from qvl.llm import LLM
from qvl.sampling_params import SamplingParams

IMAGES = [Image.fromarray(np.random.default_rng(s).integers(0, 255, (h, w, 3), dtype=np.uint8))
          for s, (h, w) in enumerate([(56, 56), (112, 140), (84, 56), (140, 112)])]
TEXTS = ["Describe.", "What color is the circle?", "How many shapes are there? one two three",
         "A longer question about the picture that goes on for a while, so that prefills are chunked."]
BYTES_PER_TOKEN = 2 * 2 * 2 * 16 * 4          # layers * (K, V) * kv heads * head dim * fp32
MAX_TOKENS = 16


def engine(ckpt, **kw) -> LLMEngine:
    return LLMEngine.from_pretrained(str(ckpt), dtype="float32", device="cpu", max_model_len=512, **kw)


def build(eng, key):
    prefix, text, images = key
    body = prefix + IMG * len(images) + TEXTS[text]
    return eng.processor.process_prompt(f"<|im_start|>user\n{body}<|im_end|>\n<|im_start|>assistant\n",
                                        {"image": [IMAGES[i] for i in images]} if images else None)


@pytest.fixture(scope="module")
def alone(tiny_ckpt):
    """(prompt key, params) -> token ids of each output, the request run alone without caches."""
    eng = engine(tiny_ckpt, kv_cache_memory=8 << 20, enable_prefix_caching=False, encoder_cache_memory=0)
    memo = {}

    def run(key, params: SamplingParams) -> list[list[int]]:
        k = (key, params.temperature, params.seed, params.n, params.max_tokens)
        if k not in memo:
            out = LLM.from_engine(eng).generate([build(eng, key)], params, use_tqdm=False)[0]
            memo[k] = [c.token_ids for c in out.outputs]
        return memo[k]
    return run


@pytest.mark.parametrize("trial", range(8))
def test_random_workload_matches_requests_run_alone(tiny_ckpt, alone, trial):
    rng = random.Random(trial)
    block = rng.choice([4, 16])
    kw = dict(block_size=block, kv_cache_memory=rng.choice([12, 20, 40, 200]) * block * BYTES_PER_TOKEN,
              max_num_batched_tokens=rng.choice([7, 33, 512]), enable_prefix_caching=rng.random() < 0.7,
              max_num_seqs=rng.choice([2, 4, 256]), encoder_cache_memory=rng.choice([0, 1 << 20]))
    eng = engine(tiny_ckpt, **kw)
    total = eng.stats()["kv_blocks_total"]
    pending, checked, added = {}, 0, 0
    for step in range(3000):
        if added < 25 and rng.random() < 0.4:
            key = (rng.choice(["", "Context first. "]), rng.randrange(len(TEXTS)),
                   tuple(rng.sample(range(len(IMAGES)), rng.randrange(3))))
            m, n = rng.randint(1, MAX_TOKENS), rng.choice([1, 1, 2])
            params = (SamplingParams(temperature=0, max_tokens=m, min_tokens=m, n=n) if rng.random() < 0.7
                      else SamplingParams(temperature=0.8, seed=rng.randrange(10), max_tokens=m, min_tokens=m, n=n))
            try:
                eng.add_request(f"r{added}", build(eng, key), params)
                pending[f"r{added}"] = (key, params)
            except ValueError as e:                   # a prompt over the whole (tiny) pool: refused
                assert "KV blocks" in str(e)
            added += 1
        if pending and rng.random() < 0.03:
            pending.pop(victim := rng.choice(sorted(pending)))
            eng.abort_request(victim)
        for out in eng.step():
            if out.finished and out.request_id in pending:
                key, params = pending.pop(out.request_id)
                if all(c.stop_reason != "kv_cache_full" for c in out.outputs):
                    assert [c.token_ids for c in out.outputs] == alone(key, params), (trial, out.request_id)
                    checked += 1
        if added == 25 and not eng.has_unfinished_requests():
            break
    assert not eng.has_unfinished_requests() and not pending
    s = eng.stats()
    assert s["kv_blocks_free"] == total and s["num_running"] == s["num_waiting"] == 0
    assert checked >= 5
