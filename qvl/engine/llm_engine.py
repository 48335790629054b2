"""LLMEngine (add_request / step / abort) and the offline facade `qvl.LLM`.

LLMEngine owns the request table and wires the parts: Scheduler (+ BlockManager), ModelRunner
(+ EncoderCache, Sampler), one IncrementalDetokenizer per sequence. `step()` is three calls:

    out = scheduler.schedule()            # {seq_id: num_tokens}, block tables grown
    results = runner.execute(out)         # vision + forward + logits + sampling
    return self._update(out, results)     # append tokens, stop checks, free blocks, outputs

Stop rules, in order, for each new token (none before `min_tokens` output tokens, where eos and
stop_token_ids are also banned from sampling): eos (from generation_config.json, else config.json)
unless `ignore_eos`; `stop_token_ids` (stop_reason = the id); stop strings (text cut before them,
stop_reason = the string); then "length" at `max_tokens` or `max_model_len`. A request with n > 1 is
n sequences; siblings share the prompt's full blocks through the prefix cache and seed `seed + i`.
A step that raises aborts the requests it was running (blocks freed) and re-raises; their ids are in
`last_failed_request_ids`. Prompts are processed (media loaded, pads expanded) in `add_request`,
never inside `step()`.

LLM(model, *, dtype, device, max_model_len, max_num_seqs, max_num_batched_tokens, block_size,
    kv_cache_memory, enable_prefix_caching=True, encoder_cache_memory) wraps an LLMEngine:
  generate(prompts, sampling_params=None, *, use_tqdm=True) -> list[RequestOutput]
     prompts: a str, {"prompt": str, "multi_modal_data": {"image": [...], "video": [...]}},
     {"prompt_token_ids": [...]}, or a list of these; sampling_params: one or one per prompt;
     None = the checkpoint's generation defaults.
  chat(messages | list of conversations, sampling_params=None, ...) -> list[RequestOutput]
  stream(prompt, params) / stream_chat(messages, params) -> iterator of (new text of completion 0,
     RequestOutput so far); leaving the loop early aborts the request.
  default_sampling_params(**overrides), stats() -> dict (see LLMEngine.stats).
"""
from __future__ import annotations

import itertools
import time
from typing import Iterator

import torch

from qvl.engine.block_manager import BlockManager
from qvl.engine.detokenizer import IncrementalDetokenizer
from qvl.engine.encoder_cache import EncoderCache
from qvl.engine.outputs import RequestOutput, RequestState
from qvl.engine.runner import ModelRunner, plan_num_blocks
from qvl.engine.scheduler import Scheduler, SchedulerOutput
from qvl.engine.sequence import MediaSpan, Sequence
from qvl.sampling_params import SamplingParams, eos_token_ids

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
_UNITS = {"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "kb": 1000, "mb": 10**6, "gb": 10**9}


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of auto, {', '.join(_DTYPES)}; got {dtype!r}")
    return _DTYPES[dtype]


def parse_memory(value) -> int | float | None:
    """kv_cache_memory: None, bytes (int), a fraction (float), or a string '4GiB' / '0.8' / '2e9'."""
    if value is None or isinstance(value, (int, float)):
        return value
    s = str(value).strip().lower().replace(" ", "")
    for unit, mult in _UNITS.items():
        if s.endswith(unit):
            return int(float(s[:-len(unit)]) * mult)
    num = float(s)
    return num if num <= 1 else int(num)


class LLMEngine:
    def __init__(self, model, config, processor=None, *, generation_config: dict | None = None,
                 max_model_len: int | None = None, max_num_seqs: int = 256,
                 max_num_batched_tokens: int | None = None, block_size: int = 16,
                 kv_cache_memory=None, enable_prefix_caching: bool = True,
                 encoder_cache_memory: int | None = None, model_path: str | None = None):
        """From a loaded model (+ its ModelConfig, PromptProcessor or None for token-id prompts)."""
        self.model, self.config, self.processor = model, config, processor
        self.model_path = model_path
        self.max_model_len = max_model_len or config.max_position_embeddings
        self.generation_config = dict(generation_config or {})
        self.eos_token_ids = set(eos_token_ids(self.generation_config) or config.eos_token_id)
        device = model.device
        num_blocks = plan_num_blocks(config, block_size=block_size, dtype=model.dtype, device=device,
                                     kv_cache_memory=parse_memory(kv_cache_memory),
                                     max_num_seqs=max_num_seqs, max_model_len=self.max_model_len)
        if encoder_cache_memory is None:
            encoder_cache_memory = (512 if device.type == "cuda" else 256) << 20
        self.block_manager = BlockManager(num_blocks, block_size, enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, max_num_seqs=max_num_seqs,
                                   max_num_batched_tokens=max_num_batched_tokens or 8192,
                                   max_model_len=self.max_model_len)
        self.runner = ModelRunner(model, config, num_blocks=num_blocks, block_size=block_size,
                                  encoder_cache=EncoderCache(int(encoder_cache_memory)))
        self.requests: dict[str, RequestState] = {}
        self._seq_state: dict[int, tuple[RequestState, IncrementalDetokenizer]] = {}
        self.last_failed_request_ids: list[str] = []
        self.num_prompt_tokens_total = 0
        self.num_generation_tokens_total = 0
        self.num_requests_finished = 0

    @classmethod
    def from_pretrained(cls, model: str, *, dtype="auto", device=None, **kw) -> "LLMEngine":
        from qvl.build import load_model, resolve_model_path
        from qvl.multimodal.prompt import PromptProcessor

        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        path = resolve_model_path(model)
        net, config = load_model(path, dtype=resolve_dtype(dtype, dev), device=dev)
        processor = PromptProcessor.from_pretrained(path, config)
        from qvl.sampling_params import load_generation_config
        return cls(net, config, processor, generation_config=load_generation_config(path),
                   model_path=str(path), **kw)

    # --- requests ------------------------------------------------------------------------------
    def default_sampling_params(self, **overrides) -> SamplingParams:
        return SamplingParams.from_generation_config(self.generation_config, **overrides)

    def process(self, prompt, policy=None):
        """str / {"prompt", "multi_modal_data"} / {"prompt_token_ids"} / list[int] / ProcessedPrompt."""
        if isinstance(prompt, str):
            prompt = {"prompt": prompt}
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return list(prompt["prompt_token_ids"])
            if self.processor is None:
                raise ValueError("this engine has no tokenizer: pass prompt token ids")
            return self.processor.process_prompt(prompt["prompt"], prompt.get("multi_modal_data"),
                                                 policy=policy, max_model_len=self.max_model_len)
        return prompt

    def add_request(self, request_id: str, prompt, params: SamplingParams | None = None, *,
                    arrival_time: float | None = None, output_kind: str = "cumulative") -> None:
        """Queue a request; raises ValueError (nothing queued) when it can never run."""
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already running")
        params = params if params is not None else self.default_sampling_params()
        prompt = self.process(prompt)
        text = None
        if isinstance(prompt, list):
            ids, positions, delta, media = prompt, None, 0, []
        else:
            ids, positions, delta, text = prompt.token_ids, prompt.positions, prompt.rope_delta, prompt.text
            media = [MediaSpan(i, off, vi.num_tokens, vi.content_hash, vi.kind, vi)
                     for i, (vi, off) in enumerate(zip(prompt.items, prompt.item_offsets))]
        self._check_prompt(request_id, ids, media)
        arrival = time.time() if arrival_time is None else arrival_time
        seqs = []
        for i in range(params.n):
            seqs.append(Sequence(request_id, ids, params, index=i, media=media, positions=positions,
                                 rope_delta=delta, arrival_time=arrival,
                                 parent=seqs[0] if i else None))
        for s in seqs:                          # all the same length: the first add decides
            self.scheduler.add(s)
        decode = self._decode_fn()
        detoks = [IncrementalDetokenizer(decode, skip_special_tokens=params.skip_special_tokens,
                                         stop=params.stop_strings,
                                         include_stop_str_in_output=params.include_stop_str_in_output)
                  for _ in seqs]
        state = RequestState(request_id, text, seqs, detoks, output_kind)
        self.requests[request_id] = state
        for s, d in zip(seqs, detoks):
            self._seq_state[s.seq_id] = (state, d)
        self.num_prompt_tokens_total += len(ids)

    def _check_prompt(self, request_id: str, ids: list[int], media: list[MediaSpan]) -> None:
        """Refuse here what would otherwise fail inside a step (and take its batch-mates along)."""
        vocab = self.config.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise ValueError(f"request {request_id!r}: prompt token ids must be in [0, {vocab})")
        pads = {self.config.image_token_id, self.config.video_token_id}
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

    def _decode_fn(self):
        if self.processor is None:
            return lambda ids, skip: ""
        tok = self.processor.tokenizer
        return lambda ids, skip: tok.decode(ids, skip_special_tokens=skip)

    def abort_request(self, request_ids) -> list[RequestOutput]:
        """Abort (finish_reason "abort") and free every block; unknown ids are ignored."""
        if isinstance(request_ids, str):
            request_ids = [request_ids]
        outs = []
        for rid in request_ids:
            state = self.requests.get(rid)
            if state is None:
                continue
            for s in state.seqs:
                self._finish(s, "abort")
            outs.append(self._pop(state))
        return outs

    abort = abort_request

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # --- the step ------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        out = self.scheduler.schedule()
        results = {}
        if out.seqs:
            try:
                results = self.runner.execute(out, self._banned_ids(out))
            except Exception:
                failed = sorted({s.request_id for s in out.seqs})
                self.abort_request(failed)
                self.last_failed_request_ids = failed
                raise
        self.scheduler.postprocess(out)
        return self._update(out, results)

    def _banned_ids(self, out: SchedulerOutput) -> dict[int, list[int]]:
        banned = {}
        for s in out.seqs:
            p = s.params
            if s.num_output_tokens < p.min_tokens:
                banned[s.seq_id] = sorted(set(p.stop_token_ids) |
                                          (set() if p.ignore_eos else self.eos_token_ids))
        return banned

    def _update(self, out: SchedulerOutput, results: dict) -> list[RequestOutput]:
        touched: dict[str, RequestState] = {}
        for s in out.preempted:
            self.runner.release(s, finished=False)
        for s in out.finished:              # the scheduler finished it: it outgrew the KV pool
            state, detok = self._seq_state[s.seq_id]
            self.runner.release(s, finished=True)
            detok.finish()
            touched[s.request_id] = state
        now = time.time()
        for seq_id, (token, logprob, top) in results.items():
            state, detok = self._seq_state[seq_id]
            seq = next(s for s in state.seqs if s.seq_id == seq_id)
            seq.append_token(token, top, logprob)
            if seq.metrics.first_token_time is None:
                seq.metrics.first_token_time = now
            self.num_generation_tokens_total += 1
            self._check_stop(seq, detok)
            touched[state.request_id] = state
        outputs = []
        for state in touched.values():
            if state.finished:
                outputs.append(self._pop(state))
            else:
                o = state.make_output()
                if o is not None:
                    outputs.append(o)
        return outputs

    def _check_stop(self, seq: Sequence, detok: IncrementalDetokenizer) -> None:
        p, token, n_out = seq.params, seq.last_token_id, seq.num_output_tokens
        armed = n_out >= p.min_tokens
        if armed and not p.ignore_eos and token in self.eos_token_ids:
            return self._finish(seq, "stop")
        if armed and token in p.stop_token_ids:
            seq.stop_reason = token
            return self._finish(seq, "stop")
        matched = detok.update([token], check_stop=armed)
        if matched is not None:
            seq.stop_reason = matched
            return self._finish(seq, "stop")
        if (p.max_tokens is not None and n_out >= p.max_tokens) or len(seq) >= self.max_model_len:
            self._finish(seq, "length")

    def _finish(self, seq: Sequence, reason: str) -> None:
        if seq.is_finished:
            return
        self.scheduler.finish(seq, reason)
        self.runner.release(seq, finished=True)
        self._seq_state[seq.seq_id][1].finish()

    def _pop(self, state: RequestState) -> RequestOutput:
        self.requests.pop(state.request_id, None)
        for s in state.seqs:
            self._seq_state.pop(s.seq_id, None)
        self.num_requests_finished += 1
        return state.make_output()

    # --- statistics ----------------------------------------------------------------------------
    def stats(self) -> dict:
        bm, ec = self.block_manager, self.runner.encoder_cache
        return {
            "num_running": self.scheduler.num_running,
            "num_waiting": self.scheduler.num_waiting,
            "kv_blocks_total": bm.num_blocks,
            "kv_blocks_free": bm.num_free_blocks,
            "kv_cache_usage": 1 - bm.num_free_blocks / bm.num_blocks,
            "prefix_cache_queries": bm.prefix_cache_queries,
            "prefix_cache_hits": bm.prefix_cache_hits,
            "encoder_cache_queries": ec.queries,
            "encoder_cache_hits": ec.hits,
            "num_preemptions": self.scheduler.num_preemptions,
            "prompt_tokens_total": self.num_prompt_tokens_total,
            "generation_tokens_total": self.num_generation_tokens_total,
            "num_requests_finished": self.num_requests_finished,
        }


class LLM:
    def __init__(self, model: str, *, dtype="auto", device=None, max_model_len: int | None = None,
                 max_num_seqs: int = 256, max_num_batched_tokens: int | None = None,
                 block_size: int = 16, kv_cache_memory=None, enable_prefix_caching: bool = True,
                 encoder_cache_memory: int | None = None):
        self.engine = LLMEngine.from_pretrained(
            model, dtype=dtype, device=device, max_model_len=max_model_len,
            max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
            block_size=block_size, kv_cache_memory=kv_cache_memory,
            enable_prefix_caching=enable_prefix_caching, encoder_cache_memory=encoder_cache_memory)
        self._ids = itertools.count()

    @classmethod
    def from_engine(cls, engine: LLMEngine) -> "LLM":
        self = cls.__new__(cls)
        self.engine, self._ids = engine, itertools.count()
        return self

    def default_sampling_params(self, **overrides) -> SamplingParams:
        return self.engine.default_sampling_params(**overrides)

    get_default_sampling_params = default_sampling_params

    def stats(self) -> dict:
        return self.engine.stats()

    def generate(self, prompts, sampling_params=None, *, use_tqdm: bool = True) -> list[RequestOutput]:
        if isinstance(prompts, (str, dict)) or _is_token_ids(prompts):
            prompts = [prompts]
        processed = [self.engine.process(p) for p in prompts]
        return self._run(processed, sampling_params, use_tqdm)

    def chat(self, messages, sampling_params=None, *, use_tqdm: bool = True,
             add_generation_prompt: bool = True, chat_template_kwargs: dict | None = None
             ) -> list[RequestOutput]:
        convs = [messages] if _is_conversation(messages) else list(messages)
        processed = [self._process_chat(c, add_generation_prompt, chat_template_kwargs) for c in convs]
        return self._run(processed, sampling_params, use_tqdm)

    def stream(self, prompt, sampling_params=None) -> Iterator[tuple[str, RequestOutput]]:
        return self._stream(self.engine.process(prompt), sampling_params)

    def stream_chat(self, messages, sampling_params=None, *, add_generation_prompt: bool = True,
                    chat_template_kwargs: dict | None = None) -> Iterator[tuple[str, RequestOutput]]:
        return self._stream(self._process_chat(messages, add_generation_prompt, chat_template_kwargs),
                            sampling_params)

    # --- internals -----------------------------------------------------------------------------
    def _process_chat(self, conv, add_generation_prompt, chat_template_kwargs):
        if self.engine.processor is None:
            raise ValueError("this engine has no tokenizer/chat template")
        return self.engine.processor.process_messages(
            conv, max_model_len=self.engine.max_model_len, add_generation_prompt=add_generation_prompt,
            chat_template_kwargs=chat_template_kwargs)

    def _params(self, sampling_params, n: int) -> list[SamplingParams]:
        if isinstance(sampling_params, (list, tuple)):
            if len(sampling_params) != n:
                raise ValueError(f"{len(sampling_params)} sampling params for {n} prompts")
            return [p if p is not None else self.default_sampling_params() for p in sampling_params]
        return [sampling_params or self.default_sampling_params()] * n

    def _run(self, prompts, sampling_params, use_tqdm: bool) -> list[RequestOutput]:
        from tqdm.auto import tqdm

        eng = self.engine
        ids = []
        try:
            for p, sp in zip(prompts, self._params(sampling_params, len(prompts))):
                ids.append(f"offline-{next(self._ids)}")
                eng.add_request(ids[-1], p, sp)
            done: dict[str, RequestOutput] = {}
            with tqdm(total=len(ids), desc="generating", unit="req",
                      disable=not use_tqdm or len(ids) < 2) as bar:
                while len(done) < len(ids):
                    for o in eng.step():
                        if o.finished:
                            done[o.request_id] = o
                            bar.update(1)
            return [done[i] for i in ids]
        finally:
            eng.abort_request([i for i in ids if i in eng.requests])

    def _stream(self, prompt, sampling_params) -> Iterator[tuple[str, RequestOutput]]:
        eng = self.engine
        rid = f"stream-{next(self._ids)}"
        eng.add_request(rid, prompt, self._params(sampling_params, 1)[0])
        sent = 0
        try:
            while True:
                for o in eng.step():
                    if o.request_id != rid:
                        continue
                    text = o.outputs[0].text
                    yield text[sent:], o
                    sent = len(text)
                    if o.finished:
                        return
        finally:
            eng.abort_request(rid)


def _is_token_ids(x) -> bool:
    return isinstance(x, list) and bool(x) and all(isinstance(t, int) for t in x)


def _is_conversation(x) -> bool:
    return isinstance(x, list) and (not x or isinstance(x[0], dict))
