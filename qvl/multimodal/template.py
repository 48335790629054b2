"""Chat templates: compile one as transformers does, pick it out of a checkpoint file, render it.

`render(template, messages, ...)` is transformers' `apply_chat_template(tokenize=False)`: a sandboxed
Jinja environment with trim_blocks/lstrip_blocks, `raise_exception`, `strftime_now`, a `tojson` that
does not HTML-escape and the `{% generation %}` tag; `tools` / `documents` default to None.

Generation flags (vLLM's request fields, transformers' semantics):
  add_generation_prompt    open a new assistant turn after the messages;
  continue_final_message   render without a generation prompt and cut the text right after the last
                           assistant message's content, so the model continues that message. The last
                           message must be the assistant's and must have text; the two flags exclude
                           each other.
  template_kwargs          extra template variables (vLLM's `chat_template_kwargs`, e.g. add_vision_id);
                           they may not replace `messages` or the two flags.

Knows nothing about tokenizers, media or the engine; every error is a ValueError.
"""
from __future__ import annotations

import copy
import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

RESERVED_VARIABLES = ("messages", "add_generation_prompt", "continue_final_message")
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "   # transformers' marker for where the final message ends


def render(template: jinja2.Template, messages: list[dict], *, add_generation_prompt: bool = True,
           continue_final_message: bool = False, variables: dict[str, Any] | None = None,
           template_kwargs: dict[str, Any] | None = None) -> str:
    """The rendered prompt. `variables` are the tokenizer's special tokens (eos_token, ...);
    `template_kwargs` the caller's extra variables (they win over `variables`)."""
    template_kwargs = dict(template_kwargs or {})
    reserved = sorted(set(template_kwargs) & set(RESERVED_VARIABLES))
    if reserved:
        raise ValueError(f"chat_template_kwargs may not set {', '.join(reserved)}; use the request field "
                         "of that name")
    if continue_final_message:
        if add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt cannot both be true: "
                             "continue the last assistant message, or open a new assistant turn")
        messages = _tag_final_message(messages)
    values = {"tools": None, "documents": None, **(variables or {}), **template_kwargs}
    try:
        text = template.render(messages=messages, add_generation_prompt=add_generation_prompt, **values)
    except jinja2.TemplateError as e:
        raise ValueError(f"chat template error: {e}") from e
    return _cut_at_tag(text) if continue_final_message else text


def _tag_final_message(messages: list[dict]) -> list[dict]:
    """A copy of `messages` whose last text (of the final, assistant message) ends with the marker."""
    if not messages or messages[-1].get("role") != "assistant":
        role = messages[-1].get("role") if messages else None
        raise ValueError(f"continue_final_message needs the last message to be the assistant's, got "
                         f"role {role!r}")
    messages = copy.deepcopy(messages)
    final = messages[-1]
    content = final.get("content")
    if isinstance(content, (list, tuple)):
        for part in reversed(content):
            if "text" in part:
                part["text"] = part["text"] + _CONTINUE_TAG
                break
        else:
            raise ValueError("continue_final_message: the last assistant message has no text to continue")
    else:
        final["content"] = (content or "") + _CONTINUE_TAG
    return messages


def _cut_at_tag(text: str) -> str:
    tag = _CONTINUE_TAG.strip()
    if tag not in text:
        raise ValueError("continue_final_message: the final message does not appear in the rendered chat "
                         "(the chat template drops part of it)")
    at = text.rindex(tag)
    if text[at:at + len(_CONTINUE_TAG)] == _CONTINUE_TAG:
        return text[:at]
    return text[:at].rstrip()    # the template trimmed the message's trailing space, so trim ours too


def pick_template(value: Any, where: Path) -> str:
    """A template string, or the "default" entry of a list of {name, template} (first one otherwise)."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and value:
        value = [{"name": k, "template": v} for k, v in value.items()]
    if isinstance(value, list) and value and all(isinstance(t, dict) and "template" in t for t in value):
        named = {t.get("name"): t["template"] for t in value}
        return named.get("default", value[0]["template"])
    raise ValueError(f"{where}: chat_template must be a string or a list of {{name, template}}, "
                     f"got {type(value).__name__}")


@lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    """Jinja environment as transformers builds it for chat templates (same whitespace rules)."""
    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson HTML-escapes; templates expect plain JSON.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols, _GenerationTag])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"chat template does not parse: {e} (line {e.lineno})") from e


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (training templates) renders its body unchanged."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()
