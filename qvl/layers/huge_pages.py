"""CPU weight tensors on transparent huge pages (2 MiB), for the kernels that stream them every token.

Why: a decode step streams every weight once, 1.2-3.1 GB for the 2B, and on 4 KiB pages each 4 KiB is a
TLB miss. qvl's int4 kernel on 40 copies of an 8960 x 1536 weight read 26.9-27.7 GB/s on 4 KiB pages and
31.7-32.2 GB/s on huge pages (same process layout, 2-core EPYC VM whose kernel has THP set to `madvise`).

  on_huge_pages(t) -> a contiguous copy of t in fresh anonymous memory advised MADV_HUGEPAGE: from 2 MiB
                      a mapping of its own (its whole 2 MiB pages advised, the tail on small pages, so
                      nothing is over-allocated), from 64 KiB a slice of a shared 32 MiB chunk (the 2B's
                      o_proj and fused q/k/v in int4 are 1.2-1.6 MB, its scales under 1 MB); t itself
                      where that does not apply: under 64 KiB, not on the CPU, no MADV_HUGEPAGE on this
                      OS, or QVL_HUGE_PAGES=0 in the environment.
  empty_huge(shape, dtype) -> the same for a new, uninitialized tensor (e.g. torch.cat(..., out=)).
Where THP is `never` the advice does nothing and the tensors are ordinary; where it is `always` they
would have been huge anyway. The memory is released with the tensor (the mapping is its buffer).
"""
from __future__ import annotations

import ctypes
import math
import mmap
import os
import threading

import torch

HUGE = 2 << 20
SMALL = 64 << 10              # below this a tensor stays an ordinary torch.empty
ARENA = 32 << 20              # tensors under 2 MiB share huge-page chunks of this size (a bump allocator)
_lock = threading.Lock()
_arena: dict = {}             # "mm", "base", "used": the chunk being filled


def _map(nbytes: int) -> tuple[mmap.mmap, int]:
    """Fresh private anonymous memory with its whole 2 MiB pages advised; (mapping, offset of the first
    2 MiB boundary)."""
    mm = mmap.mmap(-1, nbytes + HUGE, flags=mmap.MAP_PRIVATE)           # private: shared anonymous memory is shmem
    off = (-ctypes.addressof(ctypes.c_char.from_buffer(mm))) % HUGE
    try:
        mm.madvise(mmap.MADV_HUGEPAGE, off, nbytes // HUGE * HUGE)
    except OSError:                                        # an OS / kernel without THP: small pages
        pass
    return mm, off


def _enabled(nbytes: int) -> bool:
    return nbytes >= SMALL and hasattr(mmap, "MADV_HUGEPAGE") and os.environ.get("QVL_HUGE_PAGES", "1") != "0"


def empty_huge(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    numel = math.prod(shape)
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    if not _enabled(nbytes):
        return torch.empty(shape, dtype=dtype)
    if nbytes >= HUGE:
        mm, off = _map(nbytes)
    else:                     # a slice of the current chunk (64-byte aligned); the chunk lives while any slice does
        with _lock:
            if not _arena or _arena["used"] + nbytes > ARENA:
                _arena["mm"], _arena["used"] = _map(ARENA)
            mm, off = _arena["mm"], _arena["used"]
            _arena["used"] = off + (nbytes + 63) // 64 * 64
    return torch.frombuffer(mm, dtype=dtype, count=numel, offset=off).view(shape)


def on_huge_pages(t: torch.Tensor) -> torch.Tensor:
    if t.device.type != "cpu" or not _enabled(t.numel() * t.element_size()):
        return t
    return empty_huge(tuple(t.shape), t.dtype).copy_(t)
