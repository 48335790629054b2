"""ModelRunner: a scheduler decision -> flat tensors -> vision + forward + logits -> sampled tokens.

Owns: the paged KV cache (per decoder layer `k_cache` / `v_cache` tensors of shape
(num_blocks, block_size, nKV, D), set on the model's attention modules), the vision-encoder cache,
the vision features a sequence holds between prefill chunks, one torch.Generator per seeded
sequence, and the Sampler.
Does not know: queues, stop conditions, tokenizers.

`execute(out)` builds one flat batch from every scheduled sequence's new tokens
  input_ids (N,), positions (3, N), slot_mapping (N,), AttentionMetadata(seq_lens_q, context_lens,
  block_tables)
where a prompt token's position is read from the prompt's precomputed (3, P) positions and an output
token's is `index + rope_delta` on all three streams. Vision: every media item overlapping a
scheduled chunk needs its feature rows; features come from (1) what the sequence already holds,
(2) the VisionWorker's finished job for its request (qvl.engine.vision_worker: encoded off the step),
(3) the encoder cache (by content hash), or (4) the vision tower — items of the step encoded in one
packed call, each whole, deduplicated by hash. A sequence holds an item's features until its last
pad token is prefilled, so a chunk boundary inside an item never re-encodes it. `should_stop` is polled
before every vision block (a forward pre-hook; the model stays math only): an aborted request's encode
stops within one block (VisionCancelled). Logits are computed
only at the last position of sequences whose chunk reaches their end (they sample).

CPU kernels (prepacked / widened linears) are a runtime transform of the model applied by the engine
before the runner is built (qvl.layers.cpu_runtime); the runner only runs the model it is given.

KV pool size: `kv_cache_memory` as bytes (int) or as a fraction (float in (0, 1]) of free device
memory after the weights are loaded (CUDA: torch.cuda.mem_get_info; CPU: MemAvailable). Default (None):
qvl.config.AUTO_KV_CACHE_FRACTION of it (CUDA keeps the rest for activations and the vision tower), and
never more blocks than max_num_seqs sequences of max_model_len tokens can use.
"""
from __future__ import annotations

import os
import threading
from typing import Callable

import torch

from qvl.config import AUTO_KV_CACHE_FRACTION
from qvl.engine.encoder_cache import EncoderCache
from qvl.engine.scheduler import SchedulerOutput
from qvl.engine.sequence import Sequence
from qvl.layers.attention import AttentionMetadata
from qvl.layers.sampler import Sampler, SamplerOutput, SamplingBatch


# The default per-request visual-token limit on a CPU (default_visual_token_limit): FLOP of vision work a
# request may ask for. Qwen2-VL's 675M-parameter ViT (every size, 2B to 72B) gets 263 tokens: 256 tokens
# encoded in 25 / 48 / 54 s (float32, 2 threads, random weights; load 2.6 / 6 / 8 on this project's shared
# 2-core CPU). Tiny towers (the demo's) are not limited below the context.
CPU_VISION_FLOP_BUDGET = 1.4e12


class VisionCancelled(RuntimeError):
    """The vision encode of a step stopped between two blocks because one of its requests was aborted."""


def available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def kv_bytes_per_block(config, block_size: int, dtype: torch.dtype) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_hidden_layers * block_size * config.num_key_value_heads * config.head_dim * elem


def plan_num_blocks(config, *, block_size: int, dtype: torch.dtype, device: torch.device,
                    kv_cache_memory: int | float | None, max_num_seqs: int, max_model_len: int) -> int:
    per_block = kv_bytes_per_block(config, block_size, dtype)
    if isinstance(kv_cache_memory, bool):
        raise ValueError(f"kv_cache_memory must be bytes (int) or a fraction (float), got {kv_cache_memory}")
    if isinstance(kv_cache_memory, int):
        budget = kv_cache_memory
    else:
        frac = kv_cache_memory if kv_cache_memory is not None else (
            AUTO_KV_CACHE_FRACTION["cuda" if device.type == "cuda" else "cpu"])
        if not 0 < frac <= 1:
            raise ValueError(f"kv_cache_memory as a fraction must be in (0, 1], got {frac}")
        budget = int(available_memory(device) * frac)
    num_blocks = budget // per_block
    useful = max_num_seqs * -(-max_model_len // block_size) + 1
    if kv_cache_memory is None:
        num_blocks = min(num_blocks, useful)
    if num_blocks < 1:
        raise ValueError(f"kv_cache_memory={kv_cache_memory} leaves {budget} bytes, less than one KV "
                         f"block ({per_block} bytes for {block_size} tokens x "
                         f"{config.num_hidden_layers} layers)")
    return num_blocks


class ModelRunner:
    def __init__(self, model, config, *, num_blocks: int, block_size: int,
                 encoder_cache: EncoderCache | None = None):
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
        # One block more than the block manager hands out: the last one is the zeroed padding block that
        # padded decode rows read (qvl.layers.attention). The rest stays uninitialised (untouched pages
        # cost no RAM); every slot attention reads there has been written first.
        shape = (num_blocks + 1, block_size, config.num_key_value_heads, config.head_dim)
        for attn in model.attention_modules():
            attn.k_cache = torch.empty(shape, dtype=self.dtype, device=self.device)
            attn.v_cache = torch.empty(shape, dtype=self.dtype, device=self.device)
            attn.k_cache[-1].zero_()
            attn.v_cache[-1].zero_()

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
    def _vision_rows(self, batch: list[tuple[Sequence, int, int]]
                     ) -> torch.Tensor | tuple[torch.Tensor, ...] | None:
        """Feature rows for every pad token of the batch, in token order: (M, H), a tuple of (M, H), or None."""
        wanted = []                                   # (seq, item, row_start, row_end)
        to_encode: dict[str, object] = {}
        for seq, start, end in batch:
            for m in seq.media_in(start, end):
                held = self.held.setdefault(seq.seq_id, {})
                if m.index not in held:
                    feats = (self.vision_worker.features(seq.request_id, m.content_hash)
                             if self.vision_worker is not None else None)
                    feats = feats if feats is not None else self.encoder_cache.get(m.content_hash)
                    if feats is None:
                        to_encode.setdefault(m.content_hash, m.data)
                    else:
                        held[m.index] = feats
                wanted.append((seq, m, max(start, m.offset) - m.offset, min(end, m.end) - m.offset))
        if not wanted:
            return None
        encoded = self._encode(list(to_encode.items())) if to_encode else {}
        rows = []
        for seq, m, a, b in wanted:
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

    def _vision_mask(self, batch, n_total: int) -> torch.Tensor:
        """(N,) bool: the rows of this step that lie inside a prompt media span (where features go).

        Pad ids that the model generated are ordinary tokens, so the mask comes from the spans, not ids.
        """
        mask = torch.zeros(n_total, dtype=torch.bool)
        row = 0
        for seq, start, end in batch:
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
    @torch.inference_mode()
    def execute(self, out: SchedulerOutput, stop_ids: dict[int, list[int]] | None = None,
                token_mask: Callable[[list[Sequence]], torch.Tensor | None] | None = None,
                should_stop: Callable[[], bool] | None = None
                ) -> dict[int, tuple[int, float | None, dict[int, float] | None]]:
        """Run one step. Returns {seq_id: (token, logprob, top_logprobs)} for sequences that sample.

        stop_ids: per seq_id the ids to ban this step (eos / stop tokens while under min_tokens).
        token_mask: called with the sampling sequences (batch order) once the forward has run; returns
        their allowed-token bitmask (B, ceil(V/32)) int32 (CPU) or None (grammars: qvl.structured).
        should_stop: polled between vision blocks (any thread may flip it); True raises VisionCancelled.
        """
        bs = self.block_size
        ids, slots = [], []
        pos: list[list[int]] = [[], [], []]                # t, h, w streams
        batch, sample_rows, sample_seqs = [], [], []
        n_total = 0
        for seq in out.seqs:
            n = out.num_scheduled_tokens[seq.seq_id]
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
            batch.append((seq, start, end))
            ids.extend(seq.token_ids[start:end])
            self._positions(seq, start, end, pos)
            table = seq.block_table
            slots.extend(table[i // bs] * bs + i % bs for i in range(start, end))
            n_total += n
            if end == len(seq):
                sample_rows.append(n_total - 1)
                sample_seqs.append(seq)

        input_ids = torch.tensor(ids, dtype=torch.long, device=self.device)                # (N,)
        positions = torch.tensor(pos, dtype=torch.long, device=self.device)               # (3, N)
        md = AttentionMetadata(
            seq_lens_q=[e - s for _, s, e in batch], context_lens=[e for _, _, e in batch],
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=self.device),
            block_tables=[seq.block_table for seq, _, _ in batch])
        self._vision_stop.fn = should_stop
        try:
            vision = self._vision_rows(batch)
        finally:
            self._vision_stop.fn = None
        mask, extra = self._vision_mask(batch, n_total), {}
        if isinstance(vision, tuple):         # DeepStack: the extra sets go to forward with their rows
            vision, extra = vision[0], {"deepstack_embeds": vision[1:], "vision_mask": mask}
        embeds = self.model.embed(input_ids, vision, mask)                                 # (N, H)
        hidden = self.model(input_ids, positions, md, inputs_embeds=embeds, **extra)       # (N, H)
        if not sample_seqs:
            return {}
        rows = torch.tensor(sample_rows, device=self.device)
        logits = self.model.compute_logits(hidden[rows])                                   # (B, V)
        res: SamplerOutput = self.sampler(logits, self._sampling_batch(sample_seqs, stop_ids, token_mask))
        return {s.seq_id: (t, lp, top) for s, t, lp, top in
                zip(sample_seqs, res.token_ids, res.logprobs, res.top_logprobs)}

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
