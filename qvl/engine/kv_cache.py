"""KVCache: the paged key/value tensors of every decoder layer, their reserved padding block, and their size.

Owns, per decoder attention module (in layer order), `k` and `v` of shape
(num_blocks + 1, block_size, nKV, D), where nKV and D are read from the module (`num_kv_heads`, `head_dim`:
a tensor-parallel shard holds only its own KV heads). The block manager hands out blocks 0..num_blocks-1;
the last block is the zeroed padding block: the slot that padded rows (shorter decode contexts in the
reference backend, the padded rows of a CUDA-graph batch) read and write, so no unwritten slot, which may
hold NaN from recycled memory, is ever read. The rest stays uninitialised (untouched pages cost no RAM).

`attach(model, backend)` sets `k_cache` / `v_cache` / `attn_backend` on the model's attention modules (the
layers compute; the cache is the runner's). Sizing: `plan_num_blocks` turns `kv_cache_memory` (bytes, a
fraction of free device memory after the weights, or None for AUTO_KV_CACHE_FRACTION of it) into a block
count, never more than max_num_seqs sequences of max_model_len tokens can use.

Knows nothing about sequences or scheduling.
"""
from __future__ import annotations

import os

import torch

from qvl.config import AUTO_KV_CACHE_FRACTION


def available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def kv_bytes_per_block(attention_modules, block_size: int, dtype: torch.dtype) -> int:
    """Bytes of one block across every layer: 2 (K, V) x block_size x nKV x D x element size, summed."""
    elem = torch.empty((), dtype=dtype).element_size()
    return sum(2 * block_size * a.num_kv_heads * a.head_dim * elem for a in attention_modules)


def plan_num_blocks(attention_modules, *, block_size: int, dtype: torch.dtype, device: torch.device,
                    kv_cache_memory: int | float | None, max_num_seqs: int, max_model_len: int) -> int:
    per_block = kv_bytes_per_block(attention_modules, block_size, dtype)
    if isinstance(kv_cache_memory, bool):
        raise ValueError(f"kv_cache_memory must be bytes (int) or a fraction (float), got {kv_cache_memory}")
    if isinstance(kv_cache_memory, int):
        budget = kv_cache_memory
    else:
        frac = kv_cache_memory if kv_cache_memory is not None else (
            AUTO_KV_CACHE_FRACTION["cuda" if device.type == "cuda" else "cpu"])
        if not 0 < frac <= 1:
            raise ValueError(f"kv_cache_memory as a fraction must be in (0, 1], got {frac}")
        budget = int(available_memory(device) * frac)
    num_blocks = budget // per_block
    useful = max_num_seqs * -(-max_model_len // block_size) + 1
    if kv_cache_memory is None:
        num_blocks = min(num_blocks, useful)
    if num_blocks < 1:
        raise ValueError(f"kv_cache_memory={kv_cache_memory} leaves {budget} bytes, less than one KV "
                         f"block ({per_block} bytes for {block_size} tokens x "
                         f"{len(attention_modules)} layers)")
    return num_blocks


class KVCache:
    def __init__(self, attention_modules, *, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.pad_block = num_blocks                       # the reserved last block
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        for a in attention_modules:
            shape = (num_blocks + 1, block_size, a.num_kv_heads, a.head_dim)
            k, v = (torch.empty(shape, dtype=dtype, device=device) for _ in range(2))
            k[-1].zero_()
            v[-1].zero_()
            self.k.append(k)
            self.v.append(v)

    @property
    def pad_slot(self) -> int:
        """The padding block's first slot (flat index)."""
        return self.pad_block * self.block_size

    def attach(self, attention_modules, backend=None) -> None:
        """Give every attention module its layer's caches and the attention backend (None = reference)."""
        for a, k, v in zip(attention_modules, self.k, self.v, strict=True):
            a.k_cache, a.v_cache, a.attn_backend = k, v, backend

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)
