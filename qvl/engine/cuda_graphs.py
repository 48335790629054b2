"""CUDA graphs for decode steps: capture the decoder forward at fixed batch sizes, pad a step to the next one,
replay.

A decode step (every sequence adds one token, no media; `StepBatch.is_decode`) of B sequences runs as the
graph captured for S = the smallest size in `graph_batch_sizes(max_num_seqs)` (vLLM's buckets: 1, 2, 4, 8,
then steps of 8) with S >= B. Its inputs live in static buffers (`GraphInputs`, sized for the largest S; each
graph reads the first S rows): `fill` copies the step's rows in (device-to-device copies, no host sync) and
makes rows B..S-1 padding rows — token 0 at position 0, writing its K/V into the KVCache's reserved padding
block and attending to that one slot — so a padded row touches no sequence's blocks and its (finite) output
is dropped. Block tables are `ceil(max_model_len / block_size)` wide, so every context fits. Prefill and
mixed steps, steps with more than the largest size, and `EngineConfig.enforce_eager` run eagerly.

Capture needs a backend whose work depends only on tensors (the paged Triton kernels: no host-side shape
from the context lengths), so graphs are built only with the paged backend on CUDA. Logits and sampling stay
outside the graph (only the sampling rows pay for the vocabulary projection).

Knows the model's forward signature and the KVCache's padding block; nothing about scheduling.
"""
from __future__ import annotations

import logging
import time

import torch

from qvl.engine.step_batch import StepBatch
from qvl.layers.attention import AttentionMetadata

log = logging.getLogger("qvl.engine")


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """The batch sizes captured: 1, 2, 4, then multiples of 8, up to max_num_seqs (itself included)."""
    sizes = [s for s in (1, 2, 4) if s < max_num_seqs] + list(range(8, max_num_seqs, 8))
    return sizes + [max_num_seqs]


class GraphInputs:
    """Static decode inputs for up to `rows` sequences whose contexts span at most `width` blocks."""

    def __init__(self, rows: int, width: int, *, pad_block: int, block_size: int, device: torch.device):
        self.rows, self.width, self.pad_block, self.block_size = rows, width, pad_block, block_size
        i64 = dict(dtype=torch.int64, device=device)
        self.input_ids = torch.zeros(rows, **i64)                                        # (S,)
        self.positions = torch.zeros(3, rows, **i64)                                     # (3, S)
        self.slot_mapping = torch.full((rows,), pad_block * block_size, **i64)          # (S,)
        self.block_tables = torch.full((rows, width), pad_block, dtype=torch.int32, device=device)  # (S, W)
        self.seq_lens = torch.ones(rows, dtype=torch.int32, device=device)              # (S,)
        self.query_start_loc = torch.arange(rows + 1, dtype=torch.int32, device=device)  # (S + 1,)

    def fits(self, batch: StepBatch) -> bool:
        return (batch.is_decode and len(batch.seqs) <= self.rows
                and batch.attn.block_tables.shape[1] <= self.width)

    def fill(self, batch: StepBatch) -> int:
        """Copy the decode step's B rows in and make the rest padding rows; returns B."""
        b, w = len(batch.seqs), batch.attn.block_tables.shape[1]
        md = batch.attn
        self.input_ids[:b].copy_(batch.input_ids)
        self.input_ids[b:].zero_()
        self.positions[:, :b].copy_(batch.positions)
        self.positions[:, b:].zero_()
        self.slot_mapping[:b].copy_(md.slot_mapping)
        self.slot_mapping[b:].fill_(self.pad_block * self.block_size)
        self.block_tables[:b, :w].copy_(md.block_tables)
        self.block_tables[:b, w:].fill_(self.pad_block)
        self.block_tables[b:].fill_(self.pad_block)
        self.seq_lens[:b].copy_(md.seq_lens)
        self.seq_lens[b:].fill_(1)
        return b

    def metadata(self, size: int, context_lens: list[int] | None = None) -> AttentionMetadata:
        """Metadata over the first `size` static rows. `context_lens` (host) only matters to a backend that
        plans from host lists (the reference, in tests); the paged kernels read the tensors."""
        ctx = context_lens if context_lens is not None else [1] * size
        return AttentionMetadata([1] * size, ctx, slot_mapping=self.slot_mapping[:size],
                                 block_tables=self.block_tables[:size], device=self.input_ids.device,
                                 query_start_loc=self.query_start_loc[:size + 1], seq_lens=self.seq_lens[:size])


class CudaGraphs:
    """One captured decoder forward per batch size, sharing one memory pool and one set of static inputs."""

    def __init__(self, model, *, max_num_seqs: int, max_model_len: int, pad_block: int, block_size: int):
        self.sizes = graph_batch_sizes(max_num_seqs)
        width = -(-max_model_len // block_size)
        self.inputs = GraphInputs(self.sizes[-1], width, pad_block=pad_block, block_size=block_size,
                                  device=model.device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        t0 = time.perf_counter()
        pool = None
        with torch.inference_mode():
            for size in reversed(self.sizes):             # largest first: the smaller ones reuse its pool
                graph, out = self._capture(model, size, pool)
                pool = graph.pool()
                self.graphs[size] = (graph, out)
        torch.cuda.synchronize()
        log.info("captured CUDA graphs for decode batch sizes %s in %.1f s", self.sizes, time.perf_counter() - t0)

    def _capture(self, model, size: int, pool):
        x = self.inputs
        md = x.metadata(size)

        def forward():
            return model(x.input_ids[:size], x.positions[:, :size], md)                # (S, H)

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):                  # warm up: kernel compilation, lazy tables, allocator
            for _ in range(2):
                forward()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            out = forward()
        return graph, out

    def fits(self, batch: StepBatch) -> bool:
        return self.inputs.fits(batch)

    def run(self, batch: StepBatch) -> torch.Tensor:
        """Hidden states (B, H) of a decode step, by replaying the graph of the next captured size."""
        b = self.inputs.fill(batch)
        size = next(s for s in self.sizes if s >= b)
        graph, out = self.graphs[size]
        graph.replay()
        return out[:b]
