"""`qvl serve`: its flags, building the engine from them, and running the app under uvicorn.

`add_serve_args(parser)` defines the flags, all generated from dataclass fields (qvl.config.
add_dataclass_args): ServeOptions, ServerLimits, MediaPolicy (qvl.multimodal.media) and EngineConfig;
`serve(args)` builds `AsyncEngine(engine=LLMEngine.from_config(EngineConfig))` and the app
(qvl.server.app.create_app) and runs uvicorn until SIGTERM/SIGINT: stop accepting, let in-flight
requests finish for --graceful-shutdown-timeout seconds, abort the rest (streams end with finish_reason
"abort", other requests get a 503 error body), stop the engine, exit 0 — without waiting for an engine
step or media decode that outlives the grace period. With tensor_parallel_size > 1 a worker rank that
dies makes /health answer 503 and the process exit 1 a few seconds later (`_exit_on_engine_failure`);
SIGTERM stops every rank. The API serves the model as the checkpoint
folder's name unless --served-model-name says otherwise. Connections get a header read timeout, a
keep-alive timeout and a cap (qvl.server.connections), and the accept-error log line is rate-limited.
The API key falls back to the QVL_API_KEY environment variable, read when serve() starts.
Also `python -m qvl.server.launch MODEL [flags]`.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import threading
from typing import TYPE_CHECKING

from qvl.config import EngineConfig, ServeOptions, ServerLimits, add_dataclass_args, dataclass_from_args

if TYPE_CHECKING:
    from fastapi import FastAPI

logger = logging.getLogger("qvl.server")
FAIL_EXIT_DELAY_S = 2.0       # after the engine failed, how long /health answers 503 before the server exits
FAIL_EXIT_DEADLINE_S = 10.0   # ... and how long uvicorn and the engine may then take to stop before exit(1)


def add_serve_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The `qvl serve` flags: MODEL (positional, or --model), server, request limits, media fetching,
    engine."""
    from qvl.multimodal.media import MediaPolicy

    if not any(a.dest == "model_pos" for a in parser._actions):   # qvl.cli may define it already
        parser.add_argument("model_pos", nargs="?", default=None, metavar="MODEL",
                            help="checkpoint dir or hub id (default: the shipped demo checkpoint)")
    add_dataclass_args(parser, ServeOptions, title="server")
    add_dataclass_args(parser, ServerLimits, title="request limits")
    add_dataclass_args(parser, MediaPolicy, title="media fetching")
    add_dataclass_args(parser, EngineConfig, title="engine")
    return parser


def engine_config(args) -> EngineConfig:
    """EngineConfig from the flags; the positional MODEL wins over --model."""
    cfg = dataclass_from_args(EngineConfig, args)
    pos = getattr(args, "model_pos", None)
    return dataclasses.replace(cfg, model=pos) if pos else cfg


def build_engine(cfg: EngineConfig):
    """The server's AsyncEngine over `LLMEngine.from_config(cfg)`."""
    from qvl.engine.async_engine import AsyncEngine
    from qvl.engine.llm_engine import LLMEngine

    return AsyncEngine(engine=LLMEngine.from_config(cfg))


def serve(args) -> None:
    import uvicorn

    from qvl.multimodal.media import MediaPolicy
    from qvl.server.app import create_app
    from qvl.server.connections import header_timeout_protocol, install_accept_error_filter, raise_open_file_limit

    opts = dataclass_from_args(ServeOptions, args)
    limits = dataclass_from_args(ServerLimits, args)
    policy = dataclass_from_args(MediaPolicy, args)
    cfg = engine_config(args)
    logging.basicConfig(level=getattr(logging, opts.log_level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    api_key = opts.api_key or os.environ.get("QVL_API_KEY") or None
    install_accept_error_filter()
    raise_open_file_limit()
    engine = build_engine(cfg)
    name, aliases = served_names(opts.served_model_name, cfg.model_path)
    app = create_app(engine, served_model_name=name, model_aliases=aliases, api_key=api_key,
                     media_policy=policy, limits=limits, ui=opts.ui, allowed_origins=opts.allowed_origins)
    from qvl.server import observe

    observer = observe.install(app, app.state.ctx, opts)     # request log, cost, vllm names, traces
    logger.info("serving %s as %r on http://%s:%d (auth %s, web page %s)", cfg.model_path, name, opts.host,
                opts.port, "on" if api_key else "off", f"http://{opts.host}:{opts.port}/" if opts.ui else "off")
    config = uvicorn.Config(app, host=opts.host, port=opts.port, log_level=opts.log_level, access_log=False,
                            timeout_graceful_shutdown=opts.graceful_shutdown_timeout,
                            http=header_timeout_protocol(opts.header_read_timeout),
                            timeout_keep_alive=opts.timeout_keep_alive, limit_concurrency=opts.limit_concurrency)
    server = _uvicorn_server_cls(app, opts.graceful_shutdown_timeout)(config)
    failed = _exit_on_engine_failure(engine, server)
    server.run()
    observer.shutdown()                                          # flush queued spans
    if failed.is_set():         # a tensor-parallel rank died: exit non-zero (the workers are stopped already)
        logging.shutdown()
        os._exit(1)
    stuck = [t.name for t in threading.enumerate() if t.name.startswith(("qvl-engine", "qvl-pre")) and t.is_alive()]
    if stuck:   # a step or a media decode still running: waiting for it would overrun the grace period
        logger.warning("exiting with %s still running", ", ".join(stuck))
        logging.shutdown()
        os._exit(0)


def _exit_on_engine_failure(engine, server) -> threading.Event:
    """When the engine fails (a tensor-parallel rank died; qvl.engine.executor), /health answers 503 for
    FAIL_EXIT_DELAY_S (so probes and load balancers see it), then uvicorn stops without waiting for open
    connections, and serve() exits 1; FAIL_EXIT_DEADLINE_S later the process exits 1 however far that got."""
    failed = threading.Event()
    executor = engine.engine.executor
    if executor is None:
        return failed

    def stop() -> None:
        server.should_exit = server.force_exit = True
        threading.Timer(FAIL_EXIT_DEADLINE_S, os._exit, (1,)).start()

    def on_failure(reason: str) -> None:
        failed.set()
        logger.error("engine failed: %s; /health answers 503, exiting in %.0f s", reason, FAIL_EXIT_DELAY_S)
        timer = threading.Timer(FAIL_EXIT_DELAY_S, stop)
        timer.daemon = True
        timer.start()
    executor.on_failure(on_failure)
    return failed


def served_names(served_model_name: str | None, model_path: str) -> tuple[str, tuple[str, ...]]:
    """(the model id the API shows, other ids it accepts): --served-model-name, else the checkpoint
    folder's name (a hub id's last part); the model argument as given is always accepted."""
    if served_model_name:
        return served_model_name, (model_path,)
    name = os.path.basename(os.path.normpath(model_path)) or model_path
    return name, (model_path,) if model_path != name else ()


def _uvicorn_server_cls(app: "FastAPI", grace_s: float):
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's Server, plus: on SIGTERM/SIGINT the app drains (in-flight requests get most of the
        grace period, then are aborted cleanly, before uvicorn would cancel them), and the caught signal
        is not re-raised after shutdown, so the process exits 0."""

        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            originals = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in originals.items():
                    signal.signal(sig, handler)

        def handle_exit(self, sig, frame) -> None:
            first = not self.should_exit
            super().handle_exit(sig, frame)
            if first:
                logger.info("signal %d: draining (grace %.1f s)", sig, grace_s)
                with contextlib.suppress(RuntimeError):
                    loop = asyncio.get_running_loop()
                    loop.call_soon_threadsafe(app.state.begin_shutdown, max(0.0, grace_s * 0.8 - 0.1))

    return Server


def main(argv: list[str] | None = None) -> None:
    parser = add_serve_args(argparse.ArgumentParser(prog="qvl serve", description="OpenAI-compatible server"))
    serve(parser.parse_args(argv))


if __name__ == "__main__":
    main()
