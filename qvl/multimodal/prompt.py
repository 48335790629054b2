"""Chat messages (or a raw prompt) + images/videos -> token ids, M-RoPE positions and vision inputs.

`PromptProcessor` owns the checkpoint's tokenizer (tokenizer.json via `tokenizers`), its Jinja chat
template and its image pixel limits. For one request it:

  1. parses the messages (qvl/multimodal/messages.py) into template-friendly messages + media specs;
  2. renders the template exactly as transformers' `apply_chat_template` does (sandboxed Jinja with
     trim_blocks/lstrip_blocks, `raise_exception`, a `tojson` that does not HTML-escape, the tokenizer's
     special tokens as variables) and tokenizes it (no BOS; special tokens recognised);
  3. when `max_model_len` is given, counts every item's visual tokens from its header (budget.py, no
     pixel decode) and refuses a prompt that cannot fit *before* any heavy work;
  4. loads each item (process_image / process_video), expands its single `<|image_pad|>` /
     `<|video_pad|>` to t*h*w/4 copies in placeholder order, and computes positions (3, N) + rope_delta
     with `mrope_positions` (max+1 rule); then rechecks the exact length.

It knows nothing about the model weights, the engine or HTTP. Every error is a ValueError naming the
message/part or the item ("image 2 (messages[1].content[0])") and the numbers involved.
"""
from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import torch
from jinja2.sandbox import ImmutableSandboxedEnvironment

from qvl.models import DEFAULT_MODEL_TYPE, family_for
from qvl.multimodal.budget import ItemBudget, check_context, image_num_tokens, video_num_tokens
from qvl.multimodal.image import PATCH_SIZE, process_image
from qvl.multimodal.media import fetch_bytes
from qvl.multimodal.messages import MediaSpec, parse_messages, parse_multi_modal_data
from qvl.multimodal.video import process_video

IMAGE_PAD, VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
DEFAULT_MIN_PIXELS = 3136          # 4 * 28 * 28
DEFAULT_MAX_PIXELS = 12845056      # 16384 * 28 * 28
_BUILTIN_TEMPLATE = Path(__file__).with_name("chat_template.jinja")
_MAX_LOAD_WORKERS = 8


@dataclass
class ProcessedPrompt:
    token_ids: list[int]
    positions: torch.Tensor            # (3, N) int64
    rope_delta: int
    items: list = field(default_factory=list)         # VisionInput, in placeholder order
    item_offsets: list[int] = field(default_factory=list)  # index of each item's first pad token
    text: str = ""                     # the rendered prompt, one pad per item (not expanded)

    @classmethod
    def from_token_ids(cls, token_ids: list[int]) -> "ProcessedPrompt":
        """A text-only prompt given as token ids: positions 0..N-1 on all three streams."""
        n = len(token_ids)
        return cls(token_ids=list(token_ids), positions=torch.arange(n).expand(3, n).clone(),  # (3, N)
                   rope_delta=0)


class PromptProcessor:
    def __init__(self, tokenizer, chat_template: str | None = None, *, min_pixels: int = DEFAULT_MIN_PIXELS,
                 max_pixels: int = DEFAULT_MAX_PIXELS, special_tokens: dict[str, Any] | None = None,
                 model_config=None, spatial_merge_size: int = 2):
        """`tokenizer` is a `tokenizers.Tokenizer`; `special_tokens` are template variables (eos_token, ...).

        `model_config` (a family's Config) picks the family whose rope index and pad expansion apply;
        without one (tokenizer-only use), Qwen2-VL's rules with the tokenizer's pad ids and
        `spatial_merge_size`."""
        if min_pixels <= 0 or max_pixels < min_pixels:
            raise ValueError(f"pixel limits must satisfy 0 < min_pixels <= max_pixels, got "
                             f"min_pixels={min_pixels}, max_pixels={max_pixels}")
        self.tokenizer = tokenizer
        self.chat_template = chat_template if chat_template is not None else _BUILTIN_TEMPLATE.read_text()
        self.min_pixels, self.max_pixels = int(min_pixels), int(max_pixels)
        self.special_tokens = dict(special_tokens or {})
        self.model_config = model_config
        self.spatial_merge_size = spatial_merge_size
        self.processing = family_for(getattr(model_config, "model_type", DEFAULT_MODEL_TYPE)).processing
        ids = {}
        for tok in (IMAGE_PAD, VIDEO_PAD, VISION_START, VISION_END):
            ids[tok] = tokenizer.token_to_id(tok)
            if ids[tok] is None:
                raise ValueError(f"the tokenizer has no {tok} token; a Qwen2-VL tokenizer.json is required")
        self.image_token_id, self.video_token_id = ids[IMAGE_PAD], ids[VIDEO_PAD]
        self.vision_start_token_id, self.vision_end_token_id = ids[VISION_START], ids[VISION_END]
        if model_config is not None:
            self._check_model_config(model_config)
        self._template = _compile_template(self.chat_template)
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
                chat_template = _pick_template(_read_json(d / "chat_template.json").get("chat_template"),
                                               d / "chat_template.json")
            elif tok_cfg.get("chat_template") is not None:
                chat_template = _pick_template(tok_cfg["chat_template"], d / "tokenizer_config.json")
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
        size = pre.get("size") if isinstance(pre.get("size"), dict) else {}
        min_pixels = pre.get("min_pixels") or size.get("shortest_edge") or DEFAULT_MIN_PIXELS
        max_pixels = pre.get("max_pixels") or size.get("longest_edge") or DEFAULT_MAX_PIXELS
        merge = pre.get("merge_size") or 2
        if model_config is not None:
            merge = model_config.vision.spatial_merge_size
        return cls(tokenizer, chat_template, min_pixels=min_pixels, max_pixels=max_pixels,
                   special_tokens=special, model_config=model_config, spatial_merge_size=merge)

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

    def render(self, messages, add_generation_prompt: bool = True, **template_kwargs) -> str:
        """The chat template applied to `messages` (one pad per image/video, nothing loaded)."""
        return self._render(parse_messages(messages, self.roles).messages, add_generation_prompt, template_kwargs)

    def _render(self, messages: list[dict], add_generation_prompt: bool, template_kwargs: dict) -> str:
        variables = {"tools": None, "documents": None, **self.special_tokens, **template_kwargs}
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         **variables)
        except jinja2.TemplateError as e:
            raise ValueError(f"chat template error: {e}") from e

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`: no BOS, special tokens in the text are recognised as such."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # -------------------------------------------------------------------------------------- processing

    def process_messages(self, messages, *, policy=None, max_model_len: int | None = None,
                         add_generation_prompt: bool = True,
                         chat_template_kwargs: dict | None = None) -> ProcessedPrompt:
        """Render, check the budget from headers, load media, expand pads, tokenize, position."""
        parsed = parse_messages(messages, self.roles)
        text = self._render(parsed.messages, add_generation_prompt, chat_template_kwargs or {})
        return self._process(text, parsed.media, policy, max_model_len, source="the messages")

    def process_prompt(self, prompt: str, multi_modal_data: dict | None = None, *, policy=None,
                       max_model_len: int | None = None) -> ProcessedPrompt:
        """A raw prompt with one `<|vision_start|><|image_pad|><|vision_end|>` (or `<|video_pad|>`) per item.

        `multi_modal_data` = {"image": item | [items], "video": item | [items]} (see
        messages.parse_multi_modal_data); images fill the image placeholders in order, videos the video ones.
        """
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
        specs = parse_multi_modal_data(multi_modal_data)
        return self._process(prompt, specs, policy, max_model_len, source="multi_modal_data")

    def count_tokens(self, messages, *, policy=None, max_model_len: int | None = None,
                     add_generation_prompt: bool = True, chat_template_kwargs: dict | None = None) -> dict:
        """Prompt length without decoding pixels: {"prompt_tokens", "items": [{type, original_size,
        resized_size, grid_thw, tokens}, ...]} (items in placeholder order). Pass the same max_model_len
        as process_messages: a video's default pixel budget derives from it."""
        parsed = parse_messages(messages, self.roles)
        text = self._render(parsed.messages, add_generation_prompt, chat_template_kwargs or {})
        ids = self.encode(text)
        slots = self._match(ids, parsed.media, "the messages")
        counts = [self._header_count(spec, policy, max_model_len) for _, spec in slots]
        items = [{"type": c.kind, "original_size": tuple(c.original_size), "resized_size": tuple(c.resized_size),
                  "grid_thw": tuple(c.grid_thw), "tokens": int(c.num_tokens)} for c in counts]
        return {"prompt_tokens": len(ids) - len(slots) + sum(it["tokens"] for it in items), "items": items}

    # -------------------------------------------------------------------------------------- internals

    def _process(self, text: str, media, policy, max_model_len: int | None, source: str) -> ProcessedPrompt:
        ids = self.encode(text)
        slots = self._match(ids, media, source)       # [(index of the pad in ids, spec)] in prompt order
        text_tokens = len(ids) - len(slots)
        specs = [spec for _, spec in slots]
        if max_model_len is not None:
            # Refuse before decoding any pixels; download remote media once for both passes.
            specs = [_prefetch(spec, policy) for spec in specs]
            check_context([self._header_count(s, policy, max_model_len) for s in specs], text_tokens,
                          max_model_len)
        items = self._load(specs, policy, max_model_len)

        out: list[int] = []
        offsets: list[int] = []
        prev = 0
        for (at, _), item in zip(slots, items):
            out.extend(ids[prev:at])
            offsets.append(len(out))
            out.extend(self._pad_tokens(item))
            prev = at + 1
        out.extend(ids[prev:])                                       # (N,)
        if max_model_len is not None:   # exact recheck (headers can lie, e.g. a video's frame count)
            check_context([_as_budget(it, s.label) for it, s in zip(items, specs)], text_tokens, max_model_len)
        positions, delta = self.processing.rope_index(out, items, self._rope_config())  # (3, N)
        return ProcessedPrompt(out, positions, int(delta), items, offsets, text)

    def _rope_config(self):
        """The config the family's rope index and pad expansion read (pad ids, merge size)."""
        if self.model_config is not None:
            return self.model_config
        from types import SimpleNamespace

        return SimpleNamespace(image_token_id=self.image_token_id, video_token_id=self.video_token_id,
                               vision=SimpleNamespace(spatial_merge_size=self.spatial_merge_size))

    def _pad_tokens(self, item) -> list[int]:
        return self.processing.pad_tokens(item, self._rope_config())

    def _match(self, ids: list[int], media, source: str) -> list[tuple[int, MediaSpec]]:
        """Pair each pad token of `ids` with its media spec: images in order, videos in order."""
        if isinstance(media, dict):
            by_kind = {"image": list(media["image"]), "video": list(media["video"])}
        else:
            by_kind = {k: [m for m in media if m.kind == k] for k in ("image", "video")}
        pads = {"image": [i for i, t in enumerate(ids) if t == self.image_token_id],
                "video": [i for i, t in enumerate(ids) if t == self.video_token_id]}
        for kind, pad in (("image", IMAGE_PAD), ("video", VIDEO_PAD)):
            if len(pads[kind]) != len(by_kind[kind]):
                raise ValueError(
                    f"the prompt has {len(pads[kind])} {pad} placeholder(s) but {len(by_kind[kind])} "
                    f"{kind}(s) were given in {source}; write one {VISION_START}{pad}{VISION_END} per {kind}")
        slots = [(at, spec) for kind in ("image", "video") for at, spec in zip(pads[kind], by_kind[kind])]
        return sorted(slots, key=lambda s: s[0])

    def _options(self, spec: MediaSpec, max_model_len: int | None) -> dict:
        opts = dict(spec.options)
        if spec.kind == "image" and "resized_height" not in opts:
            opts.setdefault("min_pixels", self.min_pixels)
            opts.setdefault("max_pixels", self.max_pixels)
        if spec.kind == "video" and max_model_len is not None:
            opts["max_model_len"] = max_model_len   # default total_pixels = 0.9 * context (video.py)
        return opts

    def _header_count(self, spec: MediaSpec, policy, max_model_len: int | None):
        opts = self._options(spec, max_model_len)
        count = image_num_tokens if spec.kind == "image" else video_num_tokens
        with _labelled(spec.label):
            return count(spec.source, policy=policy, label=spec.label, **opts)

    def _load(self, specs: list[MediaSpec], policy, max_model_len: int | None) -> list:
        if len(specs) <= 1:
            return [self._load_one(s, policy, max_model_len) for s in specs]
        with ThreadPoolExecutor(max_workers=min(_MAX_LOAD_WORKERS, len(specs))) as pool:
            return list(pool.map(lambda s: self._load_one(s, policy, max_model_len), specs))

    def _load_one(self, spec: MediaSpec, policy, max_model_len: int | None):
        opts = self._options(spec, max_model_len)
        load = process_image if spec.kind == "image" else process_video
        with _labelled(spec.label):
            return load(spec.source, policy=policy, label=spec.label, **opts)


@contextmanager
def _labelled(label: str):
    """Make sure an error escaping media loading is a ValueError that names the item."""
    try:
        yield
    except ValueError as e:
        if str(e).startswith(label):
            raise
        raise ValueError(f"{label}: {e}") from e
    except OSError as e:
        raise ValueError(f"{label}: cannot read ({type(e).__name__}: {e})") from e


def _is_remote(source: Any) -> bool:
    return isinstance(source, str) and source[:8].lower().startswith(("http://", "https://"))


def _prefetch(spec: MediaSpec, policy) -> MediaSpec:
    """Download http(s) sources once (under the policy) so counting and loading share the bytes."""
    src = spec.source
    with _labelled(spec.label):
        if _is_remote(src):
            src = fetch_bytes(src, policy=policy, label=spec.label)
        elif isinstance(src, (list, tuple)) and any(_is_remote(f) for f in src):
            src = [fetch_bytes(f, policy=policy, label=f"{spec.label} frame {i}") if _is_remote(f) else f
                   for i, f in enumerate(src)]
    return spec if src is spec.source else replace(spec, source=src)


def _as_budget(item, label: str) -> ItemBudget:
    t, h, w = item.grid_thw
    return ItemBudget(item.kind, tuple(item.original_size), (h * PATCH_SIZE, w * PATCH_SIZE), (t, h, w),
                      item.num_tokens, label=label)


def _pick_template(value: Any, where: Path) -> str:
    """A template string, or the "default" entry of a list of {name, template} (first one otherwise)."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and value:
        value = [{"name": k, "template": v} for k, v in value.items()]
    if isinstance(value, list) and value and all(isinstance(t, dict) and "template" in t for t in value):
        named = {t.get("name"): t["template"] for t in value}
        return named.get("default", value[0]["template"])
    raise ValueError(f"{where}: chat_template must be a string or a list of {{name, template}}, "
                     f"got {type(value).__name__}")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from e


@lru_cache(maxsize=16)
def _compile_template(source: str):
    """Jinja environment as transformers builds it for chat templates (same whitespace rules)."""
    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson HTML-escapes; templates expect plain JSON.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols, _GenerationTag])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"chat template does not parse: {e} (line {e.lineno})") from e


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (training templates) renders its body unchanged."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()
