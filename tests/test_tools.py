"""Tool calls: the Hermes parser (whole and streamed), and the server end to end on a tiny random checkpoint
served with a tools-rendering --chat-template: named and required choices enforced by the grammar (the
random model's free output is noise), replies parsed into OpenAI tool_calls (streamed as deltas), the
multi-turn tool messages rendered, and a template without tools refused with a 400."""
from __future__ import annotations

import json

import httpx
import jsonschema
import pytest

from test_server import app_server

from qvl.server.tools import ToolCallStream, parse_tool_calls, template_renders_tools

openai = pytest.importorskip("openai")

TOOLS_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nYou may call tools.\n<tools>\n{%- for t in tools %}\n{{ t | tojson }}"
    "{%- endfor %}\n</tools>\nReply with <tool_call>\n{\"name\": ..., \"arguments\": ...}\n</tool_call><|im_end|>\n"
    "{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m.content if m.content is string else "
    "m.content[0].text }}\n</tool_response><|im_end|>\n"
    "{%- elif m.role == 'assistant' and m.tool_calls %}<|im_start|>assistant\n{%- for c in m.tool_calls %}"
    "\n<tool_call>\n{\"name\": \"{{ c.name }}\", \"arguments\": {{ c.arguments | tojson }}}\n</tool_call>"
    "{%- endfor %}<|im_end|>\n"
    "{%- else %}<|im_start|>{{ m.role }}\n{%- if m.content is string %}{{ m.content }}{%- else %}"
    "{%- for p in m.content %}{%- if p.type == 'text' %}{{ p.text }}{%- endif %}{%- endfor %}{%- endif %}"
    "<|im_end|>\n{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}")

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string", "maxLength": 12},
                                                "unit": {"enum": ["C", "F"]}},
                                                "required": ["city", "unit"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                     "b": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["a", "b"], "additionalProperties": False}}}
PARAMS = {"get_weather": WEATHER["function"]["parameters"], "add": ADD["function"]["parameters"]}
MSGS = [{"role": "user", "content": "What is the weather in Paris?"}]


def test_parse_tool_calls_whole_and_streamed():
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}\n'
            '</tool_call>\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>')
    content, calls = parse_tool_calls(text)
    assert content == "Let me check."
    assert [c["function"]["name"] for c in calls] == ["get_weather", "add"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris", "unit": "C"}
    assert calls[0]["id"].startswith("call_") and calls[0]["type"] == "function"
    assert parse_tool_calls("plain <tool_call> not closed") == ("plain <tool_call> not closed", [])
    assert parse_tool_calls("<tool_call>\nnot json\n</tool_call>")[1] == []
    for size in (1, 3, 7, 1000):                 # any split of the deltas gives the same events
        p = ToolCallStream()
        events = [e for k in range(0, len(text), size) for e in p.feed(text[k:k + size])] + p.finish()
        got = "".join(v for kind, v in events if kind == "content")
        assert got == "Let me check.\n"
        assert [v["function"]["name"] for kind, v in events if kind == "tool_call"] == ["get_weather", "add"]
    assert template_renders_tools(TOOLS_TEMPLATE) and not template_renders_tools("{{ messages }}")


def serve(ckpt, template_path=None):
    """A context manager: the tiny checkpoint served in process (with `template_path` as its chat
    template); yields (base URL, thread)."""
    from qvl.engine.async_engine import AsyncEngine
    from qvl.engine.llm_engine import LLMEngine
    from qvl.server.app import create_app

    kw = {"chat_template": str(template_path)} if template_path else {}
    engine = AsyncEngine(engine=LLMEngine.from_pretrained(str(ckpt), device="cpu", dtype="float32",
                                                          max_model_len=1024, **kw))
    return app_server(create_app(engine, served_model_name="tiny"), "test-uvicorn-tools")


@pytest.fixture(scope="module")
def tools_server(tiny_ckpt, tmp_path_factory):
    path = tmp_path_factory.mktemp("tmpl") / "tools.jinja"
    path.write_text(TOOLS_TEMPLATE)
    with serve(tiny_ckpt, path) as (url, _):
        yield url


def check_call(call):
    name = call.function.name if hasattr(call, "function") else call["function"]["name"]
    args = call.function.arguments if hasattr(call, "function") else call["function"]["arguments"]
    jsonschema.validate(json.loads(args), PARAMS[name])
    return name


def test_named_and_required_tool_choice_are_enforced(tools_server):
    c = openai.OpenAI(base_url=tools_server + "/v1", api_key="none", max_retries=0, timeout=120)
    named = {"type": "function", "function": {"name": "add"}}
    r = c.chat.completions.create(model="tiny", messages=MSGS, tools=[WEATHER, ADD], tool_choice=named,
                                  temperature=1.0, seed=1, max_tokens=200, n=2)
    for ch in r.choices:
        assert ch.finish_reason == "tool_calls" and ch.message.content is None
        assert [check_call(t) for t in ch.message.tool_calls] == ["add"]
    r = c.chat.completions.create(model="tiny", messages=MSGS, tools=[WEATHER, ADD], tool_choice="required",
                                  temperature=1.0, seed=2, max_tokens=200)
    ch = r.choices[0]
    assert ch.finish_reason in ("tool_calls", "length")
    assert ch.message.tool_calls and all(check_call(t) in PARAMS for t in ch.message.tool_calls)


def test_tool_calls_stream_as_deltas(tools_server):
    c = openai.OpenAI(base_url=tools_server + "/v1", api_key="none", max_retries=0, timeout=120)
    calls, finish = {}, None
    for chunk in c.chat.completions.create(model="tiny", messages=MSGS, tools=[WEATHER], stream=True,
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                           temperature=1.0, seed=3, max_tokens=200):
        for ch in chunk.choices:
            for t in ch.delta.tool_calls or []:
                calls.setdefault(t.index, {"function": {"name": "", "arguments": ""}})
                calls[t.index]["function"]["name"] += t.function.name or ""
                calls[t.index]["function"]["arguments"] += t.function.arguments or ""
            assert not (ch.delta.content or "").strip()
            finish = ch.finish_reason or finish
    assert finish == "tool_calls" and [check_call(v) for v in calls.values()] == ["get_weather"]


def test_auto_and_multi_turn_render_tools(tools_server):
    with httpx.Client(base_url=tools_server, timeout=120) as h:
        base = h.post("/v1/chat/completions", json={"messages": MSGS, "max_tokens": 2}).json()
        auto = h.post("/v1/chat/completions", json={"messages": MSGS, "max_tokens": 2, "tools": [WEATHER]}).json()
        none = h.post("/v1/chat/completions", json={"messages": MSGS, "max_tokens": 2, "tools": [WEATHER],
                                                    "tool_choice": "none"}).json()
        assert auto["usage"]["prompt_tokens"] > base["usage"]["prompt_tokens"] == none["usage"]["prompt_tokens"]
        turn = MSGS + [{"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "C"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees"}]
        r = h.post("/v1/chat/completions", json={"messages": turn, "max_tokens": 2, "tools": [WEATHER]})
        assert r.status_code == 200, r.text
        tok = h.post("/tokenize", json={"messages": turn, "return_token_ids": True}).json()
        assert tok["count"] > base["usage"]["prompt_tokens"]
        for bad, words in [({"tools": [{"type": "function", "function": {"name": "x y"}}]}, "name"),
                           ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
                            "nope"),
                           ({"tool_choice": "required"}, "requires tools"),
                           ({"tools": [WEATHER], "tool_choice": "required",
                             "response_format": {"type": "json_object"}}, "cannot be combined")]:
            r = h.post("/v1/chat/completions", json={"messages": MSGS, "max_tokens": 2, **bad})
            assert r.status_code == 400 and words in r.json()["error"]["message"], r.text


def test_template_without_tools_is_a_400(tiny_ckpt):
    with serve(tiny_ckpt) as (url, _):
        r = httpx.post(url + "/v1/chat/completions", json={"messages": MSGS, "tools": [WEATHER]}, timeout=60)
        assert r.status_code == 400 and "--chat-template" in r.json()["error"]["message"], r.text
        r = httpx.post(url + "/v1/chat/completions", json={"messages": MSGS, "tools": [WEATHER], "max_tokens": 2,
                                                          "tool_choice": "none"}, timeout=60)
        assert r.status_code == 200
