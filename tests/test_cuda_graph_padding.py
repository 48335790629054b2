"""CUDA-graph decode batches, checked on the CPU: the captured sizes, and a decode step padded into the static
inputs computes exactly what the unpadded step computes, writing nothing outside the padding block.
(The capture and replay themselves need a GPU: tests/test_cuda.py, run by bench/gpu.sh.)"""
from __future__ import annotations

import pytest
import torch

from qvl.engine.cuda_graphs import GraphInputs, graph_batch_sizes
from qvl.sampling_params import SamplingParams
from tiny import tiny_engine


def test_graph_batch_sizes():
    assert graph_batch_sizes(1) == [1]
    assert graph_batch_sizes(3) == [1, 2, 3]
    assert graph_batch_sizes(8) == [1, 2, 4, 8]
    assert graph_batch_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert graph_batch_sizes(256)[-3:] == [240, 248, 256] and len(graph_batch_sizes(256)) == 35


@torch.inference_mode()
@pytest.mark.parametrize("rows", [3, 8])
def test_padded_decode_step_equals_unpadded(tiny_ckpt, rows):
    from qvl.multimodal.prompt import ProcessedPrompt

    eng = tiny_engine(tiny_ckpt, block_size=4, enable_prefix_caching=False)
    params = SamplingParams(temperature=0, max_tokens=8, min_tokens=8)
    for r, n in (("a", 5), ("b", 9), ("c", 2)):            # contexts of different lengths
        eng.add_request(r, ProcessedPrompt.from_token_ids(list(range(30, 30 + n))), params)
    for _ in range(3):
        eng.step()
    out = eng.scheduler.schedule()
    runner, kv = eng.runner, eng.runner.kv_cache
    batch = runner.prepare(out)
    assert batch.is_decode and len(batch.seqs) == 3

    want = runner.model(batch.input_ids, batch.positions, batch.attn)                  # (3, H)
    caches = [t.clone() for t in kv.k + kv.v]
    x = GraphInputs(8, width=-(-1024 // 4), pad_block=kv.pad_block, block_size=4, device=torch.device("cpu"))
    x.input_ids.fill_(7)                                   # stale rows of an earlier, larger step
    assert x.fits(batch)
    b = x.fill(batch)
    md = x.metadata(rows, batch.attn.context_lens + [1] * (rows - b))
    got = runner.model(x.input_ids[:rows], x.positions[:, :rows], md)                   # (rows, H)
    assert torch.equal(got[:b], want) if rows == 3 else torch.allclose(got[:b], want, atol=1e-6)
    assert x.input_ids[b:].eq(0).all() and x.seq_lens[b:].eq(1).all()
    real = batch.attn.slot_mapping                        # rewritten by the real rows (GEMM rounding of M=8)
    for before, after in zip(caches, kv.k + kv.v):        # padding rows wrote only the padding block
        before, after = before.flatten(0, 1).nan_to_num(123.0), after.flatten(0, 1).nan_to_num(123.0)
        assert torch.allclose(before[real], after[real], atol=1e-5)
        keep = torch.ones(before.shape[0], dtype=torch.bool)
        keep[real], keep[kv.pad_slot:] = False, False
        assert torch.equal(before[keep], after[keep])
    eng.scheduler.postprocess(out)
    eng._update(out, runner.run(batch).by_seq())
    while eng.has_unfinished_requests():
        eng.step()


def test_prefill_and_media_steps_do_not_fit_a_graph(tiny_ckpt):
    from qvl.multimodal.prompt import ProcessedPrompt

    eng = tiny_engine(tiny_ckpt, block_size=4)
    eng.add_request("p", ProcessedPrompt.from_token_ids([1, 2, 3]), SamplingParams(max_tokens=2))
    out = eng.scheduler.schedule()
    batch = eng.runner.prepare(out)
    x = GraphInputs(4, width=8, pad_block=eng.runner.kv_cache.pad_block, block_size=4,
                    device=torch.device("cpu"))
    assert not batch.is_decode and not x.fits(batch)
    eng.scheduler.postprocess(out)
    eng._update(out, eng.runner.run(batch).by_seq())
    while eng.has_unfinished_requests():
        eng.step()
