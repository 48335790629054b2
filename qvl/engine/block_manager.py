"""BlockManager: the paged KV cache's bookkeeping — which block holds which tokens. No torch.

Owns: a pool of `num_blocks` fixed-size blocks (ids 0..num_blocks-1; the runner's cache tensors have
that many rows), their reference counts, and the prefix cache.
Does not know: tensors, the model, scheduling policy.

Prefix caching. A *full* block is named by a chained hash
    h_i = blake2b(h_{i-1} || token ids of block i || content hashes of the media items whose pad tokens
          overlap block i)
so two prompts with the same text and different images differ from the first block that touches
an image on (the pad tokens alone are identical; sglang#5455). A block's hash is registered only
after its K/V have been written (`commit`, called after the step ran), so nobody reads a block that
is still being computed. Lookups (`find_cached`) walk the chain from the first block and stop at the
first miss; at least one prompt token is always left to compute so the request gets logits.

Freeing drops reference counts, last block first. A block at zero references keeps its hash and
waits in an LRU list; allocation takes never-hashed free blocks first, then evicts the least
recently freed cached block (forgetting its hash). Hit counters are in tokens.
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque

from qvl.engine.sequence import Sequence


class Block:
    __slots__ = ("block_id", "ref_count", "hash")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: bytes | None = None


def block_hash(parent: bytes | None, token_ids: list[int], media_hashes: list[str]) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    h.update(parent or b"root")
    h.update(array("q", token_ids).tobytes())
    for mh in media_hashes:
        h.update(b"|media:" + mh.encode())
    return h.digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"BlockManager needs num_blocks >= 1 and block_size >= 1, got "
                             f"{num_blocks} and {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: deque[int] = deque(range(num_blocks))           # ref 0, no hash
        self._cached_free: OrderedDict[int, None] = OrderedDict()   # ref 0, hashed; LRU first
        self._by_hash: dict[bytes, int] = {}
        self.prefix_cache_queries = 0   # prompt tokens looked up
        self.prefix_cache_hits = 0      # of which served from cache

    # --- sizes ---------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free) + len(self._cached_free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # --- hashing -------------------------------------------------------------------------------
    def _hashes(self, seq: Sequence, num_full_blocks: int) -> list[bytes]:
        """Extend seq.block_hashes to cover its first `num_full_blocks` full blocks."""
        bs = self.block_size
        hashes = seq.block_hashes
        for i in range(len(hashes), num_full_blocks):
            start, end = i * bs, (i + 1) * bs
            media = [m.content_hash for m in seq.media_in(start, end)]
            hashes.append(block_hash(hashes[-1] if hashes else None, seq.token_ids[start:end], media))
        return hashes

    # --- prefix cache --------------------------------------------------------------------------
    def find_cached(self, seq: Sequence, count: bool = True) -> list[int]:
        """Block ids holding the longest cached prefix of a sequence that has no blocks yet."""
        if not self.enable_prefix_caching:
            if count:
                self.prefix_cache_queries += len(seq)
            return []
        max_blocks = (len(seq) - 1) // self.block_size
        hit: list[int] = []
        for h in self._hashes(seq, max_blocks):
            block_id = self._by_hash.get(h)
            if block_id is None:
                break
            hit.append(block_id)
        if count:
            self.prefix_cache_queries += len(seq)
            self.prefix_cache_hits += len(hit) * self.block_size
        return hit

    def commit(self, seq: Sequence) -> None:
        """Register the hashes of the sequence's full blocks whose K/V are now computed."""
        if not self.enable_prefix_caching:
            return
        n_full = min(seq.num_computed_tokens // self.block_size, len(seq.block_table))
        for i, h in enumerate(self._hashes(seq, n_full)[:n_full]):
            block = self.blocks[seq.block_table[i]]
            if block.hash is not None:
                continue
            if h in self._by_hash:       # the same content computed twice at once: keep the first
                continue
            block.hash = h
            self._by_hash[h] = block.block_id

    # --- allocation ----------------------------------------------------------------------------
    def can_allocate(self, seq: Sequence, num_new_tokens: int, cached: list[int] = ()) -> bool:
        have = len(seq.block_table) + len(cached)
        need = self.blocks_needed(seq.num_computed_tokens + len(cached) * self.block_size
                                  + num_new_tokens) - have
        revived = sum(1 for b in cached if self.blocks[b].ref_count == 0)
        return need <= self.num_free_blocks - revived

    def allocate(self, seq: Sequence, num_new_tokens: int, cached: list[int] = ()) -> bool:
        """Grow seq's block table to hold `num_new_tokens` more tokens, after taking `cached` blocks
        (from find_cached) as its computed prefix. All or nothing: False leaves everything as is."""
        if not self.can_allocate(seq, num_new_tokens, cached):
            return False
        if cached:
            assert not seq.block_table, "cached prefix blocks only for a sequence without blocks"
            for b in cached:
                self._ref(b)
            seq.block_table = list(cached)
            seq.num_computed_tokens = seq.num_cached_tokens = len(cached) * self.block_size
        need = self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        for _ in range(need):
            seq.block_table.append(self._take_free())
        return True

    def free(self, seq: Sequence) -> None:
        """Drop the sequence's references, last block first (so tails are evicted first)."""
        for b in reversed(seq.block_table):
            block = self.blocks[b]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {b} freed twice"
            if block.ref_count == 0:
                if block.hash is not None:
                    self._cached_free[b] = None
                else:
                    self._free.append(b)
        seq.block_table = []

    def _ref(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            self._cached_free.pop(block_id)
        block.ref_count += 1

    def _take_free(self) -> int:
        if self._free:
            block_id = self._free.popleft()
        else:
            block_id, _ = self._cached_free.popitem(last=False)      # evict least recently freed
            block = self.blocks[block_id]
            del self._by_hash[block.hash]
            block.hash = None
        self.blocks[block_id].ref_count = 1
        return block_id

    def reset_prefix_cache(self) -> None:
        """Forget every cached block that no one references (e.g. after new weights)."""
        while self._cached_free:
            block_id, _ = self._cached_free.popitem(last=False)
            del self._by_hash[self.blocks[block_id].hash]
            self.blocks[block_id].hash = None
            self._free.append(block_id)
