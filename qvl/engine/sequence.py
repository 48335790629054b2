"""Sequence: the engine's record of one completion being generated (one of a request's `n`).

Owns: token ids (prompt + output), the prompt's media items as token spans with content hashes,
the prompt's M-RoPE positions and rope_delta, the block table, the count of tokens whose K/V are in
the cache (`num_computed_tokens`), status, counters and timestamps.
Does not know: tensors (positions and the vision inputs are carried opaquely for the runner),
tokenizers, or how blocks are chosen. No torch import.

Token layout: tokens[0:num_prompt_tokens] is the prompt, the rest is output. Tokens
[0:num_computed_tokens) have K/V in the cache; the scheduler hands out the rest in chunks.
A decode token's position is `index + rope_delta` on all three M-RoPE streams.
"""
from __future__ import annotations

import dataclasses
import itertools
import time
from dataclasses import dataclass
from enum import Enum
from typing import Any

from qvl.sampling_params import SamplingParams


class SequenceStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(frozen=True)
class MediaSpan:
    """One image/video of the prompt: its pad tokens are tokens[offset : offset + num_tokens]."""
    index: int                # order of appearance in the prompt
    offset: int
    num_tokens: int
    content_hash: str
    kind: str = "image"
    data: Any = None          # the VisionInput (pixel_values, grid_thw) for the runner

    @property
    def end(self) -> int:
        return self.offset + self.num_tokens


def media_spans(items: list, offsets: list[int], token_ids: list[int]) -> list[MediaSpan]:
    """The prompt's media as spans: one per item whose `num_tokens` pad tokens follow each other from its
    offset, else one per temporal group (Qwen3-VL puts a text timestamp between a video's groups).

    A group span carries a view of its item (pixel rows of that group, grid (1, h, w), content hash
    + "#k"): the vision towers attend within one temporal group, so its features are the whole item's
    rows for that group. Spans are numbered in prompt order."""
    out: list[MediaSpan] = []
    for vi, off in zip(items, offsets):
        pad = token_ids[off] if off < len(token_ids) else None
        if all(t == pad for t in token_ids[off:off + vi.num_tokens]) and off + vi.num_tokens <= len(token_ids):
            out.append(MediaSpan(len(out), off, vi.num_tokens, vi.content_hash, vi.kind, vi))
            continue
        t, h, w = vi.grid_thw
        per, rows = vi.num_tokens // t, h * w
        at = off
        for k in range(t):
            while at < len(token_ids) and token_ids[at] != pad:
                at += 1                                    # the text between two groups
            part = dataclasses.replace(vi, pixel_values=vi.pixel_values[k * rows:(k + 1) * rows],
                                       grid_thw=(1, h, w), content_hash=f"{vi.content_hash}#{k}")
            out.append(MediaSpan(len(out), at, per, part.content_hash, vi.kind, part))
            at += per
    return out


@dataclass
class SequenceMetrics:
    arrival_time: float = 0.0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    engine_time: float = 0.0          # its share of engine-step seconds (by tokens scheduled in each step)


_seq_counter = itertools.count()


class Sequence:
    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, *,
                 index: int = 0, media: list[MediaSpan] | None = None, positions: Any = None,
                 rope_delta: int = 0, arrival_time: float | None = None,
                 parent: "Sequence | None" = None):
        if not prompt_token_ids:
            raise ValueError(f"request {request_id!r}: the prompt has no tokens")
        self.seq_id = next(_seq_counter)
        self.request_id = request_id
        self.index = index                       # which of the request's n completions
        self.params = params
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.media: list[MediaSpan] = sorted(media or [], key=lambda m: m.offset)
        self.positions = positions               # (3, num_prompt_tokens) LongTensor or None
        self.rope_delta = rope_delta
        self.parent = parent                     # sibling whose prefill this one waits for (n > 1)

        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []
        self.block_hashes: list[bytes] = []      # chained hashes of full blocks (prefix caching)
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0               # prompt tokens served by the prefix cache
        self.num_preemptions = 0
        self.finish_reason: str | None = None    # "stop" | "length" | "abort"
        self.stop_reason: int | str | None = None
        self.cumulative_logprob = 0.0
        self.output_logprobs: list[dict[int, float]] = []
        self.metrics = SequenceMetrics(arrival_time=time.time() if arrival_time is None
                                       else arrival_time)

        for m in self.media:
            if m.offset < 0 or m.end > self.num_prompt_tokens:
                raise ValueError(f"request {request_id!r}: media item {m.index} spans tokens "
                                 f"[{m.offset}, {m.end}) outside the prompt of "
                                 f"{self.num_prompt_tokens} tokens")

    # --- sizes ---------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[:self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_prefill(self) -> bool:
        """More than the last token still lacks K/V (a prompt, or a recompute after preemption)."""
        return self.num_uncomputed_tokens > 1

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def last_token_id(self) -> int:
        return self.token_ids[-1]

    # --- media ---------------------------------------------------------------------------------
    def media_in(self, start: int, end: int) -> list[MediaSpan]:
        """Media items whose pad tokens overlap tokens [start, end)."""
        return [m for m in self.media if m.offset < end and m.end > start]

    # --- mutation ------------------------------------------------------------------------------
    def append_token(self, token_id: int, logprobs: dict[int, float] | None = None,
                     logprob: float | None = None) -> None:
        self.token_ids.append(token_id)
        if logprobs is not None:
            self.output_logprobs.append(logprobs)
        if logprob is not None:
            self.cumulative_logprob += logprob

    def reset_for_recompute(self) -> None:
        """Preempted: its blocks are gone; prompt + output so far will be prefilled again."""
        self.status = SequenceStatus.WAITING
        self.block_table = []
        self.num_computed_tokens = 0
        self.num_preemptions += 1

    def __repr__(self) -> str:
        return (f"Sequence(id={self.seq_id}, req={self.request_id!r}#{self.index}, "
                f"{self.status.value}, tokens={len(self)}, computed={self.num_computed_tokens}, "
                f"blocks={len(self.block_table)})")
