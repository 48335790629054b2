"""The runner's StepBatch of a mixed step (one decode, one chunked image prefill), checked field by field,
and the KVCache / attention-backend contracts around it."""
from __future__ import annotations

import pytest
import torch

from qvl.sampling_params import SamplingParams
from tiny import IMG, chat, image, tiny_engine


@pytest.fixture(scope="module")
def eng(tiny_ckpt):
    return tiny_engine(tiny_ckpt, block_size=4, max_num_batched_tokens=24, enable_prefix_caching=False)


def test_mixed_step_batch_field_by_field(eng):
    from qvl.multimodal.prompt import ProcessedPrompt

    params = SamplingParams(temperature=0, max_tokens=8, min_tokens=8)
    eng.add_request("text", ProcessedPrompt.from_token_ids(list(range(20, 29))), params)   # 9 tokens
    eng.step()                                                    # its whole prefill; samples token 10
    pic = eng.processor.process_prompt(chat(IMG + "What is it?"), {"image": [image(3)]})
    eng.add_request("pic", pic, params)
    out = eng.scheduler.schedule()
    text, img = out.seqs
    assert [out.num_scheduled_tokens[s.seq_id] for s in out.seqs] == [1, 23]      # budget 24: a chunk
    batch = eng.runner.prepare(out)

    # input_ids: the text's newest token, then the image prompt's first 23 tokens
    assert batch.input_ids.tolist() == [text.token_ids[9]] + pic.token_ids[:23]
    # positions: decode at index + rope_delta on all streams; the prompt's precomputed M-RoPE rows
    assert batch.positions.shape == (3, 24)
    assert batch.positions[:, 0].tolist() == [9 + text.rope_delta] * 3
    assert torch.equal(batch.positions[:, 1:], torch.as_tensor(pic.positions)[:, :23])
    # slots through each block table (block_size 4)
    bs, (t_table, i_table) = 4, (text.block_table, img.block_table)
    want_slots = [t_table[9 // bs] * bs + 9 % bs] + [i_table[i // bs] * bs + i % bs for i in range(23)]
    md = batch.attn
    assert md.slot_mapping.tolist() == want_slots and md.slot_mapping.dtype == torch.int64
    assert md.seq_lens_q == [1, 23] and md.context_lens == [10, 23]
    assert md.query_start_loc.tolist() == [0, 1, 24] and md.query_start_loc.dtype == torch.int32
    assert md.seq_lens.tolist() == [10, 23] and md.seq_lens.dtype == torch.int32
    assert md.max_query_len == 23 and md.max_seq_len == 23
    width = max(len(t_table), len(i_table))
    assert md.block_tables.shape == (2, width) and md.block_tables.dtype == torch.int32
    assert md.block_tables[0, :len(t_table)].tolist() == t_table
    assert md.block_tables[1, :len(i_table)].tolist() == i_table
    assert eng.runner.kv_cache.pad_block not in t_table + i_table
    # vision: the image's pad rows, and the feature rows of this chunk
    pads = [i for i, t in enumerate(pic.token_ids[:23]) if t == eng.config.image_token_id]
    assert batch.vision_mask.tolist() == [False] + [i in pads for i in range(23)]
    (seq, item, a, b), = batch.media
    assert seq is img and (a, b) == (0, len(pads)) and item.num_tokens == pic.token_ids.count(eng.config.image_token_id)
    # only the decode row samples (the image prompt's chunk does not reach its end)
    assert batch.sample_rows.tolist() == [0] and batch.sample_seqs == [text]
    assert not batch.is_decode

    res = eng.runner.run(batch)
    assert res.seq_ids == [text.seq_id] and len(res.token_ids) == 1
    eng.scheduler.postprocess(out)
    eng._update(out, res.by_seq())
    while eng.has_unfinished_requests():
        eng.step()


def test_decode_only_step_is_a_graph_shape(eng):
    from qvl.multimodal.prompt import ProcessedPrompt

    params = SamplingParams(temperature=0, max_tokens=3, min_tokens=3)
    for r in ("a", "b"):
        eng.add_request(r, ProcessedPrompt.from_token_ids([5, 6, 7]), params)
    eng.step()
    out = eng.scheduler.schedule()
    batch = eng.runner.prepare(out)
    assert batch.is_decode and batch.vision_mask is None and batch.media == []
    assert batch.attn.query_start_loc.tolist() == [0, 1, 2] and batch.sample_rows.tolist() == [0, 1]
    eng.scheduler.postprocess(out)
    eng._update(out, eng.runner.run(batch).by_seq())
    while eng.has_unfinished_requests():
        eng.step()


def test_kv_cache_shapes_padding_block_and_attach(eng):
    kv = eng.runner.kv_cache
    mods = eng.model.attention_modules()
    assert len(kv.k) == len(mods) == eng.config.num_hidden_layers
    c = eng.config
    assert kv.k[0].shape == (kv.num_blocks + 1, 4, c.num_key_value_heads, c.head_dim)
    assert not kv.k[0][kv.pad_block].any() and kv.pad_slot == kv.num_blocks * 4
    assert all(m.k_cache is k and m.v_cache is v for m, k, v in zip(mods, kv.k, kv.v))
    assert kv.nbytes() == 2 * sum(t.numel() * 4 for t in kv.k)


def test_attention_backend_choice():
    from qvl.layers.attention import REFERENCE, attention_backend

    assert attention_backend("auto", torch.device("cpu")) is REFERENCE
    assert attention_backend("reference", torch.device("cpu")) is REFERENCE
    with pytest.raises(ValueError, match="runs on CUDA|needs Triton"):
        attention_backend("paged", torch.device("cpu"))


def test_short_block_table_is_refused():
    from qvl.layers.attention import AttentionMetadata, attention

    q = torch.randn(1, 2, 8)
    cache = torch.zeros(5, 4, 2, 8)
    md = AttentionMetadata([1], [9], slot_mapping=torch.tensor([8]), block_tables=[[0, 1]])
    with pytest.raises(ValueError, match="block table has 2 blocks, context of 9 tokens needs 3"):
        attention(q, q, q, scale=1.0, metadata=md, k_cache=cache, v_cache=cache.clone())
