"""Chat messages in, template-friendly messages + an ordered list of media specs out.

Owns the accepted *shapes* of a conversation; knows nothing about tokenizers, templates or pixels.

Accepted message: a mapping with `role` and `content`; other keys (name, tool_calls, ...) pass through.
`content` is a string, a list of parts, or None (assistant only, read as ""). A part is one of

  OpenAI           {"type": "text", "text": str}
                   {"type": "image_url", "image_url": {"url": str, "detail"?, "min_pixels"?, ...}}
                   {"type": "video_url", "video_url": {"url": str | [frame urls], "fps"?, ...}}
  qwen-vl-utils    {"type": "image", "image": src, "min_pixels"?, "resized_height"?, ...}
                   {"type": "video", "video": src | [frames], "fps"? | "nframes"?, ...}
                   ({"image": ...}, {"video": ...}, {"image_url": ...}, {"text": ...} without "type" too)
  transformers     {"type": "image" | "video", "url" | "path": src}

Per-item options may sit on the part or inside the `image_url` / `video_url` object. Unknown option keys
(`detail`, `uuid`, ...) are ignored, as the OpenAI servers do. Every part becomes {"type": "text", "text"},
{"type": "image"} or {"type": "video"} for the template, and every image/video a `MediaSpec`, in order of
appearance. Anything malformed is a ValueError naming `messages[i].content[j]`.
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

IMAGE_OPTIONS = ("min_pixels", "max_pixels", "resized_height", "resized_width")
VIDEO_OPTIONS = ("fps", "nframes", "min_frames", "max_frames", "min_pixels", "max_pixels", "total_pixels",
                 "video_start", "video_end", "resized_height", "resized_width")
_INT_OPTIONS = {"min_pixels", "max_pixels", "resized_height", "resized_width", "nframes", "min_frames",
                "max_frames"}
_BASE_ROLES = ("system", "user", "assistant")


@dataclass
class MediaSpec:
    """One image or video to load: what `process_image` / `process_video` get, plus a label for errors."""
    kind: str                      # "image" | "video"
    source: Any                    # path / URL / data URL / bytes / PIL image; a video may be a frame list
    options: dict = field(default_factory=dict)   # per-item keyword options (IMAGE_OPTIONS / VIDEO_OPTIONS)
    label: str = ""                # e.g. "image 2 (messages[1].content[0])"


@dataclass
class ParsedMessages:
    messages: list[dict]           # template-friendly messages
    media: list[MediaSpec]         # images and videos in order of appearance


def parse_messages(messages: Any, allowed_roles: tuple[str, ...] = _BASE_ROLES) -> ParsedMessages:
    """Validate and normalise a conversation (see the module docstring)."""
    if hasattr(messages, "model_dump"):
        messages = messages.model_dump(exclude_none=True)
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(f"messages must be a non-empty list of messages, got {_describe(messages)}")
    out: list[dict] = []
    media: list[MediaSpec] = []
    counts = {"image": 0, "video": 0}
    for i, msg in enumerate(messages):
        if hasattr(msg, "model_dump"):
            msg = msg.model_dump(exclude_none=True)
        if not isinstance(msg, Mapping):
            raise ValueError(f"messages[{i}] must be an object with 'role' and 'content', got {_describe(msg)}")
        role = msg.get("role")
        if role not in allowed_roles:
            raise ValueError(f"messages[{i}]: unknown role {role!r}; this chat template accepts "
                             f"{', '.join(repr(r) for r in allowed_roles)}")
        new = {k: v for k, v in msg.items() if k != "content"}
        content = msg.get("content")
        if content is None:   # OpenAI allows a null assistant content (tool calls)
            if role != "assistant":
                raise ValueError(f"messages[{i}] ({role}): 'content' is missing")
            content = ""
        if isinstance(content, str):
            new["content"] = content
        elif isinstance(content, (list, tuple)):
            parts = []
            for j, part in enumerate(content):
                where = f"messages[{i}].content[{j}]"
                kind, value = _parse_part(part, where)
                if kind == "text":
                    parts.append({"type": "text", "text": value})
                else:
                    counts[kind] += 1
                    value.label = f"{kind} {counts[kind]} ({where})"
                    media.append(value)
                    parts.append({"type": kind})
            new["content"] = parts
        else:
            raise ValueError(f"messages[{i}].content must be a string or a list of parts, got {_describe(content)}")
        out.append(new)
    return ParsedMessages(out, media)


def parse_multi_modal_data(data: Any) -> dict[str, list[MediaSpec]]:
    """vLLM-style `multi_modal_data` {"image": item | [items], "video": item | [items]} -> specs per kind.

    An item is a source, or a dict {"image"/"video": source, <options>}. A video given as frames is a
    list, so several frame-list videos are a list of lists: {"video": [[f0, f1, ...], [g0, ...]]}.
    """
    if data is None:
        return {"image": [], "video": []}
    if not isinstance(data, Mapping):
        raise ValueError(f"multi_modal_data must be a dict with 'image' and/or 'video', got {_describe(data)}")
    unknown = set(data) - {"image", "video"}
    if unknown:
        raise ValueError(f"multi_modal_data: unsupported modality {sorted(unknown)}; accepted: 'image', 'video'")
    out: dict[str, list[MediaSpec]] = {}
    for kind in ("image", "video"):
        items = data.get(kind)
        if items is None:
            items = []
        elif not isinstance(items, (list, tuple)):
            items = [items]
        specs = []
        for k, item in enumerate(items):
            where = f"multi_modal_data[{kind!r}][{k}]"
            if isinstance(item, Mapping):
                if kind not in item:
                    raise ValueError(f"{where}: a dict item needs a {kind!r} key with the source")
                spec = _media(kind, item[kind], item, where)
            else:
                spec = _media(kind, item, {}, where)
            spec.label = f"{kind} {k + 1} ({where})"
            specs.append(spec)
        out[kind] = specs
    return out


def _parse_part(part: Any, where: str) -> tuple[str, Any]:
    """One content part -> ("text", str) | ("image" | "video", MediaSpec)."""
    if hasattr(part, "model_dump"):
        part = part.model_dump(exclude_none=True)
    if not isinstance(part, Mapping):
        raise ValueError(f"{where}: a content part must be an object with a 'type', got {_describe(part)}")
    ptype = part.get("type")
    if ptype is None:   # qwen-vl-utils allows untyped items; infer from the key present
        ptype = next((k for k in ("image", "image_url", "video", "video_url", "text") if k in part), None)
        if ptype is None:
            raise ValueError(f"{where}: content part has no 'type' (keys: {sorted(part)})")
    if ptype == "text":
        text = part.get("text")
        if not isinstance(text, str):
            raise ValueError(f"{where}: a text part needs 'text' as a string, got {_describe(text)}")
        return "text", text
    if ptype in ("image_url", "video_url"):
        kind = ptype[:5]
        inner = part.get(ptype)
        if isinstance(inner, Mapping):
            if "url" not in inner:
                raise ValueError(f"{where}: '{ptype}' needs a 'url' (got keys {sorted(inner)})")
            return kind, _media(kind, inner["url"], {**part, **inner}, where)
        return kind, _media(kind, inner, part, where)
    if ptype in ("image", "video", "image_pil"):
        kind = "video" if ptype == "video" else "image"
        for key in (ptype, kind, f"{kind}_url", "url", "path"):
            if key in part:
                src = part[key]
                if isinstance(src, Mapping) and key == f"{kind}_url":
                    src = src.get("url")
                return kind, _media(kind, src, part, where)
        raise ValueError(f"{where}: an {kind} part needs the source under {kind!r} (or 'url' / 'path'); "
                         f"got keys {sorted(part)}")
    raise ValueError(f"{where}: unsupported content part type {ptype!r}; accepted: text, image_url, "
                     f"video_url, image, video")


def _media(kind: str, source: Any, opts: Mapping, where: str) -> MediaSpec:
    _check_source(kind, source, where)
    names = IMAGE_OPTIONS if kind == "image" else VIDEO_OPTIONS
    options = {}
    for name in names:
        value = opts.get(name)
        if value is None:
            continue
        options[name] = _check_option(name, value, where)
    if ("resized_height" in options) != ("resized_width" in options):
        raise ValueError(f"{where}: 'resized_height' and 'resized_width' must be given together")
    if "min_pixels" in options and "max_pixels" in options and options["min_pixels"] > options["max_pixels"]:
        raise ValueError(f"{where}: min_pixels {options['min_pixels']} > max_pixels {options['max_pixels']}")
    if "fps" in options and "nframes" in options:
        raise ValueError(f"{where}: give 'fps' or 'nframes', not both")
    return MediaSpec(kind, source, options)


def _check_source(kind: str, source: Any, where: str) -> None:
    if isinstance(source, str):
        if not source.strip():
            raise ValueError(f"{where}: the {kind} source is an empty string")
        return
    if isinstance(source, (bytes, bytearray, memoryview, os.PathLike)):
        if isinstance(source, (bytes, bytearray, memoryview)) and len(source) == 0:
            raise ValueError(f"{where}: the {kind} source is empty bytes")
        return
    if isinstance(source, (list, tuple)):
        if kind != "video":
            raise ValueError(f"{where}: an image source must be one image, got a list of {len(source)}")
        if not source:
            raise ValueError(f"{where}: the video frame list is empty")
        for f, frame in enumerate(source):
            if frame is None or isinstance(frame, (bool, int, float, Mapping, list, tuple)):
                raise ValueError(f"{where}: video frame {f} must be a path, URL, bytes or image, "
                                 f"got {_describe(frame)}")
            if isinstance(frame, str) and not frame.strip():
                raise ValueError(f"{where}: video frame {f} is an empty string")
        return
    if source is None or isinstance(source, (bool, int, float, Mapping)):
        raise ValueError(f"{where}: the {kind} source must be a path, URL, data URL, bytes or image, "
                         f"got {_describe(source)}")
    # Anything else (PIL image, array, tensor) is left to process_image / process_video to judge.


def _check_option(name: str, value: Any, where: str) -> int | float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where}: option {name!r} must be a number, got {_describe(value)}")
    if not math.isfinite(value):
        raise ValueError(f"{where}: option {name!r} must be finite, got {value}")
    if name in ("video_start", "video_end"):
        if value < 0:
            raise ValueError(f"{where}: option {name!r} must be >= 0 seconds, got {value}")
        return float(value)
    if value <= 0:
        raise ValueError(f"{where}: option {name!r} must be > 0, got {value}")
    if name in _INT_OPTIONS:
        if value != int(value):
            raise ValueError(f"{where}: option {name!r} must be an integer, got {value}")
        return int(value)
    return float(value)


def _describe(x: Any) -> str:
    if isinstance(x, (str, int, float, bool)) or x is None:
        text = repr(x)
        return text if len(text) <= 60 else text[:57] + "..."
    return type(x).__name__
