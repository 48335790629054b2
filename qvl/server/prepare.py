"""From a validated request to what the engine takes: prompts (plan -> check -> load) and SamplingParams.

Chat, and completions with a text prompt, go through qvl.multimodal's one prompt pass:
  plan   (thread pool)  render the template, tokenize, fetch remote media once, read headers;
  check  (arithmetic)   qvl.multimodal.plan.check against max_model_len, max_visual_tokens_per_request
                        and prompt + max_tokens, before any pixel is decoded;
  load   (thread pool)  decode pixels from the fetched bytes, expand pads, positions, exact recheck.
A request's constraint (response_format / structured_outputs / guided_*) becomes
SamplingParams.structured_outputs here; RequestRun compiles it before the engine gets it. /tokenize is plan alone. A token-id prompt of /v1/completions is `ProcessedPrompt.from_token_ids`.
Before any of it, a text too long for the context is refused from its length (check_text_length:
characters, then the tokens of a bounded prefix), so a huge prompt is never tokenized whole.
Media work never runs on the event-loop thread. Every refusal is an APIError (errors.py) with the
code the check gave (context_length_exceeded, too_many_visual_tokens) or the media error's.
"""
from __future__ import annotations

import functools
import json
from typing import TYPE_CHECKING

from qvl.multimodal.plan import PromptLimitError, PromptLimits, PromptPlan, check
from qvl.multimodal.prompt import ProcessedPrompt
from qvl.sampling_params import SamplingParams
from qvl.server.errors import APIError, media_error
from qvl.server.request_options import apply_mm_defaults
from qvl.server.serving import ServingContext
from qvl.server.tools import template_renders_tools

if TYPE_CHECKING:
    from qvl.server.protocol import ChatCompletionRequest, TokenizeRequest


def check_media_counts(ctx: ServingContext, messages) -> tuple[int, int]:
    """(images, videos) of the request; APIError over max_images / max_videos_per_request."""
    images = videos = 0
    for m in messages:
        i, v = m.count_media()
        images += i
        videos += v
    lim = ctx.limits
    if images > lim.max_images_per_request:
        raise APIError(f"Too many images in one request: {images} > max_images_per_request "
                       f"{lim.max_images_per_request}", param="messages", code="too_many_images")
    if videos > lim.max_videos_per_request:
        raise APIError(f"Too many videos in one request: {videos} > max_videos_per_request "
                       f"{lim.max_videos_per_request}", param="messages", code="too_many_videos")
    return images, videos


def prompt_limits(ctx: ServingContext, max_new_tokens: int | None) -> PromptLimits:
    """The server's limits for one prompt: the completion needs room for max_tokens (at least one)."""
    return PromptLimits(ctx.max_model_len, max_new_tokens=max_new_tokens or 1,
                        max_visual_tokens_per_request=ctx.limits.max_visual_tokens_per_request
                        if ctx.limits.max_visual_tokens_per_request is not None
                        else ctx.engine.default_max_visual_tokens)


def check_prompt(prompt: PromptPlan | ProcessedPrompt, limits: PromptLimits, param: str) -> None:
    """plan.check, its PromptLimitError as an APIError (param: the request field holding the prompt)."""
    try:
        check(prompt, limits)
    except PromptLimitError as exc:
        raise media_error(exc, param) from exc


async def plan_chat(ctx: ServingContext, req: "ChatCompletionRequest | TokenizeRequest") -> PromptPlan:
    """The request's messages planned (template options honoured); the media counts checked first."""
    check_media_counts(ctx, req.messages)
    texts = [p.text for m in req.messages for p in m.content if getattr(p, "type", None) == "text"]
    if getattr(req, "tools", None):
        texts.append(json.dumps(req.tools))
    await check_text_length(ctx, texts, "messages")
    messages = apply_mm_defaults([m.to_processor() for m in req.messages], req.mm_processor_kwargs)
    return await ctx.guarded(ctx.processor.plan, messages, policy=ctx.media_policy,
                             max_model_len=ctx.max_model_len, param="messages", **req.template_options())


async def prepare_chat(ctx: ServingContext, req: "ChatCompletionRequest") -> tuple[ProcessedPrompt, PromptPlan]:
    """Validated chat request -> (ProcessedPrompt, its plan). Raises APIError for bad input."""
    if req.tools_active and not template_renders_tools(ctx.processor.chat_template):
        raise APIError("This model's chat template does not render tools, so tool calls cannot be offered to "
                       "it; start the server with --chat-template FILE (a template that uses the `tools` "
                       "variable, e.g. Qwen2.5-VL's)", param="tools", code="tools_unsupported")
    plan = await plan_chat(ctx, req)
    limits = prompt_limits(ctx, req.max_new_tokens)
    check_prompt(plan, limits, "messages")
    prompt = await ctx.guarded(ctx.processor.load, plan, limits, param="messages")
    return prompt, plan


async def prepare_text(ctx: ServingContext, prompt: str | list[int],
                       max_new_tokens: int | None) -> tuple[ProcessedPrompt, str]:
    """One /v1/completions prompt -> (ProcessedPrompt, its text for echo)."""
    limits = prompt_limits(ctx, max_new_tokens)
    if isinstance(prompt, str):
        await check_text_length(ctx, [prompt], "prompt")
        plan = await ctx.guarded(ctx.processor.plan, prompt=prompt, policy=ctx.media_policy,
                                 max_model_len=ctx.max_model_len, param="prompt")
        check_prompt(plan, limits, "prompt")
        return await ctx.guarded(ctx.processor.load, plan, limits, param="prompt"), prompt
    pads = {ctx.processor.image_token_id, ctx.processor.video_token_id}
    bad = sorted({t for t in prompt if t in pads})
    if bad:
        raise APIError(f"Prompt token ids contain image/video placeholder id(s) {bad} but /v1/completions "
                       f"takes no media", param="prompt")
    out_of_vocab = [t for t in prompt if not 0 <= t < ctx.vocab_size]
    if out_of_vocab:
        raise APIError(f"Token id {out_of_vocab[0]} is out of range [0, {ctx.vocab_size})", param="prompt")
    processed = ProcessedPrompt.from_token_ids(prompt)
    check_prompt(processed, limits, "prompt")
    return processed, await ctx.run_blocking(ctx.processor.decode, prompt)


async def tokenize(ctx: ServingContext, req: "TokenizeRequest") -> dict:
    """/tokenize: token counts (and ids with return_token_ids) from the plan; nothing decoded."""
    if req.messages is not None:
        plan = await plan_chat(ctx, req)
    else:
        await check_text_length(ctx, [req.prompt], "prompt")
        plan = await ctx.guarded(ctx.processor.plan, prompt=req.prompt, policy=ctx.media_policy,
                                 max_model_len=ctx.max_model_len, param="prompt")
    counts = plan.counts()
    body = {"count": plan.num_tokens, "max_model_len": ctx.max_model_len, "text_tokens": plan.text_tokens,
            "visual_tokens": plan.visual_tokens, "items": counts["items"]}
    if req.return_token_ids:
        body["tokens"] = ctx.processor.expanded_token_ids(plan)
    return body


def sampling_params(ctx: ServingContext, req, prompt_len: int) -> SamplingParams:
    """SamplingParams = checkpoint defaults < request fields; max_tokens defaults to the room left."""
    defaults = ctx.default_sampling
    kwargs = {**defaults, **req.sampling_kwargs()}
    max_new = req.max_new_tokens
    if max_new is None:   # the room left, capped by the checkpoint's max_new_tokens when it sets one
        room = max(1, ctx.max_model_len - prompt_len)
        max_new = min(room, defaults.get("max_tokens") or room)
    kwargs["max_tokens"] = max_new
    if req.num_logprobs is not None:
        kwargs["logprobs"] = req.num_logprobs
    try:
        kwargs["structured_outputs"] = req.structured_spec()
    except ValueError as exc:
        raise APIError(f"Invalid structured output request: {exc}", code="invalid_structured_output") from exc
    try:
        return SamplingParams(**kwargs)
    except (ValueError, TypeError) as exc:
        raise APIError(str(exc), code="invalid_value") from exc



def chat_echo(req: "ChatCompletionRequest") -> str:
    """vLLM's chat `echo`: the text the reply starts with — the last message's, when it is the assistant's."""
    last = req.messages[-1]
    if not req.echo or last.role != "assistant":
        return ""
    return "".join(p.text for p in last.content if getattr(p, "type", None) == "text")


# ---------------------------------------------------------------------------------------------------
# text length, before the whole prompt is tokenized

PREFIX_CHARS_PER_TOKEN = 8     # the token pre-check tokenizes at most this many characters per context token
PREFIX_MARGIN = 16             # tokens a cut or a part boundary can change; the exact check follows anyway


@functools.lru_cache(maxsize=8)
def max_token_chars(tokenizer) -> int:
    """The most characters one token can stand for: the longest vocabulary entry (byte-level tokens are
    spelled one symbol per byte, and a character is at least one byte)."""
    return max((len(t) for t in tokenizer.get_vocab(with_added_tokens=True)), default=1)


async def check_text_length(ctx: ServingContext, texts: list[str], param: str) -> None:
    """Refuse text that cannot fit max_model_len, before the template renders and tokenizes all of it:
    more characters than max_model_len tokens can spell is refused from the length alone; a text still
    longer than PREFIX_CHARS_PER_TOKEN characters per context token has only that prefix tokenized (in the
    pool), refused when it alone is over. What passes gets the exact check after planning."""
    total = sum(len(t) for t in texts)
    limit = ctx.max_model_len
    tokenizer = ctx.processor.tokenizer
    most = limit * max_token_chars(tokenizer)
    if total > most:
        raise APIError(f"This model's maximum context length is {limit} tokens; the text of this request has "
                       f"{total} characters, more than {limit} tokens can hold (at most {most}).",
                       param=param, code="context_length_exceeded")
    budget = limit * PREFIX_CHARS_PER_TOKEN
    if total <= budget:
        return
    head = "\n".join(texts)[:budget]
    cut = max(head.rfind(" ", budget - 256), head.rfind("\n", budget - 256))
    head = head[:cut] if cut > 0 else head
    count = await ctx.run_blocking(lambda: len(tokenizer.encode(head, add_special_tokens=False).ids))
    if count > limit + PREFIX_MARGIN:
        raise APIError(f"This model's maximum context length is {limit} tokens; the text of this request has "
                       f"more than {count - PREFIX_MARGIN} tokens in its first {len(head)} of {total} characters.",
                       param=param, code="context_length_exceeded")
