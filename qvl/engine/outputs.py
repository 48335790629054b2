"""What the engine hands back: RequestOutput / CompletionOutput / RequestMetrics (vLLM's shapes).

  RequestOutput(request_id, prompt, prompt_token_ids, outputs: list[CompletionOutput], finished,
                metrics: RequestMetrics, num_cached_tokens)
  CompletionOutput(index, text, token_ids, cumulative_logprob, logprobs, finish_reason, stop_reason)
     finish_reason: None while running, then "stop" (eos, a stop token id -> stop_reason = the id,
     a stop string -> stop_reason = the string), "length" (max_tokens or max_model_len; stop_reason
     "kv_cache_full" when the sequence alone outgrew the KV pool) or "abort".
     logprobs: per output token {token_id: logprob} (top-n plus the sampled token), when asked.
  RequestMetrics: arrival_time, first_scheduled_time, first_token_time, finished_time (time.time()
     seconds) and derived time_in_queue / ttft / e2e; engine_time: the request's share of the seconds
     the engine spent in steps (each step's time split over its sequences by tokens scheduled).

`RequestState` is the engine's per-request record (the n sequences and their detokenizers) and
builds outputs in two kinds: "cumulative" (everything so far; offline generate) or "delta" (only
what is new since the last output of this request; streaming and the server).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from qvl.engine.detokenizer import IncrementalDetokenizer
from qvl.engine.sequence import Sequence


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[dict[int, float]] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    engine_time: float = 0.0                 # engine-busy seconds attributed to the request (cost share)

    @property
    def time_in_queue(self) -> float | None:
        return None if self.first_scheduled_time is None else self.first_scheduled_time - self.arrival_time

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def e2e(self) -> float | None:
        return None if self.finished_time is None else self.finished_time - self.arrival_time


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    num_cached_tokens: int = 0


@dataclass
class RequestState:
    request_id: str
    prompt: str | None
    seqs: list[Sequence]
    detoks: list[IncrementalDetokenizer]
    output_kind: str = "cumulative"           # or "delta"
    _sent_tokens: list[int] = field(default_factory=list)
    _sent_finished: list[bool] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.output_kind not in ("cumulative", "delta"):
            raise ValueError(f"output_kind must be 'cumulative' or 'delta', got {self.output_kind!r}")
        self._sent_tokens = [0] * len(self.seqs)
        self._sent_finished = [False] * len(self.seqs)

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)

    def metrics(self) -> RequestMetrics:
        ms = [s.metrics for s in self.seqs]
        sched = [m.first_scheduled_time for m in ms if m.first_scheduled_time is not None]
        first = [m.first_token_time for m in ms if m.first_token_time is not None]
        return RequestMetrics(
            arrival_time=ms[0].arrival_time,
            first_scheduled_time=min(sched) if sched else None,
            first_token_time=min(first) if first else None,
            finished_time=max(m.finish_time for m in ms) if self.finished else None,
            engine_time=sum(m.engine_time for m in ms))

    def make_output(self) -> RequestOutput | None:
        """The output to hand out now (None for a delta request with nothing new)."""
        delta = self.output_kind == "delta"
        outs = []
        for i, (seq, dt) in enumerate(zip(self.seqs, self.detoks)):
            done = seq.is_finished
            out_ids = seq.output_token_ids
            want_lp = seq.params.logprobs is not None
            if delta:
                start = self._sent_tokens[i]
                text = dt.stream_text(done)
                if start == len(out_ids) and not text and done == self._sent_finished[i]:
                    continue
                ids = out_ids[start:]
                lps = seq.output_logprobs[start:] if want_lp else None
            else:
                text = dt.text if done else dt.text[:max(0, len(dt.text) - dt.hold)]
                ids = list(out_ids)
                lps = list(seq.output_logprobs) if want_lp else None
            self._sent_tokens[i] = len(out_ids)
            self._sent_finished[i] = done
            outs.append(CompletionOutput(
                index=seq.index, text=text, token_ids=ids,
                cumulative_logprob=seq.cumulative_logprob if want_lp else None, logprobs=lps,
                finish_reason=seq.finish_reason, stop_reason=seq.stop_reason))
        if delta and not outs:
            return None
        first = self.seqs[0]
        return RequestOutput(self.request_id, self.prompt, first.prompt_token_ids, outs,
                             self.finished, self.metrics(), first.num_cached_tokens)
