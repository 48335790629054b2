"""Chat message content in the OpenAI wire format: text, image and video parts, and the message itself.

Owns: what one message may contain and the per-item bounds (a violation is a 400 naming the field,
see errors.py): OpenAI `image_url` parts (with `detail`, accepted and ignored as vLLM does), `video_url`
parts (a URL or a list of frame URLs), qwen-vl-utils style `image` / `video` parts, and the per-item
options `min_pixels` / `max_pixels` / `resized_height` / `resized_width` (images and videos) and `fps` /
`nframes` / `total_pixels` / `video_start` / `video_end` (videos). A part's URL is only checked to be a
non-empty string here; fetching and decoding happen later, under the MediaPolicy, in qvl.multimodal.
`ChatMessage.to_processor()` is the message as qvl.multimodal.prompt.PromptProcessor takes it.
"""
from __future__ import annotations

import functools
import typing
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_FRAME_URLS = 768          # qwen-vl-utils' frame cap; a longer frame list is refused, not truncated

PositiveInt = Annotated[int, Field(gt=0)]
NonEmptyStr = Annotated[str, Field(min_length=1)]


class WireModel(BaseModel):
    """Base of every wire model: unknown keys are ignored (as the OpenAI servers do), and `null` for a
    field that has a non-null default means that default (OpenAI accepts `"n": null`, `"stream": null`)."""
    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        if isinstance(data, dict):
            fields = _defaulted_non_nullable(cls)
            if any(data.get(k, 0) is None for k in fields):
                data = {k: v for k, v in data.items() if not (v is None and k in fields)}
        return data


@functools.cache
def _defaulted_non_nullable(cls: type[BaseModel]) -> frozenset[str]:
    """Fields of `cls` that have a default and whose type does not admit None (required fields keep their
    'missing' / 'wrong type' errors)."""
    return frozenset(name for name, f in cls.model_fields.items()
                     if not f.is_required() and f.default is not None
                     and type(None) not in typing.get_args(f.annotation) and f.annotation is not type(None))


class _ImageOptions(WireModel):
    min_pixels: PositiveInt | None = None
    max_pixels: PositiveInt | None = None
    resized_height: PositiveInt | None = None
    resized_width: PositiveInt | None = None

    @model_validator(mode="after")
    def _check(self):
        if self.min_pixels and self.max_pixels and self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels ({self.min_pixels}) must not exceed max_pixels ({self.max_pixels})")
        if (self.resized_height is None) != (self.resized_width is None):
            raise ValueError("resized_height and resized_width must be given together")
        return self

    def options(self) -> dict:
        return {k: v for k, v in self.model_dump(include=set(_ImageOptions.model_fields)).items()
                if v is not None}


class _VideoOptions(_ImageOptions):
    fps: Annotated[float, Field(gt=0, le=60)] | None = None
    nframes: Annotated[int, Field(ge=1)] | None = None
    total_pixels: PositiveInt | None = None
    video_start: Annotated[float, Field(ge=0)] | None = None
    video_end: Annotated[float, Field(gt=0)] | None = None

    @model_validator(mode="after")
    def _check_video(self):
        if self.fps is not None and self.nframes is not None:
            raise ValueError("give either fps or nframes, not both")
        if self.video_start is not None and self.video_end is not None and self.video_end <= self.video_start:
            raise ValueError(f"video_end ({self.video_end}) must be after video_start ({self.video_start})")
        return self

    def options(self) -> dict:
        return {k: v for k, v in self.model_dump(include=set(_VideoOptions.model_fields)).items()
                if v is not None}


def _url_object(v: Any) -> Any:
    return {"url": v} if isinstance(v, (str, list)) else v


class ImageURL(_ImageOptions):
    url: NonEmptyStr
    detail: Literal["auto", "low", "high"] | None = None   # accepted, ignored (as in vLLM)


FrameList = Annotated[list[NonEmptyStr], Field(min_length=1, max_length=MAX_FRAME_URLS)]


class VideoURL(_VideoOptions):
    url: NonEmptyStr | FrameList


class TextPart(WireModel):
    type: Literal["text"]
    text: str


class ImageURLPart(_ImageOptions):
    type: Literal["image_url"]
    image_url: ImageURL

    @field_validator("image_url", mode="before")
    @classmethod
    def _wrap(cls, v):
        return _url_object(v)

    def item(self) -> dict:
        return {"type": "image", "image": self.image_url.url, **self.options(), **self.image_url.options()}


class ImagePart(_ImageOptions):
    """qwen-vl-utils style: {"type": "image", "image": "<url>", "max_pixels": ...}."""
    type: Literal["image"]
    image: NonEmptyStr

    def item(self) -> dict:
        return {"type": "image", "image": self.image, **self.options()}


class VideoURLPart(_VideoOptions):
    type: Literal["video_url"]
    video_url: VideoURL

    @field_validator("video_url", mode="before")
    @classmethod
    def _wrap(cls, v):
        return _url_object(v)

    def item(self) -> dict:
        return {"type": "video", "video": self.video_url.url, **self.options(), **self.video_url.options()}


class VideoPart(_VideoOptions):
    """qwen-vl-utils style: {"type": "video", "video": "<url>" | ["<frame url>", ...], "fps": ...}."""
    type: Literal["video"]
    video: NonEmptyStr | FrameList

    def item(self) -> dict:
        return {"type": "video", "video": self.video, **self.options()}


ContentPart = Annotated[Union[TextPart, ImageURLPart, ImagePart, VideoURLPart, VideoPart],
                        Field(discriminator="type")]


class ChatMessage(WireModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: list[ContentPart]
    name: str | None = None
    tool_calls: list[dict] | None = None          # assistant: earlier calls (OpenAI form)
    tool_call_id: str | None = None               # tool: the call this result answers

    @field_validator("content", mode="before")
    @classmethod
    def _content(cls, v: Any) -> Any:
        if v is None:
            return []
        if isinstance(v, str):
            return [{"type": "text", "text": v}]
        if not isinstance(v, list):
            raise ValueError("content must be a string or a list of content parts")
        return v

    def to_processor(self) -> dict:
        """The message in the form PromptProcessor takes: text parts + qwen-vl-utils style items."""
        role = "system" if self.role == "developer" else self.role
        parts = [{"type": "text", "text": p.text} if isinstance(p, TextPart) else p.item()
                 for p in self.content]
        out = {"role": role, "content": parts}
        if self.tool_calls:   # templates read arguments as an object; OpenAI sends them as JSON text
            out["tool_calls"] = [_tool_call_for_template(c) for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out

    def count_media(self) -> tuple[int, int]:
        images = sum(isinstance(p, (ImageURLPart, ImagePart)) for p in self.content)
        videos = sum(isinstance(p, (VideoURLPart, VideoPart)) for p in self.content)
        return images, videos


def _tool_call_for_template(call: dict) -> dict:
    import json

    f = dict(call.get("function") or {})
    if isinstance(f.get("arguments"), str):
        try:
            f["arguments"] = json.loads(f["arguments"])
        except json.JSONDecodeError:
            pass
    return {**call, "function": f, **f}     # Qwen templates read tool_call.function or tool_call itself
