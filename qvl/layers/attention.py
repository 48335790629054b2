"""Causal self-attention of the text decoder over a flat token batch: the step's metadata and the backends.

Contract:
  * `AttentionMetadata` describes a flat batch of N new tokens from B sequences, in sequence order. Host
    fields (the step's shape): `seq_lens_q` (new tokens per sequence, sum N) and `context_lens` (cached + new
    tokens per sequence after this step). Device tensors, built once per step by the runner (or from lists
    here): `slot_mapping (N,)` int64 (KV slot = block_id * block_size + offset of every new token),
    `block_tables (B, W)` int32 (each sequence's blocks covering its context, rows padded with block 0),
    `query_start_loc (B + 1,)` int32 (first row of each sequence, then N), `seq_lens (B,)` int32
    (= context_lens), and the ints `max_query_len`, `max_seq_len`.
  * A backend computes `forward(q, k, v, *, scale, metadata, k_cache, v_cache)`, with q (N, nH, D) and k, v
    (N, nKV, D) already rotated, returning (N, nH, D); the caches are (num_blocks, block_size, nKV, D) and the
    new K/V are written at `slot_mapping` before any query reads them. Each sequence's queries are the last
    seq_lens_q of its context and attend causally. The caches' *last* block is reserved for padding: the
    KVCache zeroes it and never puts it in a block table.
      - `ReferenceBackend` ("reference"): the CPU default and the test oracle. Decode sequences (one new
        token) are gathered into one padded batch (one index_select per cache) and attend in one call
        (qvl.layers.decode_attention), masked only when their context lengths differ (a lone CPU decode
        sequence whose blocks are consecutive reads its context as a view of the cache instead, the same
        values and layout without the copy; new K/V whose slots are one run are written by a slice copy);
        rows shorter than the longest read the padding block's first slot (weight 0), so no unwritten slot,
        which may hold NaN from recycled memory (0 * NaN = NaN), is ever read. Prefill chunks attend one
        sequence at a time (a padded batch mask would be quadratic). Its index tensors are derived once per
        step, on the first layer that asks, and cached on the metadata (`CachePlan`): one metadata object
        describes one step.
      - "paged" (qvl.layers.attention_paged): Triton kernels reading K/V through the block table (CUDA).
  * `attention(q, k, v, *, scale, metadata=None, k_cache=None, v_cache=None, backend=None)` is what a layer
    calls: metadata None -> one sequence, plain causal attention, no cache (scoring / tests); metadata
    without caches -> B sequences, each causal over its own new tokens only; with caches -> `backend`
    (None = the reference).
  * GQA: kv head j serves query heads [j*g, (j+1)*g). Softmax accumulates in fp32.

Knows nothing about the model, the scheduler or how blocks are allocated. Works on CPU and CUDA alike.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from qvl.layers.decode_attention import decode_attention

_HAS_GQA = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)


@dataclass
class CachePlan:
    """Per-forward index tensors for attention over the paged cache (all on the cache's device)."""
    slot_mapping: torch.Tensor              # (N,) where the new K/V go
    decode_rows: torch.Tensor | None        # (Bd,) token rows of the decode sequences; None = all rows
    decode_slots: torch.Tensor | None       # (Bd * L,) context slots of the decode sequences, padded to L
    decode_shape: tuple[int, int]           # (Bd, L)
    decode_mask: torch.Tensor | None        # (Bd, 1, 1, L) bool, None when all contexts are L long
    prefill: list[tuple[int, int, torch.Tensor]]  # (first row, end row, context slots (Lc,)) per chunk
    decode_start: int | None = None         # one CPU decode sequence whose context is one run of slots:
                                            # its first slot (read as a view; decode_slots is then None)
    write_start: int | None = None          # CPU, slot_mapping one ascending run: its first slot (the new
                                            # K/V are written by one slice copy instead of index_copy_)


@dataclass
class AttentionMetadata:
    seq_lens_q: list[int]
    context_lens: list[int]
    slot_mapping: torch.Tensor | None = None            # (N,) int64
    block_tables: torch.Tensor | list[list[int]] | None = None   # (B, W) int32 (lists are converted)
    device: torch.device | str | None = None            # where list inputs become tensors (default: cpu)
    query_start_loc: torch.Tensor | None = None         # (B + 1,) int32 (None: built from the lists)
    seq_lens: torch.Tensor | None = None                # (B,) int32 (None: built from context_lens)
    # CachePlan per (block size, device), derived on first use and shared by every layer.
    _derived: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        b = len(self.seq_lens_q)
        if b != len(self.context_lens):
            raise ValueError(f"seq_lens_q has {b} sequences but context_lens has {len(self.context_lens)}")
        for i, (q, c) in enumerate(zip(self.seq_lens_q, self.context_lens)):
            if q < 0 or q > c:
                raise ValueError(f"sequence {i}: seq_lens_q={q} must be in [0, context_lens={c}]")
        self._table_lens: list[int] | None = None   # per-sequence table lengths when given as lists
        self.starts = [0]                     # (B + 1,) first token row of each sequence, then N
        for lq in self.seq_lens_q:
            self.starts.append(self.starts[-1] + lq)
        device = torch.device(self.device if self.device is not None else (
            self.slot_mapping.device if self.slot_mapping is not None else "cpu"))
        self.device = device
        self.max_query_len = max(self.seq_lens_q, default=0)
        self.max_seq_len = max(self.context_lens, default=0)
        if isinstance(self.block_tables, list):
            if len(self.block_tables) != b:
                raise ValueError(f"block_tables has {len(self.block_tables)} sequences but seq_lens_q has {b}")
            self._table_lens = [len(t) for t in self.block_tables]
            width = max(self._table_lens, default=0)
            self.block_tables = torch.tensor([t + [0] * (width - len(t)) for t in self.block_tables],
                                             dtype=torch.int32).reshape(b, width).to(device)   # (B, W)
        if self.query_start_loc is None or self.seq_lens is None:
            host = torch.tensor(self.starts + self.context_lens, dtype=torch.int32).to(device)
            self.query_start_loc, self.seq_lens = host[:b + 1], host[b + 1:]                # (B+1,), (B,)

    @property
    def num_tokens(self) -> int:
        return self.starts[-1]

    def _context_slots(self, rows: list[int], block_size: int, pad_slot: int, device) -> torch.Tensor:
        """KV slots of the contexts of sequences `rows`, padded to the longest with `pad_slot`:
        (len(rows), L) int64 on `device`."""
        lens = [self.context_lens[i] for i in rows]
        need = -(-max(lens) // block_size)
        for i, n in zip(rows, lens):
            have = self._table_lens[i] if self._table_lens is not None else self.block_tables.shape[1]
            if have < -(-n // block_size):
                raise ValueError(f"sequence {i}: block table has {have} blocks, context of {n} tokens needs "
                                 f"{-(-n // block_size)} (block_size {block_size})")
        idx = torch.tensor(rows, device=self.block_tables.device)
        tables = self.block_tables.index_select(0, idx)[:, :need].to(device, torch.int64)     # (b, need)
        pos = torch.arange(max(lens), device=device)
        slots = tables[:, pos // block_size] * block_size + pos % block_size                   # (b, L)
        return slots.masked_fill_(pos[None, :] >= torch.tensor(lens, device=device)[:, None], pad_slot)

    def _single_run(self, i: int, block_size: int) -> int | None:
        """First KV slot of sequence i's context when its blocks are consecutive ids (a lone request's
        usually are: the block manager hands out free blocks in order), else None. Host read of one
        table row: CPU only (a CUDA read would synchronize)."""
        n = self.context_lens[i]
        need = -(-n // block_size)
        have = self._table_lens[i] if self._table_lens is not None else self.block_tables.shape[1]
        if n == 0 or have < need:
            return None                     # _context_slots raises the error for a short table
        blocks = self.block_tables[i, :need].tolist()
        return blocks[0] * block_size if blocks == list(range(blocks[0], blocks[0] + need)) else None

    @staticmethod
    def _write_run(slot_mapping: torch.Tensor) -> int | None:
        """The first slot when the new tokens' slots are one ascending run (a decode token; a chunk inside
        consecutive blocks), else None. Host reads: CPU only."""
        n = slot_mapping.shape[0]
        if slot_mapping.device.type != "cpu" or n == 0:
            return None
        if n > 1 and not bool((slot_mapping[1:] - slot_mapping[:-1] == 1).all()):
            return None
        return int(slot_mapping[0])

    def plan(self, block_size: int, device: torch.device, pad_slot: int) -> CachePlan:
        """This step's CachePlan for a cache of `block_size` on `device` whose zeroed padding slot is
        `pad_slot` (built once, then reused)."""
        key = (block_size, str(device), pad_slot)
        if key in self._derived:
            return self._derived[key]
        if self.slot_mapping is None or self.block_tables is None:
            raise ValueError("attention with a KV cache needs slot_mapping and block_tables in the metadata")
        if self.slot_mapping.shape != (self.num_tokens,):
            raise ValueError(f"slot_mapping has shape {tuple(self.slot_mapping.shape)}, expected "
                             f"({self.num_tokens},)")
        decode = [i for i, lq in enumerate(self.seq_lens_q) if lq == 1]
        rows = slots = mask = start = None
        shape = (0, 0)
        if len(decode) == 1 and device.type == "cpu":
            start = self._single_run(decode[0], block_size)
        if start is not None:
            shape = (1, self.context_lens[decode[0]])
            if len(decode) != len(self.seq_lens_q):
                rows = torch.tensor([self.starts[decode[0]]], device=device)                # (1,)
        elif decode:
            lens = [self.context_lens[i] for i in decode]
            padded = self._context_slots(decode, block_size, pad_slot, device)              # (Bd, L)
            shape = tuple(padded.shape)
            slots = padded.flatten()                                                        # (Bd * L,)
            if min(lens) != max(lens):                  # padding is exactly where pad_slot was put
                mask = (padded != pad_slot)[:, None, None, :]                               # (Bd, 1, 1, L)
            if len(decode) != len(self.seq_lens_q):
                rows = torch.tensor([self.starts[i] for i in decode], device=device)        # (Bd,)
        prefill = [(self.starts[i], self.starts[i + 1], self._context_slots([i], block_size, pad_slot, device)[0])
                   for i, lq in enumerate(self.seq_lens_q) if lq > 1]
        slot_mapping = self.slot_mapping.to(device)
        plan = CachePlan(slot_mapping, rows, slots, shape, mask, prefill, start, self._write_run(slot_mapping))
        self._derived[key] = plan
        return plan


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


class ReferenceBackend:
    """SDPA over the context gathered through the block tables (see the module docstring)."""
    name = "reference"

    def forward(self, q, k, v, *, scale: float, metadata: AttentionMetadata, k_cache: torch.Tensor,
                v_cache: torch.Tensor) -> torch.Tensor:
        plan = metadata.plan(k_cache.shape[1], k_cache.device, pad_slot=(k_cache.shape[0] - 1) * k_cache.shape[1])
        flat_k = k_cache.view(-1, *k_cache.shape[2:])  # (num_blocks*block_size, nKV, D)
        flat_v = v_cache.view(-1, *v_cache.shape[2:])
        if plan.write_start is not None:        # the same slots as slot_mapping, by a slice (copy_ casts)
            flat_k.narrow(0, plan.write_start, k.shape[0]).copy_(k)
            flat_v.narrow(0, plan.write_start, v.shape[0]).copy_(v)
        else:
            flat_k.index_copy_(0, plan.slot_mapping, k if k.dtype == k_cache.dtype else k.to(k_cache.dtype))
            flat_v.index_copy_(0, plan.slot_mapping, v if v.dtype == v_cache.dtype else v.to(v_cache.dtype))

        decode_out = None
        if plan.decode_start is not None or plan.decode_slots is not None:
            b, length = plan.decode_shape
            if plan.decode_start is not None:   # one run of slots: a view, the same values as the gather
                kb = flat_k.narrow(0, plan.decode_start, length).unsqueeze(0)             # (1, L, nKV, D)
                vb = flat_v.narrow(0, plan.decode_start, length).unsqueeze(0)
            else:
                kb = flat_k.index_select(0, plan.decode_slots).view(b, length, *k.shape[1:])  # (Bd, L, nKV, D)
                vb = flat_v.index_select(0, plan.decode_slots).view(b, length, *v.shape[1:])
            qb = q if plan.decode_rows is None else q.index_select(0, plan.decode_rows)   # (Bd, nH, D)
            decode_out = decode_attention(qb, kb, vb, scale=scale, mask=plan.decode_mask)  # (Bd, nH, D)
            if plan.decode_rows is None:
                return decode_out
        out = torch.empty_like(q)
        if decode_out is not None:
            out.index_copy_(0, plan.decode_rows, decode_out)
        for a, b, slots in plan.prefill:
            out[a:b] = _causal_one(q[a:b], flat_k.index_select(0, slots).to(q.dtype),
                                   flat_v.index_select(0, slots).to(q.dtype), scale)
        return out


REFERENCE = ReferenceBackend()


def attention_backend(name: str, device: torch.device):
    """The backend for EngineConfig.attention_backend `name` on `device`: auto -> paged on a CUDA GPU of
    compute capability >= 8.0 (the kernels' 16-bit dots) when Triton imports, else the reference. "paged"
    where it cannot run is a ValueError saying why."""
    device = torch.device(device)
    if name == "reference" or (name == "auto" and device.type != "cuda"):
        return REFERENCE
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0):
        if name == "auto":
            return REFERENCE
        raise ValueError(f"attention_backend='paged' needs compute capability >= 8.0; {device} has "
                         f"{torch.cuda.get_device_capability(device)} (use 'reference' or 'auto')")
    try:
        from qvl.layers.attention_paged import PagedAttentionBackend
    except ImportError as e:
        if name == "auto":
            return REFERENCE
        raise ValueError(f"attention_backend='paged' needs Triton ({e}); pip install triton") from None
    if device.type != "cuda":
        raise ValueError(f"attention_backend='paged' runs on CUDA; this engine is on {device} "
                         "(use 'reference' or 'auto')")
    return PagedAttentionBackend()


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    metadata: AttentionMetadata | None = None,
    k_cache: torch.Tensor | None = None,
    v_cache: torch.Tensor | None = None,
    backend=None,
) -> torch.Tensor:
    """Causal attention of q (N, nH, D) over k, v (N, nKV, D) (+ cached context). Returns (N, nH, D)."""
    if metadata is None:
        return _causal_one(q, k, v, scale)
    n = q.shape[0]
    if metadata.num_tokens != n:
        raise ValueError(f"attention metadata covers {metadata.num_tokens} tokens but the batch has {n}")
    starts = metadata.starts

    if k_cache is None:
        for i, (lq, lc) in enumerate(zip(metadata.seq_lens_q, metadata.context_lens)):
            if lq != lc:
                raise ValueError(f"sequence {i} has context_lens={lc} > seq_lens_q={lq}: cached context needs "
                                 f"k_cache/v_cache set on the attention module")
        if len(starts) == 2:
            return _causal_one(q, k, v, scale)
        return torch.cat([_causal_one(q[a:b], k[a:b], v[a:b], scale) for a, b in zip(starts, starts[1:])])
    return (backend or REFERENCE).forward(q, k, v, scale=scale, metadata=metadata, k_cache=k_cache,
                                          v_cache=v_cache)
