"""ModelRunner: a scheduler decision -> StepBatch -> vision + forward + logits -> sampled tokens.

Owns: the KVCache (qvl.engine.kv_cache: per decoder layer K/V blocks and the reserved padding block), the
attention backend chosen at start (EngineConfig.attention_backend: reference or paged), the vision-encoder
cache, the vision features a sequence holds between prefill chunks, one torch.Generator per seeded
sequence, and the Sampler.
Does not know: queues, stop conditions, tokenizers.

  prepare(out) -> StepBatch   (qvl.engine.step_batch) every tensor of the step built once, on the device:
      ids (N,), positions (3, N), slot_mapping (N,), block tables (B, W), query_start_loc (B + 1,),
      seq_lens (B,), the vision mask and media spans (only when the step holds media), the sample rows.
      A prompt token's position is read from the prompt's precomputed (3, P) positions and an output token's
      is `index + rope_delta` on all three streams.
  run(batch) -> StepResult    vision for the media spans, embed, model forward, logits of the sample rows,
      sampling. Vision: every media item overlapping a scheduled chunk needs its feature rows; features come
      from (1) what the sequence already holds, (2) the VisionWorker's finished job for its request
      (qvl.engine.vision_worker: encoded off the step), (3) the encoder cache (by content hash), or (4) the
      vision tower — items of the step encoded in one packed call, each whole, deduplicated by hash. A
      sequence holds an item's features until its last pad token is prefilled, so a chunk boundary inside an
      item never re-encodes it. `should_stop` is polled before every vision block (a forward pre-hook; the
      model stays math only): an aborted request's encode stops within one block (VisionCancelled).
  CUDA graphs: `capture_graphs()` (the engine calls it unless enforce_eager; CUDA with the paged backend only);
      decode steps then replay a captured forward padded to the next captured size (qvl.engine.cuda_graphs).
  execute(out) = run(prepare(out)) as {seq_id: (token, logprob, top_logprobs)} (what the engine calls).

CPU kernels (prepacked / widened linears) are a runtime transform of the model applied by the engine
before the runner is built (qvl.layers.cpu_runtime); the runner only runs the model it is given.

KV pool size: qvl.engine.kv_cache.plan_num_blocks.
"""
from __future__ import annotations

import logging
import threading
from typing import Callable

import torch

from qvl.engine.cuda_graphs import CudaGraphs
from qvl.engine.encoder_cache import EncoderCache
from qvl.engine.kv_cache import KVCache
from qvl.engine.scheduler import SchedulerOutput
from qvl.engine.sequence import Sequence
from qvl.engine.step_batch import StepBatch, StepResult, to_device
from qvl.layers.attention import REFERENCE, AttentionMetadata
from qvl.layers.sampler import Sampler, SamplerOutput, SamplingBatch


log = logging.getLogger("qvl.engine")

# The default per-request visual-token limit on a CPU (default_visual_token_limit): FLOP of vision work a
# request may ask for. Qwen2-VL's 675M-parameter ViT (every size, 2B to 72B) gets 263 tokens: 256 tokens
# encoded in 25 / 48 / 54 s (float32, 2 threads, random weights; load 2.6 / 6 / 8 on this project's shared
# 2-core CPU). Tiny towers (the demo's) are not limited below the context.
CPU_VISION_FLOP_BUDGET = 1.4e12


class VisionCancelled(RuntimeError):
    """The vision encode of a step stopped between two blocks because one of its requests was aborted."""


class ModelRunner:
    def __init__(self, model, config, *, num_blocks: int, block_size: int,
                 encoder_cache: EncoderCache | None = None, attention_backend=REFERENCE):
        self.model = model
        self.config = config
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.device = model.device
        self.dtype = model.dtype
        self.encoder_cache = encoder_cache if encoder_cache is not None else EncoderCache(0)
        self.sampler = Sampler()
        self.generators: dict[int, torch.Generator] = {}
        self.held: dict[int, dict[int, torch.Tensor]] = {}   # seq_id -> {item index: (T, H)}
        # The stop check of the encode running on this thread: execute(should_stop=...) on the engine's,
        # encode_async_job's on the VisionWorker's (qvl.engine.vision_worker), which may run at once.
        self._vision_stop = threading.local()
        self.vision_worker = None                 # a VisionWorker sets itself here
        for blk in getattr(getattr(model, "visual", None), "blocks", ()):
            blk.register_forward_pre_hook(self._between_vision_blocks)
        self.attention_backend = attention_backend
        self.kv_cache = KVCache(model.attention_modules(), num_blocks=num_blocks, block_size=block_size,
                                dtype=self.dtype, device=self.device)
        self.kv_cache.attach(model.attention_modules(), attention_backend)
        self.graphs: CudaGraphs | None = None     # capture_graphs() on CUDA with the paged backend

    def capture_graphs(self, *, max_num_seqs: int, max_model_len: int) -> None:
        """On CUDA with the paged backend, capture the decode forward as CUDA graphs (qvl.engine.cuda_graphs);
        decode steps replay them. Elsewhere nothing to capture (a CUDA reference backend says so once)."""
        if self.device.type != "cuda":
            return
        if self.attention_backend.name != "paged":
            log.warning("CUDA graphs need the paged attention backend (pip install triton); decoding eagerly")
            return
        self.graphs = CudaGraphs(self.model, max_num_seqs=max_num_seqs, max_model_len=max_model_len,
                                 pad_block=self.kv_cache.pad_block, block_size=self.block_size)

    # --- per-sequence state --------------------------------------------------------------------
    def release(self, seq: Sequence, finished: bool) -> None:
        """Drop held vision features (preempted or finished); the generator only when finished."""
        self.held.pop(seq.seq_id, None)
        if finished:
            self.generators.pop(seq.seq_id, None)

    def _generator(self, seq: Sequence) -> torch.Generator | None:
        if seq.params.seed is None:
            return None
        g = self.generators.get(seq.seq_id)
        if g is None:
            g = torch.Generator(device=self.device)
            g.manual_seed(seq.params.seed + seq.index)
            self.generators[seq.seq_id] = g
        return g

    # --- vision --------------------------------------------------------------------------------
    # An item's features are one tensor (T, H), or a tuple of them (main, DeepStack sets...) when the
    # model's encode_vision returns several (Qwen3-VL); every set is sliced with the same token range.
    def _media_spans(self, spans: list[tuple[Sequence, int, int]]) -> list[tuple[Sequence, object, int, int]]:
        """[(seq, item, a, b)]: each media item overlapping a scheduled chunk and its feature rows [a, b)."""
        return [(seq, m, max(start, m.offset) - m.offset, min(end, m.end) - m.offset)
                for seq, start, end in spans for m in seq.media_in(start, end)]

    def _vision_rows(self, media: list[tuple[Sequence, object, int, int]]
                     ) -> torch.Tensor | tuple[torch.Tensor, ...] | None:
        """Feature rows for every pad token of the step, in token order: (M, H), a tuple of (M, H), or None."""
        if not media:
            return None
        to_encode: dict[str, object] = {}
        for seq, m, _, _ in media:
            held = self.held.setdefault(seq.seq_id, {})
            if m.index not in held:
                feats = (self.vision_worker.features(seq.request_id, m.content_hash)
                         if self.vision_worker is not None else None)
                feats = feats if feats is not None else self.encoder_cache.get(m.content_hash)
                if feats is None:
                    to_encode.setdefault(m.content_hash, m.data)
                else:
                    held[m.index] = feats
        encoded = self._encode(list(to_encode.items())) if to_encode else {}
        rows = []
        for seq, m, a, b in media:
            held = self.held[seq.seq_id]
            if m.index not in held:
                held[m.index] = encoded[m.content_hash]
            f = held[m.index]
            rows.append(tuple(s[a:b] for s in f) if isinstance(f, tuple) else f[a:b])
            if b == m.num_tokens:                      # its last pad token is in this step
                del held[m.index]
        if isinstance(rows[0], tuple):
            return tuple(torch.cat(s) if len(s) > 1 else s[0] for s in zip(*rows))   # each (M, H)
        return torch.cat(rows) if len(rows) > 1 else rows[0]          # (M, H)

    def default_visual_token_limit(self) -> int | None:
        """Visual tokens per request a CPU encodes in seconds (CPU_VISION_FLOP_BUDGET over the vision tower's
        ~8 FLOP per parameter per token: 4 patches, multiply-add); None on CUDA or without a vision tower."""
        visual = getattr(self.model, "visual", None)
        if self.device.type == "cuda" or visual is None:
            return None
        return max(1, int(CPU_VISION_FLOP_BUDGET // (8 * sum(p.numel() for p in visual.parameters()))))

    def _between_vision_blocks(self, module, args) -> None:
        """Forward pre-hook of every vision block: an aborted request's encode stops within one block."""
        stop = getattr(self._vision_stop, "fn", None)
        if stop is not None and stop():
            raise VisionCancelled("vision encoding stopped: a request of this step was aborted")

    def _vision_mask(self, spans, n_total: int) -> torch.Tensor:
        """(N,) bool: the rows of this step that lie inside a prompt media span (where features go).

        Pad ids that the model generated are ordinary tokens, so the mask comes from the spans, not ids.
        """
        mask = torch.zeros(n_total, dtype=torch.bool)
        row = 0
        for seq, start, end in spans:
            for m in seq.media_in(start, end):
                a, b = max(start, m.offset), min(end, m.end)
                mask[row + a - start: row + b - start] = True
            row += end - start
        return mask.to(self.device)

    def _encode(self, items: list[tuple[str, object]]) -> dict[str, torch.Tensor]:
        out = self._encode_items(items)
        for h, f in out.items():
            self.encoder_cache.put(h, f)
        return out

    @torch.inference_mode()
    def encode_async_job(self, items: list[tuple[str, object]], should_stop: Callable[[], bool]
                         ) -> dict[str, torch.Tensor]:
        """A VisionWorker job (its own thread): the items encoded in one packed call, as a step holding only
        them would; should_stop is polled before every vision block. Touches no runner state."""
        self._vision_stop.fn = should_stop
        try:
            return self._encode_items(items)
        finally:
            self._vision_stop.fn = None

    def _encode_items(self, items: list[tuple[str, object]]) -> dict[str, torch.Tensor]:
        pixels = torch.cat([vi.pixel_values for _, vi in items]).to(self.device, self.dtype)  # (np, C*T*P*P)
        grid = torch.tensor([list(vi.grid_thw) for _, vi in items], device=self.device)      # (ni, 3)
        feats = self.model.encode_vision(pixels, grid)                    # (np/4, H) or a tuple of them
        sizes = [vi.num_tokens for _, vi in items]
        per_item = (zip(*(s.split(sizes) for s in feats)) if isinstance(feats, tuple)
                    else feats.split(sizes))
        return {h: f for (h, _), f in zip(items, per_item)}

    # --- the step ------------------------------------------------------------------------------
    def prepare(self, out: SchedulerOutput) -> StepBatch:
        """Every tensor of the step `out` schedules, built once (see qvl.engine.step_batch)."""
        bs = self.block_size
        ids, slots = [], []
        pos: list[list[int]] = [[], [], []]                # t, h, w streams
        spans, sample_rows, sample_seqs = [], [], []
        n_total = 0
        for seq in out.seqs:
            n = out.num_scheduled_tokens[seq.seq_id]
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
            spans.append((seq, start, end))
            ids.extend(seq.token_ids[start:end])
            self._positions(seq, start, end, pos)
            table = seq.block_table
            slots.extend(table[i // bs] * bs + i % bs for i in range(start, end))
            n_total += n
            if end == len(seq):
                sample_rows.append(n_total - 1)
                sample_seqs.append(seq)
        lens_q, ctx = [e - s for _, s, e in spans], [e for _, _, e in spans]
        width = max(len(seq.block_table) for seq in out.seqs)
        tables = [b for seq, _, _ in spans for b in seq.block_table + [0] * (width - len(seq.block_table))]
        starts = [0]
        for n in lens_q:
            starts.append(starts[-1] + n)
        t_ids, t_pos, t_slots, t_tables, t_qsl, t_ctx, t_rows = to_device(
            [ids, pos[0] + pos[1] + pos[2], slots, tables, starts, ctx, sample_rows], self.device)
        attn = AttentionMetadata(
            seq_lens_q=lens_q, context_lens=ctx, slot_mapping=t_slots,
            block_tables=t_tables.view(len(spans), width).int(), device=self.device,       # (B, W)
            query_start_loc=t_qsl.int(), seq_lens=t_ctx.int())                             # (B+1,), (B,)
        media = self._media_spans(spans)
        return StepBatch(
            input_ids=t_ids, positions=t_pos.view(3, n_total), attn=attn, sample_rows=t_rows,  # (N,), (3, N)
            spans=spans, sample_seqs=sample_seqs, media=media,
            vision_mask=self._vision_mask(spans, n_total) if media else None)

    @torch.inference_mode()
    def run(self, batch: StepBatch, stop_ids: dict[int, list[int]] | None = None,
            token_mask: Callable[[list[Sequence]], torch.Tensor | None] | None = None,
            should_stop: Callable[[], bool] | None = None) -> StepResult:
        """Compute one prepared step: vision, forward, logits of the sample rows, sampling.

        stop_ids: per seq_id the ids to ban this step (eos / stop tokens while under min_tokens).
        token_mask: called with the sampling sequences (batch order) once the forward has run; returns
        their allowed-token bitmask (B, ceil(V/32)) int32 (CPU) or None (grammars: qvl.structured).
        should_stop: polled between vision blocks (any thread may flip it); True raises VisionCancelled.
        """
        hidden = self._forward(batch, should_stop)                                          # (N, H)
        if not batch.sample_seqs:
            return StepResult()
        logits = self.model.compute_logits(hidden[batch.sample_rows])                       # (S, V)
        seqs = batch.sample_seqs
        res: SamplerOutput = self.sampler(logits, self._sampling_batch(seqs, stop_ids, token_mask))
        return StepResult([s.seq_id for s in seqs], res.token_ids, res.logprobs, res.top_logprobs)

    def _forward(self, batch: StepBatch, should_stop) -> torch.Tensor:
        """Hidden states (N, H) of the step: vision features into the embeddings when it holds media;
        otherwise the model embeds the ids itself (a sampled pad id is an ordinary token)."""
        if self.graphs is not None and self.graphs.fits(batch):
            return self.graphs.run(batch)
        if not batch.media:
            return self.model(batch.input_ids, batch.positions, batch.attn)
        self._vision_stop.fn = should_stop
        try:
            vision = self._vision_rows(batch.media)
        finally:
            self._vision_stop.fn = None
        mask, extra = batch.vision_mask, {}
        if isinstance(vision, tuple):         # DeepStack: the extra sets go to forward with their rows
            vision, extra = vision[0], {"deepstack_embeds": vision[1:], "vision_mask": mask}
        embeds = self.model.embed(batch.input_ids, vision, mask)                            # (N, H)
        return self.model(batch.input_ids, batch.positions, batch.attn, inputs_embeds=embeds, **extra)

    def execute(self, out: SchedulerOutput, stop_ids: dict[int, list[int]] | None = None,
                token_mask: Callable[[list[Sequence]], torch.Tensor | None] | None = None,
                should_stop: Callable[[], bool] | None = None
                ) -> dict[int, tuple[int, float | None, dict[int, float] | None]]:
        """prepare + run: {seq_id: (token, logprob, top_logprobs)} for the sequences that sample."""
        return self.run(self.prepare(out), stop_ids, token_mask, should_stop).by_seq()

    def _sampling_batch(self, seqs: list[Sequence], stop_ids, token_mask) -> SamplingBatch:
        bitmask = token_mask(seqs) if token_mask is not None else None      # may take over some bans
        banned = [stop_ids.get(s.seq_id, []) for s in seqs] if stop_ids else None
        return SamplingBatch([s.params for s in seqs], [s.token_ids for s in seqs],
                             [s.num_prompt_tokens for s in seqs], [self._generator(s) for s in seqs],
                             allowed_bitmask=None if bitmask is None else bitmask.to(self.device),
                             banned_token_ids=banned)

    @staticmethod
    def _positions(seq: Sequence, start: int, end: int, out: list[list[int]]) -> None:
        """Append tokens [start, end)'s positions to the 3 streams: the prompt's M-RoPE positions,
        then index + rope_delta on all three."""
        P = seq.num_prompt_tokens
        if start < P:
            stop = min(end, P)
            if seq.positions is None:
                rows = [range(start, stop)] * 3
            else:
                rows = seq.positions[:, start:stop].tolist()                            # (3, n)
            for stream, row in zip(out, rows):
                stream.extend(row)
        if end > P:
            dec = range(max(start, P) + seq.rope_delta, end + seq.rope_delta)
            for stream in out:
                stream.extend(dec)
