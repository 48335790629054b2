"""What the engine refuses when a request is added: everything that would otherwise fail inside a step.

A step runs many requests in one batch, so a value that only breaks there (a token id past the vocabulary
indexing the logits, a top-logprobs count past the vocabulary, a prompt whose pads and features disagree)
would take its batch-mates down with it. These checks run in `LLMEngine.add_request`, before anything is
queued, against the facts of the loaded model; each raises ValueError naming the request, the field, the
limit and the value (the server turns it into a 400). SamplingParams checks what needs no model itself.

Knows the model config's vocab size and pad ids; nothing about tensors, queues or HTTP.
"""
from __future__ import annotations

from qvl.engine.sequence import MediaSpan
from qvl.sampling_params import SamplingParams


def check_params(request_id: str, params: SamplingParams, *, vocab_size: int, max_num_seqs: int) -> None:
    """The sampling fields whose range depends on the model and the engine's size."""
    if not isinstance(params, SamplingParams):
        raise TypeError(f"request {request_id!r}: params must be a SamplingParams, got {type(params).__name__}")
    bad = [t for t in params.stop_token_ids if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"request {request_id!r}: SamplingParams.stop_token_ids entries must be token ids in "
                         f"[0, {vocab_size}) (the model's vocab_size), got {bad[:5]}")
    if params.logprobs is not None and params.logprobs > vocab_size:
        raise ValueError(f"request {request_id!r}: SamplingParams.logprobs must be <= {vocab_size} (the "
                         f"model's vocab_size), got {params.logprobs}")
    if params.n > max_num_seqs:
        raise ValueError(f"request {request_id!r}: SamplingParams.n must be <= max_num_seqs {max_num_seqs} "
                         f"(its sequences run side by side), got {params.n}")


def check_prompt(request_id: str, ids: list[int], media: list[MediaSpan], config) -> None:
    """Prompt token ids inside the vocabulary; one feature row per image/video pad, on pad tokens."""
    vocab = config.vocab_size
    if any(not 0 <= t < vocab for t in ids):
        raise ValueError(f"request {request_id!r}: prompt token ids must be in [0, {vocab})")
    pads = {config.image_token_id, config.video_token_id}
    num_pads = sum(1 for t in ids if t in pads)
    num_feats = sum(m.num_tokens for m in media)
    if num_pads != num_feats:
        raise ValueError(f"request {request_id!r}: the prompt has {num_pads} image/video pad tokens "
                         f"but its media give {num_feats} features; pass images/videos through "
                         f"multi_modal_data (or messages), not pad tokens alone")
    for m in media:
        if any(t not in pads for t in ids[m.offset:m.end]):
            raise ValueError(f"request {request_id!r}: media item {m.index} does not sit on pad "
                             f"tokens [{m.offset}, {m.end})")
