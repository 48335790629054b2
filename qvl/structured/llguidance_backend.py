"""The llguidance backend (microsoft/llguidance): JSON schema, regex, choice and Lark grammars.

JSON is compiled without flexible whitespace (compact output: `{"a":1}`) unless the schema's own
`x-guidance` says otherwise. A choice is a Lark alternation of its strings, quoted as JSON strings. The
mask is computed on the fly from the grammar's state (llguidance's Earley parser + token trie), so
compiling is cheap and the per-token cost is what bench/structured.py measures.
"""
from __future__ import annotations

import json

import llguidance as llg
import torch

from qvl.sampling_params import StructuredOutputsParams

_JSON_DEFAULTS = {"whitespace_flexible": False}


class LLGuidanceMatcher:
    __slots__ = ("m",)

    def __init__(self, m: "llg.LLMatcher"):
        self.m = m

    def accept(self, token_id: int) -> bool:
        return self.m.consume_token(token_id)

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        v = bitmask[row]                                                   # (W,) int32, contiguous, CPU
        self.m.unsafe_compute_mask_ptr(v.data_ptr(), v.numel() * 4)

    def is_terminated(self) -> bool:
        return self.m.is_stopped()


class LLGuidanceGrammar:
    def __init__(self, template: "llg.LLMatcher"):
        self.template = template            # never advanced; each sequence gets a copy

    def matcher(self) -> LLGuidanceMatcher:
        return LLGuidanceMatcher(self.template.deep_copy())


class LLGuidanceBackend:
    name = "llguidance"

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_token_ids: list[int]):
        self.tokenizer = llg.LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=list(eos_token_ids))
        self.executor = llg.LLExecutor()

    @staticmethod
    def grammar_text(spec: StructuredOutputsParams) -> str:
        kind, text = spec.key()
        if kind == "json":
            return llg.LLMatcher.grammar_from_json_schema(text, defaults=_JSON_DEFAULTS)
        if kind == "json_object":
            return llg.LLMatcher.grammar_from_json_schema('{"type": "object"}', defaults=_JSON_DEFAULTS)
        if kind == "regex":
            return llg.LLMatcher.grammar_from_regex(text)
        if kind == "choice":
            alts = " | ".join(json.dumps(c) for c in spec.choice)
            return llg.LLMatcher.grammar_from_lark(f"start: {alts}")
        return llg.LLMatcher.grammar_from_lark(text)

    def compile(self, spec: StructuredOutputsParams) -> LLGuidanceGrammar:
        try:
            grammar = self.grammar_text(spec)
        except ValueError as exc:
            raise ValueError(f"invalid {spec.kind} constraint: {exc}") from None
        err = llg.LLMatcher.validate_grammar(grammar, self.tokenizer)
        if err:
            raise ValueError(f"invalid {spec.kind} constraint: {err.strip()}")
        m = llg.LLMatcher(self.tokenizer, grammar, log_level=0)
        if m.is_error():
            raise ValueError(f"invalid {spec.kind} constraint: {m.get_error().strip()}")
        return LLGuidanceGrammar(m)

    def fill_bitmasks(self, matchers: list[tuple[LLGuidanceMatcher, int]], bitmask: torch.Tensor) -> None:
        if len(matchers) == 1:
            matchers[0][0].fill_bitmask(bitmask, matchers[0][1])
            return
        assert bitmask.is_contiguous() and bitmask.dtype == torch.int32 and not bitmask.is_cuda
        B, W = bitmask.shape
        self.executor.unsafe_compute_mask_ptr([(m.m, row) for m, row in matchers], bitmask.data_ptr(), W * 4, B)
