"""Configuration dataclasses that check themselves: the one source of every default and every flag.

  EngineConfig   how an engine is loaded and sized (qvl.LLM, LLMEngine.from_config, every CLI command)
  ServerLimits   per-request limits of the HTTP server (qvl serve)
  ServeOptions   where and how qvl serve listens
  BatchOptions   how qvl batch runs a JSONL job
  DEMO_MODEL     the demo checkpoint shipped in the package (EngineConfig.model=None loads it)

Each dataclass validates itself in __post_init__ (a ValueError naming the field, the limit and the
value) and carries its help text in field metadata. `add_dataclass_args(parser, cls)` turns the
fields into argparse flags and `dataclass_from_args(cls, args)` builds the dataclass back, so a new
knob is one field. Flags have no argparse default: an unset flag is absent from the namespace and the
field's default applies (qvl.config_flags: the field metadata it reads).

Knows nothing about torch, models or HTTP; reads no environment variable.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from qvl.config_flags import add_dataclass_args, dataclass_from_args  # noqa: F401 (re-exported)

DEMO_MODEL = Path(__file__).parent / "demo"

# What "auto" (None) means for the two cache sizes, by device type.
AUTO_KV_CACHE_FRACTION = {"cuda": 0.85, "cpu": 0.25}      # of free memory after the weights
AUTO_ENCODER_CACHE_BYTES = {"cuda": 512 << 20, "cpu": 256 << 20}

DTYPES = ("auto", "float32", "bfloat16", "float16")
QUANTIZATIONS = ("gptq", "awq", "int8", "int4")          # = qvl.quant.METHODS (this module imports no torch)
DIST_BACKENDS = ("nccl", "gloo")
ATTENTION_BACKENDS = ("auto", "reference", "paged")
_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")
_UNITS = {"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
          "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}


# ------------------------------------------------------------------------------------------- sizes

def parse_memory(value, name: str = "memory", *, fraction: bool = True) -> int | float | None:
    """None, bytes (int), a fraction (float, when `fraction`), or a string: '4GiB', '512MB', '2e9', '0.8'.

    A unitless number <= 1 is a fraction (when `fraction`); anything else is bytes (int). ValueError
    names `name`."""
    if value is None or isinstance(value, bool):
        return value                       # bool: refused by the caller's range check
    if isinstance(value, (int, float)):
        return value if isinstance(value, int) or (fraction and value <= 1) else int(value)
    s = str(value).strip().lower().replace(" ", "")
    try:
        for unit, mult in _UNITS.items():
            if s.endswith(unit):
                return int(float(s[:-len(unit)]) * mult)
        if s.endswith("b"):
            return int(float(s[:-1]))
        num = float(s)
    except ValueError:
        raise ValueError(f"{name} must be bytes (e.g. 4GiB, 512MB, 2e9)"
                         f"{' or a fraction in (0, 1]' if fraction else ''}, got {value!r}") from None
    return num if fraction and num <= 1 else int(num)


# ------------------------------------------------------------------------------------ media defaults

MM_PROCESSOR_KEYS = {"min_pixels": int, "max_pixels": int, "fps": float}


def parse_mm_processor_kwargs(value) -> dict | None:
    """EngineConfig.mm_processor_kwargs (a dict or its JSON text) -> a checked dict, or None."""
    where = "EngineConfig.mm_processor_kwargs"
    if value is None or value == {}:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where} must be a JSON object, got {value!r} ({e})") from None
    _require(isinstance(value, dict), where, "a JSON object", value)
    unknown = sorted(set(value) - set(MM_PROCESSOR_KEYS))
    _require(not unknown, where, f"keys among {sorted(MM_PROCESSOR_KEYS)}", unknown)
    for key, v in value.items():
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 and (
            MM_PROCESSOR_KEYS[key] is float or _is_int(v)) and v != float("inf")
        _require(ok, f"{where}[{key!r}]", f"a positive {MM_PROCESSOR_KEYS[key].__name__}", v)
    if "min_pixels" in value and "max_pixels" in value:
        _require(value["min_pixels"] <= value["max_pixels"], f"{where}['min_pixels']",
                 f"<= max_pixels {value['max_pixels']}", value["min_pixels"])
    return dict(value)


# ------------------------------------------------------------------------------------------ checks

def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _require(ok: bool, where: str, limit: str, value) -> None:
    if not ok:
        raise ValueError(f"{where} must be {limit}, got {value!r}")


def _check_ints(obj, names: dict[str, int], *, optional: tuple[str, ...] = ()) -> None:
    """Each field in `names` an int >= its lower bound (None allowed for the `optional` ones)."""
    for name, lo in names.items():
        v = getattr(obj, name)
        if v is None and name in optional:
            continue
        _require(_is_int(v) and v >= lo, f"{type(obj).__name__}.{name}", f"an integer >= {lo}", v)


# -------------------------------------------------------------------------------------- EngineConfig

def _f(default, help: str, **meta):
    return field(default=default, metadata={"help": help, **meta})


@dataclass(frozen=True)
class EngineConfig:
    """Everything that decides how a checkpoint is loaded and how the engine is sized.

    Loading (read by LLMEngine.from_config only): model, dtype, device, threads, chat_template,
    quantization, tensor_parallel_size. Sizing (read by LLMEngine): the rest. Sizes given as strings
    are parsed here: after construction kv_cache_memory is None, an int (bytes) or a float (a
    fraction), and encoder_cache_memory None or an int."""

    model: str | None = _f(None, "checkpoint directory or Hugging Face hub id "
                                 "(default: the demo checkpoint shipped in qvl/demo)")
    dtype: str = _f("auto", "weights and activations dtype (auto: bfloat16 on CUDA, float32 on CPU)",
                    choices=DTYPES)
    device: str = _f("auto", "cpu, cuda or cuda:N (auto: cuda when available, else cpu)")
    max_model_len: int | None = _f(None, "context length in tokens, prompt + output "
                                         "(default: the model's max_position_embeddings)")
    max_num_seqs: int = _f(256, "sequences decoded at once")
    max_num_batched_tokens: int = _f(8192, "tokens per engine step; longer prefills are split in chunks")
    block_size: int = _f(16, "tokens per KV-cache block")
    kv_cache_memory: int | float | str | None = _f(
        None, "KV-cache size: bytes (4GiB, 2e9) or a fraction of the memory free after loading the "
              f"weights (0.8) (default: {AUTO_KV_CACHE_FRACTION['cuda']} of free CUDA memory, "
              f"{AUTO_KV_CACHE_FRACTION['cpu']} of available RAM on CPU, capped at what max_num_seqs "
              "sequences of max_model_len tokens can use)", metavar="SIZE")
    enable_prefix_caching: bool = _f(True, "reuse the KV blocks of shared prompt prefixes "
                                           "(images included, by content)", aliases=["--no-prefix-caching"])
    encoder_cache_memory: int | str | None = _f(
        None, "vision-feature cache size in bytes, e.g. 256MiB; 0 turns it off (default: "
              f"{AUTO_ENCODER_CACHE_BYTES['cuda'] >> 20}MiB on CUDA, {AUTO_ENCODER_CACHE_BYTES['cpu'] >> 20}MiB "
              "on CPU)", metavar="SIZE")
    threads: int | None = _f(None, "CPU threads for torch (default: torch's; 1 is much faster on a "
                                   "machine other jobs load)")
    chat_template: str | None = _f(None, "a Jinja chat-template file used instead of the checkpoint's",
                                   metavar="FILE")
    quantization: str | None = _f(None, "weight-only quantization: gptq / awq (must match the checkpoint's "
                                        "quantization_config), int8 (per output channel) or int4 (groups of "
                                        "128) to quantize a float checkpoint while loading (default: detect a "
                                        "GPTQ/AWQ checkpoint from config.json, else float)",
                                  choices=QUANTIZATIONS)
    tensor_parallel_size: int = _f(1, "processes (one per GPU) the text decoder is split over; on one machine qvl "
                                      "starts them itself, across machines see `qvl worker`",
                                   aliases=["-tp"])
    distributed_backend: str | None = _f(None, "torch.distributed backend of the tensor-parallel ranks "
                                               "(default: nccl on CUDA, gloo on CPU)", choices=DIST_BACKENDS)
    attention_backend: str = _f("auto", "decoder attention: reference (SDPA over gathered context; the CPU "
                                        "path and the test oracle) or paged (Triton kernels reading K/V "
                                        "through the block table; CUDA) (auto: paged on CUDA when Triton is "
                                        "installed, else reference)", choices=ATTENTION_BACKENDS)
    enforce_eager: bool = _f(False, "never capture CUDA graphs: every decode step runs eagerly")
    mm_processor_kwargs: dict | str | None = _f(
        None, 'engine-wide media defaults, JSON: {"min_pixels": N, "max_pixels": N} per image (replacing '
              'the checkpoint\'s preprocessor_config.json limits), {"fps": F} per video; a request may lower '
              'them, never raise them (vLLM\'s --mm-processor-kwargs)', metavar="JSON")

    def __post_init__(self):
        def set_(name: str, value) -> None:          # the normalised value of a frozen field
            object.__setattr__(self, name, value)

        if self.model is not None:
            _require(isinstance(self.model, (str, Path)) and str(self.model) != "", "EngineConfig.model",
                     "a checkpoint directory or hub id (or None for the demo)", self.model)
            set_("model", str(self.model))
        dtype = self.dtype if isinstance(self.dtype, str) else str(self.dtype).removeprefix("torch.")
        set_("dtype", _DTYPE_ALIASES.get(dtype, dtype))
        _require(self.dtype in DTYPES, "EngineConfig.dtype", f"one of {', '.join(DTYPES)}", self.dtype)
        set_("device", "auto" if self.device is None else str(self.device))
        _require(_DEVICE.fullmatch(self.device) is not None, "EngineConfig.device",
                 "auto, cpu, cuda or cuda:N", self.device)
        _check_ints(self, {"max_model_len": 1, "max_num_seqs": 1, "max_num_batched_tokens": 1,
                           "block_size": 1, "threads": 1, "tensor_parallel_size": 1},
                    optional=("max_model_len", "threads"))
        kv = parse_memory(self.kv_cache_memory, "EngineConfig.kv_cache_memory")
        _require(kv is None or (_is_int(kv) and kv > 0) or (isinstance(kv, float) and 0 < kv <= 1),
                 "EngineConfig.kv_cache_memory", "bytes > 0 or a fraction in (0, 1]", self.kv_cache_memory)
        set_("kv_cache_memory", kv)
        enc = parse_memory(self.encoder_cache_memory, "EngineConfig.encoder_cache_memory", fraction=False)
        _require(enc is None or (_is_int(enc) and enc >= 0), "EngineConfig.encoder_cache_memory",
                 "bytes >= 0", self.encoder_cache_memory)
        set_("encoder_cache_memory", enc)
        for name in ("enable_prefix_caching", "enforce_eager"):
            _require(isinstance(getattr(self, name), bool), f"EngineConfig.{name}", "True or False",
                     getattr(self, name))
        _require(self.chat_template is None or (isinstance(self.chat_template, (str, Path))
                                                and str(self.chat_template) != ""),
                 "EngineConfig.chat_template", "a template file path or None", self.chat_template)
        if self.chat_template is not None:
            set_("chat_template", str(self.chat_template))
        set_("mm_processor_kwargs", parse_mm_processor_kwargs(self.mm_processor_kwargs))
        _require(self.quantization is None or self.quantization in QUANTIZATIONS, "EngineConfig.quantization",
                 f"None or one of {', '.join(QUANTIZATIONS)}", self.quantization)
        _require(self.distributed_backend is None or self.distributed_backend in DIST_BACKENDS,
                 "EngineConfig.distributed_backend", f"None or one of {', '.join(DIST_BACKENDS)}",
                 self.distributed_backend)
        _require(self.attention_backend in ATTENTION_BACKENDS, "EngineConfig.attention_backend",
                 f"one of {', '.join(ATTENTION_BACKENDS)}", self.attention_backend)

    @property
    def model_path(self) -> str:
        """The checkpoint to load: `model`, or the shipped demo checkpoint."""
        return self.model if self.model is not None else str(DEMO_MODEL)

    def encoder_cache_bytes(self, device_type: str) -> int:
        """encoder_cache_memory, or its auto size on this device type."""
        if self.encoder_cache_memory is not None:
            return self.encoder_cache_memory
        return AUTO_ENCODER_CACHE_BYTES["cuda" if device_type == "cuda" else "cpu"]


# ---------------------------------------------------------------------------------------- the server

@dataclass(frozen=True)
class ServerLimits:
    """What one HTTP request may ask for; more is a 4xx before any media is decoded."""

    max_images_per_request: int = _f(16, "images in one request")
    max_videos_per_request: int = _f(2, "videos in one request")
    max_visual_tokens_per_request: int | None = _f(
        None, "image + video tokens in one request (default: on CUDA only the context bounds them; on a "
              "CPU what the vision tower encodes in seconds, 263 for Qwen2-VL's ViT, see qvl.engine.runner)")
    max_request_bytes: int = _f(64 * 1024 * 1024, "HTTP body size limit in bytes")
    preprocess_workers: int = _f(4, "threads that fetch, decode and resize media")
    body_read_timeout: float = _f(30.0, "seconds a client may take to send its whole request body (then 408)")
    strict_request_fields: bool = _f(False, "refuse request fields the server does not read (400) instead of "
                                            "logging and ignoring them")

    def __post_init__(self):
        _check_ints(self, {"max_images_per_request": 0, "max_videos_per_request": 0,
                           "max_visual_tokens_per_request": 1, "max_request_bytes": 1, "preprocess_workers": 1},
                    optional=("max_visual_tokens_per_request",))
        _require(isinstance(self.body_read_timeout, (int, float)) and self.body_read_timeout > 0,
                 "ServerLimits.body_read_timeout", "> 0 seconds", self.body_read_timeout)


LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
METRICS_COMPAT = ("vllm",)


@dataclass(frozen=True)
class ServeOptions:
    """Where `qvl serve` listens, who may call it, and how it stops."""

    host: str = _f("127.0.0.1", "address to listen on")
    port: int = _f(8000, "TCP port")
    api_key: str | None = _f(None, "require 'Authorization: Bearer KEY' on every route but /health "
                                   "(default: the QVL_API_KEY environment variable, read at startup)")
    served_model_name: str | None = _f(None, "the model id in the API (default: the checkpoint folder's name; "
                                             "the model argument as given is accepted too)")
    log_level: str = _f("info", "server log level", choices=LOG_LEVELS)
    graceful_shutdown_timeout: float = _f(30.0, "on SIGTERM, seconds in-flight requests may take "
                                                "before they are aborted")
    ui: bool = _f(True, "serve the web page (chat with images and video, token counts, boxes) at / "
                        "(--no-ui turns it off)")
    log_format: str = _f("text", "request log: one text line, or one JSON object, per finished request "
                                 "(logger qvl.requests, on stderr)", choices=LOG_FORMATS)
    log_prompts: bool = _f(False, "put the prompt text in the request log (never image or video bytes)")
    log_client_addr: bool = _f(False, "put the client's address in the request log")
    cost_per_hour: float | None = _f(None, "instance price in USD per hour: exports qvl:cost_usd_total and "
                                           "logs each request's cost_usd (its share of engine-busy time)",
                                     metavar="USD")
    metrics_compat: str | None = _f(None, "also export the vLLM-named series (vllm:num_requests_waiting, "
                                          "vllm:kv_cache_usage_perc, ...) that vLLM dashboards and "
                                          "autoscalers read", choices=METRICS_COMPAT)
    otlp_traces_endpoint: str | None = _f(None, "send one OpenTelemetry trace per request (child spans: media "
                                                "fetch, preprocessing, queue, prefill, decode) to this OTLP "
                                                "endpoint; needs the qvl[otel] extra", metavar="URL")
    allowed_origins: list[str] | None = _f(None, "browser origins allowed to call the API (CORS), e.g. "
                                                 "https://app.example.com; '*' for any (default: none)")
    header_read_timeout: float = _f(10.0, "seconds a connection may take to send complete request headers")
    timeout_keep_alive: float = _f(5.0, "seconds an idle keep-alive connection stays open")
    limit_concurrency: int = _f(1024, "open connections at once; a request beyond them gets a 503")

    def __post_init__(self):
        for name in ("header_read_timeout", "timeout_keep_alive"):
            v = getattr(self, name)
            _require(isinstance(v, (int, float)) and v > 0, f"ServeOptions.{name}", "> 0 seconds", v)
        _check_ints(self, {"limit_concurrency": 1})
        _require(_is_int(self.port) and 0 <= self.port <= 65535, "ServeOptions.port", "in [0, 65535]",
                 self.port)
        _require(self.log_level in LOG_LEVELS, "ServeOptions.log_level", f"one of {', '.join(LOG_LEVELS)}",
                 self.log_level)
        _require(isinstance(self.graceful_shutdown_timeout, (int, float)) and self.graceful_shutdown_timeout >= 0,
                 "ServeOptions.graceful_shutdown_timeout", ">= 0 seconds", self.graceful_shutdown_timeout)
        _require(self.log_format in LOG_FORMATS, "ServeOptions.log_format", f"one of {', '.join(LOG_FORMATS)}",
                 self.log_format)
        _require(self.cost_per_hour is None or (isinstance(self.cost_per_hour, (int, float))
                                                and not isinstance(self.cost_per_hour, bool)
                                                and self.cost_per_hour >= 0),
                 "ServeOptions.cost_per_hour", ">= 0 USD", self.cost_per_hour)
        _require(self.metrics_compat is None or self.metrics_compat in METRICS_COMPAT,
                 "ServeOptions.metrics_compat", f"None or one of {', '.join(METRICS_COMPAT)}", self.metrics_compat)
        _require(self.otlp_traces_endpoint is None or "://" in str(self.otlp_traces_endpoint),
                 "ServeOptions.otlp_traces_endpoint", "a URL such as http://collector:4317",
                 self.otlp_traces_endpoint)


@dataclass(frozen=True)
class BatchOptions:
    """How `qvl batch INPUT.jsonl -o OUTPUT.jsonl` runs a job (qvl.batch)."""

    error_file: str | None = _f(None, "where failed lines go (default: OUTPUT with .jsonl -> .errors.jsonl)",
                                metavar="FILE")
    max_in_flight: int | None = _f(None, "lines being prepared or generated at once (default: 2 x "
                                         "max_num_seqs)")
    served_model_name: str | None = _f(None, "the model name request bodies may give (default: the model "
                                             "argument)")
    progress: bool = _f(True, "progress bar with ETA and tok/s on stderr (--no-progress turns it off)")

    def __post_init__(self):
        _check_ints(self, {"max_in_flight": 1}, optional=("max_in_flight",))
