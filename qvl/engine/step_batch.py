"""StepBatch and StepResult: what one engine step computes, as data.

`ModelRunner.prepare(scheduler_output) -> StepBatch` builds every tensor of a step once; `run(batch) ->
StepResult` computes it. A StepBatch is what a tensor-parallel executor broadcasts and what a CUDA graph
replays (padded to a captured size), so everything the forward reads is here, on the runner's device:

  input_ids      (N,) int64      the new tokens of every scheduled sequence, batch order
  positions      (3, N) int64    M-RoPE t/h/w positions (prompt: precomputed; output: index + rope_delta)
  attn           AttentionMetadata: slot_mapping (N,), block_tables (B, W), query_start_loc (B + 1,),
                 seq_lens (B,), max_query_len, and the host lists seq_lens_q / context_lens
  vision_mask    (N,) bool or None: rows inside a prompt media span (None when the step holds no media)
  media          [(seq, item, first row, end row)] the feature rows each span needs (host; vision only)
  sample_rows    (S,) int64      rows whose logits are sampled (a sequence's chunk reaching its end)

Host-side: `spans` [(seq, start, end)] (`seqs`: their sequences, batch order) and `sample_seqs` (the S sequences that sample,
batch order). `to_device(rows, device)` moves a step's integer lists in one copy (pinned on CUDA).
Knows nothing about models or kernels.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from qvl.layers.attention import AttentionMetadata


def to_device(rows: list[list[int]], device: torch.device) -> list[torch.Tensor]:
    """Integer lists -> int64 tensors on `device` through one host buffer and one copy (pinned memory and a
    non-blocking copy on CUDA, so the host goes on preparing while the copy runs)."""
    flat = [x for r in rows for x in r]
    host = torch.tensor(flat, dtype=torch.int64)
    if torch.device(device).type == "cuda":
        host = host.pin_memory()
    dev = host.to(device, non_blocking=True)
    return list(dev.split([len(r) for r in rows]))


@dataclass
class StepBatch:
    input_ids: torch.Tensor                  # (N,)
    positions: torch.Tensor                  # (3, N)
    attn: AttentionMetadata
    sample_rows: torch.Tensor                # (S,)
    spans: list = field(default_factory=list)           # [(seq, start, end)], batch order
    sample_seqs: list = field(default_factory=list)
    media: list = field(default_factory=list)           # [(seq, media item, a, b)]
    vision_mask: torch.Tensor | None = None  # (N,) bool

    @property
    def seqs(self) -> list:
        """The scheduled sequences, batch order."""
        return [seq for seq, _, _ in self.spans]

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]

    @property
    def is_decode(self) -> bool:
        """Every sequence adds one token, none holds media: the shape a CUDA graph can replay."""
        return self.attn.max_query_len == 1 and not self.media


@dataclass
class StepResult:
    """The sampled token of every sampling sequence (batch order) with its logprob and top logprobs."""
    seq_ids: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float | None] = field(default_factory=list)
    top_logprobs: list[dict[int, float] | None] = field(default_factory=list)

    def by_seq(self) -> dict[int, tuple[int, float | None, dict[int, float] | None]]:
        """{seq_id: (token, logprob, top_logprobs)}."""
        return {s: (t, lp, top) for s, t, lp, top in
                zip(self.seq_ids, self.token_ids, self.logprobs, self.top_logprobs)}
