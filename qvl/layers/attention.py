"""Causal self-attention of the text decoder over a flat token batch, with an optional paged KV cache.

Contract (INTERFACES.md):
  * `AttentionMetadata` describes a flat batch of N new tokens from B sequences, in sequence order:
    `seq_lens_q` (new tokens per sequence, sum N), `context_lens` (cached + new tokens per sequence after
    this step), `slot_mapping` (N,) (KV slot = block_id * block_size + offset of every new token) and
    `block_tables` (per sequence, the block ids covering its context).
  * `attention(q, k, v, scale=..., metadata=..., k_cache=..., v_cache=...)`, with q (N, nH, D) and k, v
    (N, nKV, D) already rotated, returns (N, nH, D). Three modes:
      - metadata None: one sequence, plain causal attention, no cache (scoring / tests);
      - metadata without caches: B sequences, each causal over its own new tokens only (no history);
      - metadata with caches (num_blocks, block_size, nKV, D): the new K/V are written at `slot_mapping`,
        then each sequence's queries (the last seq_lens_q of its context) attend causally to its
        context, gathered through its block table.
    Decode sequences (one new token) are gathered into one padded batch and attend in a single SDPA call;
    prefill chunks attend one sequence at a time (a padded batch mask would be quadratic in the batch).
  * GQA: kv head j serves query heads [j*g, (j+1)*g). Softmax runs inside SDPA (fp32 accumulation).

Knows nothing about the model, the scheduler or how blocks are allocated. Works on CPU and CUDA alike.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

_HAS_GQA = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)


@dataclass
class AttentionMetadata:
    seq_lens_q: list[int]
    context_lens: list[int]
    slot_mapping: torch.Tensor | None = None  # (N,) int64
    block_tables: list[list[int]] | None = None
    # Index tensors derived once per forward and shared by every layer (keyed by device, block size).
    _derived: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.seq_lens_q) != len(self.context_lens):
            raise ValueError(f"seq_lens_q has {len(self.seq_lens_q)} sequences but context_lens has "
                             f"{len(self.context_lens)}")
        for i, (q, c) in enumerate(zip(self.seq_lens_q, self.context_lens)):
            if q < 0 or q > c:
                raise ValueError(f"sequence {i}: seq_lens_q={q} must be in [0, context_lens={c}]")
        if self.block_tables is not None and len(self.block_tables) != len(self.seq_lens_q):
            raise ValueError(f"block_tables has {len(self.block_tables)} sequences but seq_lens_q has "
                             f"{len(self.seq_lens_q)}")

    @property
    def num_tokens(self) -> int:
        return sum(self.seq_lens_q)

    def _slots(self, i: int, block_size: int, device: torch.device) -> torch.Tensor:
        """KV slots of sequence i's whole context, (context_lens[i],) int64 on `device`."""
        key = ("seq", i, block_size, str(device))
        if key not in self._derived:
            n = self.context_lens[i]
            table = self.block_tables[i]
            need = -(-n // block_size)
            if len(table) < need:
                raise ValueError(f"sequence {i}: block table has {len(table)} blocks, context of {n} tokens "
                                 f"needs {need} (block_size {block_size})")
            pos = torch.arange(n)
            slots = torch.tensor(table[:need], dtype=torch.long)[pos // block_size] * block_size + pos % block_size
            self._derived[key] = slots.to(device)
        return self._derived[key]

    def _decode_batch(self, rows: list[int], block_size: int, device: torch.device):
        """Padded (B, maxL) slots and (B, 1, 1, maxL) validity mask for the decode sequences `rows`."""
        key = ("decode", block_size, str(device))
        if key not in self._derived:
            lens = torch.tensor([self.context_lens[i] for i in rows])
            max_len = int(lens.max())
            slots = torch.zeros(len(rows), max_len, dtype=torch.long)  # (B, maxL)
            for b, i in enumerate(rows):
                slots[b, : self.context_lens[i]] = self._slots(i, block_size, torch.device("cpu"))
            mask = torch.arange(max_len)[None, :] < lens[:, None]  # (B, maxL)
            self._derived[key] = (slots.to(device), mask[:, None, None, :].to(device))
        return self._derived[key]


def _sdpa(q, k, v, *, scale: float, mask=None, causal: bool = False) -> torch.Tensor:
    """q (B, nH, Lq, D), k/v (B, nKV, Lk, D) -> (B, nH, Lq, D)."""
    if k.shape[1] != q.shape[1]:
        if _HAS_GQA:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale,
                                                  enable_gqa=True)
        g = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)


def _causal_one(q, k, v, scale: float) -> torch.Tensor:
    """One sequence: q (Lq, nH, D) are the last Lq of the Lk keys (Lk, nKV, D). -> (Lq, nH, D)."""
    lq, lk = q.shape[0], k.shape[0]
    qt, kt, vt = q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None]  # (1, h, L, D)
    if lq == lk:
        out = _sdpa(qt, kt, vt, scale=scale, causal=True)
    elif lq == 1:
        out = _sdpa(qt, kt, vt, scale=scale)
    else:
        # Query j sits at absolute position lk - lq + j; SDPA's is_causal would align top-left instead.
        mask = torch.arange(lk, device=q.device)[None, :] <= torch.arange(lk - lq, lk, device=q.device)[:, None]
        out = _sdpa(qt, kt, vt, scale=scale, mask=mask)
    return out[0].transpose(0, 1)  # (Lq, nH, D)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    metadata: AttentionMetadata | None = None,
    k_cache: torch.Tensor | None = None,
    v_cache: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of q (N, nH, D) over k, v (N, nKV, D) (+ cached context). Returns (N, nH, D)."""
    if metadata is None:
        return _causal_one(q, k, v, scale)
    n = q.shape[0]
    if metadata.num_tokens != n:
        raise ValueError(f"attention metadata covers {metadata.num_tokens} tokens but the batch has {n}")
    starts = [0]
    for lq in metadata.seq_lens_q:
        starts.append(starts[-1] + lq)

    if k_cache is None:
        for i, (lq, lc) in enumerate(zip(metadata.seq_lens_q, metadata.context_lens)):
            if lq != lc:
                raise ValueError(f"sequence {i} has context_lens={lc} > seq_lens_q={lq}: cached context needs "
                                 f"k_cache/v_cache set on the attention module")
        if len(starts) == 2:
            return _causal_one(q, k, v, scale)
        return torch.cat([_causal_one(q[a:b], k[a:b], v[a:b], scale) for a, b in zip(starts, starts[1:])])

    if metadata.slot_mapping is None or metadata.block_tables is None:
        raise ValueError("attention with a KV cache needs slot_mapping and block_tables in the metadata")
    if metadata.slot_mapping.shape != (n,):
        raise ValueError(f"slot_mapping has shape {tuple(metadata.slot_mapping.shape)}, expected ({n},)")
    block_size = k_cache.shape[1]
    flat_k = k_cache.view(-1, *k_cache.shape[2:])  # (num_blocks*block_size, nKV, D)
    flat_v = v_cache.view(-1, *v_cache.shape[2:])
    slot_mapping = metadata.slot_mapping.to(k_cache.device)
    flat_k[slot_mapping] = k.to(k_cache.dtype)
    flat_v[slot_mapping] = v.to(v_cache.dtype)

    out = torch.empty_like(q)
    decode = [i for i, lq in enumerate(metadata.seq_lens_q) if lq == 1]
    if decode:
        slots, mask = metadata._decode_batch(decode, block_size, k_cache.device)
        idx = torch.tensor([starts[i] for i in decode], device=q.device)
        kb = flat_k[slots].transpose(1, 2).to(q.dtype)  # (B, nKV, maxL, D)
        vb = flat_v[slots].transpose(1, 2).to(q.dtype)
        qb = q[idx].unsqueeze(2)  # (B, nH, 1, D)
        out[idx] = _sdpa(qb, kb, vb, scale=scale, mask=mask).squeeze(2)
    for i, lq in enumerate(metadata.seq_lens_q):
        if lq <= 1:
            continue
        slots = metadata._slots(i, block_size, k_cache.device)
        a, b = starts[i], starts[i + 1]
        out[a:b] = _causal_one(q[a:b], flat_k[slots].to(q.dtype), flat_v[slots].to(q.dtype), scale)
    return out
