"""One decoder step on the wire: rank 0's model-call arguments, broadcast to every tensor-parallel rank.

  send(call, *, device, control=None)   rank 0: broadcast a StepCall;  send_stop(control) the STOP
  recv(*, hidden_size, dtype, device, control=None) -> StepCall | None   rank > 0: the call, or None for STOP
  to_device(call, device)               the call with every tensor on the rank's device

A StepCall is what rank 0's runner passes to `model(...)`: positions (3, N), AttentionMetadata
(seq_lens_q, context_lens, slot_mapping (N,), block_tables (B, W); the rest is derived from them) or None,
inputs_embeds (N, H), and the optional Qwen3-VL extras deepstack_embeds (each (M, H)) and vision_mask (N,).
Token ids are not sent: only rank 0 holds the embedding (qvl.parallel.shard), so workers run from
inputs_embeds.

Format (chosen over `broadcast_object_list`, which pickles and sends a size then the bytes: see
bench/tp.py for the measured cost of both): three or four tensor broadcasts from rank 0 — the first two
on the CPU over the control group (qvl.parallel.group.control_group: gloo), the others on the
communication device over the default group —
  header (10,) int64  [cmd, N, B, W, n_deepstack, M, has_md, has_slots, has_vmask, has_tables]
  ints   (3N + N? + 2B + B*W? + N?,) int64   positions | slot_mapping | seq_lens_q | context_lens |
                                             block tables (B, W) | vision_mask
  embeds (N, H) in the model dtype;  deepstack (n_deepstack * M, H) when there are DeepStack sets.
Under NCCL the embeddings live on the rank's CUDA device; under gloo everything is on the CPU.

Knows nothing about processes, the engine or the model beyond these arguments.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from qvl.layers.attention import AttentionMetadata

STOP, STEP = 0, 1
_HEADER = 10


@dataclass
class StepCall:
    positions: torch.Tensor                                  # (3, N) int64
    attn_metadata: AttentionMetadata | None
    inputs_embeds: torch.Tensor                              # (N, H)
    deepstack_embeds: tuple[torch.Tensor, ...] | None = None  # each (M, H)
    vision_mask: torch.Tensor | None = None                  # (N,) bool

    def kwargs(self) -> dict:
        extra = {}
        if self.deepstack_embeds is not None:
            extra["deepstack_embeds"] = self.deepstack_embeds
        if self.vision_mask is not None:
            extra["vision_mask"] = self.vision_mask
        return {"inputs_embeds": self.inputs_embeds, **extra}


def _bcast(t: torch.Tensor, group=None) -> torch.Tensor:
    dist.broadcast(t, src=0, group=group)
    return t


def send_stop(control=None) -> None:
    _bcast(torch.zeros(_HEADER, dtype=torch.long), control)


def send(call: StepCall, *, device: torch.device, control=None) -> None:
    """Rank 0: broadcast `call`: header and integers on the CPU over `control` (qvl.parallel.group.
    control_group), the embeddings from `device`, the communication device, over the default group."""
    md = call.attn_metadata
    n = call.inputs_embeds.shape[0]
    ds = call.deepstack_embeds or ()
    m = ds[0].shape[0] if ds else 0
    slots = md.slot_mapping if md is not None else None
    tables = md.block_tables if md is not None else None                           # (B, W) int32
    b = len(md.seq_lens_q) if md is not None else 0
    w = tables.shape[1] if tables is not None else 0
    header = torch.tensor([STEP, n, b, w, len(ds), m, md is not None, slots is not None,
                           call.vision_mask is not None, tables is not None], dtype=torch.long)
    parts = [call.positions.reshape(-1)]                                           # (3N,)
    if slots is not None:
        parts.append(slots)                                                        # (N,)
    if md is not None:
        parts.append(torch.tensor(list(md.seq_lens_q) + list(md.context_lens)))    # (2B,)
    if tables is not None:
        parts.append(tables.reshape(-1))                                           # (B * W,)
    if call.vision_mask is not None:
        parts.append(call.vision_mask)                                             # (N,)
    _bcast(header, control)
    _bcast(torch.cat([t.to("cpu", torch.long) for t in parts]), control)
    _bcast(call.inputs_embeds.to(device).contiguous())                             # (N, H)
    if ds:
        _bcast(torch.cat([d.to(device) for d in ds]).contiguous())                 # (n_ds * M, H)


def recv(*, hidden_size: int, dtype: torch.dtype, device: torch.device, control=None) -> StepCall | None:
    """Rank > 0: the next StepCall from rank 0 (integers on the CPU, embeddings on `device`), or None when
    rank 0 said STOP."""
    header = _bcast(torch.empty(_HEADER, dtype=torch.long), control).tolist()
    cmd, n, b, w, n_ds, m, has_md, has_slots, has_vmask, has_tables = header
    if cmd == STOP:
        return None
    sizes = [3 * n, n if has_slots else 0, 2 * b if has_md else 0, b * w if has_tables else 0,
             n if has_vmask else 0]
    ints = _bcast(torch.empty(sum(sizes), dtype=torch.long), control)
    embeds = _bcast(torch.empty((n, hidden_size), dtype=dtype, device=device))          # (N, H)
    ds = None
    if n_ds:
        flat_ds = _bcast(torch.empty((n_ds * m, hidden_size), dtype=dtype, device=device))
        ds = tuple(flat_ds.split(m))                                                     # each (M, H)
    pos, slots, lens, tables, vmask = ints.split(sizes)
    md = None
    if has_md:
        lens = lens.tolist()
        md = AttentionMetadata(seq_lens_q=lens[:b], context_lens=lens[b:],
                               slot_mapping=slots if has_slots else None,
                               block_tables=tables.view(b, w).int() if has_tables else None)   # (B, W)
    return StepCall(pos.view(3, n), md, embeds, ds, vmask.bool() if has_vmask else None)     # (3, N)


def to_device(call: StepCall, device: torch.device) -> StepCall:
    """The same call with its tensors on `device` (when the communication device is another one)."""
    md = call.attn_metadata
    if md is not None:
        md = AttentionMetadata(seq_lens_q=md.seq_lens_q, context_lens=md.context_lens, device=device,
                               slot_mapping=None if md.slot_mapping is None else md.slot_mapping.to(device),
                               block_tables=None if md.block_tables is None else md.block_tables.to(device))
    ds = None if call.deepstack_embeds is None else tuple(d.to(device) for d in call.deepstack_embeds)
    return StepCall(call.positions.to(device), md, call.inputs_embeds.to(device), ds,
                    None if call.vision_mask is None else call.vision_mask.to(device))
