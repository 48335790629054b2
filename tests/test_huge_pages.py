"""Packed CPU weights on transparent huge pages (qvl.layers.huge_pages): same values, 2 MiB-aligned (or
64-byte slices of shared chunks under 2 MiB), the whole 2 MiB pages inside advised (and, where the
kernel's THP mode allows it, faulted in as huge pages), tiny tensors and QVL_HUGE_PAGES=0 left as
ordinary tensors."""
from pathlib import Path

import pytest
import torch

from qvl.layers.huge_pages import HUGE, empty_huge, on_huge_pages


def _thp_mode() -> str | None:
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return None
    return text[text.index("[") + 1:text.index("]")]


def _huge_kb_at(addr: int) -> int | None:
    """AnonHugePages of the mapping holding addr, from /proc/self/smaps (None: not found)."""
    current = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(v, 16) for v in head.split("-"))
            current = lo <= addr < hi
        elif current and line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    return None


def test_copy_is_exact_aligned_and_small_tensors_stay():
    t = torch.randn(1536, 2048).bfloat16()                       # 6 MiB
    h = on_huge_pages(t)
    assert torch.equal(h, t) and h.is_contiguous() and h.data_ptr() != t.data_ptr()
    assert h.data_ptr() % HUGE == 0
    small = torch.randn(64, 64)                                   # 16 KiB
    assert on_huge_pages(small) is small
    mid = [on_huge_pages(torch.full((300, 1024), float(i))) for i in range(40)]    # 1.2 MB each: chunks of 32 MiB
    assert all(bool((m == i).all()) and m.data_ptr() % 64 == 0 for i, m in enumerate(mid))
    assert len({m.untyped_storage().data_ptr() for m in mid}) == 40 and len({m.data_ptr() // (32 << 20) for m in mid}) < 40
    views = h.view(-1)[: 1536 * 1024].view(1536, 1024)           # a view keeps the mapping alive
    del h
    assert torch.equal(views, t.view(-1)[: 1536 * 1024].view(1536, 1024))


def test_switch_off(monkeypatch):
    monkeypatch.setenv("QVL_HUGE_PAGES", "0")
    t = empty_huge((4 << 20,), torch.uint8)
    assert t.shape == (4 << 20,) and t.dtype == torch.uint8      # an ordinary torch.empty


@pytest.mark.skipif(_thp_mode() not in ("madvise", "always") or not Path("/proc/self/smaps").exists(),
                    reason="the kernel's transparent huge pages are off (or not Linux)")
def test_pages_are_huge():
    t = empty_huge((16 << 20,), torch.uint8)
    t.fill_(1)                                                    # fault the pages in
    kb = _huge_kb_at(t.data_ptr())
    assert kb is not None and kb >= 2048, kb                      # at least one 2 MiB page (THP may be short of them)
