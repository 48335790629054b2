"""The prompt plan and the one prompt check: what a request will cost, known before any pixel is decoded.

Data flow (DESIGN.md): plan -> check -> load.

  PromptProcessor.plan(...) -> PromptPlan (prompt.py builds it with the helpers here): the rendered text,
      its token ids with ONE pad per item, and per item its MediaSpec (an http(s) or data: source replaced
      by its bytes, fetched once under the media policy) and its ItemBudget read from the header.
  check(plan_or_prompt, PromptLimits) -> total prompt tokens, or PromptLimitError: the context check and
      the per-request limits, in one place. It takes a PromptPlan (header counts, before loading) or a
      ProcessedPrompt (exact counts, after loading) alike.
  PromptProcessor.load(plan, limits) -> ProcessedPrompt: pixels, pad expansion, positions; then check()
      again on the exact counts (headers can lie, e.g. a video's frame count).

Owns PromptPlan, PlannedItem, PromptLimits, PromptLimitError, check, and the per-item helpers the
processor uses (placeholder matching, prefetch, the item thread pool). Knows nothing about tokenizers,
templates, HTTP or the engine.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence, TypeVar

from qvl.multimodal.budget import ItemBudget
from qvl.multimodal.media import fetch_bytes
from qvl.multimodal.messages import MediaSpec

_MAX_ITEM_WORKERS = 8
_T = TypeVar("_T")
_R = TypeVar("_R")


@dataclass
class PlannedItem:
    """One image or video of a planned prompt."""
    spec: MediaSpec      # what load() opens: remote / data: sources already replaced by their bytes
    budget: ItemBudget   # from the header: sizes, grid, tokens
    pad_index: int       # index of the item's single pad token in PromptPlan.token_ids
    extra_tokens: int = 0  # text tokens its expansion adds beyond the visual ones (Qwen3-VL timestamps)


@dataclass
class PromptPlan:
    """A rendered, tokenized prompt whose media are fetched and measured but not decoded."""
    text: str                          # the rendered prompt, one pad per item
    token_ids: list[int]               # (N,) one pad per item
    items: list[PlannedItem] = field(default_factory=list)   # placeholder order
    policy: Any = None                 # the MediaPolicy the sources were fetched under (load uses it too)
    max_model_len: int | None = None   # what video default pixel budgets derived from (load uses it too)

    @property
    def budgets(self) -> list[ItemBudget]:
        return [it.budget for it in self.items]

    @property
    def visual_tokens(self) -> int:
        return sum(it.budget.num_tokens for it in self.items)

    @property
    def text_tokens(self) -> int:
        return len(self.token_ids) - len(self.items) + sum(it.extra_tokens for it in self.items)

    @property
    def num_tokens(self) -> int:
        """Prompt tokens once every pad is expanded (what usage.prompt_tokens will say)."""
        return self.text_tokens + self.visual_tokens

    def counts(self) -> dict:
        """{"prompt_tokens", "items": [{type, original_size, resized_size, grid_thw, tokens}]} (JSON-ready
        but for tuples; PromptProcessor.count_tokens' result)."""
        items = [{"type": b.kind, "original_size": tuple(b.original_size), "resized_size": tuple(b.resized_size),
                  "grid_thw": tuple(b.grid_thw), "tokens": int(b.num_tokens)} for b in self.budgets]
        return {"prompt_tokens": self.num_tokens, "items": items}


# ---------------------------------------------------------------------------------------------- check


@dataclass(frozen=True)
class PromptLimits:
    """What a prompt must fit. max_new_tokens=None: only the prompt must fit the context; a number: the
    prompt must also leave room for that many generated tokens (and for at least one)."""
    max_model_len: int
    max_new_tokens: int | None = None
    max_visual_tokens_per_request: int | None = None


class PromptLimitError(ValueError):
    """A prompt over its limits. `code`: "context_length_exceeded" | "too_many_visual_tokens";
    `field`: "prompt" (the prompt itself is too big) or "max_tokens" (the prompt + completion is)."""

    def __init__(self, message: str, *, code: str, field: str = "prompt"):
        super().__init__(message)
        self.code, self.field = code, field


def check(prompt, limits: PromptLimits) -> int:
    """Total prompt tokens; PromptLimitError naming every item's tokens when a limit is exceeded.

    `prompt` is a PromptPlan or a ProcessedPrompt (anything with `num_tokens` and `budgets`). Rules, in
    order: the prompt fits max_model_len (with room for one token when max_new_tokens is set); its visual
    tokens stay within max_visual_tokens_per_request; prompt + max_new_tokens fits max_model_len.
    """
    total, budgets, L = int(prompt.num_tokens), list(prompt.budgets), limits.max_model_len
    visual = sum(b.num_tokens for b in budgets)
    room = limits.max_new_tokens
    if total > L or (room is not None and total >= L):
        detail = f"text: {total - visual} tokens" + ("; " + describe_items(budgets) if budgets else "")
        fix = "shorten the prompt"
        if budgets:
            fix = (f"lower max_pixels / fps / nframes of {', '.join(b.label or b.kind for b in budgets)} "
                   f"or {fix}")
        extra = ", which leaves no room for the completion" if total <= L else ""
        raise PromptLimitError(f"This model's maximum context length is {L} tokens (max_model_len {L}), "
                               f"but the prompt has {total} tokens ({detail}){extra}. {fix[0].upper()}"
                               f"{fix[1:]}.", code="context_length_exceeded")
    cap = limits.max_visual_tokens_per_request
    if cap is not None and visual > cap:
        raise PromptLimitError(f"Too many visual tokens: {visual} > max_visual_tokens_per_request {cap} "
                               f"({describe_items(budgets)}). Lower max_pixels / fps / nframes, or send "
                               f"fewer images (the server's --max-visual-tokens-per-request raises the "
                               f"limit).", code="too_many_visual_tokens")
    if room is not None and total + room > L:
        raise PromptLimitError(f"This model's maximum context length is {L} tokens. However, you requested "
                               f"{total + room} tokens ({total} in the prompt, {room} for the completion). "
                               f"Reduce max_tokens or the prompt.", code="context_length_exceeded",
                               field="max_tokens")
    return total


def describe_items(budgets: Sequence[ItemBudget]) -> str:
    """'image 1: 1230 tokens (3000x4000 -> 840x1148); video 1: ...' (sizes as height x width)."""
    parts, seen = [], {}
    for b in budgets:
        seen[b.kind] = seen.get(b.kind, 0) + 1
        (oh, ow), (rh, rw) = b.original_size, b.resized_size
        desc = f"{b.kind} {seen[b.kind]}: {b.num_tokens} tokens ({oh}x{ow} -> {rh}x{rw}"
        if b.kind == "video":
            desc += f", {b.grid_thw[0]} temporal patches"
        parts.append(desc + ")")
    return "; ".join(parts)


def exact_budget(item, label: str) -> ItemBudget:
    """The ItemBudget of a loaded VisionInput (exact: from the pixels that were made)."""
    return ItemBudget(item.kind, tuple(item.original_size), item.resized_size, tuple(item.grid_thw),
                      item.num_tokens, label=label)


# ------------------------------------------------------------------------------------- item helpers


def match_placeholders(ids: Sequence[int], media, image_token_id: int, video_token_id: int,
                       source: str) -> list[tuple[int, MediaSpec]]:
    """Pair each pad token of `ids` with its media spec (images in order, videos in order), in prompt
    order. `media` is a list of specs or {"image": [...], "video": [...]}; a count mismatch is an error."""
    if isinstance(media, dict):
        by_kind = {"image": list(media["image"]), "video": list(media["video"])}
    else:
        by_kind = {k: [m for m in media if m.kind == k] for k in ("image", "video")}
    pads = {"image": [i for i, t in enumerate(ids) if t == image_token_id],
            "video": [i for i, t in enumerate(ids) if t == video_token_id]}
    for kind in ("image", "video"):
        if len(pads[kind]) != len(by_kind[kind]):
            pad = f"<|{kind}_pad|>"
            raise ValueError(
                f"the prompt has {len(pads[kind])} {pad} placeholder(s) but {len(by_kind[kind])} "
                f"{kind}(s) were given in {source}; write one <|vision_start|>{pad}<|vision_end|> per {kind}")
    slots = [(at, spec) for kind in ("image", "video") for at, spec in zip(pads[kind], by_kind[kind])]
    return sorted(slots, key=lambda s: s[0])


def map_items(fn: Callable[[_T], _R], items: Sequence[_T]) -> list[_R]:
    """fn over the items, in order; several items run in a small thread pool (downloads, decodes)."""
    if len(items) <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(max_workers=min(_MAX_ITEM_WORKERS, len(items))) as pool:
        return list(pool.map(fn, items))


def _fetched(source: Any) -> bool:
    """http(s) and data: URLs: resolved to bytes once at plan time (local paths stay paths)."""
    return isinstance(source, str) and source[:8].lower().startswith(("http://", "https://", "data:"))


def prefetch(spec: MediaSpec, policy) -> MediaSpec:
    """`spec` with its http(s) / data: source (or frames) replaced by the bytes, fetched under `policy`."""
    src = spec.source
    with labelled(spec.label):
        if _fetched(src):
            src = fetch_bytes(src, policy=policy, label=spec.label)
        elif isinstance(src, (list, tuple)) and any(_fetched(f) for f in src):
            src = [fetch_bytes(f, policy=policy, label=f"{spec.label} frame {i}") if _fetched(f) else f
                   for i, f in enumerate(src)]
    return spec if src is spec.source else replace(spec, source=src)


@contextmanager
def labelled(label: str):
    """Make sure an error escaping media work is a ValueError that names the item."""
    try:
        yield
    except ValueError as e:
        if str(e).startswith(label):
            raise
        raise ValueError(f"{label}: {e}") from e
    except OSError as e:
        raise ValueError(f"{label}: cannot read ({type(e).__name__}: {e})") from e
