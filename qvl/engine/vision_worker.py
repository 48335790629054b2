"""VisionWorker: a request's images are encoded on one worker thread, off the engine step.

Why: a large image takes tens of seconds in the vision tower on a CPU; encoded inline in the step, every
other request's decode step waits for all of it. Here the engine submits a request's media when the request
is added (`submit`); the scheduler's `is_ready` keeps its sequences waiting in the queue until the job is
done, while the other requests keep stepping; the runner then takes the features (`features`) instead of
encoding them in the step. One thread: jobs run in arrival order; the encode and the steps share the CPU,
so a step may be slower while an image encodes, but no step waits for a whole encode.

Contract:
- `submit(request_id, media, should_stop)`: a job for the request's items that the encoder cache does not
  hold (deduplicated by content hash; a hit needs no encode). Nothing when disabled or no media.
- `is_ready(request_id)`: False only while the request's job runs or waits (no job: True).
- `features(request_id, content_hash)`: the item's features (and they enter the encoder cache), None when
  the job does not have them (the runner then encodes inline as before: preempted and rescheduled after
  release, mock models, a disabled worker); re-raises the job's error, so the step fails that request
  alone (qvl.engine.isolation), its blocks freed by the engine.
- `release(request_id)`: drop the job's features; a job still queued never runs, one running stops before
  its next vision block (the runner's pre-hook polls `should_stop` and the release flag: VisionCancelled).
- `wait(timeout, also)`: block until some job finishes (the engine has nothing else to do); with none
  pending, `also.wait(timeout)` (the grammar manager's) when given, else return at once.
Enabled by default only for real vision work (a tower of at least MIN_VISION_PARAMS parameters); tiny test
towers encode inline, so every float32 invariant of the inline path holds unchanged. The encode itself is
the runner's (`ModelRunner.encode_async_job`): the same packed call as a step that holds only this request.
"""
from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor, wait as wait_futures

# Towers at least this large are encoded on the worker (Qwen2-VL's ViT has 675M parameters); a tiny test
# tower encodes in milliseconds, where a thread hop would only add nondeterministic timing.
MIN_VISION_PARAMS = 50_000_000


class _Job:
    def __init__(self, should_stop):
        self.released = threading.Event()
        self.should_stop = lambda: self.released.is_set() or should_stop()
        self.future: Future | None = None


class VisionWorker:
    def __init__(self, runner, enabled: bool | None = None):
        """enabled None: on when the runner's model has a vision tower of >= MIN_VISION_PARAMS parameters."""
        visual = getattr(runner.model, "visual", None)
        if enabled is None:
            enabled = visual is not None and sum(p.numel() for p in visual.parameters()) >= MIN_VISION_PARAMS
        self.runner = runner
        self.enabled = bool(enabled) and visual is not None
        self._jobs: dict[str, _Job] = {}
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        runner.vision_worker = self

    def submit(self, request_id: str, media, should_stop) -> None:
        if not self.enabled or not media:
            return
        cache = self.runner.encoder_cache
        items = {m.content_hash: m.data for m in media if m.content_hash not in cache}
        if not items:
            return                                   # every item is a cache hit: the step takes them
        job = _Job(should_stop)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="qvl-vision")
        job.future = self._pool.submit(self._run, job, list(items.items()))
        with self._lock:
            self._jobs[request_id] = job

    def _run(self, job: _Job, items):
        if job.should_stop():
            return {}                                # released while queued: never encoded
        return self.runner.encode_async_job(items, job.should_stop)

    def is_ready(self, request_id: str) -> bool:
        job = self._jobs.get(request_id)
        return job is None or job.future.done()

    def features(self, request_id: str, content_hash: str):
        job = self._jobs.get(request_id)
        if job is None or not job.future.done():
            return None
        feats = job.future.result().get(content_hash)          # raises the job's error
        if feats is not None:                        # the cache is the engine thread's: put here, not there
            self.runner.encoder_cache.put(content_hash, feats)
        return feats

    def release(self, request_id: str) -> None:
        with self._lock:
            job = self._jobs.pop(request_id, None)
        if job is not None:
            job.released.set()

    def wait(self, timeout: float, also=None) -> None:
        with self._lock:
            pending = [j.future for j in self._jobs.values() if not j.future.done()]
        if pending:
            wait_futures(pending, timeout, return_when="FIRST_COMPLETED")
        elif also is not None:                       # the grammar manager: its compiles are the other wait
            also.wait(timeout)

    @property
    def num_pending(self) -> int:
        return sum(not j.future.done() for j in list(self._jobs.values()))
