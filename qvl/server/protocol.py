"""OpenAI wire format: pydantic models for /v1/chat/completions, /v1/completions, /tokenize, /detokenize and their
responses (including stream chunks, usage, logprobs and the error body).

Owns: what a request may contain and the per-field bounds (a violation is a 400 naming the field, see
errors.py); message content (text / image / video parts) is content.py's. Does not know the model, the
engine or media.

Extensions over OpenAI (vLLM names where vLLM has one): `top_k`, `min_p`, `repetition_penalty`,
`min_tokens`, `ignore_eos`, `stop_token_ids`, `include_stop_str_in_output`, `skip_special_tokens` (default
False so grounding tokens survive); for chat and /tokenize `add_generation_prompt`, `continue_final_message`
(continue the last assistant message instead of opening a new turn; the two exclude each other, checked
where the template is rendered), `chat_template_kwargs` (extra chat-template variables) and
`mm_processor_kwargs` (min_pixels / max_pixels / fps / total_pixels for every item); chat `echo`. A null
field takes its default (content.WireModel). Unknown top-level keys are ignored and logged (refused with
--strict-request-fields); keys that would silently change the meaning of a request are refused instead:
here `functions`, `logit_bias`, `suffix`, `best_of` != n, and the vLLM options of request_options.py.

Tools (chat): `tools` (type "function": name, description, parameters) and `tool_choice` ("none",
"auto" — the default with tools —, "required", or {"type": "function", "function": {"name"}}) go to the
chat template as its `tools` variable; "required" and a named choice are enforced with a grammar
(qvl.server.tools). "none" leaves the tools out of the prompt. Messages may carry `tool_calls`
(assistant) and the `tool` role with `tool_call_id`.

Structured output (chat and completions): OpenAI `response_format`, vLLM's `structured_outputs` and the
older `guided_*` aliases, read by request_options.structured_spec into one StructuredOutputsParams.
"""
from __future__ import annotations

import re
import time
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from qvl.sampling_params import StructuredOutputsParams
from qvl.server.content import ChatMessage, NonEmptyStr, WireModel
from qvl.server.request_options import MMProcessorKwargs, structured_spec
from qvl.server.tools import tool_grammar

MAX_N = 16
MAX_PROMPTS = 256             # prompts (and prompts x n choices) in one /v1/completions request
MAX_STOP = 16
MAX_TOP_LOGPROBS = 20


# ---------------------------------------------------------------------------------------------------
# requests


class StreamOptions(WireModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _SamplingRequest(WireModel):
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
    include_stop_str_in_output: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    request_id: str | None = None
    response_format: dict | None = None
    structured_outputs: dict | None = None
    guided_json: dict | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

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

    def structured_spec(self) -> StructuredOutputsParams | None:
        """The decoding constraint the request asks for (None: free text); ValueError when unclear."""
        return structured_spec(self)

    def sampling_kwargs(self) -> dict:
        """The SamplingParams keyword arguments this request sets (unset ones keep the engine's defaults)."""
        keys = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                "frequency_penalty", "seed", "stop", "stop_token_ids")
        out = {k: getattr(self, k) for k in keys if getattr(self, k) is not None}
        out.update(n=self.n, min_tokens=self.min_tokens, ignore_eos=self.ignore_eos,
                   skip_special_tokens=self.skip_special_tokens,
                   include_stop_str_in_output=self.include_stop_str_in_output)
        return out


class _ChatTemplateOptions(WireModel):
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    mm_processor_kwargs: MMProcessorKwargs | None = None

    def template_options(self) -> dict:
        """The keyword arguments of PromptProcessor.plan these fields set."""
        return {"add_generation_prompt": self.add_generation_prompt,
                "continue_final_message": self.continue_final_message,
                "chat_template_kwargs": self.chat_template_kwargs}


class ChatCompletionRequest(_SamplingRequest, _ChatTemplateOptions):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    echo: bool = False          # vLLM: the reply repeats the last message when that is the assistant's
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool | None = None
    functions: list | None = None

    @model_validator(mode="after")
    def _check_chat(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        if self.functions:
            raise ValueError("functions (the deprecated form) is not supported; use tools")
        names = []
        for i, t in enumerate(self.tools or []):
            f = t.get("function") if isinstance(t, dict) else None
            if t.get("type", "function") != "function" or not isinstance(f, dict):
                raise ValueError(f"tools[{i}] must be {{'type': 'function', 'function': {{'name', 'parameters'}}}}")
            if not isinstance(f.get("name"), str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", f["name"]):
                raise ValueError(f"tools[{i}].function.name must be 1-64 letters, digits, '_', '.' or '-'")
            if f.get("parameters") is not None and not isinstance(f["parameters"], dict):
                raise ValueError(f"tools[{i}].function.parameters must be a JSON schema object")
            names.append(f["name"])
        choice = self.tool_choice
        if choice is not None:
            if isinstance(choice, str):
                if choice not in ("none", "auto", "required"):
                    raise ValueError(f"tool_choice must be 'none', 'auto', 'required' or a named function, "
                                     f"got {choice!r}")
            else:
                name = (choice.get("function") or {}).get("name") if choice.get("type") == "function" else None
                if not isinstance(name, str):
                    raise ValueError("tool_choice as an object must be {'type': 'function', 'function': {'name'}}")
                if name not in names:
                    raise ValueError(f"tool_choice names function {name!r}, which is not among the tools")
            if choice in ("required",) or isinstance(choice, dict):
                if not names:
                    raise ValueError("tool_choice requires tools")
        return self

    @property
    def tools_active(self) -> bool:
        """Tools go into the prompt and replies are parsed for tool calls."""
        return bool(self.tools) and self.tool_choice != "none"

    def structured_spec(self) -> StructuredOutputsParams | None:
        spec = super().structured_spec()
        grammar = tool_grammar(self.tools, self.tool_choice) if self.tools_active else None
        if grammar is not None and spec is not None:
            raise ValueError("tool_choice 'required' or a named function cannot be combined with "
                             "response_format / structured_outputs")
        return grammar or spec

    def template_options(self) -> dict:
        opts = super().template_options()
        if self.tools_active:
            opts["chat_template_kwargs"] = {**(opts["chat_template_kwargs"] or {}), "tools": self.tools}
        return opts

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
            if len(v) > MAX_PROMPTS:
                raise ValueError(f"a prompt list holds at most {MAX_PROMPTS} prompts, got {len(v)}")
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
        if len(self.prompt) * self.n > MAX_PROMPTS:
            raise ValueError(f"{len(self.prompt)} prompts x n {self.n} = {len(self.prompt) * self.n} choices; "
                             f"at most {MAX_PROMPTS} in one request")
        return self

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        return self.logprobs


class TokenizeRequest(_ChatTemplateOptions):
    """Either chat `messages` (with images/videos; the template options apply) or a text `prompt`."""
    model: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = None
    prompt: str | None = None
    return_token_ids: bool = False

    @model_validator(mode="after")
    def _one(self):
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("give exactly one of messages or prompt")
        return self


class DetokenizeRequest(WireModel):
    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0)]]


# ---------------------------------------------------------------------------------------------------
# responses


class PromptTokensDetails(WireModel):
    cached_tokens: int = 0


class Usage(WireModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None


class TopLogprob(WireModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChatLogprobs(WireModel):
    content: list[TokenLogprob] | None = None


class CompletionLogprobs(WireModel):
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []


class AssistantMessage(WireModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[dict] | None = None


class ChatChoice(WireModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


def _now() -> int:
    return int(time.time())


class ChatCompletionResponse(WireModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChoice]
    usage: Usage
    qvl_boxes: list | None = None     # grounding boxes per choice when qvl.grounding is available


class DeltaMessage(WireModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(WireModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(WireModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChoice(WireModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class CompletionResponse(WireModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ErrorInfo(WireModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(WireModel):
    error: ErrorInfo
