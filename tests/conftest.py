"""Shared pytest fixtures: tiny random Qwen2-VL checkpoints (see tests/tiny.py)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny import make_tiny_checkpoint, write_tiny_qwen2_5_vl, write_tiny_qwen3_vl, write_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    """Untied tiny checkpoint dir (config, safetensors, tokenizer, preprocessor, generation config)."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_untied"), tied=False, seed=0)


@pytest.fixture(scope="session")
def tiny_ckpt_tied(tmp_path_factory) -> Path:
    """Tied-embedding tiny checkpoint dir (no lm_head.weight in the file, like the 2B)."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_tied"), tied=True, seed=1)


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    """A directory holding only tokenizer.json and tokenizer_config.json (with the chat template)."""
    path = tmp_path_factory.mktemp("tiny_tok")
    write_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def tiny_qwen2_5_vl_ckpt(tmp_path_factory) -> Path:
    """Untied tiny Qwen2.5-VL checkpoint: flat hub config.json, keys as 4.57's save_pretrained writes them."""
    return write_tiny_qwen2_5_vl(tmp_path_factory.mktemp("tiny25_hub"), layout="hub", tied=False, seed=0)


@pytest.fixture(scope="session")
def tiny_qwen2_5_vl_ckpt_nested(tmp_path_factory) -> Path:
    """Tied tiny Qwen2.5-VL checkpoint (like the 3B): nested config.json, `model.language_model.*` /
    `model.visual.*` keys."""
    return write_tiny_qwen2_5_vl(tmp_path_factory.mktemp("tiny25_nested"), layout="nested", tied=True, seed=1)


@pytest.fixture(scope="session")
def tiny_qwen3_vl_ckpt(tmp_path_factory) -> Path:
    """Untied tiny Qwen3-VL checkpoint: nested config.json, `model.visual.*` / `model.language_model.*` keys."""
    return write_tiny_qwen3_vl(tmp_path_factory.mktemp("tiny3"), tied=False, seed=0)


@pytest.fixture(scope="session")
def tiny_qwen3_vl_ckpt_tied(tmp_path_factory) -> Path:
    """Tied tiny Qwen3-VL checkpoint (like the 2B / 4B)."""
    return write_tiny_qwen3_vl(tmp_path_factory.mktemp("tiny3_tied"), tied=True, seed=1)
