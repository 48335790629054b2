"""Sampler against transformers' logits processors, and seeded reproducibility across batches."""
import math

import pytest
import torch
from transformers.generation.logits_process import (MinPLogitsWarper,
                                                    RepetitionPenaltyLogitsProcessor,
                                                    TemperatureLogitsWarper, TopKLogitsWarper,
                                                    TopPLogitsWarper)

from qvl.layers.sampler import (Sampler, SamplingBatch, apply_min_p, apply_repetition_penalty,
                                apply_top_k, apply_top_p, apply_token_bitmask)
from qvl.sampling_params import SamplingParams, generation_defaults

V = 300


def sample(logits, *batch, **kw):
    """The sampler's one input is a SamplingBatch (params, token ids, prompt lengths, generators, mask)."""
    return Sampler()(logits, SamplingBatch(*batch, **kw))


def rand_logits(b=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, V, generator=g) * 3


def test_repetition_penalty_equals_transformers():
    logits = rand_logits()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (logits.shape[0], 40), generator=g)
    ref = RepetitionPenaltyLogitsProcessor(1.3)(ids, logits.clone())
    ours = logits.clone()
    apply_repetition_penalty(ours, list(range(logits.shape[0])), ids.tolist(), [1.3] * 6)
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("k", [1, 5, 50, V])
def test_top_k_equals_transformers(k):
    logits = rand_logits(seed=k)
    ref = TopKLogitsWarper(k)(None, logits.clone())
    assert torch.equal(apply_top_k(logits, torch.full((6,), k)), ref)


@pytest.mark.parametrize("p", [0.001, 0.3, 0.8, 0.95, 1.0])
def test_top_p_equals_transformers(p):
    logits = rand_logits(seed=int(p * 1000))
    ref = TopPLogitsWarper(p)(None, logits.clone())
    assert torch.equal(apply_top_p(logits, torch.full((6,), p)), ref)


def test_min_p_equals_transformers():
    logits = rand_logits(seed=3)
    ref = MinPLogitsWarper(0.1)(None, logits.clone())
    assert torch.equal(apply_min_p(logits, torch.full((6,), 0.1)), ref)


def test_per_row_filters_in_one_batch():
    logits = rand_logits(b=3, seed=4)
    k = apply_top_k(logits, torch.tensor([1, 10, V]))
    assert torch.equal(k[0], TopKLogitsWarper(1)(None, logits[:1].clone())[0])
    assert torch.equal(k[1], TopKLogitsWarper(10)(None, logits[1:2].clone())[0])
    assert torch.equal(k[2], logits[2])


def test_greedy_and_penalized_greedy():
    logits = rand_logits(b=2, seed=5)
    top = logits.argmax(-1)
    hist = [[int(top[0])], [int(top[1])]]
    out = sample(logits, [SamplingParams(temperature=0), SamplingParams(temperature=0,
                    repetition_penalty=100.0)], hist, [1, 1])
    assert out.token_ids[0] == int(top[0])
    ref = RepetitionPenaltyLogitsProcessor(100.0)(torch.tensor(hist[1:]), logits[1:].clone())
    assert out.token_ids[1] == int(ref.argmax())


def test_presence_frequency_penalties_output_only():
    logits = torch.zeros(1, V)
    logits[0, 5] = 1.0
    logits[0, 6] = 0.9
    sp = SamplingParams(temperature=0, frequency_penalty=0.1)
    # token 5 in the prompt only: not penalized; in the output twice: 1.0 - 0.2 < 0.9
    assert sample(logits, [sp], [[5, 5, 5]], [3]).token_ids == [5]
    assert sample(logits, [sp], [[1, 5, 5]], [1]).token_ids == [6]
    sp = SamplingParams(temperature=0, presence_penalty=0.2)
    assert sample(logits, [sp], [[1, 5]], [1]).token_ids == [6]


def test_banned_tokens_for_min_tokens():
    logits = rand_logits(b=1, seed=6)
    top = int(logits.argmax())
    out = sample(logits, [SamplingParams(temperature=0)], [[1]], [1], banned_token_ids=[[top]])
    assert out.token_ids[0] != top


def test_allowed_bitmask_masks_each_row():
    logits = rand_logits(b=3, seed=11)
    words = (V + 31) // 32
    mask = torch.zeros(3, words, dtype=torch.int32)
    mask[0, 7 // 32] |= 1 << 7                        # row 0: only token 7
    mask[1, 299 // 32] |= 1 << (299 % 32)             # row 1: only the last token
    mask[1, 0] |= 1 << 31                              # and token 31 (the sign bit)
    mask[2] = -1                                       # row 2: everything
    sp = [SamplingParams(temperature=0), SamplingParams(temperature=1.0, seed=1), SamplingParams(temperature=0)]
    gens = [None, torch.Generator().manual_seed(1), None]
    out = sample(logits, sp, [[1]] * 3, [1] * 3, gens, allowed_bitmask=mask)
    assert out.token_ids[0] == 7 and out.token_ids[1] in (31, 299)
    assert out.token_ids[2] == int(logits[2].argmax())
    masked = logits.clone()
    apply_token_bitmask(masked, mask)
    assert torch.isfinite(masked[0]).sum() == 1 and torch.isfinite(masked[1]).sum() == 2
    assert torch.equal(masked[2], logits[2])


def test_sampling_distribution_follows_softmax():
    logits = torch.tensor([[0.0, 1.0, 2.0, -1e9]]).repeat(4000, 1)
    sp = [SamplingParams(temperature=1.0)] * 4000
    torch.manual_seed(0)
    toks = torch.tensor(sample(logits, sp, [[0]] * 4000, [1] * 4000).token_ids)
    freq = torch.bincount(toks, minlength=4).float() / 4000
    assert torch.allclose(freq, torch.softmax(logits[0], -1), atol=0.03)
    assert freq[3] == 0


def test_seeded_rows_independent_of_batch_mates():
    logits = rand_logits(b=4, seed=7)
    mk = lambda seed: SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=seed)  # noqa: E731

    def draw(rows, steps=5):
        gens = [torch.Generator().manual_seed(s) if s is not None else None for _, s in rows]
        toks = []
        for _ in range(steps):
            out = sample(logits[[r for r, _ in rows]], [mk(s) for _, s in rows],
                            [[1]] * len(rows), [1] * len(rows), gens)
            toks.append(out.token_ids)
        return list(zip(*toks))

    alone = draw([(2, 123)])[0]
    mixed = draw([(0, None), (1, 9), (2, 123), (3, None)])
    assert mixed[2] == alone
    again = draw([(3, 5), (2, 123)])
    assert again[1] == alone


def test_logprobs_are_raw_and_top_n():
    logits = rand_logits(b=2, seed=8)
    sp = [SamplingParams(temperature=0, logprobs=3, repetition_penalty=2.0), SamplingParams()]
    out = sample(logits, sp, [[0], [0]], [1, 1])
    raw = torch.log_softmax(logits[0], -1)
    top = dict(zip(*[t.tolist() for t in reversed(raw.topk(3))]))
    assert all(math.isclose(out.top_logprobs[0][t], v, abs_tol=1e-6) for t, v in top.items())
    assert out.token_ids[0] in out.top_logprobs[0]
    assert math.isclose(out.logprobs[0], raw[out.token_ids[0]].item(), abs_tol=1e-6)
    assert out.logprobs[1] is None and out.top_logprobs[1] is None


def test_temperature_then_warpers_matches_transformers_chain():
    logits = rand_logits(seed=9)
    ref = logits.clone()
    for w in (TemperatureLogitsWarper(0.7), TopKLogitsWarper(20), TopPLogitsWarper(0.9)):
        ref = w(None, ref)
    ours = apply_top_p(apply_top_k(logits / 0.7, torch.full((6,), 20)), torch.full((6,), 0.9))
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))


def test_sampling_params_validation():
    for bad in (dict(temperature=-1), dict(top_p=0), dict(top_k=-2), dict(min_p=2), dict(n=0),
                dict(max_tokens=0), dict(min_tokens=5, max_tokens=2), dict(stop=[""]),
                dict(presence_penalty=3), dict(repetition_penalty=0), dict(logprobs=-1),
                dict(stop_token_ids=[-1]), dict(temperature=float("nan"))):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SamplingParams(**bad)
    assert SamplingParams(stop="x").stop_strings == ["x"]
    assert SamplingParams(temperature=0).greedy and SamplingParams(top_k=1).greedy


def test_generation_config_defaults(tmp_path):
    (tmp_path / "generation_config.json").write_text(
        '{"do_sample": true, "top_k": 1, "top_p": 0.001, "temperature": 0.1, '
        '"repetition_penalty": 1.05, "eos_token_id": [151645, 151643]}')
    sp = SamplingParams.from_generation_config(tmp_path, max_tokens=32)
    assert (sp.top_k, sp.top_p, sp.temperature, sp.repetition_penalty, sp.max_tokens) == \
        (1, 0.001, 0.1, 1.05, 32)
    assert sp.greedy
    assert generation_defaults({"repetition_penalty": 1.1}) == {"repetition_penalty": 1.1,
                                                                "temperature": 0.0}
    assert generation_defaults(tmp_path / "missing") == {}
    with pytest.raises(ValueError, match="no field"):
        SamplingParams.from_generation_config(None, bogus=1)
