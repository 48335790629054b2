"""The grammar-backend interface: what qvl needs from a grammar library, nothing more.

A backend is built once per engine from the tokenizer's JSON (tokenizers' `to_str()`), the checkpoint's
vocabulary size (embedding rows — masks are that wide, not the tokenizer's size) and the eos ids. It
compiles a StructuredOutputsParams into a Grammar (ValueError naming the problem when it cannot: bad
JSON, a schema feature it does not support, a regex that does not parse); a Grammar hands out fresh
Matchers, one per sequence. A Matcher follows one sequence's output tokens. Thread-safety: `compile`
runs on the manager's worker thread; matchers are used from the engine's thread only.
"""
from __future__ import annotations

from typing import Protocol

import torch

from qvl.sampling_params import StructuredOutputsParams


class Matcher(Protocol):
    def accept(self, token_id: int) -> bool:
        """Advance by one sampled token; False when the grammar does not allow it (an error state)."""

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into bitmask[row] ((B, ceil(V/32)) int32, CPU)."""

    def is_terminated(self) -> bool:
        """The grammar is complete and allows nothing but eos."""


class Grammar(Protocol):
    def matcher(self) -> Matcher: ...


class GrammarBackend(Protocol):
    name: str

    def compile(self, spec: StructuredOutputsParams) -> Grammar: ...

    def fill_bitmasks(self, matchers: list[tuple[Matcher, int]], bitmask: torch.Tensor) -> None:
        """fill_bitmask for many rows at once (a backend may do it in parallel)."""
