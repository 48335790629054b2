"""The request options beyond OpenAI's core that a vLLM or OpenAI client may send, and what qvl does with each.

Owns three decisions about a request body, made before (or right after) pydantic validation:

- **structured output**: `structured_spec(req)` reads OpenAI `response_format`, vLLM `structured_outputs` and
  the older `guided_json` / `guided_regex` / `guided_choice` / `guided_grammar` into the one
  StructuredOutputsParams the request asks for (an unknown kind, or two constraints at once, is a
  ValueError: a request that asks for a constraint never gets unconstrained text);
- **refused options**: vLLM / OpenAI fields qvl does not implement and that would change the answer if they
  were ignored (`guided_whitespace_pattern`, a per-request `chat_template`, `truncate_prompt_tokens`,
  `prompt_logprobs`, beam search, `allowed_token_ids`, `bad_words`, `priority`, audio output, ...):
  `refused_field(data)` names the first one a body sets to anything but its neutral value (a 400);
- **unknown fields**: `unknown_fields(model_cls, data)` lists the top-level keys no model field reads; the
  server logs them (as vLLM does) and refuses them with `--strict-request-fields`.

Also `mm_processor_kwargs` (vLLM's per-request media options): `MMProcessorKwargs` validates it and
`apply_mm_defaults` gives its values to every image / video item that does not set them itself, where
qvl.multimodal's limits apply to them exactly as to an item's own options.
"""
from __future__ import annotations

from typing import Annotated, Any

from pydantic import ConfigDict, Field

from qvl.sampling_params import StructuredOutputsParams
from qvl.server.content import WireModel

# field -> (its neutral value: sending this, or null, asks for nothing; why it is refused)
_REFUSED: dict[str, tuple[Any, str]] = {
    "chat_template": (None, "a per-request chat template is not accepted; start the server with "
                            "--chat-template FILE"),
    "guided_whitespace_pattern": (None, "not supported (the JSON grammar's whitespace is fixed)"),
    "truncate_prompt_tokens": (None, "not supported; shorten the prompt instead"),
    "prompt_logprobs": (None, "not supported"),
    "use_beam_search": (False, "beam search is not supported"),
    "length_penalty": (1.0, "only used by beam search, which is not supported"),
    "allowed_token_ids": (None, "not supported; use structured_outputs.choice or .regex"),
    "bad_words": (None, "not supported"),
    "logits_processors": (None, "not supported"),
    "return_tokens_as_token_ids": (False, "not supported"),
    "spaces_between_special_tokens": (True, "false is not supported"),
    "documents": (None, "not supported"),
    "priority": (0, "request priorities are not supported (the scheduler is first come, first served)"),
    "prompt_embeds": (None, "not supported"),
    "audio": (None, "audio output is not supported"),
}


def refused_field(data: dict) -> tuple[str, str] | None:
    """(field, message) for the first refused option `data` asks for, else None."""
    for name, (neutral, why) in _REFUSED.items():
        value = data.get(name)
        if value is None or value == neutral or value == []:
            continue
        return name, f"{name}: {why}"
    modalities = data.get("modalities")
    if modalities is not None and modalities != ["text"]:
        return "modalities", f"modalities: only ['text'] output is supported, got {modalities!r}"
    return None


def unknown_fields(model_cls, data: dict) -> list[str]:
    """Top-level keys of `data` that no field of `model_cls` reads (refused ones are reported apart)."""
    return sorted(k for k in data if k not in model_cls.model_fields and k not in _REFUSED
                  and k != "modalities")


# ---------------------------------------------------------------------------------------------------
# per-request media options

PositiveInt = Annotated[int, Field(gt=0)]


class MMProcessorKwargs(WireModel):
    """vLLM's `mm_processor_kwargs` for the Qwen-VL processors: defaults for every image / video item of
    the request (an item's own option wins). Any other key is a 400."""
    model_config = ConfigDict(extra="forbid")

    min_pixels: PositiveInt | None = None
    max_pixels: PositiveInt | None = None
    fps: Annotated[float, Field(gt=0, le=60)] | None = None
    total_pixels: PositiveInt | None = None

    def defaults_for(self, kind: str) -> dict:
        keys = ("min_pixels", "max_pixels") if kind == "image" else ("min_pixels", "max_pixels", "fps",
                                                                      "total_pixels")
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}


def apply_mm_defaults(messages: list[dict], kwargs: MMProcessorKwargs | None) -> list[dict]:
    """Processor messages (ChatMessage.to_processor) with `kwargs` filled into items that lack them."""
    if kwargs is None:
        return messages
    out = []
    for m in messages:
        parts = [{**kwargs.defaults_for(p["type"]), **p} if p.get("type") in ("image", "video") else p
                 for p in m["content"]]
        out.append({**m, "content": parts})
    return out


# ---------------------------------------------------------------------------------------------------
# structured output

_ALIASES = (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice"),
            ("guided_grammar", "grammar"))


def structured_spec(req) -> StructuredOutputsParams | None:
    """The decoding constraint `req` (a chat or completion request) asks for (None: free text);
    ValueError when it is unclear or unsupported."""
    asked: dict[str, dict] = {}
    rf = req.response_format
    if rf is not None:
        kind = rf.get("type", "text")
        if kind == "json_object":
            asked["response_format"] = {"json_object": True}
        elif kind == "json_schema":
            js = rf.get("json_schema")
            if not isinstance(js, dict):
                raise ValueError("response_format.json_schema must be an object with name and schema")
            schema = js.get("schema")
            if schema is None:
                asked["response_format"] = {"json_object": True}
            elif not isinstance(schema, dict):
                raise ValueError("response_format.json_schema.schema must be a JSON schema object")
            else:
                asked["response_format"] = {"json": schema}
        elif kind != "text":
            raise ValueError(f"response_format type {kind!r} is not supported; use 'text', 'json_object' "
                             "or 'json_schema'")
    if req.structured_outputs is not None:
        known = {"json", "regex", "choice", "grammar", "json_object"}
        given = {k: v for k, v in req.structured_outputs.items() if k in known and v not in (None, False)}
        unsupported = sorted(k for k in ("structural_tag",) if req.structured_outputs.get(k))
        if unsupported:
            raise ValueError(f"structured_outputs.{unsupported[0]} is not supported; use json, regex, "
                             "choice or grammar")
        if not given:
            raise ValueError("structured_outputs must set one of json, regex, choice, grammar, json_object")
        asked["structured_outputs"] = given
    for alias, key in _ALIASES:
        if getattr(req, alias) is not None:
            asked[alias] = {key: getattr(req, alias)}
    if not asked:
        return None
    if len(asked) > 1 or len(next(iter(asked.values()))) > 1:
        raise ValueError(f"give one structured-output constraint, got {sorted(asked)}"
                         + ("" if len(asked) > 1 else f" with {sorted(next(iter(asked.values())))}"))
    return StructuredOutputsParams(**next(iter(asked.values())))
