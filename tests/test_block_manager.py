"""BlockManager with fake sequences: ref counts, prefix hits, media-aware hashes, LRU eviction."""
import subprocess
import sys

import pytest

from qvl.engine.block_manager import BlockManager
from qvl.engine.sequence import MediaSpan, Sequence
from qvl.sampling_params import SamplingParams

BS = 4
PAD = 151655


def seq(tokens, media=()):
    return Sequence("r", list(tokens), SamplingParams(), media=list(media))


def run_prefill(bm, s):
    """Allocate the whole prompt (after prefix hits) and mark it computed, as the engine would."""
    cached = bm.find_cached(s)
    assert bm.allocate(s, len(s) - len(cached) * BS, cached)
    s.num_computed_tokens = len(s)
    bm.commit(s)
    return len(cached) * BS


def test_no_torch_import():
    code = ("import sys, qvl.engine.block_manager, qvl.engine.scheduler, qvl.engine.encoder_cache; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_allocate_free_refcounts():
    bm = BlockManager(8, BS)
    s = seq(range(10))
    assert bm.allocate(s, 10)
    assert len(s.block_table) == 3 and bm.num_free_blocks == 5
    s.num_computed_tokens = 10
    assert bm.allocate(s, 1) and len(s.block_table) == 3      # slot 10 still in block 2
    s.token_ids += [1, 2]
    s.num_computed_tokens = 12
    assert bm.allocate(s, 1) and len(s.block_table) == 4      # slot 12 opens block 3
    bm.free(s)
    assert bm.num_free_blocks == 8 and s.block_table == []
    assert all(b.ref_count == 0 for b in bm.blocks)


def test_allocate_is_all_or_nothing():
    bm = BlockManager(2, BS)
    s = seq(range(12))
    assert not bm.allocate(s, 12)
    assert s.block_table == [] and bm.num_free_blocks == 2


def test_prefix_hit_shares_blocks_and_leaves_one_token():
    bm = BlockManager(16, BS)
    a = seq(range(12))
    assert run_prefill(bm, a) == 0
    b = seq(range(12))
    # 12 tokens = 3 full blocks, but one token must be computed for logits: 2 blocks hit.
    assert run_prefill(bm, b) == 8
    assert b.block_table[:2] == a.block_table[:2]
    assert bm.blocks[a.block_table[0]].ref_count == 2
    assert bm.prefix_cache_queries == 24 and bm.prefix_cache_hits == 8
    c = seq(list(range(8)) + [99, 98, 97, 96, 95])
    assert run_prefill(bm, c) == 8
    d = seq([5] + list(range(1, 13)))
    assert run_prefill(bm, d) == 0                             # first block differs: chain broken


def test_different_images_never_share_a_block():
    bm = BlockManager(32, BS)
    prompt = [1, 2, 3, 4, 5, 6] + [PAD] * 8 + [7, 8, 9, 10, 11]
    img = lambda h: [MediaSpan(0, offset=6, num_tokens=8, content_hash=h)]   # noqa: E731
    a = seq(prompt, img("cat"))
    run_prefill(bm, a)
    b = seq(prompt, img("dog"))
    hit = run_prefill(bm, b)
    assert hit == 4                                  # only block 0 is text before the image
    assert set(a.block_table[1:]).isdisjoint(b.block_table[1:])
    c = seq(prompt, img("cat"))
    assert run_prefill(bm, c) == 16                  # same image: every full block but the last token's


def test_commit_only_computed_blocks():
    bm = BlockManager(16, BS)
    a = seq(range(12))
    assert bm.allocate(a, 6)
    a.num_computed_tokens = 6
    bm.commit(a)
    assert len(bm._by_hash) == 1                     # block 1 half computed: not published
    b = seq(range(12))
    assert bm.find_cached(b) == a.block_table[:1]


def test_lru_eviction_prefers_uncached_then_oldest():
    bm = BlockManager(6, BS)
    a, b = seq(range(0, 9)), seq(range(100, 109))
    run_prefill(bm, a)
    run_prefill(bm, b)                               # 3 + 3 blocks, 2 + 2 hashed
    bm.free(a)
    bm.free(b)
    assert bm.num_free_blocks == 6
    c = seq(range(200, 209))
    run_prefill(bm, c)                               # takes the 2 unhashed, then evicts a's tail
    assert len(bm.find_cached(seq(range(0, 9)))) == 1   # a's tail block (freed first) evicted
    assert len(bm.find_cached(seq(range(100, 109)))) == 2   # b (freed later) survives


def test_lru_eviction_evicts_tail_first():
    bm = BlockManager(5, BS)
    a = seq(range(0, 13))                            # 4 blocks, 3 hashed
    run_prefill(bm, a)
    bm.free(a)
    b = seq(range(100, 109))                         # needs 3: 2 unhashed, then a's last hashed
    run_prefill(bm, b)
    assert len(bm.find_cached(seq(range(0, 13)))) == 2


def test_revived_cached_blocks_count_against_free():
    bm = BlockManager(4, BS)
    a = seq(range(9))
    run_prefill(bm, a)
    bm.free(a)                                       # 3 blocks free (2 hashed) + 1 never used
    b = seq(list(range(8)) + list(range(50, 62)))    # hits 2, needs 3 more -> 5 > 4
    cached = bm.find_cached(b)
    assert len(cached) == 2
    assert not bm.can_allocate(b, len(b) - 8, cached)
    assert bm.can_allocate(b, 8, cached)


def test_prefix_caching_disabled():
    bm = BlockManager(16, BS, enable_prefix_caching=False)
    a, b = seq(range(12)), seq(range(12))
    run_prefill(bm, a)
    assert run_prefill(bm, b) == 0
    assert bm.prefix_cache_hits == 0


def test_bad_sizes():
    with pytest.raises(ValueError, match="num_blocks"):
        BlockManager(0, 16)
