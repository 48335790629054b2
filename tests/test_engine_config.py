"""EngineConfig and the flags generated from dataclass fields: validation names the field, flags
round-trip to the dataclass (defaults included), a new field is a new flag, every command lists the
engine flags once, and --chat-template replaces the checkpoint's template."""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from qvl.cli import build_parser
from qvl.config import (DEMO_MODEL, EngineConfig, ServeOptions, ServerLimits, add_dataclass_args,
                        dataclass_from_args)
from qvl.multimodal.media import MediaPolicy
from qvl.server.launch import add_serve_args, engine_config

ROOT = Path(__file__).resolve().parents[1]
ENGINE_FLAGS = ["--model", "--dtype", "--device", "--max-model-len", "--max-num-seqs", "--max-num-batched-tokens",
                "--block-size", "--kv-cache-memory", "--enable-prefix-caching", "--encoder-cache-memory",
                "--threads", "--chat-template", "--quantization", "--tensor-parallel-size", "--enforce-eager"]


def parse(cls, argv):
    p = argparse.ArgumentParser()
    add_dataclass_args(p, cls)
    return dataclass_from_args(cls, p.parse_args(argv))


# ------------------------------------------------------------------------------------------- validation

@pytest.mark.parametrize("kw, message", [
    (dict(dtype="int8"), r"EngineConfig.dtype must be one of auto, float32, bfloat16, float16, got 'int8'"),
    (dict(block_size=0), r"EngineConfig.block_size must be an integer >= 1, got 0"),
    (dict(kv_cache_memory="-1GiB"), r"EngineConfig.kv_cache_memory must be bytes > 0 or a fraction in \(0, 1\], "
                                    r"got '-1GiB'"),
    (dict(kv_cache_memory="lots"), r"EngineConfig.kv_cache_memory must be bytes .*got 'lots'"),
    (dict(kv_cache_memory=-0.5), r"EngineConfig.kv_cache_memory must be .*got -0.5"),
    (dict(quantization="fp8"), r"EngineConfig.quantization must be None or one of gptq, awq, int8, int4, got 'fp8'"),
    (dict(tensor_parallel_size=0), r"EngineConfig.tensor_parallel_size must be an integer >= 1, got 0"),
    (dict(device="tpu"), r"EngineConfig.device must be auto, cpu, cuda or cuda:N, got 'tpu'"),
    (dict(max_num_seqs=0), r"EngineConfig.max_num_seqs must be an integer >= 1, got 0"),
    (dict(max_model_len=True), r"EngineConfig.max_model_len must be an integer >= 1, got True"),
    (dict(threads=0), r"EngineConfig.threads"),
    (dict(encoder_cache_memory=-1), r"EngineConfig.encoder_cache_memory must be bytes >= 0, got -1"),
    (dict(enable_prefix_caching="no"), r"EngineConfig.enable_prefix_caching must be True or False"),
])
def test_validation_names_field_limit_and_value(kw, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig(**kw)


def test_sizes_are_parsed_and_aliases_normalised():
    c = EngineConfig(kv_cache_memory="4GiB", encoder_cache_memory="256MiB", dtype="bf16", device=None,
                     model=DEMO_MODEL)
    assert c.kv_cache_memory == 4 << 30 and c.encoder_cache_memory == 256 << 20
    assert c.dtype == "bfloat16" and c.device == "auto" and c.model == str(DEMO_MODEL)
    assert EngineConfig(kv_cache_memory="0.5").kv_cache_memory == 0.5
    assert EngineConfig(kv_cache_memory="2e9").kv_cache_memory == 2 * 10**9
    assert EngineConfig(kv_cache_memory=4e9).kv_cache_memory == 4 * 10**9
    assert EngineConfig(kv_cache_memory="4GiB") == EngineConfig(kv_cache_memory=4 << 30)
    assert EngineConfig().model_path == str(DEMO_MODEL)
    assert EngineConfig().encoder_cache_bytes("cpu") == 256 << 20
    assert EngineConfig(encoder_cache_memory=0).encoder_cache_bytes("cuda") == 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        EngineConfig().block_size = 4


def test_other_configs_check_themselves():
    with pytest.raises(ValueError, match=r"ServerLimits.preprocess_workers must be an integer >= 1, got 0"):
        ServerLimits(preprocess_workers=0)
    with pytest.raises(ValueError, match=r"ServeOptions.port must be in \[0, 65535\], got 70000"):
        ServeOptions(port=70000)


def test_unknown_llm_keyword_is_named():
    from qvl.llm import LLM

    with pytest.raises(TypeError, match="'max_num_sequences'"):
        LLM("unused", max_num_sequences=4)                       # refused before any loading


# ---------------------------------------------------------------------------------------------- flags

def test_flags_round_trip_to_the_dataclass():
    assert parse(EngineConfig, []) == EngineConfig()
    got = parse(EngineConfig, ["--model", "/m", "--dtype", "float32", "--device", "cuda:1", "--max-model-len", "4096",
                               "--max-num-seqs", "8", "--max-num-batched-tokens", "512", "--block-size", "32",
                               "--kv-cache-memory", "4GiB", "--no-prefix-caching", "--encoder-cache-memory", "0",
                               "--threads", "2", "--chat-template", "t.jinja", "--enforce-eager"])
    assert got == EngineConfig(model="/m", dtype="float32", device="cuda:1", max_model_len=4096, max_num_seqs=8,
                               max_num_batched_tokens=512, block_size=32, kv_cache_memory=4 << 30,
                               enable_prefix_caching=False, encoder_cache_memory=0, threads=2,
                               chat_template="t.jinja", enforce_eager=True)
    assert parse(EngineConfig, ["--no-enable-prefix-caching"]).enable_prefix_caching is False
    assert parse(EngineConfig, ["--no-prefix-caching", "--enable-prefix-caching"]).enable_prefix_caching is True
    assert parse(EngineConfig, ["--kv-cache-memory", "0.5"]).kv_cache_memory == 0.5


def test_serve_flags_round_trip():
    args = build_parser().parse_args(["serve"])
    assert engine_config(args) == EngineConfig()
    assert dataclass_from_args(ServerLimits, args) == ServerLimits()
    assert dataclass_from_args(MediaPolicy, args) == MediaPolicy()
    assert dataclass_from_args(ServeOptions, args) == ServeOptions()
    assert MediaPolicy().max_bytes == 64 * 1024 * 1024          # one media byte cap, library and server
    args = build_parser().parse_args([
        "serve", "/models/x", "--port", "9000", "--api-key", "k", "--max-images-per-request", "2",
        "--max-visual-tokens-per-request", "300", "--allowed-local-media-path", "/media",
        "--allowed-media-domains", "a.example.com, *.cdn.example.com", "--allowed-media-domains", "b.org",
        "--allow-private-media-addresses", "--media-timeout", "2.5", "--media-max-bytes", "1000",
        "--media-max-redirects", "0", "--max-num-seqs", "4", "--no-prefix-caching"])
    assert engine_config(args) == EngineConfig(model="/models/x", max_num_seqs=4, enable_prefix_caching=False)
    assert dataclass_from_args(ServeOptions, args) == ServeOptions(port=9000, api_key="k")
    assert dataclass_from_args(ServerLimits, args) == ServerLimits(max_images_per_request=2,
                                                                   max_visual_tokens_per_request=300)
    assert dataclass_from_args(MediaPolicy, args) == MediaPolicy(
        allowed_local_media_path="/media", allowed_media_domains=["a.example.com", "*.cdn.example.com", "b.org"],
        allow_private_addresses=True, timeout_s=2.5, max_bytes=1000, max_redirects=0)


def test_a_new_field_is_a_new_flag():
    @dataclass(frozen=True)
    class Knobs:
        depth: int = field(default=3, metadata={"help": "how deep"})
        scale: float | None = field(default=None, metadata={"help": "how big (default: unscaled)"})
        fast: bool = field(default=False, metadata={"help": "go fast", "aliases": ["--no-slow-down"]})
        tags: list[str] = field(default_factory=list, metadata={"help": "labels"})
        mode: str = field(default="a", metadata={"help": "which", "choices": ("a", "b"), "flag": "--knob-mode"})

    p = argparse.ArgumentParser()
    add_dataclass_args(p, Knobs, title="knobs")
    text = p.format_help()
    for flag in ("--depth", "--scale", "--fast, --no-fast", "--tags", "--knob-mode {a,b}"):
        assert flag in text
    assert "how deep (default: 3)" in text and "go fast (default: off)" in text
    assert dataclass_from_args(Knobs, p.parse_args([])) == Knobs()
    assert dataclass_from_args(Knobs, p.parse_args(["--depth", "5", "--scale", "0.5", "--fast", "--tags", "x,y",
                                                    "--tags", "z", "--knob-mode", "b"])) == \
        Knobs(depth=5, scale=0.5, fast=True, tags=["x", "y", "z"], mode="b")
    assert dataclass_from_args(Knobs, p.parse_args(["--fast", "--no-slow-down"])).fast is False
    with pytest.raises(ValueError, match="already has a 'depth' option"):
        add_dataclass_args(p, Knobs)


@pytest.mark.parametrize("command", ["run", "chat", "serve", "bench"])
def test_help_lists_each_engine_flag_once(command, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    text = capsys.readouterr().out
    for flag in ENGINE_FLAGS:
        assert len(re.findall(rf"^\s+{re.escape(flag)}\b", text, flags=re.M)) == 1, (command, flag)
    if command == "serve":
        for flag in ("--allowed-media-domains", "--media-max-bytes", "--max-images-per-request", "--api-key"):
            assert len(re.findall(rf"^\s+{re.escape(flag)}\b", text, flags=re.M)) == 1, flag


def test_launch_parser_alone_has_the_same_flags():
    p = add_serve_args(argparse.ArgumentParser())
    args = p.parse_args(["M", "--device", "cpu", "--threads", "1", "--dtype", "float32"])
    assert engine_config(args) == EngineConfig(model="M", device="cpu", threads=1, dtype="float32")


# -------------------------------------------------------------------------------------- chat template

def _marked_template(tmp_path: Path, source_dir: Path) -> Path:
    from qvl.multimodal.prompt import PromptProcessor

    text = PromptProcessor.from_pretrained(source_dir).chat_template
    assert "You are a helpful assistant." in text
    path = tmp_path / "marked.jinja"
    path.write_text("MARKER " + text.replace("You are a helpful assistant.",
                                             "You are a helpful assistant. MARKER MARKER MARKER."))
    return path


def test_llm_chat_template_file_replaces_the_checkpoints(tiny_ckpt, tmp_path):
    import torch

    from qvl.llm import LLM

    path = _marked_template(tmp_path, tiny_ckpt)
    threads = torch.get_num_threads()
    try:
        llm = LLM(str(tiny_ckpt), dtype="float32", device="cpu", kv_cache_memory=4 << 20,
                  chat_template=str(path), threads=1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    assert llm.engine.processor.chat_template == path.read_text()
    msgs = [{"role": "user", "content": "hi"}]
    assert llm.engine.processor.process_messages(msgs).text.startswith("MARKER <|im_start|>system")
    out = llm.chat(msgs, llm.default_sampling_params(max_tokens=2), use_tqdm=False)[0]
    plain = LLM.from_config(EngineConfig(model=str(tiny_ckpt), dtype="float32", device="cpu",
                                         kv_cache_memory=4 << 20))
    base = plain.chat(msgs, plain.default_sampling_params(max_tokens=2), use_tqdm=False)[0]
    assert len(out.prompt_token_ids) > len(base.prompt_token_ids)


def test_cli_run_chat_template_flag(tmp_path):
    path = _marked_template(tmp_path, DEMO_MODEL)

    def prompt_tokens(*extra):
        r = subprocess.run([sys.executable, "-m", "qvl.cli", "run", "hi", "--json", "--max-tokens", "1",
                            "--threads", "1", *extra], capture_output=True, text=True, timeout=240, cwd=ROOT)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)["prompt_tokens"]

    assert prompt_tokens("--chat-template", str(path)) > prompt_tokens()
    r = subprocess.run([sys.executable, "-m", "qvl.cli", "run", "hi", "--chat-template", str(tmp_path / "nope")],
                       capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert r.returncode == 2 and "chat_template" in r.stderr and "Traceback" not in r.stderr
