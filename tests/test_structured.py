"""Structured output on a tiny random checkpoint: its free output is noise, so every reply that parses
and validates is the grammar's doing. JSON schemas (nested, arrays, enums, bounds, required,
additionalProperties false, patterns), regex and choice; sampled and greedy, n = 2, streamed, under
chunked prefill and a KV pool small enough to force preemption (same text as without); the mask is
the checkpoint's vocabulary wide; bad grammars are ValueErrors; the sampler gets one SamplingBatch."""
import json
import re

import jsonschema
import pytest

from qvl.config import EngineConfig
from qvl.engine.llm_engine import LLMEngine
from qvl.llm import LLM
from qvl.multimodal.prompt import ProcessedPrompt
from qvl.sampling_params import SamplingParams, StructuredOutputsParams

SCHEMAS = {
    "flat": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                              "ok": {"type": "boolean"}},
             "required": ["name", "ok"], "additionalProperties": False},
    "nested": {"type": "object", "properties": {
        "vendor": {"type": "object", "properties": {
            "name": {"type": "string", "maxLength": 8},
            "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 6},
                                                         "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                        "required": ["city", "zip"], "additionalProperties": False}},
            "required": ["name", "address"], "additionalProperties": False}},
        "required": ["vendor"], "additionalProperties": False},
    "array_enum": {"type": "object", "properties": {
        "colors": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 1, "maxItems": 4},
        "shape": {"type": "string", "enum": ["circle", "square"]}},
        "required": ["colors", "shape"], "additionalProperties": False},
    "numbers": {"type": "object", "properties": {
        "count": {"type": "integer", "minimum": 1, "maximum": 9},
        "price": {"type": "number", "minimum": 0, "maximum": 1000},
        "items": {"type": "array", "maxItems": 3, "items": {
            "type": "object", "properties": {"qty": {"type": "integer", "minimum": 0, "maximum": 50},
                                             "sku": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"}},
            "required": ["qty", "sku"], "additionalProperties": False}}},
        "required": ["count", "price", "items"], "additionalProperties": False},
}

PROMPT = [3, 17, 42, 99, 5, 250]


def make(ckpt, **kw) -> LLMEngine:
    kw.setdefault("max_model_len", 512)
    kw.setdefault("kv_cache_memory", 4 << 20)
    return LLMEngine.from_config(EngineConfig(model=str(ckpt), dtype="float32", device="cpu", **kw))


@pytest.fixture(scope="module")
def eng(tiny_ckpt):
    return make(tiny_ckpt)


def constrained(spec: StructuredOutputsParams, **kw) -> SamplingParams:
    kw.setdefault("temperature", 1.0)
    kw.setdefault("max_tokens", 300)
    return SamplingParams(structured_outputs=spec, **kw)


def texts(eng, params, prompts=(PROMPT,)):
    outs = LLM.from_engine(eng).generate([ProcessedPrompt.from_token_ids(list(p)) for p in prompts],
                                         params, use_tqdm=False)
    return [(c.text, c.finish_reason) for o in outs for c in o.outputs]


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_every_reply_validates(eng, name):
    schema = SCHEMAS[name]
    replies = texts(eng, [constrained(StructuredOutputsParams(json=schema), n=2, seed=s) for s in range(3)],
                    [PROMPT, PROMPT[:3], PROMPT[2:]])
    assert len(replies) == 6
    for text, finish in replies:
        assert finish == "stop", text
        jsonschema.validate(json.loads(text), schema)
    greedy = texts(eng, constrained(StructuredOutputsParams(json=json.dumps(schema)), temperature=0))
    jsonschema.validate(json.loads(greedy[0][0]), schema)


def test_free_output_of_the_tiny_model_is_noise(eng):
    """The control: unconstrained, the same prompts give no parseable JSON."""
    for text, _ in texts(eng, [SamplingParams(temperature=1.0, seed=s, max_tokens=40) for s in range(3)],
                         [PROMPT] * 3):
        with pytest.raises(ValueError):
            json.loads(text)


def test_json_object_regex_and_choice(eng):
    obj = texts(eng, constrained(StructuredOutputsParams(json_object=True), n=2, seed=1, max_tokens=60))
    for text, finish in obj:
        if finish == "stop":
            assert isinstance(json.loads(text), dict)
        else:                                    # a free-form object may run long: then it is a prefix
            assert finish == "length" and text.startswith("{")
    rx = r"[A-Z]{3}-[0-9]{4} (paid|due)"      # \d is Unicode-wide in llguidance, as in Rust
    for text, finish in texts(eng, constrained(StructuredOutputsParams(regex=rx), n=2, seed=2)):
        assert re.fullmatch(rx, text) and finish == "stop"
    choices = ["red apple", 'say "hi"', "back\\slash", "日本"]
    got = {t for t, _ in texts(eng, constrained(StructuredOutputsParams(choice=choices), n=6, seed=0))}
    assert got <= set(choices) and len(got) > 1
    lark = 'start: "x=" NUM ("," NUM)*\nNUM: /[0-9]{1,2}/'
    for text, _ in texts(eng, constrained(StructuredOutputsParams(grammar=lark), seed=3, max_tokens=12)):
        assert re.fullmatch(r"x=\d{1,2}(,\d{1,2})*", text)


def test_streamed_text_validates(eng):
    schema = SCHEMAS["numbers"]
    llm = LLM.from_engine(eng)
    deltas = [d for d, _ in llm.stream(ProcessedPrompt.from_token_ids(PROMPT),
                                       constrained(StructuredOutputsParams(json=schema), seed=4))]
    assert len(deltas) > 3
    jsonschema.validate(json.loads("".join(deltas)), schema)


def test_preemption_chunking_and_prefix_cache_change_nothing(tiny_ckpt, eng):
    """The grammar state survives recompute: a tiny pool (preemptions), chunked prefill and prefix-cache
    hits give the same seeded replies as a roomy engine."""
    schema = SCHEMAS["array_enum"]
    params = [constrained(StructuredOutputsParams(json=schema), n=2, seed=s) for s in range(3)]
    prompts = [PROMPT * 3, PROMPT * 2, PROMPT[:4] * 4]
    ref = texts(eng, params, prompts)
    per_block = 2 * 2 * 16 * 2 * 16 * 4                     # layers * K,V * block * kv heads * dim * fp32
    small = make(tiny_ckpt, kv_cache_memory=6 * per_block, max_num_batched_tokens=9)
    got = texts(small, params, prompts)
    assert small.stats()["num_preemptions"] > 0
    assert got == ref and small.stats()["prefix_cache_hits"] > 0
    for text, finish in got:
        jsonschema.validate(json.loads(text), schema)
    assert small.stats()["kv_blocks_free"] == small.block_manager.num_blocks


def test_mask_is_the_checkpoints_vocab_wide(eng):
    """Embedding rows (448), not the tokenizer's size: ids the tokenizer lacks are never allowed."""
    assert eng.config.vocab_size == 448 and eng.processor.tokenizer.get_vocab_size() < 448
    seq_params = constrained(StructuredOutputsParams(json_object=True))
    eng.add_request("mask", ProcessedPrompt.from_token_ids(PROMPT), seq_params)
    seq = eng.requests["mask"].seqs[0]
    eng.structured.check(seq_params.structured_outputs)
    mask = eng.structured.bitmask([seq])
    assert tuple(mask.shape) == (1, 14)
    allowed = [t for t in range(448) if (int(mask[0, t // 32]) >> (t % 32)) & 1]
    assert allowed and max(allowed) < eng.processor.tokenizer.get_vocab_size()
    assert all(eng.processor.tokenizer.decode([t]).lstrip().startswith("{") for t in allowed)
    eng.abort_request("mask")


def test_min_tokens_ban_yields_to_a_finished_grammar(eng):
    """min_tokens bans eos, a complete grammar allows only eos: the grammar wins, the text is valid."""
    sp = constrained(StructuredOutputsParams(choice=["yes", "no"]), temperature=0, min_tokens=8)
    (text, finish), = texts(eng, sp)
    assert text in ("yes", "no") and finish == "stop"


def test_bad_grammars_are_value_errors(eng):
    llm = LLM.from_engine(eng)
    p = ProcessedPrompt.from_token_ids(PROMPT)
    for spec, words in [(StructuredOutputsParams(json={"type": "strin"}), "strin"),
                        (StructuredOutputsParams(json='{"type": '), "not valid JSON"),
                        (StructuredOutputsParams(json={"$ref": "#/defs/missing"}), "missing"),
                        (StructuredOutputsParams(regex="[a-"), "regex"),
                        (StructuredOutputsParams(grammar="start: nothere"), "nothere")]:
        with pytest.raises(ValueError, match=re.escape(words)):
            llm.generate(p, constrained(spec), use_tqdm=False)
    assert not eng.requests
    # straight to the engine, before its compile finished: the request ends, flagged, with no text
    spec = StructuredOutputsParams(json={"type": "object", "properties": {"a": {"type": "nope"}}})
    eng.add_request("bad", p, constrained(spec))
    outs = []
    while eng.has_unfinished_requests():
        outs += eng.step()
    c = outs[-1].outputs[0]
    assert c.finish_reason == "abort" and "structured_output_error" in c.stop_reason and c.text == ""
    with pytest.raises(ValueError, match="nope"):          # now cached: refused at once
        eng.add_request("bad2", p, constrained(spec))


def test_structured_outputs_params_validation():
    for bad in (dict(), dict(json={}, regex="a"), dict(choice=[]), dict(choice="ab"), dict(regex=""),
                dict(json=3)):
        with pytest.raises(ValueError, match="StructuredOutputsParams"):
            StructuredOutputsParams(**bad)
    a = StructuredOutputsParams(json={"type": "object", "properties": {"b": {}, "a": {}}})
    b = StructuredOutputsParams(json='{"type":"object", "properties": {"b": {}, "a": {}}}')
    assert a.key() == b.key() and hash(a) == hash(b)
    with pytest.raises(ValueError, match="structured_outputs"):
        SamplingParams(structured_outputs={"json": {}})


def test_compiles_are_cached_by_canonical_text(eng):
    s = eng.structured
    f1 = s.compile(StructuredOutputsParams(json={"type": "object", "properties": {"zz": {"type": "integer"}}}))
    f2 = s.compile(StructuredOutputsParams(json='{"type": "object",\n "properties": {"zz": {"type": "integer"}}}'))
    assert f1 is f2
    f1.result()
