"""Tool calls in the Hermes form Qwen models use: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`.

Owns: whether a chat template renders tools (it must use the `tools` variable); the grammar that enforces
`tool_choice` "required" (one or more calls to any of the tools) and a named function (exactly one call
to it, its arguments valid for its `parameters` schema); parsing a finished reply into OpenAI
`tool_calls` plus the remaining content; and `ToolCallStream`, the same for a streamed reply: content
deltas pass through (holding back what could be the start of a `<tool_call>` tag) and each complete call
comes out once, whole, as one tool-call delta. Knows nothing about HTTP or the engine.
"""
from __future__ import annotations

import json
import re
import uuid

from qvl.sampling_params import StructuredOutputsParams

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_CALL = re.compile(re.escape(OPEN) + r"\s*(.*?)\s*" + re.escape(CLOSE), re.S)


def template_renders_tools(template: str) -> bool:
    return re.search(r"\btools\b", template or "") is not None


def tool_grammar(tools: list[dict], choice) -> StructuredOutputsParams | None:
    """The constraint for `tool_choice` ("required" or {"type": "function", "function": {"name"}});
    None for "auto" / "none" (the model decides)."""
    if choice in (None, "auto", "none"):
        return None
    funcs = [t["function"] for t in tools]
    if choice == "required":
        chosen, many = funcs, True
    else:
        name = choice["function"]["name"]
        chosen, many = [f for f in funcs if f["name"] == name], False
    bodies = [{"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
               "properties": {"name": {"const": f["name"]},
                              "arguments": f.get("parameters") or {"type": "object"}}} for f in chosen]
    body = bodies[0] if len(bodies) == 1 else {"anyOf": bodies}
    body = {**body, "x-guidance": {"whitespace_flexible": False}}
    start = 'start: call ("\\n" call)*' if many else "start: call"
    lark = f'{start}\ncall: "{OPEN}\\n" body "\\n{CLOSE}"\nbody: %json {json.dumps(body)}'
    return StructuredOutputsParams(grammar=lark)


def _call(body: str) -> dict | None:
    try:
        obj = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": obj["name"],
                         "arguments": args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)}}


def parse_tool_calls(text: str) -> tuple[str | None, list[dict]]:
    """(content outside the calls, or None when only whitespace is left; the parsed calls). A call whose
    body is not a JSON object with a name stays in the content, as text."""
    calls, content, pos = [], [], 0
    for m in _CALL.finditer(text):
        call = _call(m.group(1))
        content.append(text[pos:m.start()] if call else text[pos:m.end()])
        if call:
            calls.append(call)
        pos = m.end()
    content.append(text[pos:])
    rest = "".join(content)
    return (rest.strip() or None) if calls else (rest or None), calls


class ToolCallStream:
    """Feed text deltas, get ("content", text) and ("tool_call", call) events in order."""

    def __init__(self):
        self.buf = ""
        self.inside = False
        self.num_calls = 0

    def feed(self, text: str) -> list[tuple[str, object]]:
        self.buf += text
        events: list[tuple[str, object]] = []
        while True:
            if not self.inside:
                i = self.buf.find(OPEN)
                if i < 0:
                    keep = next((k for k in range(min(len(OPEN) - 1, len(self.buf)), 0, -1)
                                 if OPEN.startswith(self.buf[-k:])), 0)
                    self._content(events, self.buf[:len(self.buf) - keep])
                    self.buf = self.buf[len(self.buf) - keep:]
                    return events
                self._content(events, self.buf[:i])
                self.buf, self.inside = self.buf[i:], True
            j = self.buf.find(CLOSE)
            if j < 0:
                return events
            whole, self.buf, self.inside = self.buf[:j + len(CLOSE)], self.buf[j + len(CLOSE):], False
            call = _call(whole[len(OPEN):-len(CLOSE)].strip())
            if call is None:
                self._content(events, whole)
            else:
                self.num_calls += 1
                events.append(("tool_call", call))

    def finish(self) -> list[tuple[str, object]]:
        events: list[tuple[str, object]] = []
        self._content(events, self.buf)
        self.buf = ""
        return events

    def _content(self, events: list, text: str) -> None:
        if text and not (self.num_calls and not text.strip()):    # no whitespace between calls
            events.append(("content", text))
