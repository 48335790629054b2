"""Scheduler driven with fake model outputs: budgets, chunked prefill, preemption, refusal."""
import pytest

from qvl.engine.block_manager import BlockManager
from qvl.engine.scheduler import Scheduler
from qvl.engine.sequence import MediaSpan, Sequence, SequenceStatus
from qvl.sampling_params import SamplingParams

BS = 4


def make(num_blocks=64, **kw):
    bm = BlockManager(num_blocks, BS)
    kw.setdefault("max_model_len", 1024)
    return bm, Scheduler(bm, **kw)


def seq(n, max_tokens=4, rid="r", first=1, **kw):
    return Sequence(rid, list(range(first, first + n)), SamplingParams(max_tokens=max_tokens), **kw)


def step(sched):
    """One engine step with a fake model: every sequence whose tokens are all computed samples 7."""
    out = sched.schedule()
    sched.postprocess(out)
    for s in out.seqs:
        if s.num_computed_tokens == len(s):
            s.append_token(7)
            if s.num_output_tokens >= s.params.max_tokens:
                sched.finish(s, "length")
    return out


def run_all(sched, limit=1000):
    outs = []
    while sched.has_unfinished():
        outs.append(step(sched))
        assert len(outs) < limit, "scheduler loops"
    return outs


def test_decision_is_data_and_respects_budget():
    bm, sched = make(max_num_batched_tokens=10, max_num_seqs=8)
    a, b = seq(6), seq(6)
    sched.add(a)
    sched.add(b)
    out = sched.schedule()
    assert out.num_scheduled_tokens == {a.seq_id: 6, b.seq_id: 4}     # b's prompt chunked
    assert [s.seq_id for s in out.seqs] == [a.seq_id, b.seq_id]
    assert out.total_tokens == 10
    assert len(a.block_table) == 2 and len(b.block_table) == 1


def test_chunked_prefill_mixed_with_decode():
    bm, sched = make(max_num_batched_tokens=8)
    a = seq(4, max_tokens=10)
    sched.add(a)
    step(sched)                                     # a prefilled, now decoding
    b = seq(20, first=100)
    sched.add(b)
    out = step(sched)
    assert out.num_scheduled_tokens == {a.seq_id: 1, b.seq_id: 7}
    out = step(sched)
    assert out.num_scheduled_tokens == {a.seq_id: 1, b.seq_id: 7}
    out = step(sched)
    assert out.num_scheduled_tokens == {a.seq_id: 1, b.seq_id: 6}   # b's last chunk: samples
    assert b.num_output_tokens == 1


def test_max_num_seqs():
    bm, sched = make(max_num_seqs=2)
    seqs = [seq(3) for _ in range(3)]
    for s in seqs:
        sched.add(s)
    out = sched.schedule()
    assert len(out.seqs) == 2 and sched.num_waiting == 1


def test_everything_finishes_and_frees_blocks():
    bm, sched = make(num_blocks=64, max_num_batched_tokens=16, max_num_seqs=4)
    seqs = [seq(3 + 5 * i, max_tokens=3 + i) for i in range(6)]
    for s in seqs:
        sched.add(s)
    run_all(sched)
    assert all(s.is_finished and s.num_output_tokens == s.params.max_tokens for s in seqs)
    assert bm.num_free_blocks == 64


def test_preemption_newest_first_and_all_finish():
    bm, sched = make(num_blocks=6, max_num_batched_tokens=64)
    a, b, c = seq(7, max_tokens=8), seq(7, max_tokens=8), seq(7, max_tokens=8)
    for s in (a, b, c):
        sched.add(s)
    outs = run_all(sched)
    preempted = [p for o in outs for p in o.preempted]
    assert preempted and sched.num_preemptions == len(preempted)
    assert a not in preempted                      # the oldest is never the victim
    assert preempted[0] is c                       # newest goes first
    assert all(s.is_finished and s.num_output_tokens == 8 for s in (a, b, c))
    assert a.metrics.finish_time <= b.metrics.finish_time <= c.metrics.finish_time
    assert bm.num_free_blocks == 6


def test_preempted_recompute_keeps_output_tokens():
    bm, sched = make(num_blocks=5, max_num_batched_tokens=64)
    a, b = seq(8, max_tokens=8), seq(8, max_tokens=8)
    sched.add(a)
    sched.add(b)
    while not b.num_preemptions:
        step(sched)
    assert b.status is SequenceStatus.WAITING and b.block_table == [] and b.num_computed_tokens == 0
    n_out = b.num_output_tokens
    run_all(sched)
    assert b.num_output_tokens == 8 and b.token_ids[:8 + n_out] == list(range(1, 9)) + [7] * n_out


def test_refusals():
    bm, sched = make(num_blocks=4, max_model_len=100)
    with pytest.raises(ValueError, match="max_model_len=100"):
        sched.add(seq(101))
    with pytest.raises(ValueError, match="pool has 4"):
        sched.add(seq(17))
    s = seq(16, max_tokens=50)                      # fits now, can never grow past 16 tokens
    sched.add(s)
    run_all(sched, limit=50)
    assert s.finish_reason == "length" and s.stop_reason == "kv_cache_full"
    assert bm.num_free_blocks == 4


def test_prefix_hit_on_schedule():
    bm, sched = make()
    a = seq(13)
    sched.add(a)
    run_all(sched)
    b = seq(13)
    sched.add(b)
    out = sched.schedule()
    assert b.num_cached_tokens == 12 and out.num_scheduled_tokens[b.seq_id] == 1


def test_siblings_wait_for_first_prefill_then_share():
    bm, sched = make(max_num_batched_tokens=64)
    p = seq(10)
    kids = [seq(10, parent=p, index=i) for i in (1, 2)]
    for s in [p, *kids]:
        sched.add(s)
    out = step(sched)
    assert [s.seq_id for s in out.seqs] == [p.seq_id]
    out = step(sched)
    assert {s.seq_id for s in out.seqs} == {p.seq_id, *(k.seq_id for k in kids)}
    assert all(k.block_table[:2] == p.block_table[:2] and k.num_cached_tokens == 8 for k in kids)


def test_chunk_may_end_inside_a_vision_item():
    # The documented rule: chunks ignore item boundaries (the runner computes items whole).
    bm, sched = make(max_num_batched_tokens=5)
    media = [MediaSpan(0, offset=2, num_tokens=8, content_hash="x")]
    s = Sequence("r", [1, 2] + [9] * 8 + [3], SamplingParams(max_tokens=1), media=media)
    sched.add(s)
    assert step(sched).num_scheduled_tokens == {s.seq_id: 5}
    assert step(sched).num_scheduled_tokens == {s.seq_id: 5}
    assert step(sched).num_scheduled_tokens == {s.seq_id: 1}
    assert s.is_finished


def test_abort_waiting_and_running():
    bm, sched = make(num_blocks=16)
    a, b = seq(9), seq(9)
    sched.add(a)
    step(sched)
    sched.add(b)
    sched.finish(a, "abort")
    sched.finish(b, "abort")
    assert not sched.has_unfinished() and bm.num_free_blocks == 16
    assert a.finish_reason == "abort"
