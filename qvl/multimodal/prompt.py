"""Chat messages (or a raw prompt) + images/videos -> token ids, M-RoPE positions and vision inputs.

`PromptProcessor` owns the checkpoint's tokenizer (tokenizer.json via `tokenizers`), its chat template
(rendered as transformers does, template.py) and its media limits (the checkpoint's pixel limits, or the
engine-wide `apply_mm_processor_kwargs`; a request's options may lower them, never raise them: limits.py).
One request goes through three steps (DESIGN.md "plan -> check -> load"; the plan types and the check
live in plan.py):

  plan(messages | prompt=, multi_modal_data=, ...) -> PromptPlan
      parse the messages (messages.py), render the template (add_generation_prompt /
      continue_final_message / chat_template_kwargs), tokenize (no BOS; special tokens recognised) with
      one pad per item, pair the pads with the media specs, fetch http(s) / data: sources ONCE and read
      each item's header (budget.py: sizes, frame count, fps -> tokens). No pixel is decoded.
  check(plan, PromptLimits(max_model_len, ...))  (plan.check) refuses what cannot fit, from the headers.
  load(plan, limits) -> ProcessedPrompt
      decode and preprocess each item from the fetched bytes (process_image / process_video), expand its
      pad to the family's pad tokens in placeholder order, compute positions (3, N) + rope_delta with the
      family's rope index, and check the exact length again.

process_messages / process_prompt (plan + check when max_model_len is given + load) and count_tokens
(plan alone) are the one-call conveniences. Knows nothing about the model weights, the engine or HTTP.
Every error is a ValueError naming the message/part or the item ("image 2 (messages[1].content[0])")
and the numbers involved; limit violations are plan.PromptLimitError.
"""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qvl.models import DEFAULT_MODEL_TYPE, family_for
from qvl.multimodal.budget import ItemBudget, image_num_tokens, video_num_tokens
from qvl.multimodal.image import process_image
from qvl.multimodal.limits import request_options
from qvl.multimodal.messages import MediaSpec, parse_messages, parse_multi_modal_data
from qvl.multimodal.plan import (PlannedItem, PromptLimits, PromptPlan, check, exact_budget, labelled,
                                 map_items, match_placeholders, prefetch)
from qvl.multimodal.spec import PreprocessSpec
from qvl.multimodal.template import compile_template, pick_template
from qvl.multimodal.template import render as render_template
from qvl.multimodal.video import process_video

IMAGE_PAD, VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
_BUILTIN_TEMPLATE = Path(__file__).with_name("chat_template.jinja")


def read_chat_template(path: str | None) -> str | None:
    """The text of EngineConfig.chat_template (a file), or None for the checkpoint's own template."""
    if path is None:
        return None
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"chat_template: no such file: {path}")
    return p.read_text()


@dataclass
class ProcessedPrompt:
    token_ids: list[int]
    positions: torch.Tensor            # (3, N) int64
    rope_delta: int
    items: list = field(default_factory=list)         # VisionInput, in placeholder order
    item_offsets: list[int] = field(default_factory=list)  # index of each item's first pad token
    text: str = ""                     # the rendered prompt, one pad per item (not expanded)
    labels: list[str] = field(default_factory=list)   # each item's label for messages ("image 1 (...)")

    @classmethod
    def from_token_ids(cls, token_ids: list[int]) -> "ProcessedPrompt":
        """A text-only prompt given as token ids: positions 0..N-1 on all three streams."""
        n = len(token_ids)
        return cls(token_ids=list(token_ids), positions=torch.arange(n).expand(3, n).clone(),  # (3, N)
                   rope_delta=0)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def budgets(self) -> list[ItemBudget]:
        """Each item's exact budget (from its pixels), for plan.check."""
        labels = self.labels or [""] * len(self.items)
        return [exact_budget(it, label) for it, label in zip(self.items, labels)]


class PromptProcessor:
    def __init__(self, tokenizer, chat_template: str | None = None, *, spec: PreprocessSpec | None = None,
                 special_tokens: dict[str, Any] | None = None, model_config=None):
        """`tokenizer` is a `tokenizers.Tokenizer`; `special_tokens` are template variables (eos_token, ...).

        `model_config` (a family's Config) picks the family whose rope index, pad expansion and
        preprocessing apply; without one (tokenizer-only use), Qwen2-VL's rules with the tokenizer's pad
        ids. `spec` is the checkpoint's PreprocessSpec (default: the family's defaults)."""
        self.tokenizer = tokenizer
        self.chat_template = chat_template if chat_template is not None else _BUILTIN_TEMPLATE.read_text()
        self.special_tokens = dict(special_tokens or {})
        self.model_config = model_config
        self.processing = family_for(getattr(model_config, "model_type", DEFAULT_MODEL_TYPE)).processing
        self.spec = spec if spec is not None else self.processing.preprocess_spec(model_config)
        self.default_fps: float | None = None     # engine-wide video fps (apply_mm_processor_kwargs)
        ids = {}
        for tok in (IMAGE_PAD, VIDEO_PAD, VISION_START, VISION_END):
            ids[tok] = tokenizer.token_to_id(tok)
            if ids[tok] is None:
                raise ValueError(f"the tokenizer has no {tok} token; a Qwen2-VL tokenizer.json is required")
        self.image_token_id, self.video_token_id = ids[IMAGE_PAD], ids[VIDEO_PAD]
        self.vision_start_token_id, self.vision_end_token_id = ids[VISION_START], ids[VISION_END]
        if model_config is not None:
            self._check_model_config(model_config)
        self._template = compile_template(self.chat_template)
        self.roles = ("system", "user", "assistant") + (
            ("tool",) if re.search(r"""['"]tool['"]""", self.chat_template) else ())

    # ------------------------------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, model_config=None,
                        chat_template: str | None = None) -> "PromptProcessor":
        """Read tokenizer.json, the chat template and preprocessor_config.json from a checkpoint dir.

        Template precedence: `chat_template` argument, chat_template.jinja, chat_template.json,
        tokenizer_config.json["chat_template"] (a string, or a list of {name, template}: "default"), then
        the built-in Qwen2-VL template.
        """
        from tokenizers import Tokenizer

        d = Path(model_dir)
        if not (d / "tokenizer.json").is_file():
            raise ValueError(f"{d}: no tokenizer.json (qvl needs the fast-tokenizer file of the checkpoint)")
        tokenizer = Tokenizer.from_file(str(d / "tokenizer.json"))
        tok_cfg = _read_json(d / "tokenizer_config.json")
        if chat_template is None:
            if (d / "chat_template.jinja").is_file():
                chat_template = (d / "chat_template.jinja").read_text()
            elif (d / "chat_template.json").is_file():
                chat_template = pick_template(_read_json(d / "chat_template.json").get("chat_template"),
                                               d / "chat_template.json")
            elif tok_cfg.get("chat_template") is not None:
                chat_template = pick_template(tok_cfg["chat_template"], d / "tokenizer_config.json")
        special = {}
        for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
            value = tok_cfg.get(key)
            if isinstance(value, dict):
                value = value.get("content")
            if value is not None:
                special[key] = value
        if tok_cfg.get("additional_special_tokens"):
            special["additional_special_tokens"] = [
                t.get("content") if isinstance(t, dict) else t for t in tok_cfg["additional_special_tokens"]]
        pre = _read_json(d / "preprocessor_config.json")
        family = family_for(getattr(model_config, "model_type", DEFAULT_MODEL_TYPE))
        return cls(tokenizer, chat_template, spec=family.processing.preprocess_spec(model_config, pre),
                   special_tokens=special, model_config=model_config)

    def apply_mm_processor_kwargs(self, kwargs: dict | None) -> None:
        """Engine-wide media defaults (EngineConfig.mm_processor_kwargs, checked there): min_pixels /
        max_pixels replace the checkpoint's image limits, fps becomes the video default and limit."""
        kwargs = kwargs or {}
        if "min_pixels" in kwargs or "max_pixels" in kwargs:
            self.spec = dataclasses.replace(self.spec, min_pixels=int(kwargs.get("min_pixels", self.min_pixels)),
                                            max_pixels=int(kwargs.get("max_pixels", self.max_pixels)))
        if "fps" in kwargs:
            self.default_fps = float(kwargs["fps"])

    @property
    def min_pixels(self) -> int:
        return self.spec.min_pixels

    @property
    def max_pixels(self) -> int:
        return self.spec.max_pixels

    def _check_model_config(self, cfg) -> None:
        pairs = [(IMAGE_PAD, self.image_token_id, "image_token_id"),
                 (VIDEO_PAD, self.video_token_id, "video_token_id"),
                 (VISION_START, self.vision_start_token_id, "vision_start_token_id"),
                 (VISION_END, self.vision_end_token_id, "vision_end_token_id")]
        for tok, tid, name in pairs:
            want = getattr(cfg, name, None)
            if want is not None and want != tid:
                raise ValueError(f"tokenizer maps {tok} to id {tid} but the model config's {name} is {want}")
            if tid >= cfg.vocab_size:
                raise ValueError(f"tokenizer id {tid} of {tok} is outside the model's vocab_size {cfg.vocab_size}")

    # ------------------------------------------------------------------------------------ text helpers

    def render(self, messages, add_generation_prompt: bool = True, *, continue_final_message: bool = False,
               **template_kwargs) -> str:
        """The chat template applied to `messages` (one pad per image/video, nothing loaded)."""
        return self._render(parse_messages(messages, self.roles).messages, add_generation_prompt,
                            continue_final_message, template_kwargs)

    def _render(self, messages: list[dict], add_generation_prompt: bool, continue_final_message: bool,
                template_kwargs: dict | None) -> str:
        return render_template(self._template, messages, add_generation_prompt=add_generation_prompt,
                               continue_final_message=continue_final_message, variables=self.special_tokens,
                               template_kwargs=template_kwargs)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`: no BOS, special tokens in the text are recognised as such."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # ----------------------------------------------------------------------------- plan, check, load

    def plan(self, messages=None, *, prompt: str | None = None, multi_modal_data: dict | None = None,
             policy=None, add_generation_prompt: bool = True, continue_final_message: bool = False,
             chat_template_kwargs: dict | None = None, max_model_len: int | None = None) -> PromptPlan:
        """Render + tokenize + fetch + read headers (no pixels decoded). Give chat `messages`, or a raw
        `prompt` with one `<|vision_start|><|image_pad|><|vision_end|>` (or `<|video_pad|>`) per item and
        `multi_modal_data` = {"image": item | [items], "video": item | [items]} (messages.
        parse_multi_modal_data; images fill the image placeholders in order, videos the video ones).
        The template flags apply to messages only. Pass the max_model_len the prompt will be checked
        against: a video's default pixel budget derives from it."""
        if (messages is None) == (prompt is None):
            raise ValueError("plan takes chat messages or a raw prompt (prompt=...), exactly one of them")
        if messages is not None:
            if multi_modal_data is not None:
                raise ValueError("multi_modal_data goes with a raw prompt; chat messages carry their own media")
            parsed = parse_messages(messages, self.roles)
            text = self._render(parsed.messages, add_generation_prompt, continue_final_message,
                                chat_template_kwargs)
            media, source = parsed.media, "the messages"
        else:
            if not isinstance(prompt, str):
                raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
            if continue_final_message or chat_template_kwargs:
                raise ValueError("continue_final_message / chat_template_kwargs apply to chat messages, not "
                                 "to a raw prompt")
            text, media, source = prompt, parse_multi_modal_data(multi_modal_data), "multi_modal_data"
        ids = self.encode(text)
        slots = match_placeholders(ids, media, self.image_token_id, self.video_token_id, source)

        def one(slot: tuple[int, MediaSpec]) -> PlannedItem:
            at, spec = slot
            spec = prefetch(spec, policy)                      # the only download of this item
            item = PlannedItem(spec, self._header_count(spec, policy, max_model_len), at)
            # the expansion's own text (timestamps) counts from the header too; a replaced wrapper is not new
            item.extra_tokens = (len(self._pad_tokens(item.budget)) - item.budget.num_tokens
                                 - 2 * self._wrapped(ids, item))
            return item

        return PromptPlan(text, ids, map_items(one, slots), policy=policy, max_model_len=max_model_len)

    def load(self, plan: PromptPlan, limits: PromptLimits | None = None) -> ProcessedPrompt:
        """Decode the planned items, expand the pads, compute positions; then check the exact length
        against `limits` (default: the plan's max_model_len, when it has one)."""
        items = map_items(lambda it: self._load_one(it.spec, plan.policy, plan.max_model_len), plan.items)
        ids, offsets = self._expand(plan, [self._pad_tokens(v) for v in items])      # (N,)
        positions, delta = self.processing.rope_index(ids, items, self._rope_config())  # (3, N)
        out = ProcessedPrompt(ids, positions, int(delta), items, offsets, plan.text,
                              [it.spec.label for it in plan.items])
        if limits is None and plan.max_model_len is not None:
            limits = PromptLimits(plan.max_model_len)
        if limits is not None:      # exact recheck (headers can lie, e.g. a video's frame count)
            check(out, limits)
        return out

    def expanded_token_ids(self, plan: PromptPlan) -> list[int]:
        """The ids load() will produce, from the headers alone (for /tokenize)."""
        return self._expand(plan, [self._pad_tokens(it.budget) for it in plan.items])[0]

    def item_prompt_tokens(self, item) -> int:
        """Tokens one item (a VisionInput, or an ItemBudget) takes in a prompt where it is written as
        <|vision_start|>pad<|vision_end|>: the wrapper plus the family's expansion (timestamps included)."""
        wrapped = item.kind in getattr(self.processing, "WRAPPED_KINDS", ())
        return len(self._pad_tokens(item)) + (0 if wrapped else 2)

    def _wrapped(self, ids: list[int], item) -> bool:
        """Whether the family's expansion of `item` replaces its <|vision_start|>pad<|vision_end|>
        (Qwen3-VL video timestamps) rather than the pad alone (a bare pad keeps its neighbours)."""
        i = item.pad_index
        return (item.spec.kind in getattr(self.processing, "WRAPPED_KINDS", ()) and 0 < i < len(ids) - 1
                and ids[i - 1] == self.vision_start_token_id and ids[i + 1] == self.vision_end_token_id)

    def _expand(self, plan: PromptPlan, pads: list[list[int]]) -> tuple[list[int], list[int]]:
        """Token ids with each item's single pad replaced by `pads[i]`, and each item's first pad index."""
        out: list[int] = []
        offsets: list[int] = []
        prev = 0
        pad_ids = (self.image_token_id, self.video_token_id)
        for item, pad in zip(plan.items, pads):
            wrapped = self._wrapped(plan.token_ids, item)
            out.extend(plan.token_ids[prev:item.pad_index - wrapped])
            offsets.append(len(out) + next((j for j, t in enumerate(pad) if t in pad_ids), 0))
            out.extend(pad)
            prev = item.pad_index + 1 + wrapped
        out.extend(plan.token_ids[prev:])
        return out, offsets

    # ---------------------------------------------------------------------------------- conveniences

    def process_messages(self, messages, *, policy=None, max_model_len: int | None = None,
                         add_generation_prompt: bool = True, continue_final_message: bool = False,
                         chat_template_kwargs: dict | None = None) -> ProcessedPrompt:
        """plan -> check (when max_model_len is given: the prompt must fit it) -> load."""
        plan = self.plan(messages, policy=policy, add_generation_prompt=add_generation_prompt,
                         continue_final_message=continue_final_message,
                         chat_template_kwargs=chat_template_kwargs, max_model_len=max_model_len)
        return self._check_and_load(plan)

    def process_prompt(self, prompt: str, multi_modal_data: dict | None = None, *, policy=None,
                       max_model_len: int | None = None) -> ProcessedPrompt:
        """A raw prompt + multi_modal_data (see plan): plan -> check (with max_model_len) -> load."""
        plan = self.plan(prompt=prompt, multi_modal_data=multi_modal_data, policy=policy,
                         max_model_len=max_model_len)
        return self._check_and_load(plan)

    def count_tokens(self, messages, *, policy=None, max_model_len: int | None = None,
                     add_generation_prompt: bool = True, continue_final_message: bool = False,
                     chat_template_kwargs: dict | None = None) -> dict:
        """Prompt length without decoding pixels (plan alone): {"prompt_tokens", "items": [{type,
        original_size, resized_size, grid_thw, tokens}, ...]} (items in placeholder order). Pass the same
        max_model_len as process_messages: a video's default pixel budget derives from it."""
        return self.plan(messages, policy=policy, add_generation_prompt=add_generation_prompt,
                         continue_final_message=continue_final_message,
                         chat_template_kwargs=chat_template_kwargs, max_model_len=max_model_len).counts()

    def _check_and_load(self, plan: PromptPlan) -> ProcessedPrompt:
        limits = None if plan.max_model_len is None else PromptLimits(plan.max_model_len)
        if limits is not None:      # refuse before decoding any pixels
            check(plan, limits)
        return self.load(plan, limits)

    # -------------------------------------------------------------------------------------- internals

    def _rope_config(self):
        """The config the family's rope index and pad expansion read (pad ids, merge size)."""
        if self.model_config is not None:
            return self.model_config
        from types import SimpleNamespace

        return SimpleNamespace(image_token_id=self.image_token_id, video_token_id=self.video_token_id,
                               vision=SimpleNamespace(spatial_merge_size=self.spec.merge_size))

    def _pad_tokens(self, item) -> list[int]:
        """The family's pad tokens for one item (a VisionInput, or an ItemBudget: kind + grid_thw)."""
        return self.processing.pad_tokens(item, self._rope_config(), self.encode)

    def _options(self, spec: MediaSpec, max_model_len: int | None) -> dict:
        """The item's options under this processor's limits (limits.py: lowered, never raised)."""
        return request_options(spec.kind, spec.options, self.spec, default_fps=self.default_fps,
                               max_model_len=max_model_len)

    def _header_count(self, spec: MediaSpec, policy, max_model_len: int | None) -> ItemBudget:
        count = image_num_tokens if spec.kind == "image" else video_num_tokens
        with labelled(spec.label):
            return count(spec.source, policy=policy, label=spec.label, spec=self.spec,
                         **self._options(spec, max_model_len))

    def _load_one(self, spec: MediaSpec, policy, max_model_len: int | None):
        load = process_image if spec.kind == "image" else process_video
        with labelled(spec.label):
            return load(spec.source, policy=policy, label=spec.label, spec=self.spec,
                        **self._options(spec, max_model_len))


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from e
