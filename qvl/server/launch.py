"""`qvl serve`: its flags, building the engine from them, and running the app under uvicorn.

`add_serve_args(parser)` defines the flags; `serve(args)` builds an AsyncEngine and the app
(qvl.server.app.create_app) and runs uvicorn until SIGTERM/SIGINT: stop accepting, let in-flight
requests finish for --graceful-shutdown-timeout seconds, abort the rest, stop the engine, exit 0.
Also `python -m qvl.server.launch MODEL [flags]`.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import threading

from fastapi import FastAPI

from qvl.server.app import create_app
from qvl.config import ServerLimits

logger = logging.getLogger("qvl.server")


def add_serve_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The `qvl serve` flags (server, limits, media policy and engine sizing)."""
    if not any(a.dest == "model_pos" for a in parser._actions):   # qvl.cli may define it already
        parser.add_argument("model_pos", nargs="?", default=None, metavar="MODEL",
                            help="checkpoint dir or hub id (default: the shipped demo checkpoint)")
    g = parser.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every route but /health "
                        "(default: env QVL_API_KEY, read at startup)")
    g.add_argument("--served-model-name", default=None, help="model id in the API (default: the model arg)")
    g.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    g.add_argument("--graceful-shutdown-timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds in-flight requests may take before they are aborted")
    g.add_argument("--preprocess-workers", type=int, default=4, help="threads for media decode/resize")
    lim = parser.add_argument_group("request limits")
    lim.add_argument("--max-images-per-request", type=int, default=16)
    lim.add_argument("--max-videos-per-request", type=int, default=2)
    lim.add_argument("--max-visual-tokens-per-request", type=int, default=None,
                     help="cap on image+video tokens in one request (default: only the context bounds it)")
    lim.add_argument("--max-request-bytes", type=int, default=64 * 1024 * 1024, help="HTTP body size limit")
    med = parser.add_argument_group("media fetching")
    med.add_argument("--allowed-local-media-path", default=None,
                     help="allow file:// URLs and paths under this directory (default: none)")
    med.add_argument("--allowed-media-domains", action="extend", default=None, metavar="DOMAIN[,DOMAIN]",
                     type=lambda s: [d.strip() for d in s.split(",") if d.strip()],
                     help="only fetch http(s) media from these hosts (exact, or *.example.com; comma-separated "
                          "or repeated; default: any public host)")
    med.add_argument("--allow-private-media-addresses", action="store_true",
                     help="allow http(s) media on loopback/private/link-local addresses (unsafe)")
    med.add_argument("--media-timeout", type=float, default=10.0, help="seconds per media download")
    med.add_argument("--media-max-bytes", type=int, default=100 * 1024 * 1024, help="bytes per media download")
    eng = parser.add_argument_group("engine")
    eng.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    eng.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (auto: cuda if available)")
    eng.add_argument("--max-model-len", type=int, default=None)
    eng.add_argument("--threads", type=int, default=None,
                     help="CPU threads for torch (default: torch's; 1 is much faster on a machine other jobs load)")
    eng.add_argument("--max-num-seqs", type=int, default=None)
    eng.add_argument("--max-num-batched-tokens", type=int, default=None)
    eng.add_argument("--block-size", type=int, default=None)
    eng.add_argument("--kv-cache-memory", default=None, help="KV-cache size, e.g. 4GiB or a fraction 0.8")
    eng.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_false")
    return parser


def _media_policy(args):
    from qvl.multimodal.media import MediaPolicy

    return MediaPolicy(allowed_local_media_path=args.allowed_local_media_path,
                       allowed_media_domains=args.allowed_media_domains,
                       allow_private_addresses=args.allow_private_media_addresses,
                       timeout_s=args.media_timeout, max_bytes=args.media_max_bytes)


def build_engine(args):
    """An AsyncEngine from the engine flags (unset flags keep the engine's defaults)."""
    from qvl.engine.async_engine import AsyncEngine

    kw = {k: getattr(args, k) for k in ("dtype", "device", "max_model_len", "max_num_seqs",
                                        "max_num_batched_tokens", "block_size", "kv_cache_memory")
          if getattr(args, k, None) not in (None, "auto")}
    return AsyncEngine(args.model, enable_prefix_caching=args.enable_prefix_caching, **kw)


def serve(args) -> None:
    import uvicorn

    logging.basicConfig(level=getattr(logging, args.log_level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args.model = getattr(args, "model", None) or getattr(args, "model_pos", None)
    if args.model is None:
        from qvl.cli import DEMO_MODEL  # the shipped demo checkpoint
        args.model = str(DEMO_MODEL)
    api_key = args.api_key or os.environ.get("QVL_API_KEY") or None
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    engine = build_engine(args)
    limits = ServerLimits(max_images_per_request=args.max_images_per_request,
                          max_videos_per_request=args.max_videos_per_request,
                          max_visual_tokens_per_request=args.max_visual_tokens_per_request,
                          max_request_bytes=args.max_request_bytes, preprocess_workers=args.preprocess_workers)
    app = create_app(engine, served_model_name=args.served_model_name or str(args.model), api_key=api_key,
                     media_policy=_media_policy(args), limits=limits)
    logger.info("serving %s on http://%s:%d (auth %s)", args.model, args.host, args.port,
                "on" if api_key else "off")
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False,
                            timeout_graceful_shutdown=args.graceful_shutdown_timeout)
    _uvicorn_server_cls(app, args.graceful_shutdown_timeout)(config).run()


def _uvicorn_server_cls(app: FastAPI, grace_s: float):
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
