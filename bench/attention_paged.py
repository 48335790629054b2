"""Decode attention benchmark: the paged Triton kernel (qvl.layers.attention_paged) vs the reference path
(gather every context through its block table into a padded batch, then SDPA: what qvl.layers.attention
does for decode rows).

    python bench/attention_paged.py                      # Qwen2-VL-7B heads (28 q / 4 kv, head_dim 128), bf16
    python bench/attention_paged.py --heads 12 --kv-heads 2 --block-size 16 --iters 50

For batch 1 / 32 / 128 at context 1k and 4k (every sequence that long, randomly placed blocks) it prints
the context splits the decode kernel chose, the median time of one layer's attention for each path (CUDA
events, after a warm-up), the ratio, and max |paged - reference| as a sanity check. The reference's slot indices are built once outside the timing
(the reference backend builds them once per step for all layers), so it is timed on its gather + SDPA only.
On a machine without CUDA it prints "needs CUDA" and exits 0. Not a test: nothing here is asserted.
"""
from __future__ import annotations

import argparse
import statistics
import sys

import torch


def cuda_ms(fn, iters: int) -> float:
    """Median milliseconds of fn() over iters runs, after 3 warm-up runs."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def case(batch: int, context: int, args, dtype) -> tuple[float, float, float, int]:
    from qvl.layers.attention_paged import _num_splits, paged_attention
    from qvl.layers.decode_attention import decode_attention

    dev, bs = torch.device("cuda"), args.block_size
    need = -(-context // bs)
    num_blocks = batch * need + 1
    gen = torch.Generator(device=dev).manual_seed(0)
    k_cache = torch.randn(num_blocks, bs, args.kv_heads, args.head_dim, device=dev, dtype=dtype, generator=gen)
    v_cache = torch.randn_like(k_cache)
    tables = torch.randperm(batch * need, device=dev, generator=gen).view(batch, need).int()  # (B, W)
    q = torch.randn(batch, args.heads, args.head_dim, device=dev, dtype=dtype, generator=gen)
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device=dev)
    qsl = torch.arange(batch + 1, dtype=torch.int32, device=dev)
    scale = args.head_dim ** -0.5

    def paged():
        return paged_attention(q, k_cache, v_cache, block_tables=tables, query_start_loc=qsl, seq_lens=seq_lens,
                               max_query_len=1, scale=scale)

    pos = torch.arange(context, device=dev)
    slots = (tables[:, pos // bs].long() * bs + pos % bs).flatten()                     # (B * L,)
    flat_k, flat_v = k_cache.flatten(0, 1), v_cache.flatten(0, 1)                     # (blocks*bs, nKV, D)

    def reference():
        kb = flat_k.index_select(0, slots).view(batch, context, args.kv_heads, args.head_dim)  # (B, L, nKV, D)
        vb = flat_v.index_select(0, slots).view(batch, context, args.kv_heads, args.head_dim)
        return decode_attention(q, kb, vb, scale=scale)                               # (B, nH, D)

    diff = (paged().float() - reference().float()).abs().max().item()
    splits = _num_splits(dev, batch * args.kv_heads, need * bs, 1)
    return cuda_ms(paged, args.iters), cuda_ms(reference, args.iters), diff, splits


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--heads", type=int, default=28)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32, 128])
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096])
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("needs CUDA")
        sys.exit(0)
    torch.set_num_threads(1)
    dtype = getattr(torch, args.dtype)
    print(f"heads {args.heads}/{args.kv_heads} head_dim {args.head_dim} block_size {args.block_size} {args.dtype} "
          f"on {torch.cuda.get_device_name()}")
    print(f"{'batch':>6} {'context':>8} {'splits':>6} {'paged ms':>9} {'ref ms':>9} {'ref/paged':>9} {'max diff':>9}")
    for batch in args.batches:
        for context in args.contexts:
            paged_ms, ref_ms, diff, splits = case(batch, context, args, dtype)
            print(f"{batch:>6} {context:>8} {splits:>6} {paged_ms:>9.3f} {ref_ms:>9.3f} {ref_ms / paged_ms:>9.2f} "
                  f"{diff:>9.2e}")
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
