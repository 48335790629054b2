"""LLMEngine: add_request / step / abort over one loaded model.

LLMEngine owns the request table and wires the parts: Scheduler (+ BlockManager), ModelRunner
(+ EncoderCache, Sampler), one IncrementalDetokenizer per sequence. `step()` is three calls:

    out = scheduler.schedule()            # {seq_id: num_tokens}, block tables grown
    results = runner.execute(out)         # prepare -> StepBatch; run: vision + forward + logits + sampling
    return self._update(out, results)     # append tokens, stop checks, free blocks, outputs

Tensor parallelism (tensor_parallel_size > 1): from_config starts a TPExecutor (qvl.engine.executor: the
worker ranks, the step broadcast), loads rank 0's shard, and `close()` stops the workers; `failure` says why
a dead rank stopped the engine.

Building: `LLMEngine.from_config(EngineConfig)` loads the checkpoint (qvl.engine.loading: weights through
qvl.build and the family registry, tokenizer + chat template as a PromptProcessor, generation_config.json) and sizes the
engine; `LLMEngine(model, config, processor, engine_config)` wraps an already loaded model (tests, mock
models; processor None = token-id prompts only). The offline facade over it is qvl.llm.LLM.

Requests: `add_request(request_id, ProcessedPrompt, params)` only — text, chat and media are turned
into a ProcessedPrompt beforehand (qvl.multimodal.prompt, via `engine.processor`; token ids via
`ProcessedPrompt.from_token_ids`), never inside the engine or `step()`.

Stop rules: qvl.engine.stop_rules (eos unless ignore_eos, stop_token_ids, stop strings, then "length";
none before min_tokens). A request with n > 1 is n sequences sharing the prompt's blocks; seeds `seed + i`.
Request checks (qvl.engine.request_checks) refuse at add_request what would fail inside a step. A step
whose batch still raises is retried request by request; only the requests that fail alone are blamed:
aborted (blocks freed; their exceptions in `last_step_errors`, their ids in `last_failed_request_ids`,
their "abort" outputs returned) while the rest of the batch goes on. When every request of the step
fails, the step re-raises the exception instead (unless they were all cancelled: `request_cancel`, from
any thread, stops a step's vision encode within one block; the request is aborted).

Media of a large vision tower encode off the step (qvl.engine.vision_worker): add_request submits the
request's uncached items to one worker thread and its sequences wait in the queue (`is_ready`) while the
other requests keep stepping; aborting stops the job within one vision block, a failed encode fails the
request alone (at its first step, like an inline encode error).

Structured output (`params.structured_outputs`, qvl.structured): add_request starts the grammar's compile on
a worker thread; the sequence waits until it is ready (`is_ready`); a grammar that fails to compile finishes
its request with "abort", stop_reason "structured_output_error: ..." (`check_structured_outputs` raises
instead). Sampling rows get the grammar's allowed-token bitmask (min_tokens' ban folded in); a complete
grammar finishes with "stop".
"""
from __future__ import annotations

import dataclasses
import threading
import time

from qvl.config import EngineConfig
from qvl.engine.block_manager import BlockManager
from qvl.engine.detokenizer import IncrementalDetokenizer
from qvl.engine.encoder_cache import EncoderCache
from qvl.engine.isolation import execute_isolated
from qvl.engine.outputs import RequestOutput, RequestState
from qvl.engine.request_checks import check_params, check_prompt
from qvl.engine.kv_cache import available_memory, kv_bytes_per_block, plan_num_blocks
from qvl.engine.runner import ModelRunner, VisionCancelled
from qvl.engine.scheduler import Scheduler, SchedulerOutput
from qvl.engine.stop_rules import banned_ids, finish_reason
from qvl.engine.sequence import Sequence, media_spans
from qvl.engine.vision_worker import VisionWorker
from qvl.layers.attention import attention_backend
from qvl.layers.cpu_runtime import prepare_cpu_model
from qvl.multimodal.prompt import ProcessedPrompt
from qvl.sampling_params import SamplingParams, eos_token_ids

_STRUCTURED_LOCK = threading.Lock()
class LLMEngine:
    def __init__(self, model, config, processor=None, engine_config: EngineConfig | None = None, *,
                 generation_config: dict | None = None, model_path: str | None = None, executor=None,
                 **options):
        """From a loaded model, its family's config, a PromptProcessor (None: token-id prompts only) and
        an EngineConfig, or its fields as keywords (`LLMEngine(model, config, None, max_model_len=64)`),
        or both (the keywords replace fields). The loading fields (model, dtype, device, threads,
        chat_template, ...) are from_config's; here the model's own device and dtype rule."""
        cfg = engine_config or EngineConfig()
        cfg = dataclasses.replace(cfg, **options) if options else cfg
        self.engine_config = cfg
        self.model, self.config, self.processor = model, config, processor
        if processor is not None and cfg.mm_processor_kwargs:
            processor.apply_mm_processor_kwargs(cfg.mm_processor_kwargs)   # engine-wide media limits
        self.model_path = model_path
        self.max_model_len = cfg.max_model_len or config.max_position_embeddings
        self.generation_config = dict(generation_config or {})
        self.eos_token_ids = set(eos_token_ids(self.generation_config) or config.eos_token_id)
        device = model.device
        self.executor = executor                # qvl.engine.executor.TPExecutor when tensor_parallel_size > 1
        attn_modules = model.attention_modules()    # a tensor-parallel shard's hold only its own KV heads
        num_blocks = plan_num_blocks(attn_modules, block_size=cfg.block_size, dtype=model.dtype, device=device,
                                     kv_cache_memory=cfg.kv_cache_memory, max_num_seqs=cfg.max_num_seqs,
                                     max_model_len=self.max_model_len)
        if executor is not None:                # the pool every rank can hold; then steps reach every rank
            num_blocks = executor.agree_num_blocks(num_blocks, cfg.block_size, self.max_model_len, cfg.max_num_seqs)
            executor.attach(model)
        self.block_manager = BlockManager(num_blocks, cfg.block_size, cfg.enable_prefix_caching)
        self._structured = None                 # qvl.structured.StructuredOutputs, built on first use
        self.scheduler = Scheduler(self.block_manager, max_num_seqs=cfg.max_num_seqs,
                                   max_num_batched_tokens=cfg.max_num_batched_tokens,
                                   max_model_len=self.max_model_len, is_ready=self._grammar_ready)
        kv_bytes = num_blocks * kv_bytes_per_block(attn_modules, cfg.block_size, model.dtype)  # not touched yet
        self.cpu_runtime = prepare_cpu_model(model, max_bytes=(available_memory(device) - kv_bytes) // 2)
        self.runner = ModelRunner(model, config, num_blocks=num_blocks, block_size=cfg.block_size,
                                  encoder_cache=EncoderCache(cfg.encoder_cache_bytes(device.type)),
                                  attention_backend=attention_backend(cfg.attention_backend, device))
        if not cfg.enforce_eager and executor is None:   # a graph would replay rank 0's shard without its workers
            self.runner.capture_graphs(max_num_seqs=cfg.max_num_seqs, max_model_len=self.max_model_len)
        self.vision = VisionWorker(self.runner)     # large towers encode off the step (is_ready below)
        self.requests: dict[str, RequestState] = {}
        self._seq_state: dict[int, tuple[RequestState, IncrementalDetokenizer]] = {}
        self.last_failed_request_ids: list[str] = []
        self.last_step_errors: dict[str, Exception] = {}
        self._cancelled: set[str] = set()      # request_cancel: aborts not yet processed (any thread adds)
        self.num_prompt_tokens_total = 0
        self.num_generation_tokens_total = 0
        self.num_requests_finished = 0

    @classmethod
    def from_config(cls, cfg: EngineConfig) -> "LLMEngine":
        """Load `cfg.model_path` (a directory or hub id) and build the engine `cfg` describes
        (qvl.engine.loading: threads, weights on cfg.device in cfg.dtype, tokenizer and chat template,
        generation defaults, the tensor-parallel workers)."""
        from qvl.engine.loading import load_engine_parts

        parts = load_engine_parts(cfg)
        try:
            return cls(parts.model, parts.config, parts.processor, cfg, generation_config=parts.generation_config,
                       model_path=parts.model_path, executor=parts.executor)
        except BaseException:
            if parts.executor is not None:
                parts.executor.shutdown()
            raise

    @classmethod
    def from_pretrained(cls, model: str | None = None, **options) -> "LLMEngine":
        """`from_config(EngineConfig(model=model, **options))`."""
        return cls.from_config(EngineConfig(model=model, **options))

    # --- structured output ---------------------------------------------------------------------
    @property
    def structured(self):
        """The grammar manager (qvl.structured), built on first use; needs the tokenizer."""
        with _STRUCTURED_LOCK:                  # the server's pool threads may ask first
            return self._structured_outputs()

    def _structured_outputs(self):
        if self._structured is None:
            if self.processor is None:
                raise ValueError("structured output needs the checkpoint's tokenizer (this engine has none)")
            from qvl.structured import StructuredOutputs
            from qvl.structured.llguidance_backend import LLGuidanceBackend

            tok_json, vocab, eos = self.processor.tokenizer.to_str(), self.config.vocab_size, sorted(self.eos_token_ids)
            self._structured = StructuredOutputs(lambda: LLGuidanceBackend(tok_json, vocab, eos), vocab)
        return self._structured

    def check_structured_outputs(self, params: SamplingParams | None) -> None:
        """Compile (or find cached) the request's grammar and wait: ValueError naming the problem."""
        if params is not None and params.structured_outputs is not None:
            self.structured.check(params.structured_outputs)

    def _grammar_ready(self, seq: Sequence) -> bool:
        return (seq.params.structured_outputs is None or self._structured.is_ready(seq)) and \
            self.vision.is_ready(seq.request_id)

    # --- requests ------------------------------------------------------------------------------
    def default_sampling_params(self, **overrides) -> SamplingParams:
        return SamplingParams.from_generation_config(self.generation_config, **overrides)

    def add_request(self, request_id: str, prompt: ProcessedPrompt, params: SamplingParams | None = None, *,
                    arrival_time: float | None = None, output_kind: str = "cumulative") -> None:
        """Queue a processed prompt; raises ValueError (nothing queued) when it can never run, TypeError
        for anything but a ProcessedPrompt. params None: the checkpoint's generation defaults."""
        if not isinstance(prompt, ProcessedPrompt):
            raise TypeError(f"add_request takes a qvl.multimodal.prompt.ProcessedPrompt, got "
                            f"{type(prompt).__name__} (token ids: ProcessedPrompt.from_token_ids(ids); text, "
                            f"chat and media: engine.processor or qvl.LLM)")
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already running")
        params = params if params is not None else self.default_sampling_params()
        check_params(request_id, params, vocab_size=self.config.vocab_size,
                     max_num_seqs=self.engine_config.max_num_seqs)
        if params.structured_outputs is not None:
            grammar = self.structured.compile(params.structured_outputs)   # starts the compile
            if grammar.done() and grammar.exception() is not None:
                raise ValueError(str(grammar.exception()))
        ids, positions, delta, text = prompt.token_ids, prompt.positions, prompt.rope_delta, prompt.text or None
        media = media_spans(prompt.items, prompt.item_offsets, ids)
        check_prompt(request_id, ids, media, self.config)
        arrival = time.time() if arrival_time is None else arrival_time
        seqs = []
        for i in range(params.n):
            seqs.append(Sequence(request_id, ids, params, index=i, media=media, positions=positions,
                                 rope_delta=delta, arrival_time=arrival,
                                 parent=seqs[0] if i else None))
        for s in seqs:                          # all the same length: the first add decides
            self.scheduler.add(s)
            if params.structured_outputs is not None:
                self.structured.add(s)
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
        self.vision.submit(request_id, media, lambda: request_id in self._cancelled)

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
            self._cancelled.discard(rid)
            state = self.requests.get(rid)
            if state is None:
                continue
            for s in state.seqs:
                self._finish(s, "abort")
            outs.append(self._pop(state))
        return outs

    abort = abort_request

    @property
    def default_max_visual_tokens(self) -> int | None:
        """The visual tokens per request this engine encodes in seconds (CPU: runner's
        default_visual_token_limit; CUDA: None) — the server's limit unless --max-visual-tokens-per-request."""
        return self.runner.default_visual_token_limit()

    def request_cancel(self, request_id: str) -> None:
        """From any thread, before abort_request reaches the engine's own thread: a step encoding this
        request's images stops within one vision block (the request is then aborted)."""
        self._cancelled.add(request_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    @property
    def failure(self) -> str | None:
        """Why this engine cannot step any more (a tensor-parallel rank died), or None."""
        return self.executor.failure if self.executor is not None else None

    def close(self) -> None:
        """Stop the tensor-parallel worker processes (nothing to do with one process). Idempotent."""
        if self.executor is not None:
            self.executor.shutdown()

    # --- the step ------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        t0 = time.perf_counter()
        failed = self._fail_bad_grammars()
        out = self.scheduler.schedule()
        results, self.last_step_errors = {}, {}
        if not out.seqs:                         # only grammars compiling / images encoding: wait, do not spin
            self.vision.wait(0.05, also=self._structured)
        if out.seqs:
            results, errors = execute_isolated(self._execute_part, out)
            if errors:
                self.last_step_errors, self.last_failed_request_ids = errors, sorted(errors)
                failed += self.abort_request(sorted(errors))
                if all(s.request_id in errors for s in out.seqs) and not all(
                        isinstance(e, VisionCancelled) for e in errors.values()):
                    raise next(iter(errors.values()))             # nobody else was running
                out.seqs = [s for s in out.seqs if s.request_id not in errors]
        self.scheduler.postprocess(out)
        self.scheduler.attribute_time(out, time.perf_counter() - t0)     # per-request cost shares
        return failed + self._update(out, results)

    def _execute_part(self, out: SchedulerOutput) -> dict:
        banned = banned_ids(out, self.eos_token_ids)
        mask = self._start_mask(out, banned) if self._structured is not None else None
        rids = {s.request_id for s in out.seqs}
        return self.runner.execute(out, banned, mask, should_stop=lambda: any(r in self._cancelled for r in rids))

    def _start_mask(self, out: SchedulerOutput, banned: dict[int, list[int]]):
        """Start filling the grammar bitmask of this step's sampling rows (overlapping the forward on CUDA); the
        runner's token_mask hook waits for it. Constrained rows' min_tokens bans move into the mask."""
        sampling = [s for s in out.seqs if s.num_computed_tokens + out.num_scheduled_tokens[s.seq_id] == len(s)]
        if not any(s.params.structured_outputs is not None for s in sampling):
            return None
        grammar_ban = {s.seq_id: banned.pop(s.seq_id) for s in sampling
                       if s.params.structured_outputs is not None and s.seq_id in banned}
        fut = self._structured.bitmask_async(sampling, grammar_ban, overlap=self.runner.device.type == "cuda")
        order = [s.seq_id for s in sampling]

        def mask(seqs):
            assert [s.seq_id for s in seqs] == order, "the runner samples other rows than the engine masked"
            return fut.result()
        return mask

    def _fail_bad_grammars(self) -> list[RequestOutput]:
        """Requests whose grammar failed to compile: finished ("abort", stop_reason the error)."""
        if self._structured is None:
            return []
        outs = []
        for state in list(self.requests.values()):
            errors = [self._structured.failed(s) for s in state.seqs if not s.is_finished]
            if any(errors):
                for s in state.seqs:
                    s.stop_reason = f"structured_output_error: {next(e for e in errors if e)}"
                    self._finish(s, "abort")
                outs.append(self._pop(state))
        return outs

    def _update(self, out: SchedulerOutput, results: dict) -> list[RequestOutput]:
        touched: dict[str, RequestState] = {}
        for s in out.preempted:
            self.runner.release(s, finished=False)
        for s in out.finished:              # the scheduler finished it: it outgrew the KV pool
            state, detok = self._seq_state[s.seq_id]
            self.runner.release(s, finished=True)
            if self._structured is not None:
                self._structured.release(s)
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
            grammar_ok, grammar_done = True, False
            if self._structured is not None and seq.params.structured_outputs is not None:
                grammar_ok, grammar_done = self._structured.accept(seq)
            reason = finish_reason(seq, detok, self.eos_token_ids, self.max_model_len)
            if reason is not None:
                self._finish(seq, reason)
            if not grammar_ok and not seq.is_finished:      # never hand out text the grammar refused
                seq.stop_reason = "structured_output_error: token refused by the grammar"
                self._finish(seq, "abort")
            elif grammar_done and not seq.is_finished:
                self._finish(seq, "stop")
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

    def _finish(self, seq: Sequence, reason: str) -> None:
        if seq.is_finished:
            return
        self.scheduler.finish(seq, reason)
        self.runner.release(seq, finished=True)
        if self._structured is not None:
            self._structured.release(seq)
        self._seq_state[seq.seq_id][1].finish()

    def _pop(self, state: RequestState) -> RequestOutput:
        self.requests.pop(state.request_id, None)
        self.vision.release(state.request_id)
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
            "busy_time_s": self.scheduler.busy_time_s,
        }
