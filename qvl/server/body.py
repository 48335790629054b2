"""Reading one request body: size and time limits, JSON, well-formedness, pydantic validation.

`read_json(request, limits, model_cls)` is the only way a route gets its body, and every failure is an
APIError (a 4xx with an OpenAI error body, never a 500):

- size: a `Content-Length` over `max_request_bytes` is a 413 before a byte is read; a body sent without
  one (chunked) is counted as it streams and refused at the first chunk over the limit;
- time: the whole body must arrive within `body_read_timeout` seconds (a 408), so a client trickling
  bytes cannot hold a connection and its buffer forever;
- JSON: not UTF-8, malformed, `NaN` / `Infinity` (not JSON), a number that overflows to infinity, an
  integer literal over Python's 4,300 digits, or nesting deeper than MAX_DEPTH are 400s; so is a string
  holding a lone UTF-16 surrogate (`"\\ud800"` parses in Python but cannot be encoded, tokenized or
  echoed), reported with its path, e.g. `messages[0].content`;
- the top-level object: vLLM options qvl refuses (request_options.refused_field) are a 400 naming the
  field; keys no field reads are logged (once per set of names), or refused with `strict_request_fields`.

Parsing, the structure walk and pydantic validation of a body over INLINE_BYTES run in a worker thread,
so a large body never stalls the event loop (and with it every other client's stream).
"""
from __future__ import annotations

import asyncio
import json
import logging
import math

import anyio.to_thread
from pydantic import ValidationError

from qvl.config import ServerLimits
from qvl.server.errors import APIError, from_pydantic
from qvl.server.request_options import refused_field, unknown_fields

logger = logging.getLogger("qvl.server")

MAX_DEPTH = 64              # JSON objects/arrays inside each other; OpenAI bodies need < 20 (schemas included)
INLINE_BYTES = 256 * 1024   # smaller bodies parse on the event loop (a thread hop costs more than they do)
_logged_unknown: set[str] = set()
_CLOSE = {"Connection": "close"}   # the rest of a refused body is never read: do not keep the connection


async def read_body(request, limits: ServerLimits) -> bytes:
    """The raw body, within the size and time limits."""
    max_bytes = limits.max_request_bytes
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_bytes:
        raise APIError(f"Request body too large: {int(length)} bytes > max_request_bytes {max_bytes}",
                       status=413, code="request_too_large", headers=_CLOSE)
    buf = bytearray()
    try:
        async with asyncio.timeout(limits.body_read_timeout):
            async for chunk in request.stream():
                if len(buf) + len(chunk) > max_bytes:
                    raise APIError(f"Request body too large: more than max_request_bytes {max_bytes} bytes",
                                   status=413, code="request_too_large", headers=_CLOSE)
                buf += chunk
    except TimeoutError as exc:
        raise APIError(f"Request body not received within body_read_timeout {limits.body_read_timeout:g} s "
                       f"({len(buf)} bytes arrived)", status=408, code="request_timeout",
                       headers=_CLOSE) from exc
    return bytes(buf)


async def read_json(request, limits: ServerLimits, model_cls):
    """Read, parse and validate the body as `model_cls` (see the module docstring for every refusal)."""
    raw = await read_body(request, limits)
    if len(raw) <= INLINE_BYTES:
        data = parse_object(raw)
        return validate(data, model_cls, limits)
    return await anyio.to_thread.run_sync(lambda: validate(parse_object(raw), model_cls, limits))


def _no_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"number {text[:40]}{'...' if len(text) > 40 else ''} is out of range")
    return value


def _int(text: str) -> int:
    if len(text.lstrip("-")) > 4300:
        raise ValueError(f"integer literal of {len(text.lstrip('-'))} digits (at most 4300)")
    return int(text)


def parse_object(raw: bytes) -> dict:
    """JSON bytes -> a dict of well-formed values (APIError otherwise)."""
    if not raw.strip():
        raise APIError("Request body is empty; expected a JSON object", code="invalid_json")
    try:
        data = json.loads(raw, parse_constant=_no_constant, parse_float=_finite_float, parse_int=_int)
    except RecursionError as exc:
        raise APIError(f"Invalid JSON body: nested deeper than {MAX_DEPTH} levels", code="invalid_json") from exc
    except (ValueError, UnicodeDecodeError) as exc:      # JSONDecodeError is a ValueError
        raise APIError(f"Invalid JSON body: {exc}", code="invalid_json") from exc
    if not isinstance(data, dict):
        raise APIError(f"Request body must be a JSON object, got {type(data).__name__}", code="invalid_json")
    check_structure(data)
    return data


def _path(parts: tuple) -> str:
    out = ""
    for p in parts:
        # a key may hold the very surrogate being reported: escape what UTF-8 cannot carry
        out += f"[{p}]" if isinstance(p, int) else ("." if out else "") + p.encode(
            "utf-8", "backslashreplace").decode("utf-8")
    return out or "(body)"


def check_structure(data: dict) -> None:
    """Nesting depth <= MAX_DEPTH and every string (keys too) encodable as UTF-8; iterative, so a deep
    body cannot exhaust the stack here either."""
    stack: list[tuple[object, tuple, int]] = [(data, (), 1)]
    while stack:
        node, where, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise APIError(f"Invalid JSON body: nested deeper than {MAX_DEPTH} levels (at {_path(where)})",
                           code="invalid_json")
        if isinstance(node, dict):
            for k, v in node.items():
                _check_string(k, where + (k,))
                if isinstance(v, (dict, list)):
                    stack.append((v, where + (k,), depth + 1))
                elif isinstance(v, str):
                    _check_string(v, where + (k,))
        else:
            for i, v in enumerate(node):
                if isinstance(v, (dict, list)):
                    stack.append((v, where + (i,), depth + 1))
                elif isinstance(v, str):
                    _check_string(v, where + (i,))


def _check_string(s: str, where: tuple) -> None:
    if s.isascii():
        return
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise APIError(f"Invalid string in '{_path(where)}': lone UTF-16 surrogate {s[exc.start]!r} at "
                       f"character {exc.start}", param=_path(where), code="invalid_string") from None


def validate(data: dict, model_cls, limits: ServerLimits):
    """The refused / unknown top-level fields, then pydantic."""
    refused = refused_field(data)
    if refused is not None:
        raise APIError(refused[1], param=refused[0], code="unsupported_parameter")
    unknown = unknown_fields(model_cls, data)
    if unknown:
        if limits.strict_request_fields:
            raise APIError(f"Unknown request field(s) {unknown} (the server runs with --strict-request-fields)",
                           param=unknown[0], code="unknown_parameter")
        names = ", ".join(repr(k[:64]) for k in unknown[:16])
        if names not in _logged_unknown:           # once per set of names: a client repeats itself
            if len(_logged_unknown) < 1024:
                _logged_unknown.add(names)
            logger.warning("request fields ignored (not read by qvl): %s", names)
    try:
        return model_cls.model_validate(data)
    except ValidationError as exc:
        raise from_pydantic(exc) from exc
