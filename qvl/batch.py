"""`qvl batch`: OpenAI Batch-format JSONL jobs through the engine, resumable after any crash.

Input, one JSON object per line (blank lines are skipped):
  {"custom_id": str, "method": "POST", "url": "/v1/chat/completions" | "/v1/completions", "body": {...}}
Output (OUTPUT, successes only), one line per request, in completion order (match on custom_id):
  {"id": "batch_req_...", "custom_id", "response": {"status_code": 200, "request_id", "body"}, "error": null}
Errors (the error file; default OUTPUT with `.jsonl` -> `.errors.jsonl`):
  {"id", "custom_id" (null when the line has none), "response": null, "error": {"code", "message"},
   "line": the 1-based input line}

The body is handled exactly as the server handles it: the server's pydantic request models, its
preparation (qvl.server.prepare: plan -> check -> load under the server's limits and a MediaPolicy), its
RequestRun and its response builders (qvl.server.responses), in process, without HTTP. So a line fails in
a batch job where the same request would get a 4xx from `qvl serve`, with the same message; `stream: true`
is refused (a batch line has one answer). Relative media paths (and qwen-vl-utils' `file://relative`) are
resolved against the input file's folder, and local media is allowed under that folder unless
--allowed-local-media-path says otherwise.

Continuous batching: lines are read one at a time and at most `max_in_flight` of them are being prepared
or generated at once (the engine batches whatever is in flight), so a file of any size never sits in
memory; only the set of custom_ids seen is kept.

Resuming: at start the output and error files are read back: a trailing partial line (the process was
killed mid-write) is truncated away, then every custom_id in the output and every line number in the
error file counts as done and is skipped. Each result is one whole line written with one append and no
buffering, so `kill -9` at any moment loses at most the requests in flight. A custom_id seen earlier in
the same input is an error line (`duplicate_custom_id`); the first occurrence runs.
"""
from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from qvl.config import BatchOptions, ServerLimits

if TYPE_CHECKING:
    from qvl.engine.async_engine import AsyncEngine
    from qvl.multimodal.media import MediaPolicy
    from qvl.server.serving import ServingContext

SUPPORTED_URLS = ("/v1/chat/completions", "/v1/completions")
_MEDIA_KEYS = {"image_url": ("image_url", "url"), "video_url": ("video_url", "url"),
               "image": ("image",), "video": ("video",)}
_SCHEME = ("http://", "https://", "data:", "file://")


def default_error_file(output: str | os.PathLike) -> str:
    """out.jsonl -> out.errors.jsonl; any other name gets `.errors.jsonl` appended."""
    out = str(output)
    return (out[:-len(".jsonl")] if out.endswith(".jsonl") else out) + ".errors.jsonl"


@dataclass
class BatchResult:
    total: int = 0            # request lines in the input
    succeeded: int = 0        # written to the output by this run
    failed: int = 0           # written to the error file by this run
    skipped: int = 0          # already done by an earlier run
    failed_total: int = 0     # lines in the error file at the end (this run and earlier ones)
    generation_tokens: int = 0
    elapsed_s: float = 0.0
    error_file: str = ""

    @property
    def ok(self) -> bool:
        return self.failed_total == 0


class LineError(Exception):
    """A line that becomes an error line: code, message and the line's custom_id when it has one."""

    def __init__(self, code: str, message: str, custom_id: str | None = None):
        super().__init__(message)
        self.code, self.message, self.custom_id = code, message, custom_id


# ----------------------------------------------------------------------------------------- the files

class ResultFile:
    """An append-only JSONL file: read back on open (a torn last line is cut off), then whole lines are
    appended with one unbuffered write each."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.records: list[dict] = []
        if self.path.exists():
            self._recover()
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def _recover(self) -> None:
        data = self.path.read_bytes()
        keep = data.rfind(b"\n") + 1              # everything after the last newline is a torn write
        if keep < len(data):
            os.truncate(self.path, keep)
        for n, raw in enumerate(data[:keep].splitlines(), 1):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{self.path}: line {n} is not JSON ({exc}); this is not a qvl batch result "
                                 "file, refusing to append to it") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{self.path}: line {n} is not a JSON object; not a qvl batch result file")
            self.records.append(rec)

    def append(self, record: dict) -> None:
        data = (json.dumps(record, ensure_ascii=False) + "\n").encode()
        view = memoryview(data)
        while view:                               # one write for a regular file; loop only on a short write
            view = view[os.write(self.fd, view):]

    def close(self) -> None:
        os.close(self.fd)


# ----------------------------------------------------------------------------------------- the lines

def resolve_media_paths(body: dict, base: Path) -> None:
    """Rewrite relative local media paths in a chat body to paths under `base` (in place)."""
    for msg in body.get("messages") or []:
        content = msg.get("content") if isinstance(msg, dict) else None
        if not isinstance(content, list):
            continue
        for part in content:
            if not isinstance(part, dict) or part.get("type") not in _MEDIA_KEYS:
                continue
            keys = _MEDIA_KEYS[part["type"]]
            holder, key = part, keys[0]
            if len(keys) == 2 and isinstance(part.get(keys[0]), dict):
                holder, key = part[keys[0]], keys[1]
            value = holder.get(key)
            if isinstance(value, str):
                holder[key] = _resolve(value, base)
            elif isinstance(value, list):
                holder[key] = [_resolve(v, base) if isinstance(v, str) else v for v in value]


def _resolve(source: str, base: Path) -> str:
    if source.startswith("file://") and not source.startswith(("file:///", "file://localhost/")):
        source = source[len("file://"):]          # qwen-vl-utils' file://relative
    elif source.startswith(_SCHEME) or "://" in source:
        return source
    return source if os.path.isabs(source) else str(base / source)


def parse_line(raw: bytes | str) -> tuple[str | None, str, dict]:
    """(custom_id, url, body) of one input line; LineError with the custom_id when it can be read."""
    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LineError("invalid_json", f"the line is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise LineError("invalid_request", f"a line must be a JSON object, got {type(obj).__name__}")
    cid = obj.get("custom_id")
    if not isinstance(cid, str) or not cid:
        raise LineError("invalid_request", "the line has no custom_id (a non-empty string)")
    url, method, body = obj.get("url"), obj.get("method", "POST"), obj.get("body")
    if url not in SUPPORTED_URLS:
        raise LineError("invalid_url", f"unsupported url {url!r}; supported: {', '.join(SUPPORTED_URLS)}", cid)
    if method != "POST":
        raise LineError("invalid_method", f"method must be \"POST\", got {method!r}", cid)
    if not isinstance(body, dict):
        raise LineError("invalid_request", f"body must be a JSON object, got {type(body).__name__}", cid)
    return cid, url, body


# ------------------------------------------------------------------------------------- one request

async def run_request(ctx: "ServingContext", url: str, body: dict) -> tuple[str, dict, int]:
    """(request_id, response body, generated tokens) for one body, as the server's route would answer it;
    APIError for what the server would refuse."""
    from qvl.server import prepare, responses
    from qvl.server.errors import APIError, from_pydantic
    from qvl.server.protocol import ChatCompletionRequest, CompletionRequest
    from qvl.server.serving import RequestRun, new_request_id

    chat = url == "/v1/chat/completions"
    run = RequestRun(ctx, new_request_id("chatcmpl" if chat else "cmpl"), "chat" if chat else "completion")
    try:
        try:
            req = (ChatCompletionRequest if chat else CompletionRequest).model_validate(body)
        except ValidationError as exc:
            raise from_pydantic(exc) from exc
        if req.model and req.model != ctx.served_model_name:
            raise APIError(f"The model `{req.model}` does not exist; this job serves `{ctx.served_model_name}` "
                           "(--served-model-name)", status=404, param="model", code="model_not_found")
        if req.stream:
            raise APIError("stream: true is not supported in a batch job (each line gets one response)",
                           param="stream", code="invalid_value")
        if chat:
            run.images, run.videos = prepare.check_media_counts(ctx, req.messages)
            prompt, plan = await prepare.prepare_chat(ctx, req)
            await run.start([(prompt, prepare.sampling_params(ctx, req, len(prompt.token_ids)))], req.n)
            sizes = plan.counts()["items"] if ctx.boxes_fn else None
            out = await responses.chat_full(ctx, run, req, sizes)
        else:
            jobs, texts = [], []
            for p in req.prompt:
                processed, text = await prepare.prepare_text(ctx, p, req.max_new_tokens)
                jobs.append((processed, prepare.sampling_params(ctx, req, len(processed.token_ids))))
                texts.append(text)
            await run.start(jobs, req.n)
            out = await responses.completion_full(ctx, run, req, texts)
    except BaseException as exc:
        await run.abort_unfinished()
        run.fail(exc)
        raise
    run.finish(200)
    return run.request_id, out, run.completion_tokens


# ----------------------------------------------------------------------------------------- the job

@dataclass
class _Job:
    ctx: "ServingContext"
    base: Path
    out: ResultFile
    err: ResultFile
    result: BatchResult
    progress: Any
    window: asyncio.Semaphore
    done_ids: set = field(default_factory=set)
    done_lines: set = field(default_factory=set)
    seen: set = field(default_factory=set)
    started: float = field(default_factory=time.monotonic)

    def error(self, lineno: int, cid: str | None, code: str, message: str) -> None:
        self.err.append({"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": cid, "response": None,
                         "error": {"code": code, "message": message}, "line": lineno})
        self.result.failed += 1
        self.tick()

    def success(self, cid: str, request_id: str, body: dict, tokens: int) -> None:
        self.out.append({"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": cid,
                         "response": {"status_code": 200, "request_id": request_id, "body": body},
                         "error": None})
        self.result.succeeded += 1
        self.result.generation_tokens += tokens
        self.tick()

    def tick(self, skipped: bool = False) -> None:
        if self.progress is None:
            return
        self.progress.update(1)
        if not skipped:
            rate = self.result.generation_tokens / max(1e-9, time.monotonic() - self.started)
            self.progress.set_postfix_str(f"{rate:.1f} tok/s, {self.result.failed} failed", refresh=False)

    async def one(self, lineno: int, cid: str, url: str, body: dict) -> None:
        from qvl.server.errors import APIError

        try:
            request_id, out, tokens = await run_request(self.ctx, url, body)
        except APIError as exc:
            self.error(lineno, cid, exc.code or str(exc.status), exc.message)
        except Exception as exc:  # noqa: BLE001 - one request's failure never stops the job
            self.error(lineno, cid, "internal_error", f"{type(exc).__name__}: {exc}")
        else:
            self.success(cid, request_id, out, tokens)
        finally:
            self.window.release()


def _count_lines(path: Path) -> int:
    n = 0
    with open(path, "rb") as f:
        for raw in f:
            n += bool(raw.strip())
    return n


async def run_job(ctx: "ServingContext", input_path: str | os.PathLike, output_path: str | os.PathLike,
                  options: BatchOptions | None = None, *, max_num_seqs: int = 256) -> BatchResult:
    """Run (or resume) one job with the serving context `ctx` (its engine is started here, not stopped)."""
    options = options or BatchOptions()
    src = Path(input_path)
    if not src.is_file():
        raise FileNotFoundError(f"batch input not found: {src}")
    err_path = options.error_file or default_error_file(output_path)
    if Path(err_path).resolve() == Path(output_path).resolve():
        raise ValueError(f"the error file must differ from the output file ({err_path})")
    out, err = ResultFile(output_path), ResultFile(err_path)
    result = BatchResult(total=_count_lines(src), error_file=str(err_path))
    progress = None
    if options.progress:
        from tqdm import tqdm

        progress = tqdm(total=result.total, unit="req", desc="qvl batch", dynamic_ncols=True)
    job = _Job(ctx, src.resolve().parent, out, err, result, progress,
               asyncio.Semaphore(options.max_in_flight or 2 * max_num_seqs),
               done_ids={r.get("custom_id") for r in out.records},
               done_lines={r.get("line") for r in err.records})
    ctx.engine.start()
    tasks: set[asyncio.Task] = set()
    try:
        with open(src, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                await job.window.acquire()
                if not _dispatch(job, lineno, raw, tasks):
                    job.window.release()
        if tasks:
            await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
        if progress is not None:
            progress.close()
        out.close()
        err.close()
    result.elapsed_s = time.monotonic() - job.started
    result.failed_total = len(err.records) + result.failed
    return result


def _dispatch(job: _Job, lineno: int, raw: bytes, tasks: set) -> bool:
    """Start the line's request (True: it holds a window slot), or settle it right here (False)."""
    done = lineno in job.done_lines
    try:
        limit = job.ctx.limits.max_request_bytes
        if len(raw) > limit:                       # the server's body limit, per line
            raise LineError("request_too_large", f"the line is {len(raw)} bytes > max_request_bytes {limit}")
        cid, url, body = parse_line(raw)
    except LineError as exc:
        if not done:
            job.error(lineno, exc.custom_id, exc.code, exc.message)
        return _skip(job) if done else False
    if cid in job.seen:              # decided by the input alone, so a resumed run decides the same
        if not done:
            job.error(lineno, cid, "duplicate_custom_id", f"custom_id {cid!r} appears earlier in the input; "
                                                           "custom_ids must be unique")
        return _skip(job) if done else False
    job.seen.add(cid)
    if done or cid in job.done_ids:
        return _skip(job)
    if url == "/v1/chat/completions":
        resolve_media_paths(body, job.base)
    task = asyncio.create_task(job.one(lineno, cid, url, body))
    tasks.add(task)
    task.add_done_callback(tasks.discard)
    return True


def _skip(job: _Job) -> bool:
    job.result.skipped += 1
    job.tick(skipped=True)
    return False


def serving_context(engine: "AsyncEngine", served_model_name: str, input_path: str | os.PathLike,
                    media_policy: "MediaPolicy | None" = None, limits: ServerLimits | None = None):
    """The server's ServingContext for a batch job: the server's limits; local media allowed under the input
    file's folder when the policy names no folder of its own."""
    import dataclasses

    from qvl.multimodal.media import MediaPolicy
    from qvl.server.app import _grounding_fn
    from qvl.server.serving import ServingContext

    policy = media_policy or MediaPolicy()
    if policy.allowed_local_media_path is None:
        policy = dataclasses.replace(policy, allowed_local_media_path=str(Path(input_path).resolve().parent))
    return ServingContext(engine=engine, served_model_name=served_model_name, media_policy=policy,
                          limits=limits or ServerLimits(), boxes_fn=_grounding_fn(engine.processor.processing))


def run_batch(input_path: str | os.PathLike, output_path: str | os.PathLike, engine_config=None,
              options: BatchOptions | None = None, *, media_policy: "MediaPolicy | None" = None,
              limits: ServerLimits | None = None) -> BatchResult:
    """Load the engine `engine_config` describes (EngineConfig; None: the demo) and run the job."""
    from qvl.config import EngineConfig
    from qvl.server.launch import build_engine

    cfg = engine_config or EngineConfig()
    options = options or BatchOptions()
    if not Path(input_path).is_file():                        # before the weights load
        raise FileNotFoundError(f"batch input not found: {input_path}")
    engine = build_engine(cfg)
    ctx = serving_context(engine, options.served_model_name or cfg.model_path, input_path, media_policy, limits)
    try:
        return asyncio.run(run_job(ctx, input_path, output_path, options, max_num_seqs=cfg.max_num_seqs))
    finally:
        engine.shutdown()
        if ctx.executor is not None:
            ctx.executor.shutdown(wait=False, cancel_futures=True)
