"""The `qvl` command: run | chat | serve | batch | tokens | bench | worker.

Contract: every subcommand defaults to the demo checkpoint shipped in the package (`qvl/demo`), takes
`--model DIR_OR_HUB_ID` for real weights, and turns a user mistake (missing file, unsupported format, a
checkpoint of an unsupported model type, a prompt over the context) into one line on stderr and exit code 2 —
never a traceback. The CLI only parses flags and prints; the work is done by qvl.LLM, the server and
qvl.multimodal. The engine flags of run, chat, serve and bench are EngineConfig's fields
(qvl.config.add_dataclass_args); each command builds one EngineConfig from them.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from qvl.config import EngineConfig, add_dataclass_args, dataclass_from_args


class CLIError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


# ---------------------------------------------------------------------------------------------- flags

def _add_engine_args(p: argparse.ArgumentParser) -> None:
    add_dataclass_args(p, EngineConfig, title="engine")


def _add_media_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--min-pixels", type=int, default=None, help="per-image lower pixel bound")
    p.add_argument("--max-pixels", type=int, default=None, help="per-image upper pixel bound")
    p.add_argument("--fps", type=float, default=None, help="video frames sampled per second (default 2)")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=None,
                   help="0 = greedy (default: the checkpoint's generation_config)")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qvl", description="The Qwen-VL family on your own machine.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of unexpected errors")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="answer one question about images/videos (streams the answer)")
    run.add_argument("question")
    run.add_argument("--image", action="append", default=[], help="image path or URL (repeatable)")
    run.add_argument("--video", action="append", default=[], help="video path or URL (repeatable)")
    run.add_argument("--json", action="store_true", help="print text, token counts, timings and boxes as JSON")
    run.add_argument("--draw", default=None, metavar="OUT.png", help="draw grounding boxes on the first image")
    run.add_argument("--json-schema", default=None, metavar="FILE",
                     help="constrain the answer to this JSON schema (enforced while decoding)")
    _add_engine_args(run)
    _add_media_args(run)
    _add_sampling_args(run)

    chat = sub.add_parser("chat", help="interactive chat: /image PATH, /video PATH, /reset, /quit")
    _add_engine_args(chat)
    _add_media_args(chat)
    _add_sampling_args(chat)

    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    serve.add_argument("model_pos", nargs="?", default=None, metavar="MODEL",
                       help="checkpoint directory or hub id (default: the bundled demo checkpoint)")
    from qvl.server.launch import add_serve_args

    add_serve_args(serve)

    _add_batch_parser(sub)

    worker = sub.add_parser("worker", help="a tensor-parallel rank > 0 (another machine): runs under MASTER_ADDR, "
                                           "MASTER_PORT, RANK, WORLD_SIZE; rank 0 runs qvl serve")
    worker.add_argument("model_pos", nargs="?", default=None, metavar="MODEL",
                        help="checkpoint directory or hub id, the same as rank 0's")
    _add_engine_args(worker)

    tokens = sub.add_parser("tokens", help="visual token count of images/videos, from their headers (no weights)")
    tokens.add_argument("files", nargs="+")
    tokens.add_argument("--json", action="store_true")
    tokens.add_argument("--model", default=None,
                        help="checkpoint dir or hub id whose tokenizer, pixel limits and context to count with, "
                             "as the server plans a request (reads its config files only; default: the demo "
                             "checkpoint)")
    tokens.add_argument("--max-model-len", type=int, default=None,
                        help="context length the counts are planned for (default: the model's)")
    _add_media_args(tokens)
    bench = sub.add_parser("bench", help="latency and throughput of a checkpoint on this machine (qvl.benchmark)")
    bench.add_argument("--concurrency", type=int, nargs="+", default=[1, 8],
                       help="requests submitted at once, one measurement each (default: 1 8)")
    bench.add_argument("--new-tokens", type=int, default=128, help="tokens generated per request (default 128)")
    bench.add_argument("--image-size", type=int, nargs=2, default=[448, 448], metavar=("W", "H"),
                       help="random image per request (default 448 448: 256 visual tokens)")
    bench.add_argument("--question", default=None, help="the question asked about each image")
    bench.add_argument("--json", action="store_true")
    _add_engine_args(bench)
    return parser


def _add_batch_parser(sub) -> None:
    from qvl.config import BatchOptions, ServerLimits
    from qvl.multimodal.media import MediaPolicy

    batch = sub.add_parser("batch", help="run an OpenAI Batch-format JSONL file through the engine (resumable)")
    batch.add_argument("input", metavar="INPUT.jsonl")
    batch.add_argument("-o", "--output", required=True, metavar="OUTPUT.jsonl",
                       help="successful lines go here; re-running skips the custom_ids already in it")
    add_dataclass_args(batch, BatchOptions, title="batch")
    add_dataclass_args(batch, ServerLimits, title="request limits (as qvl serve)")
    add_dataclass_args(batch, MediaPolicy, title="media fetching (local media: under INPUT's folder by default)")
    _add_engine_args(batch)


# ------------------------------------------------------------------------------------------ helpers

def _make_llm(args):
    from qvl.llm import LLM

    return LLM.from_config(dataclass_from_args(EngineConfig, args))


def _sampling(args, llm):

    # Keep grounding tokens (<|box_start|>…) in the text so boxes can be parsed and shown.
    overrides = {"max_tokens": args.max_tokens, "skip_special_tokens": False}
    for name in ("temperature", "top_p", "top_k", "repetition_penalty", "seed"):
        value = getattr(args, name)
        if value is not None:
            overrides[name] = value
    return llm.default_sampling_params(**overrides)


def _media_part(kind: str, source: str, args) -> dict:
    if "://" not in source and not source.startswith("data:") and not Path(source).exists():
        raise CLIError(f"{kind} file not found: {source}")
    part: dict = {"type": kind, kind: source}
    for key in ("min_pixels", "max_pixels"):
        if getattr(args, key) is not None:
            part[key] = getattr(args, key)
    if kind == "video" and args.fps is not None:
        part["fps"] = args.fps
    return part


def _read_schema(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise CLIError(f"--json-schema: file not found: {path}")
    try:
        schema = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise CLIError(f"--json-schema: {path} is not valid JSON: {e}") from None
    if not isinstance(schema, dict):
        raise CLIError(f"--json-schema: {path} must hold a JSON object (a schema)")
    return schema


def _first_image(prompt):
    """The prompt's first image (a VisionInput) or None: grounding boxes refer to it."""
    return next((it for it in prompt.items if it.kind == "image"), None)


# --------------------------------------------------------------------------------------- commands

def _plan_counter(path, max_model_len: int | None):
    """(count, prompt_tokens) for budget.describe through the checkpoint's PromptProcessor — the server's
    plan, with its pixel limits and context — or (None, None) when the checkpoint has no tokenizer.json."""
    import re

    from qvl.models import load_config
    from qvl.multimodal.prompt import PromptProcessor

    if not (Path(path) / "tokenizer.json").is_file():
        return None, None
    _, config = load_config(path)
    processor = PromptProcessor.from_pretrained(path, config)
    context = max_model_len or config.max_position_embeddings

    def count(kind, source, options):
        part = {"type": kind, kind: str(source), **options}
        try:
            plan = processor.plan([{"role": "user", "content": [part]}], max_model_len=context)
        except ValueError as e:                     # name the file, not the message part
            raise ValueError(re.sub(r"^(image|video) 1 \(messages\[0\]\.content\[0\]\): ", "", str(e))) from None
        return plan.items[0].budget
    return count, processor.item_prompt_tokens


def cmd_tokens(args) -> int:
    from qvl.build import resolve_model_path
    from qvl.config import DEMO_MODEL
    from qvl.models import load_config, load_preprocess_spec
    from qvl.multimodal.budget import describe

    path = resolve_model_path(args.model if args.model is not None else str(DEMO_MODEL))
    count, in_prompt = _plan_counter(path, args.max_model_len)
    spec = load_preprocess_spec(path) if count is None else None
    context = args.max_model_len or load_config(path)[1].max_position_embeddings
    options = {k: getattr(args, k) for k in ("min_pixels", "max_pixels", "fps") if getattr(args, k) is not None}
    rows, failed = [], 0
    for f in args.files:
        try:
            if "://" not in f and not f.startswith("data:") and not Path(f).exists():
                raise ValueError(f"{f}: file not found")
            d = describe(f, spec=spec, count=count, prompt_tokens=in_prompt, max_model_len=context, **options)
            rows.append({"source": f, **d})
        except ValueError as e:                     # one line for this file; the others are still listed
            failed += 1
            msg = str(e)
            print(f"qvl: error: {msg if msg.startswith(f) else f'{f}: {msg}'}", file=sys.stderr)
    if args.json:
        if rows:
            print(json.dumps(rows if len(args.files) > 1 else rows[0], indent=1))
        return 2 if failed else 0
    total = 0
    for r in rows:
        (h0, w0), (h1, w1) = r["original_size"], r["resized_size"]
        t, gh, gw = r["grid_thw"]
        extra = f"  frames {r['nframes']}" if r.get("nframes") else ""
        in_prompt_note = f" ({r['prompt_tokens']} in a prompt)" if "prompt_tokens" in r else ""
        print(f"{r['source']}: {r['kind']} {w0}x{h0} -> {w1}x{h1}  grid {t}x{gh}x{gw}{extra}  "
              f"{r['num_tokens']} tokens{in_prompt_note}")
        total += r["num_tokens"]
    if len(rows) > 1:
        print(f"total: {total} tokens")
    return 2 if failed else 0


def cmd_run(args) -> int:
    if args.draw and not args.image:
        raise CLIError("--draw needs an --image to draw on")       # before the model loads, not after
    content = [_media_part("image", s, args) for s in args.image]
    content += [_media_part("video", s, args) for s in args.video]
    content.append({"type": "text", "text": args.question})
    messages = [{"role": "user", "content": content}]
    schema = _read_schema(args.json_schema) if args.json_schema else None
    llm = _make_llm(args)
    params = _sampling(args, llm)
    if schema is not None:
        from qvl.sampling_params import StructuredOutputsParams

        params = params.clone(structured_outputs=StructuredOutputsParams(json=schema))
    start = time.perf_counter()
    first = None
    text = ""
    final = None
    prompt = llm.process_chat(messages)
    for delta, out in llm.stream(prompt, params):
        if delta and first is None:
            first = time.perf_counter() - start
        text += delta
        final = out
        if not args.json:
            sys.stdout.write(delta)
            sys.stdout.flush()
    total = time.perf_counter() - start
    from qvl import grounding

    image = _first_image(prompt)
    parsed, to_original = grounding.read_boxes(text, llm.engine.processor.processing,
                                              image and image.original_size, image and image.resized_size)
    boxes = grounding.to_json(parsed, to_original=to_original)
    if args.draw:
        grounding.draw(args.image[0], parsed, args.draw, to_original=to_original)
    if args.json:
        comp = final.outputs[0]
        print(json.dumps({
            "text": text,
            "prompt_tokens": len(final.prompt_token_ids),
            "completion_tokens": len(comp.token_ids),
            "finish_reason": comp.finish_reason,
            "time_to_first_token_s": round(first if first is not None else total, 4),
            "total_time_s": round(total, 4),
            "boxes": boxes,
        }, indent=1, ensure_ascii=False))
    else:
        sys.stdout.write("\n")
    return 0


def cmd_chat(args) -> int:
    from qvl.cli_chat import chat

    def attach(kind: str, source: str) -> dict:
        try:
            return _media_part(kind, source, args)
        except CLIError as e:
            raise ValueError(str(e)) from None
    llm = _make_llm(args)
    return chat(llm, _sampling(args, llm), attach)


def cmd_serve(args) -> int:
    from qvl.server.launch import serve

    serve(args)
    return 0


def cmd_worker(args) -> int:
    """Rank RANK > 0 of a multi-node tensor-parallel group (qvl.parallel.worker); exit 0 when rank 0 stops it."""
    import dataclasses

    from qvl.build import resolve_device
    from qvl.parallel.group import GroupSpec, default_backend
    from qvl.parallel.worker import run_worker

    cfg = dataclass_from_args(EngineConfig, args)
    if getattr(args, "model_pos", None):
        cfg = dataclasses.replace(cfg, model=args.model_pos)
    spec = GroupSpec.from_env(cfg.distributed_backend or default_backend(resolve_device(cfg.device)))
    if spec.rank == 0:
        raise CLIError("RANK=0 owns the engine: run `qvl serve` there, `qvl worker` on the other ranks")
    if cfg.tensor_parallel_size not in (1, spec.world_size):
        raise CLIError(f"--tensor-parallel-size {cfg.tensor_parallel_size} but WORLD_SIZE={spec.world_size}")
    import logging

    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank{spec.rank} %(levelname)s %(name)s: %(message)s")
    return run_worker(dataclasses.replace(cfg, tensor_parallel_size=spec.world_size), spec)


def cmd_batch(args) -> int:
    """Exit 0 when every line succeeded, 1 when any line is in the error file, 2 for a bad invocation."""
    from qvl.batch import run_batch
    from qvl.config import BatchOptions, ServerLimits
    from qvl.multimodal.media import MediaPolicy

    res = run_batch(args.input, args.output, dataclass_from_args(EngineConfig, args),
                    dataclass_from_args(BatchOptions, args), media_policy=dataclass_from_args(MediaPolicy, args),
                    limits=dataclass_from_args(ServerLimits, args))
    print(f"qvl batch: {res.succeeded} succeeded, {res.failed} failed, {res.skipped} already done "
          f"({res.total} lines) in {res.elapsed_s:.1f} s, {res.generation_tokens} tokens generated; "
          f"output {args.output}" + (f", {res.failed_total} failed line(s) in {res.error_file}" if res.failed_total
                                     else ""), file=sys.stderr)
    return 0 if res.ok else 1


def cmd_bench(args) -> int:
    from qvl import benchmark

    benchmark.check(args.concurrency, args.new_tokens, args.image_size)
    llm = _make_llm(args)
    model = llm.engine.model
    kwargs = {"question": args.question} if args.question else {}
    rows = benchmark.run_bench(llm, concurrency=args.concurrency, new_tokens=args.new_tokens,
                               image_size=tuple(args.image_size), **kwargs)
    import torch

    setup = {"model": llm.engine.engine_config.model_path, "device": str(model.device),
             "dtype": str(model.dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
             "image_size": list(args.image_size)}
    if args.json:
        print(json.dumps({**setup, "rows": rows}, indent=1))
    else:
        print(f"qvl bench: {setup['model']} on {setup['device']} ({setup['dtype']}, {setup['threads']} threads); "
              f"each request: one {args.image_size[0]}x{args.image_size[1]} image, {rows[0]['prompt_tokens']} "
              f"prompt tokens, {args.new_tokens} new tokens")
        print(benchmark.format_table(rows))
    return 0


def main(argv: list[str] | None = None) -> int:
    rc = _main(argv)
    group = sys.modules.get("qvl.parallel.group")           # imported by tensor-parallel runs only
    if argv is None and group is not None:   # the `qvl` command, not a caller's main([...]): a TP rank leaves here
        group.exit_process(rc)
    return rc


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    handler = {"run": cmd_run, "chat": cmd_chat, "serve": cmd_serve, "tokens": cmd_tokens,
               "bench": cmd_bench, "batch": cmd_batch, "worker": cmd_worker}[args.command]
    if args.command in ("run", "chat", "serve", "bench", "batch"):
        from qvl.parallel.group import GroupSpec       # torchrun starts the same command on every rank:
        if GroupSpec.other_rank_env():                 # only rank 0 runs it, the others serve its steps
            handler = cmd_worker
    try:
        return handler(args)
    except (CLIError, ValueError, FileNotFoundError) as e:
        print(f"qvl: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # an unexpected failure still gets one line; --debug shows the traceback
        if args.debug:
            raise
        print(f"qvl: error: {type(e).__name__}: {e} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
