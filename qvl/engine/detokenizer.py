"""IncrementalDetokenizer: output token ids -> text, one step at a time, plus stop-string handling.

Owns, for one sequence: the output text so far, the decode window offsets and how much text has
been handed to a stream.
Does not know: the model, scheduling, sampling. The tokenizer is a `decode(ids, skip_special_tokens)`
callable.

Incremental decoding: each step decodes a short window `tokens[prefix_offset:]` and compares it
with `tokens[prefix_offset:read_offset]`; the difference is the new text. A window that ends in
U+FFFD (a UTF-8 character split across tokens, e.g. an emoji over two byte-level tokens) emits
nothing until the character completes, so streams never show a broken character. `finish()` flushes
whatever is left (a truly invalid byte tail then appears as U+FFFD, as a full decode shows it).

Stop strings: after each update the text is searched (only the region new text could complete) for
every stop string; on a match the text is cut before it (or after it with
`include_stop_str_in_output`). While a request runs, `stream_text()` holds back the last
`max(len(stop)) - 1` characters, so a stream never emits the start of a stop string that is
completed later.
"""
from __future__ import annotations

from typing import Callable

DecodeFn = Callable[[list[int], bool], str]


class IncrementalDetokenizer:
    def __init__(self, decode: DecodeFn, *, skip_special_tokens: bool = True,
                 stop: list[str] | None = None, include_stop_str_in_output: bool = False):
        self._decode = decode
        self.skip_special_tokens = skip_special_tokens
        self.stop = list(stop or [])
        self.include_stop = include_stop_str_in_output
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.tokens: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self.text = ""
        self.stopped = False     # the text was cut at a stop string: nothing more is appended
        self.num_streamed = 0    # characters of `text` already handed out by `stream_text`

    def _window(self, a: int, b: int | None = None) -> str:
        return self._decode(self.tokens[a:b], self.skip_special_tokens)

    def update(self, new_token_ids: list[int], check_stop: bool = True) -> str | None:
        """Append tokens; returns the stop string matched (the text is then final), else None."""
        if self.stopped:
            return None
        self.tokens.extend(new_token_ids)
        prefix = self._window(self._prefix_offset, self._read_offset)
        full = self._window(self._prefix_offset)
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return None
        before = len(self.text)
        self.text += full[len(prefix):]
        self._prefix_offset, self._read_offset = self._read_offset, len(self.tokens)
        return self._check_stop(before) if check_stop else None

    def finish(self) -> None:
        """Flush text held back by an unfinished multi-byte character."""
        if self.stopped or self._read_offset == len(self.tokens):
            return
        prefix = self._window(self._prefix_offset, self._read_offset)
        full = self._window(self._prefix_offset)
        self.text += full[len(prefix):]
        self._prefix_offset = self._read_offset = len(self.tokens)

    def _check_stop(self, before: int) -> str | None:
        hits = [(at, s) for s in self.stop
                if (at := self.text.find(s, max(0, before - len(s) + 1))) != -1]
        if not hits:
            return None
        at, s = min(hits, key=lambda h: h[0])          # the earliest stop string wins
        self.text = self.text[:at + len(s)] if self.include_stop else self.text[:at]
        self.stopped = True
        return s

    def stream_text(self, finished: bool) -> str:
        """Text not yet streamed; while running, minus the tail a stop string could still claim."""
        end = len(self.text) if finished else max(self.num_streamed, len(self.text) - self.hold)
        delta = self.text[self.num_streamed:end]
        self.num_streamed = end
        return delta
