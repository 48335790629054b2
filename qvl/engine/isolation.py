"""Step isolation: when a batch raises, find the requests to blame and keep the others' results.

One request's bad value (or a fault only its data triggers) must never fail the other users' requests that
happen to share its step. `execute_isolated(run, out)` runs the whole batch once; only if that raises does it
run each request's sequences again on their own (the rare, slow path), so a request is blamed only when it
fails alone. A failure that only the combination triggers (memory) blames nobody: every request's part ran.
Retrying is safe because a step's effects before sampling are recomputed the same way (K/V slots are
rewritten, vision features re-encoded or taken from the encoder cache); seeded rows of a retried part may
draw from a generator the failed attempt already advanced.

Knows SchedulerOutput only; the runner call is the caller's.
"""
from __future__ import annotations

from typing import Callable

from qvl.engine.scheduler import SchedulerOutput


def execute_isolated(run: Callable[[SchedulerOutput], dict], out: SchedulerOutput
                     ) -> tuple[dict, dict[str, Exception]]:
    """(results of run over `out`, {request_id: exception} of the requests that failed on their own)."""
    try:
        return run(out), {}
    except Exception as exc:  # noqa: BLE001 - retried below, request by request
        groups: dict[str, list] = {}
        for s in out.seqs:
            groups.setdefault(s.request_id, []).append(s)
        if len(groups) == 1:
            return {}, {out.seqs[0].request_id: exc}
    results, errors = {}, {}
    for rid, seqs in groups.items():
        part = SchedulerOutput(seqs, {s.seq_id: out.num_scheduled_tokens[s.seq_id] for s in seqs})
        try:
            results.update(run(part))
        except Exception as exc:  # noqa: BLE001 - blamed on this request alone
            errors[rid] = exc
    return results, errors
