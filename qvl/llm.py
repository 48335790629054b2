"""The offline facade `qvl.LLM`: generate, chat and stream over one LLMEngine.

LLM(model=None, **options): options are EngineConfig's fields (dtype, device, max_model_len,
    max_num_seqs, max_num_batched_tokens, block_size, kv_cache_memory, enable_prefix_caching,
    encoder_cache_memory, threads, chat_template, ...); model None = the shipped demo checkpoint; an
    unknown option is a TypeError naming it. LLM.from_config(EngineConfig), LLM.from_engine(LLMEngine).
  generate(prompts, sampling_params=None, *, use_tqdm=True) -> list[RequestOutput]
     prompts: a str, {"prompt": str, "multi_modal_data": {"image": [...], "video": [...]}},
     {"prompt_token_ids": [...]}, a list of token ids, a ProcessedPrompt, or a list of these;
     sampling_params: one or one per prompt; None = the checkpoint's generation defaults.
  chat(messages | list of conversations, sampling_params=None, ...) -> list[RequestOutput]
  stream(prompt, params) / stream_chat(messages, params) -> iterator of (new text of completion 0,
     RequestOutput so far); leaving the loop early aborts the request.
  process(prompt) / process_chat(messages) -> ProcessedPrompt (what stream / generate also accept).
  default_sampling_params(**overrides), stats() -> dict (see LLMEngine.stats).
  close(): with tensor_parallel_size=N > 1 (LLM(model, tensor_parallel_size=2)) the engine runs N - 1
     worker processes (qvl.engine.executor); close() stops them, as interpreter exit does.

Prompts are turned into ProcessedPrompts here (through the engine's PromptProcessor: template, media
loaded, pads expanded) before they reach LLMEngine.add_request. A request's grammar
(`SamplingParams(structured_outputs=StructuredOutputsParams(json=...))`) is compiled first, so a bad one
is a ValueError before anything runs.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Iterator

from qvl.config import EngineConfig
from qvl.engine.llm_engine import LLMEngine
from qvl.engine.outputs import RequestOutput
from qvl.multimodal.prompt import ProcessedPrompt
from qvl.sampling_params import SamplingParams

_OPTIONS = tuple(f.name for f in dataclasses.fields(EngineConfig) if f.name != "model")


class LLM:
    def __init__(self, model: str | None = None, **options):
        unknown = sorted(set(options) - set(_OPTIONS))
        if unknown:
            raise TypeError(f"LLM() got an unexpected keyword argument {unknown[0]!r} "
                            f"(engine options: {', '.join(_OPTIONS)})")
        self.engine = LLMEngine.from_config(EngineConfig(model=model, **options))
        self._ids = itertools.count()

    @classmethod
    def from_config(cls, config: EngineConfig) -> "LLM":
        return cls.from_engine(LLMEngine.from_config(config))

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

    def close(self) -> None:
        """Stop the tensor-parallel worker processes (tensor_parallel_size > 1; also done at exit)."""
        self.engine.close()

    def generate(self, prompts, sampling_params=None, *, use_tqdm: bool = True) -> list[RequestOutput]:
        if isinstance(prompts, (str, dict, ProcessedPrompt)) or _is_token_ids(prompts):
            prompts = [prompts]
        processed = [self.process(p) for p in prompts]
        return self._run(processed, sampling_params, use_tqdm)

    def chat(self, messages, sampling_params=None, *, use_tqdm: bool = True,
             add_generation_prompt: bool = True, chat_template_kwargs: dict | None = None
             ) -> list[RequestOutput]:
        convs = [messages] if _is_conversation(messages) else list(messages)
        processed = [self.process_chat(c, add_generation_prompt, chat_template_kwargs) for c in convs]
        return self._run(processed, sampling_params, use_tqdm)

    def stream(self, prompt, sampling_params=None) -> Iterator[tuple[str, RequestOutput]]:
        return self._stream(self.process(prompt), sampling_params)

    def stream_chat(self, messages, sampling_params=None, *, add_generation_prompt: bool = True,
                    chat_template_kwargs: dict | None = None) -> Iterator[tuple[str, RequestOutput]]:
        return self._stream(self.process_chat(messages, add_generation_prompt, chat_template_kwargs),
                            sampling_params)

    def process(self, prompt, policy=None) -> ProcessedPrompt:
        """str / {"prompt", "multi_modal_data"} / {"prompt_token_ids"} / list[int] / ProcessedPrompt
        -> ProcessedPrompt (media opened under `policy`, None = the permissive library default)."""
        if isinstance(prompt, ProcessedPrompt):
            return prompt
        if _is_token_ids(prompt) or (isinstance(prompt, list) and not prompt):
            return ProcessedPrompt.from_token_ids(prompt)
        if isinstance(prompt, str):
            prompt = {"prompt": prompt}
        if not isinstance(prompt, dict):
            raise TypeError(f"a prompt is a str, a dict, token ids or a ProcessedPrompt, got "
                            f"{type(prompt).__name__}")
        if "prompt_token_ids" in prompt:
            return ProcessedPrompt.from_token_ids(list(prompt["prompt_token_ids"]))
        if self.engine.processor is None:
            raise ValueError("this engine has no tokenizer: pass prompt token ids")
        return self.engine.processor.process_prompt(prompt["prompt"], prompt.get("multi_modal_data"),
                                                    policy=policy, max_model_len=self.engine.max_model_len)

    def process_chat(self, conv, add_generation_prompt: bool = True,
                     chat_template_kwargs: dict | None = None) -> ProcessedPrompt:
        """One conversation -> ProcessedPrompt (template, media loaded, pads expanded, positions)."""
        if self.engine.processor is None:
            raise ValueError("this engine has no tokenizer/chat template")
        return self.engine.processor.process_messages(
            conv, max_model_len=self.engine.max_model_len, add_generation_prompt=add_generation_prompt,
            chat_template_kwargs=chat_template_kwargs)

    # --- internals -----------------------------------------------------------------------------
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
        params = self._params(sampling_params, len(prompts))
        for sp in params:
            eng.check_structured_outputs(sp)
        try:
            for p, sp in zip(prompts, params):
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
        params = self._params(sampling_params, 1)[0]
        eng.check_structured_outputs(params)
        eng.add_request(rid, prompt, params)
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
