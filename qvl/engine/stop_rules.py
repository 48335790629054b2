"""Stop rules: when a sequence stops, and which ids it may not sample yet. No torch.

For each new token, in order (none before `min_tokens` output tokens, where eos and stop_token_ids are
also banned from sampling): eos unless `ignore_eos`; `stop_token_ids` (stop_reason = the id); stop strings
(the detokenizer matches them; stop_reason = the string); then "length" at `max_tokens` or `max_model_len`.
The engine finishes the sequence with the reason returned; these functions only decide.
"""
from __future__ import annotations

from qvl.engine.detokenizer import IncrementalDetokenizer
from qvl.engine.scheduler import SchedulerOutput
from qvl.engine.sequence import Sequence


def banned_ids(out: SchedulerOutput, eos_token_ids: set[int]) -> dict[int, list[int]]:
    """{seq_id: ids it may not sample this step} for the sequences still under min_tokens."""
    banned = {}
    for s in out.seqs:
        p = s.params
        if s.num_output_tokens < p.min_tokens:
            banned[s.seq_id] = sorted(set(p.stop_token_ids) | (set() if p.ignore_eos else eos_token_ids))
    return banned


def finish_reason(seq: Sequence, detok: IncrementalDetokenizer, eos_token_ids: set[int],
                  max_model_len: int) -> str | None:
    """"stop" / "length" when the sequence's last token ends it (seq.stop_reason set), else None. Feeds the
    token to the detokenizer."""
    p, token, n_out = seq.params, seq.last_token_id, seq.num_output_tokens
    armed = n_out >= p.min_tokens
    if armed and not p.ignore_eos and token in eos_token_ids:
        return "stop"
    if armed and token in p.stop_token_ids:
        seq.stop_reason = token
        return "stop"
    matched = detok.update([token], check_stop=armed)
    if matched is not None:
        seq.stop_reason = matched
        return "stop"
    if (p.max_tokens is not None and n_out >= p.max_tokens) or len(seq) >= max_model_len:
        return "length"
    return None
