"""Tensor parallelism on CUDA (skipped without a GPU): 2 ranks, the tiny checkpoint, tp=2 against tp=1.

NCCL needs one GPU per rank (it refuses two ranks on one device), so its case needs 2 GPUs; with one GPU
the same two ranks run over gloo with CUDA tensors, which still checks the CUDA side of the executor (rank
devices, the control group beside the data path, per-rank KV caches, the paged backend). Held to the
fast-kernel criterion (DESIGN.md invariant 2): greedy tokens equal until the first difference, where each
side's token is in the other's top-5 — the all-reduce may sum in another order than one GPU's matmul.
"""
from __future__ import annotations

import pytest
import torch
from tiny import IMG, chat, image

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _run(path, prompts, **kw):
    from qvl import LLM, SamplingParams
    from qvl.config import EngineConfig

    llm = LLM.from_config(EngineConfig(model=str(path), device="cuda", dtype="float32", max_model_len=1024,
                                       kv_cache_memory=64 << 20, **kw))
    try:
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=16, min_tokens=16, logprobs=5),
                            use_tqdm=False)
        return [(list(o.outputs[0].token_ids), o.outputs[0].logprobs) for o in outs]
    finally:
        llm.close()


@pytest.mark.parametrize("backend, gpus", [("nccl", 2), ("gloo", 1)])
def test_tp2_on_cuda_meets_the_criterion_against_tp1(tiny_ckpt, backend, gpus):
    if torch.cuda.device_count() < gpus:
        pytest.skip(f"{backend} with 2 ranks needs {gpus} GPU(s)")
    prompts = [{"prompt": chat(IMG + f"Describe {i}."), "multi_modal_data": {"image": [image(i)]}} for i in range(3)]
    prompts += [chat("Count to ten.")]
    one = _run(tiny_ckpt, prompts)
    two = _run(tiny_ckpt, prompts, tensor_parallel_size=2, distributed_backend=backend)
    for (a, la), (b, lb) in zip(one, two):
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                assert y in la[i] and x in lb[i], (i, x, y)
                break
