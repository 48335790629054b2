"""The CUDA attention backend: Triton kernels for attention over the paged KV cache and for the vision
tower's segment attention.

Contract:
  * `paged_attention(q, k_cache, v_cache, block_tables=, query_start_loc=, seq_lens=, max_query_len=, scale=)`:
    q (N, nH, D) holds the rotated queries of B sequences packed in batch order (sequence b's rows are
    query_start_loc[b]:query_start_loc[b+1]); the caches (num_blocks, block_size, nKV, D) already hold this
    step's K/V. Sequence b's lq queries are the last lq of its seq_lens[b] context positions, causal.
    GQA: kv head j serves query heads [j*g, (j+1)*g). Returns (N, nH, D) in q's dtype; scores, softmax and
    the P @ V accumulation are fp32 (fp32 inputs also multiply in full fp32: no TF32).
  * `varlen_attention(q, k, v, cu_seqlens=, max_seqlen=, scale=)`: q, k, v (S, nH, D) of F packed segments;
    every row attends to every row of its own segment (no mask) — the vision tower's frames and windows.
  * `PagedAttentionBackend` ("paged"): writes the step's K/V at `metadata.slot_mapping`, then
    `paged_attention`. No metadata or no cache is a ValueError: the caller routes those to the reference.

How the kernels work (one program = one tile of query rows of one sequence and one kv head):
  * the g query heads of a kv head are rows of the same tile (row r = query (r // BLOCK_H), head r % BLOCK_H),
    so one K/V tile load serves every query head that shares it; g is padded to a power of two with masks;
  * context positions are read one KV tile (BLOCK_N positions) at a time through the block table:
    slot = block_tables[b, pos // block_size] * block_size + pos % block_size, any power-of-two block size;
    offsets are int64 (a cache can exceed 2**31 elements);
  * only positions < seq_len are ever loaded (masked loads, other=0): a slot no sequence owns (recycled
    memory, possibly NaN) is never read, whatever the block table holds past a sequence's need;
  * online softmax in base 2 with a finite running-max floor, so a tile a row cannot see yet (causal) adds
    exactly 0 and never makes exp(-inf - -inf);
  * prefill / mixed steps (and varlen) launch N // BLOCK_Q + B query tiles, each finding its sequence by a
    binary search over query_start_loc: one long chunk among many decodes costs no B x max_query_len grid;
  * decode (max_query_len == 1) runs one tile per sequence (one query, all g heads), split over the context
    (split-K) when B * nKV programs alone would leave the GPU idle; a second kernel merges the partial sums.
No host synchronisation: every launch size comes from tensor shapes (and max_query_len == 1 or not).

Knows nothing about the model, the scheduler or how blocks are allocated. CUDA (compiled) or, with
TRITON_INTERPRET=1 set before triton is imported, CPU tensors through Triton's interpreter (the tests).
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

_NEG = tl.constexpr(-1.0e30)    # running-max floor: finite, below any real score (a constexpr: kernels read it)
_LOG2E = 1.4426950408889634
_MAX_HEAD_DIM = 256
_MAX_SPLITS = 16
_MIN_SPLIT_LEN = 128    # context positions per split below which splitting costs more than it gives


@triton.jit
def _dot(a, b, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b with an fp32 result: full fp32 for fp32 inputs (IEEE, no TF32); UPCAST for 16-bit inputs
    under the interpreter, whose tl.dot multiplies bf16 as its raw uint16 bits (triton 3.9): products of
    16-bit floats are exact in fp32, so this is the tensor-core result up to summation order."""
    if UPCAST:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif IEEE:
        out = tl.dot(a, b, input_precision="ieee")
    else:
        out = tl.dot(a, b)
    return out


@triton.jit
def _softmax_step(acc, m_i, l_i, s, v, visible, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """One KV tile of online softmax: s (M, N) base-2 scores, v (N, BLOCK_D), visible (M, N) bool."""
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))                   # >= _NEG: finite even for a fully hidden row
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])                         # hidden keys: exp2(-inf) = 0
    l_i = l_i * alpha + tl.sum(p, 1)
    return acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE, UPCAST), m_new, l_i


@triton.jit
def _tile_owner(starts_ptr, count, pid, BLOCK: tl.constexpr):
    """(run r, first row of tile pid within r) for `count` packed runs of rows (starts_ptr (count+1,)).
    Run r owns tiles [first(r), first(r+1)), first(r) = starts[r] // BLOCK + r: at least cdiv(len, BLOCK)
    of them (the +r is one spare per run), rows // BLOCK + count in all, whatever the mix of lengths.
    first() strictly increases, so r is the last run with first(r) <= pid: a binary search."""
    left = pid * 0
    right = pid * 0 + count
    while left < right:
        mid = (left + right) // 2
        ahead = tl.load(starts_ptr + mid) // BLOCK + mid <= pid
        left = tl.where(ahead, mid + 1, left)
        right = tl.where(ahead, right, mid)
    r = left - 1
    return r, (pid - tl.load(starts_ptr + r) // BLOCK - r) * BLOCK


@triton.jit
def _paged_kernel(q_ptr, k_ptr, v_ptr, o_ptr, bt_ptr, qsl_ptr, sl_ptr, po_ptr, pm_ptr, pl_ptr,
                  qk_scale, n_seqs, split_len, n_tokens, n_heads,
                  s_qn, s_qh, s_on, s_oh, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, s_bt,
                  G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                  BLOCK_Q: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_D: tl.constexpr, SPLIT: tl.constexpr, IEEE: tl.constexpr,
                  UPCAST: tl.constexpr):
    pid = tl.program_id(0)
    if BLOCK_Q == 1:
        b = pid
        q0 = pid * 0
    else:
        b, q0 = _tile_owner(qsl_ptr, n_seqs, pid, BLOCK_Q)  # q0: first query (of this sequence) in the tile
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    q_start = tl.load(qsl_ptr + b).to(tl.int64)
    lq = tl.load(qsl_ptr + b + 1).to(tl.int64) - q_start
    seq_len = tl.load(sl_ptr + b).to(tl.int64)

    r = tl.arange(0, BLOCK_Q * BLOCK_H)
    qi = q0 + r // BLOCK_H                                  # query index within the sequence
    head = kvh * G + r % BLOCK_H
    row_ok = (qi < lq) & (r % BLOCK_H < G)
    qpos = seq_len - lq + qi                                # absolute position: causal limit of the row
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    row = q_start + qi                                      # (M,) int64 token row in q / o
    q = tl.load(q_ptr + row[:, None] * s_qn + head[:, None] * s_qh + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    # keys this tile can see: up to its last query's position; none for a tile past the sequence's queries
    hi = tl.where(q0 < lq, seq_len - lq + tl.minimum(q0 + BLOCK_Q, lq), 0)
    lo = split.to(tl.int64) * split_len
    hi = tl.minimum(hi, lo + split_len)
    m_i = tl.full([BLOCK_Q * BLOCK_H], _NEG, tl.float32)
    l_i = tl.zeros([BLOCK_Q * BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_Q * BLOCK_H, BLOCK_D], tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)                    # (N,) int64 context positions
        p_ok = pos < hi
        blk = tl.load(bt_ptr + b * s_bt + pos // BLOCK_SIZE, mask=p_ok, other=0).to(tl.int64)
        off = pos % BLOCK_SIZE
        kt = tl.load(k_ptr + (blk * s_kb + off * s_kt + kvh * s_kh)[None, :] + d[:, None],
                     mask=p_ok[None, :] & d_ok[:, None], other=0.0)  # (BLOCK_D, N)
        s = _dot(q, kt, IEEE, UPCAST) * qk_scale
        v = tl.load(v_ptr + (blk * s_vb + off * s_vt + kvh * s_vh)[:, None] + d[None, :],
                    mask=p_ok[:, None] & d_ok[None, :], other=0.0)   # (N, BLOCK_D)
        visible = p_ok[None, :] & (pos[None, :] <= qpos[:, None])
        acc, m_i, l_i = _softmax_step(acc, m_i, l_i, s, v, visible, IEEE, UPCAST)

    if SPLIT:   # unnormalised partials, merged by _merge_kernel
        part = (split * n_tokens + row) * n_heads + head    # (M,) int64 index into (S, N, nH)
        tl.store(pm_ptr + part, m_i, mask=row_ok)
        tl.store(pl_ptr + part, l_i, mask=row_ok)
        tl.store(po_ptr + part[:, None] * HEAD_DIM + d[None, :], acc, mask=row_ok[:, None] & d_ok[None, :])
    else:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(o_ptr + row[:, None] * s_on + head[:, None] * s_oh + d[None, :],
                 out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _merge_kernel(o_ptr, po_ptr, pm_ptr, pl_ptr, n_splits, n_tokens, n_heads, s_on, s_oh,
                  HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """One program per (token, head): out = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s."""
    n = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    sp = tl.arange(0, BLOCK_S)
    s_ok = sp < n_splits
    part = (sp * n_tokens + n) * n_heads + h                # (BLOCK_S,) int64
    m = tl.load(pm_ptr + part, mask=s_ok, other=_NEG)
    w = tl.exp2(m - tl.max(m, 0))   # 0 for empty or absent splits: m = _NEG, l = 0, acc = 0
    total = tl.sum(w * tl.load(pl_ptr + part, mask=s_ok, other=0.0), 0)
    d = tl.arange(0, BLOCK_D)
    acc = tl.load(po_ptr + part[:, None] * HEAD_DIM + d[None, :],
                  mask=s_ok[:, None] & (d < HEAD_DIM)[None, :], other=0.0)   # (BLOCK_S, BLOCK_D)
    out = tl.sum(acc * w[:, None], 0) / total
    tl.store(o_ptr + n * s_on + h * s_oh + d, out.to(o_ptr.dtype.element_ty), mask=d < HEAD_DIM)


@triton.jit
def _varlen_kernel(q_ptr, k_ptr, v_ptr, o_ptr, cu_ptr, qk_scale, n_segs,
                   s_qn, s_qh, s_kn, s_kh, s_vn, s_vh, s_on, s_oh,
                   HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_D: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, ALIGN: tl.constexpr):
    """ALIGN: a power of two dividing every row offset (strides and data offsets, in elements); it lets
    the loads of a head_dim like 72 (head stride 72, no multiple of 16) vectorise all the same."""
    f, m0 = _tile_owner(cu_ptr, n_segs, tl.program_id(0), BLOCK_M)
    h = tl.program_id(1)
    start = tl.load(cu_ptr + f).to(tl.int64)
    length = tl.load(cu_ptr + f + 1).to(tl.int64) - start
    i = m0 + tl.arange(0, BLOCK_M)
    i_ok = i < length
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    q_row = tl.multiple_of((start + i) * s_qn + h * s_qh, ALIGN)       # (M,) int64
    q = tl.load(q_ptr + q_row[:, None] + d[None, :], mask=i_ok[:, None] & d_ok[None, :], other=0.0)
    m_i = tl.full([BLOCK_M], _NEG, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    hi = tl.where(m0 < length, length, 0)                   # a tile past the segment reads nothing
    for n0 in range(0, hi, BLOCK_N):
        j = n0 + tl.arange(0, BLOCK_N)
        j_ok = j < length
        k_row = tl.multiple_of((start + j) * s_kn + h * s_kh, ALIGN)   # (N,) int64
        kt = tl.load(k_ptr + k_row[None, :] + d[:, None], mask=j_ok[None, :] & d_ok[:, None], other=0.0)
        s = _dot(q, kt, IEEE, UPCAST) * qk_scale                     # (M, N)
        v_row = tl.multiple_of((start + j) * s_vn + h * s_vh, ALIGN)
        v = tl.load(v_ptr + v_row[:, None] + d[None, :], mask=j_ok[:, None] & d_ok[None, :], other=0.0)
        acc, m_i, l_i = _softmax_step(acc, m_i, l_i, s, v, j_ok[None, :] & i_ok[:, None], IEEE, UPCAST)
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_row = tl.multiple_of((start + i) * s_on + h * s_oh, ALIGN)
    tl.store(o_ptr + o_row[:, None] + d[None, :], out.to(o_ptr.dtype.element_ty),
             mask=i_ok[:, None] & d_ok[None, :])


# TRITON_INTERPRET=1 at import: the kernels run on CPU tensors through numpy (the tests)
_INTERPRETED = type(_paged_kernel).__name__ == "InterpretedFunction"
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _pow2(x: int) -> int:
    return 1 << max(0, x - 1).bit_length()


def _tiling(dtype: torch.dtype, decode: bool) -> tuple[int, int, int]:
    """(BLOCK_N, num_warps, num_stages): no register spills in sm_90 builds (tools/attention_paged_compile.py).
    fp32 dots run in full fp32 on the FMA units, operands in registers: fewer keys per tile, fewer stages."""
    if dtype == torch.float32:
        return (32, 8, 2) if decode else (16, 8, 1)
    return (64, 4, 3) if decode else (64, 8, 3)


def _alignment(*tensors: torch.Tensor) -> int:
    """The largest power of two <= 16 dividing every row stride and data offset (in elements) of tensors
    whose last dimension is contiguous."""
    align = 16
    for t in tensors:
        for value in (*t.stride()[:-1], t.data_ptr() // t.element_size()):
            align = math.gcd(align, value)
    return align


def _query_tile(g: int, decode: bool) -> tuple[int, int]:
    """(BLOCK_Q, BLOCK_H): queries x padded heads of a tile. Decode: one query, its g heads padded to the
    16 rows tl.dot needs; prefill: 64 rows (or one query of all its heads when g > 64)."""
    if decode:
        return 1, max(16, _pow2(g))
    return max(1, 64 // _pow2(g)), _pow2(g)


def _check_heads(name: str, t: torch.Tensor, dims: int, dtype: torch.dtype, device: torch.device) -> None:
    if t.dim() != dims:
        raise ValueError(f"{name} must have {dims} dimensions, got shape {tuple(t.shape)}")
    if t.dtype != dtype:
        raise ValueError(f"{name} has dtype {t.dtype}, expected {dtype} (the queries' dtype)")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, the queries on {device}")
    if t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last (head_dim) dimension, strides {t.stride()}")


def _check_index(name: str, t: torch.Tensor, shape: tuple, device: torch.device) -> None:
    if tuple(t.shape) != shape or t.dtype not in (torch.int32, torch.int64) or t.device != device:
        raise ValueError(f"{name} must be an int32/int64 tensor of shape {shape} on {device}, got {t.dtype} "
                         f"{tuple(t.shape)} on {t.device}")


def _check_q(q: torch.Tensor) -> tuple[int, int, int]:
    if q.dim() != 3:
        raise ValueError(f"q must have shape (N, nH, D), got {tuple(q.shape)}")
    if q.dtype not in _DTYPES:
        raise ValueError(f"q has dtype {q.dtype}; supported: {', '.join(str(d) for d in _DTYPES)}")
    n, nh, d = q.shape
    if not 1 <= d <= _MAX_HEAD_DIM:
        raise ValueError(f"head_dim {d} is outside [1, {_MAX_HEAD_DIM}]")
    _check_heads("q", q, 3, q.dtype, q.device)
    return n, nh, d


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    """SMs of a GPU; 8 for the interpreter (enough splits to exercise the merge, few enough to stay fast)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8


def _num_splits(device: torch.device, programs: int, max_context: int, max_query_len: int) -> int:
    """Splits of the context for decode: enough programs for about two per SM, at least _MIN_SPLIT_LEN
    positions each; prefill tiles are many already and never split."""
    if max_query_len != 1:
        return 1
    want = -(-2 * _sm_count(device) // max(programs, 1))
    return max(1, min(want, _MAX_SPLITS, -(-max_context // _MIN_SPLIT_LEN)))


def paged_attention(q, k_cache, v_cache, *, block_tables, query_start_loc, seq_lens,
                    max_query_len: int, scale: float) -> torch.Tensor:
    """q (N, nH, D) of B sequences over their paged contexts (see the module docstring). -> (N, nH, D).
    The caller promises what only reading the tensors back could check: query_start_loc rises from 0 to N,
    lq <= min(max_query_len, seq_lens[b]), block_tables[b] covers seq_lens[b] with valid block ids."""
    n, nh, d = _check_q(q)
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        _check_heads(name, cache, 4, q.dtype, q.device)
        if cache.shape[3] != d or nh % cache.shape[2]:
            raise ValueError(f"{name} has shape {tuple(cache.shape)}: needs head_dim {d} and a kv head count "
                             f"dividing the {nh} query heads")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache shape {tuple(v_cache.shape)} != k_cache shape {tuple(k_cache.shape)}")
    block_size = k_cache.shape[1]
    if block_size < 1 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two, got {block_size}")
    b = seq_lens.shape[0] if seq_lens.dim() == 1 else -1
    _check_index("seq_lens", seq_lens, (b,), q.device)
    _check_index("query_start_loc", query_start_loc, (b + 1,), q.device)
    _check_index("block_tables", block_tables, (b, block_tables.shape[-1] if block_tables.dim() == 2 else -1),
                 q.device)
    if n and not 1 <= max_query_len <= n:
        raise ValueError(f"max_query_len {max_query_len} must be in [1, N={n}]")
    if block_tables.stride(1) != 1:
        block_tables = block_tables.contiguous()
    out = torch.empty((n, nh, d), dtype=q.dtype, device=q.device)
    if n == 0 or b == 0:
        return out
    block_q, block_h = _query_tile(nh // k_cache.shape[2], decode=max_query_len == 1)
    splits = _num_splits(q.device, b * k_cache.shape[2], block_tables.shape[1] * block_size, max_query_len)
    return _launch_paged(q, k_cache, v_cache, out, block_tables, query_start_loc, seq_lens, scale,
                         block_q=block_q, block_h=block_h, splits=splits)


def _launch_paged(q, k_cache, v_cache, out, block_tables, query_start_loc, seq_lens, scale, *,
                  block_q: int, block_h: int, splits: int) -> torch.Tensor:
    """The kernel launches of paged_attention for given tilings (the tests force splits)."""
    n, nh, d = q.shape
    b, nkv = seq_lens.shape[0], k_cache.shape[2]
    tiles = b if block_q == 1 else n // block_q + b     # the tile map of _tile_owner
    block_n, warps, stages = _tiling(q.dtype, block_q == 1)
    if splits > 1:
        span = -(-block_tables.shape[1] * k_cache.shape[1] // splits)
        split_len = -(-span // block_n) * block_n
        po = torch.empty((splits, n, nh, d), dtype=torch.float32, device=q.device)
        pm = torch.empty((splits, n, nh), dtype=torch.float32, device=q.device)
        pl = torch.empty_like(pm)
    else:
        split_len = 2 ** 31 - 1     # one split covers any context
        po = pm = pl = out          # unused (SPLIT is a constexpr False)
    _paged_kernel[(tiles, nkv, splits)](
        q, k_cache, v_cache, out, block_tables, query_start_loc, seq_lens, po, pm, pl,
        scale * _LOG2E, b, split_len, n, nh,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        G=nh // nkv, HEAD_DIM=d, BLOCK_SIZE=k_cache.shape[1], BLOCK_Q=block_q, BLOCK_H=block_h,
        BLOCK_N=block_n, BLOCK_D=max(16, _pow2(d)), SPLIT=splits > 1, IEEE=q.dtype == torch.float32,
        UPCAST=_INTERPRETED and q.dtype != torch.float32, num_warps=warps, num_stages=stages)
    if splits > 1:
        _merge_kernel[(n, nh)](out, po, pm, pl, splits, n, nh, out.stride(0), out.stride(1),
                               HEAD_DIM=d, BLOCK_S=_pow2(splits), BLOCK_D=max(16, _pow2(d)), num_warps=4)
    return out


def varlen_attention(q, k, v, *, cu_seqlens, max_seqlen: int, scale: float) -> torch.Tensor:
    """q, k, v (S, nH, D) of F packed segments (cu_seqlens (F+1,) from 0 to S, the caller's promise), each
    row attending to its whole segment. -> (S, nH, D). max_seqlen is checked only: the launch needs none."""
    s, nh, d = _check_q(q)
    for name, t in (("k", k), ("v", v)):
        _check_heads(name, t, 3, q.dtype, q.device)
        if t.shape != q.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, q {tuple(q.shape)}: they must match")
    f = cu_seqlens.shape[0] - 1 if cu_seqlens.dim() == 1 and cu_seqlens.numel() else -2   # segments
    _check_index("cu_seqlens", cu_seqlens, (f + 1,), q.device)
    if s and not 1 <= max_seqlen <= s:
        raise ValueError(f"max_seqlen {max_seqlen} must be in [1, S={s}]")
    out = torch.empty((s, nh, d), dtype=q.dtype, device=q.device)
    if s == 0 or f == 0:
        return out
    block_m = 64
    block_n, warps, stages = _tiling(q.dtype, decode=False)
    _varlen_kernel[(s // block_m + f, nh)](            # the tile map of _tile_owner
        q, k, v, out, cu_seqlens, scale * _LOG2E, f,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1),
        HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=max(16, _pow2(d)),
        IEEE=q.dtype == torch.float32, UPCAST=_INTERPRETED and q.dtype != torch.float32,
        ALIGN=_alignment(q, k, v, out), num_warps=warps, num_stages=stages)
    return out


class PagedAttentionBackend:
    """Attention over the paged cache with the Triton kernels above (CUDA)."""

    name = "paged"

    def forward(self, q, k, v, *, scale: float, metadata, k_cache, v_cache) -> torch.Tensor:
        """Writes k, v (N, nKV, D) at metadata.slot_mapping, then paged_attention over the caches."""
        missing = [n for n, x in (("metadata", metadata), ("k_cache", k_cache), ("v_cache", v_cache)) if x is None]
        if missing:
            raise ValueError(f"the paged attention backend needs {' and '.join(missing)} (got None): attention "
                             f"without attention metadata and a KV cache goes to the reference backend")
        slots = metadata.slot_mapping
        if slots.shape != (k.shape[0],) or k.shape != v.shape:
            raise ValueError(f"slot_mapping has shape {tuple(slots.shape)}, k {tuple(k.shape)}, v "
                             f"{tuple(v.shape)}: need ({k.shape[0]},) slots for as many k and v rows")
        k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, k.to(k_cache.dtype))  # (blocks*bs, nKV, D)
        v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, v.to(v_cache.dtype))
        return paged_attention(q, k_cache, v_cache, block_tables=metadata.block_tables,
                               query_start_loc=metadata.query_start_loc, seq_lens=metadata.seq_lens,
                               max_query_len=metadata.max_query_len, scale=scale)
