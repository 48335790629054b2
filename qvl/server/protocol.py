"""OpenAI wire format: pydantic models for /v1/chat/completions, /v1/completions, /tokenize and their
responses (including stream chunks, usage, logprobs and the error body).

Owns: what a request may contain and the per-field bounds (a violation is a 400 naming the field, see
errors.py). Does not know the model, the engine or media: a part's URL is only checked to be a non-empty
string here; fetching and decoding happen later under the MediaPolicy.

Extensions over OpenAI (vLLM names where vLLM has one): `top_k`, `min_p`, `repetition_penalty`,
`min_tokens`, `ignore_eos`, `stop_token_ids`, `skip_special_tokens` (default False so grounding tokens
survive), per-image `min_pixels`/`max_pixels`/`resized_height`/`resized_width`, video parts (`video_url`
or qwen-vl-utils style `video`, a URL or a list of frame URLs) with `fps`/`nframes`/`min_pixels`/
`max_pixels`/`total_pixels`/`video_start`/`video_end`. Unknown top-level keys are ignored (as vLLM
does); keys that would silently change the meaning of a request (`tools`, `logit_bias`, non-text
`response_format`, `suffix`, `best_of` != n) are refused instead.
"""
from __future__ import annotations

import time
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_N = 16
MAX_STOP = 16
MAX_TOP_LOGPROBS = 20
MAX_FRAME_URLS = 768          # qwen-vl-utils' frame cap; a longer frame list is refused, not truncated

PositiveInt = Annotated[int, Field(gt=0)]
NonEmptyStr = Annotated[str, Field(min_length=1)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


# ---------------------------------------------------------------------------------------------------
# content parts


class _ImageOptions(_Model):
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


class TextPart(_Model):
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


class ChatMessage(_Model):
    role: Literal["system", "developer", "user", "assistant"]
    content: list[ContentPart]
    name: str | None = None

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
        return {"role": role, "content": parts}

    def count_media(self) -> tuple[int, int]:
        images = sum(isinstance(p, (ImageURLPart, ImagePart)) for p in self.content)
        videos = sum(isinstance(p, (VideoURLPart, VideoPart)) for p in self.content)
        return images, videos


# ---------------------------------------------------------------------------------------------------
# requests


class StreamOptions(_Model):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _SamplingRequest(_Model):
    model: str | None = None
    temperature: Annotated[float, Field(ge=0, le=100)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=-1)] | None = None
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0, le=10)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    seed: int | None = None
    stop: str | Annotated[list[NonEmptyStr], Field(max_length=MAX_STOP)] | None = None
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = None
    min_tokens: Annotated[int, Field(ge=0)] = 0
    ignore_eos: bool = False
    skip_special_tokens: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    request_id: str | None = None

    @field_validator("stop", mode="after")
    @classmethod
    def _stop(cls, v):
        if isinstance(v, str):
            return [v] if v else None
        return v or None

    @model_validator(mode="after")
    def _check_common(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        if self.logit_bias:
            raise ValueError("logit_bias is not supported")
        return self

    def sampling_kwargs(self) -> dict:
        """The SamplingParams keyword arguments this request sets (unset ones keep the engine's defaults)."""
        keys = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                "frequency_penalty", "seed", "stop", "stop_token_ids")
        out = {k: getattr(self, k) for k in keys if getattr(self, k) is not None}
        out.update(n=self.n, min_tokens=self.min_tokens, ignore_eos=self.ignore_eos,
                   skip_special_tokens=self.skip_special_tokens)
        return out


class ChatCompletionRequest(_SamplingRequest):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    add_generation_prompt: bool = True
    response_format: dict | None = None
    tools: list | None = None
    tool_choice: Any = None
    functions: list | None = None

    @model_validator(mode="after")
    def _check_chat(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        if self.tools or self.functions:
            raise ValueError("tools / function calling is not supported by this server")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise ValueError(f"response_format type {self.response_format.get('type')!r} is not supported; "
                             "only 'text'")
        if self.messages[-1].role == "assistant" and self.add_generation_prompt:
            pass    # allowed: the template opens a new assistant turn after it
        return self

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_SamplingRequest):
    prompt: list[str | list[int]]     # normalised by _prompt: one entry per prompt

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, v: Any) -> Any:
        def is_ids(x):
            return isinstance(x, list) and len(x) > 0 and all(
                isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in x)
        if isinstance(v, str) and v:
            return [v]
        if is_ids(v):
            return [v]
        if isinstance(v, list) and v and all((isinstance(x, str) and x) or is_ids(x) for x in v):
            return v
        raise ValueError("prompt must be a non-empty string, a list of strings, a list of token ids "
                         "(non-negative ints) or a list of such lists")

    max_tokens: Annotated[int, Field(ge=1)] | None = 16
    logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    @model_validator(mode="after")
    def _check_completion(self):
        if self.suffix:
            raise ValueError("suffix is not supported")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError(f"best_of ({self.best_of}) different from n ({self.n}) is not supported")
        return self

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        return self.logprobs


class TokenizeRequest(_Model):
    """Either chat `messages` (with images/videos) or a text `prompt`."""
    model: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = None
    prompt: str | None = None
    add_generation_prompt: bool = True
    return_token_ids: bool = False

    @model_validator(mode="after")
    def _one(self):
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("give exactly one of messages or prompt")
        return self


# ---------------------------------------------------------------------------------------------------
# responses


class PromptTokensDetails(_Model):
    cached_tokens: int = 0


class Usage(_Model):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None


class TopLogprob(_Model):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChatLogprobs(_Model):
    content: list[TokenLogprob] | None = None


class CompletionLogprobs(_Model):
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []


class AssistantMessage(_Model):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatChoice(_Model):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


def _now() -> int:
    return int(time.time())


class ChatCompletionResponse(_Model):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChoice]
    usage: Usage
    qvl_boxes: list | None = None     # grounding boxes per choice when qvl.grounding is available


class DeltaMessage(_Model):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(_Model):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(_Model):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChoice(_Model):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class CompletionResponse(_Model):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ErrorInfo(_Model):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(_Model):
    error: ErrorInfo
