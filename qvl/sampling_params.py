"""SamplingParams: how one request is decoded. Field names and meanings follow vLLM.

Contract:
  * Every field is checked in `__post_init__`; a bad value raises ValueError naming the field, the
    limit and the value given. Numbers must be finite; `seed` is a 64-bit signed int (OpenAI's and vLLM's
    range; sibling i of an n > 1 request seeds `seed + i`, still within torch's generator range). What
    depends on the model (token ids < vocab size, logprobs <= vocab size, n <= max_num_seqs) is checked
    by the engine when the request is added (qvl.engine.request_checks).
  * `temperature == 0` means greedy (argmax). `top_k == 1` is greedy too (one candidate).
  * `top_k` 0 or -1 and `top_p` 1.0 and `min_p` 0.0 disable those filters.
  * `repetition_penalty` has transformers' semantics (every id seen in prompt + output: positive
    logits divided, negative multiplied); `presence_penalty` / `frequency_penalty` have vLLM's
    (output ids only, subtracted).
  * `max_tokens=None` means "until max_model_len". `stop` strings never appear in the returned text
    unless `include_stop_str_in_output`.
  * Checkpoint defaults: `SamplingParams.from_generation_config(model_dir_or_dict, **overrides)` reads
    generation_config.json (do_sample, temperature, top_k, top_p, min_p, repetition_penalty,
    max_new_tokens) and lays the caller's overrides on top. `generation_defaults()` returns only the
    overlay dict. eos ids are the engine's business (it stops on them unless `ignore_eos`).
  * `structured_outputs=StructuredOutputsParams(json=... | regex=... | choice=[...] | grammar=... |
    json_object=True)` constrains decoding to a grammar (vLLM's names; exactly one constraint). The
    grammar itself is compiled by qvl.structured; here only the shape of the request is checked.
Knows nothing about tokenizers or tensors.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, fields, replace

_GEN_KEYS = {  # generation_config.json key -> SamplingParams field
    "temperature": "temperature",
    "top_k": "top_k",
    "top_p": "top_p",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "max_new_tokens": "max_tokens",
}


@dataclass(frozen=True)
class StructuredOutputsParams:
    """One decoding constraint: a JSON schema (dict or JSON text), any JSON object, a regex, one of
    a list of strings, or a Lark grammar (llguidance's dialect)."""
    json: dict | str | None = None
    regex: str | None = None
    choice: list[str] | tuple[str, ...] | None = None
    grammar: str | None = None
    json_object: bool = False

    def __post_init__(self) -> None:
        given = [k for k in ("json", "regex", "choice", "grammar") if getattr(self, k) is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            raise ValueError(f"StructuredOutputsParams takes exactly one of json, regex, choice, grammar, "
                             f"json_object; got {given or 'none'}")
        if self.json is not None and not isinstance(self.json, (dict, str)):
            raise ValueError(f"StructuredOutputsParams.json must be a JSON schema (dict or JSON text), "
                             f"got {type(self.json).__name__}")
        if self.choice is not None:
            if isinstance(self.choice, str) or not self.choice or not all(
                    isinstance(c, str) and c for c in self.choice):
                raise ValueError("StructuredOutputsParams.choice must be a non-empty list of non-empty strings")
            object.__setattr__(self, "choice", tuple(self.choice))
        for k in ("regex", "grammar"):
            v = getattr(self, k)
            if v is not None and (not isinstance(v, str) or not v):
                raise ValueError(f"StructuredOutputsParams.{k} must be a non-empty string")

    @property
    def kind(self) -> str:
        return next(k for k in ("json", "regex", "choice", "grammar", "json_object")
                    if getattr(self, k) not in (None, False))

    def key(self) -> tuple[str, str]:
        """(kind, canonical text): equal constraints have equal keys (the compile cache's key)."""
        kind = self.kind
        if kind == "json":
            schema = self.json
            if isinstance(schema, str):
                try:
                    schema = json.loads(schema)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"the JSON schema is not valid JSON: {exc}") from None
            return kind, json.dumps(schema, separators=(",", ":"))   # key order is output order
        if kind == "choice":
            return kind, json.dumps(list(self.choice))
        if kind == "json_object":
            return kind, ""
        return kind, getattr(self, kind)

    def __hash__(self) -> int:
        return hash(self.key())


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    ignore_eos: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    structured_outputs: StructuredOutputsParams | None = None
    _stop_list: list[str] = field(default_factory=list, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        def bad(name, limit):
            raise ValueError(f"SamplingParams.{name} must be {limit}, got {getattr(self, name)!r}")

        if not _is_int(self.n) or self.n < 1:
            bad("n", "an int >= 1")
        if not _is_num(self.temperature) or self.temperature < 0:
            bad("temperature", "a number >= 0 (0 = greedy)")
        if not _is_num(self.top_p) or not 0 < self.top_p <= 1:
            bad("top_p", "in (0, 1]")
        if not _is_int(self.top_k) or self.top_k < -1:
            bad("top_k", "an int >= 1, or 0 / -1 to disable")
        if not _is_num(self.min_p) or not 0 <= self.min_p <= 1:
            bad("min_p", "in [0, 1]")
        if not _is_num(self.repetition_penalty) or self.repetition_penalty <= 0:
            bad("repetition_penalty", "a number > 0 (1 = off)")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not _is_num(v) or not -2 <= v <= 2:
                bad(name, "in [-2, 2]")
        if self.seed is not None and (not _is_int(self.seed) or not -2**63 <= self.seed < 2**63):
            bad("seed", "an int in [-2**63, 2**63 - 1] or None")
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            bad("max_tokens", "an int >= 1 or None")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            bad("min_tokens", "an int >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"SamplingParams.min_tokens ({self.min_tokens}) must be <= max_tokens "
                             f"({self.max_tokens})")
        if self.logprobs is not None and (not _is_int(self.logprobs) or self.logprobs < 0):
            bad("logprobs", "an int >= 0 or None")
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        for s in stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"SamplingParams.stop entries must be non-empty strings, got {s!r}")
        self._stop_list = stop
        ids = list(self.stop_token_ids or [])
        for t in ids:
            if not _is_int(t) or t < 0:
                raise ValueError(f"SamplingParams.stop_token_ids entries must be ints >= 0, got {t!r}")
        self.stop_token_ids = ids
        if self.structured_outputs is not None and not isinstance(self.structured_outputs,
                                                                  StructuredOutputsParams):
            raise ValueError(f"SamplingParams.structured_outputs must be a StructuredOutputsParams, got "
                             f"{type(self.structured_outputs).__name__}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @property
    def stop_strings(self) -> list[str]:
        return self._stop_list

    def clone(self, **changes) -> "SamplingParams":
        return replace(self, **changes)

    @classmethod
    def from_generation_config(cls, source: str | os.PathLike | dict | None = None,
                               **overrides) -> "SamplingParams":
        """Checkpoint defaults (generation_config.json in a dir, a file path, or a dict) + overrides."""
        known = {f.name for f in fields(cls) if f.init}
        unknown = set(overrides) - known
        if unknown:
            raise ValueError(f"SamplingParams has no field(s) {sorted(unknown)}")
        return cls(**{**generation_defaults(source), **overrides})


def generation_defaults(source: str | os.PathLike | dict | None) -> dict:
    """The SamplingParams fields a checkpoint's generation config sets (empty when there is none).

    A config with `do_sample` false or absent means greedy (temperature 0), as transformers decodes it.
    """
    cfg = load_generation_config(source)
    if not cfg:
        return {}
    out = {f: cfg[k] for k, f in _GEN_KEYS.items() if cfg.get(k) is not None}
    if "top_k" in out and out["top_k"] == 0:
        out.pop("top_k")
    if not cfg.get("do_sample", False):
        out["temperature"] = 0.0
    return out


def load_generation_config(source: str | os.PathLike | dict | None) -> dict:
    if source is None:
        return {}
    if isinstance(source, dict):
        return dict(source)
    path = os.fspath(source)
    if os.path.isdir(path):
        path = os.path.join(path, "generation_config.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def eos_token_ids(source: str | os.PathLike | dict | None) -> list[int]:
    """eos_token_id of a generation config as a list (it may be an int or a list)."""
    eos = load_generation_config(source).get("eos_token_id")
    if eos is None:
        return []
    return [int(eos)] if isinstance(eos, int) else [int(e) for e in eos]


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and (
        isinstance(v, int) or math.isfinite(v))                                # NaN, inf fail
