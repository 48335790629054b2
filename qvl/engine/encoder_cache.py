"""EncoderCache: merged vision features by media content hash, LRU, bounded in bytes.

Owns: a map content_hash -> features (any object with `.numel()` and `.element_size()`, i.e. a
tensor of shape (num_tokens, H), or a tuple of them: all of an item's feature sets, e.g. Qwen3-VL's main
features and its DeepStack sets, stored and evicted together), its byte total, and counters (in items).
Does not know: the vision tower, sequences, scheduling. No torch import.

The content hash (VisionInput.content_hash) covers kind, grid and pixel bytes, so the resize
parameters are part of it: two different images, or one image at two resolutions, never share an
entry. An entry larger than the whole capacity is not stored. Sequences that are mid-prefill hold
their own reference to the features they need, so eviction here never breaks a running request.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any


def _nbytes(x: Any) -> int:
    if isinstance(x, tuple):
        return sum(_nbytes(t) for t in x)
    return x.numel() * x.element_size()


class EncoderCache:
    def __init__(self, capacity_bytes: int):
        if capacity_bytes < 0:
            raise ValueError(f"EncoderCache capacity must be >= 0 bytes, got {capacity_bytes}")
        self.capacity_bytes = capacity_bytes
        self._entries: OrderedDict[str, Any] = OrderedDict()
        self.used_bytes = 0
        self.queries = 0   # items looked up
        self.hits = 0      # items found

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, content_hash: str) -> bool:
        return content_hash in self._entries

    def get(self, content_hash: str) -> Any | None:
        """Features for the hash (and mark them recently used), or None. Counts a query."""
        self.queries += 1
        feats = self._entries.get(content_hash)
        if feats is not None:
            self.hits += 1
            self._entries.move_to_end(content_hash)
        return feats

    def put(self, content_hash: str, features: Any) -> None:
        size = _nbytes(features)
        if size > self.capacity_bytes:
            return
        old = self._entries.pop(content_hash, None)
        if old is not None:
            self.used_bytes -= _nbytes(old)
        while self._entries and self.used_bytes + size > self.capacity_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.used_bytes -= _nbytes(evicted)
        self._entries[content_hash] = features
        self.used_bytes += size

    def clear(self) -> None:
        self._entries.clear()
        self.used_bytes = 0
