"""The model-family registry: `config.json`'s `model_type` -> the family package that owns it.

A family is a package `qvl.models.<family>` that exposes (see qvl/models/qwen2_vl/__init__.py):
  MODEL_TYPE                the model_type it serves
  Config                    config class: `from_dict(config.json dict)`, `from_pretrained(dir)`, `model_type`
  Model                     the nn.Module (math only; built on the meta device by qvl.build)
  weights                   module: `canonical_key(stored key) -> module name`, `sanitize(name, tensor)`
  processing                module: `preprocess_spec(config, preprocessor_config)`, `rope_index(...)`,
                            `pad_tokens(item, config, encode)` (encode: text -> token ids, for
                            expansions that hold text), `box_to_original(...)`, `BOX_COORDINATES`;
                            optional `WRAPPED_KINDS`: item kinds whose pad_tokens replace the whole
                            `<|vision_start|>pad<|vision_end|>` (Qwen3-VL video timestamps)
Engine, runner, scheduler, server and CLI reach model facts only through these names. Families are
imported on first use, so `import qvl.models` costs nothing (`qvl tokens` needs no torch).
"""
from __future__ import annotations

import json
from importlib import import_module
from pathlib import Path
from types import ModuleType

FAMILIES: dict[str, str] = {
    "qwen2_vl": "qvl.models.qwen2_vl",
    "qwen2_5_vl": "qvl.models.qwen2_5_vl",
    "qwen3_vl": "qvl.models.qwen3_vl",
}
DEFAULT_MODEL_TYPE = "qwen2_vl"


def supported_model_types() -> list[str]:
    return sorted(FAMILIES)


def family_for(model_type: str | None) -> ModuleType:
    """The family package serving `model_type`; ValueError naming it and the supported ones otherwise."""
    if model_type not in FAMILIES:
        raise ValueError(f"model_type={model_type!r} is not supported; qvl runs "
                         f"{', '.join(repr(t) for t in supported_model_types())}")
    return import_module(FAMILIES[model_type])


def read_config_dict(path: str | Path, name: str = "config.json", *, required: bool = True) -> dict:
    """`path`/`name` as a dict: ValueError when it is not JSON, or missing and `required` ({} if not)."""
    path = Path(path)
    cfg_file = path / name
    if not cfg_file.is_file():
        if not required:
            return {}
        raise ValueError(f"{path} has no {name}; it is not a Hugging Face checkpoint directory")
    try:
        d = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_file} is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise ValueError(f"{cfg_file} must hold a JSON object, got {type(d).__name__}")
    return d


def load_config(path: str | Path):
    """(family package, its Config) for the checkpoint directory `path`."""
    family = family_for(read_config_dict(path).get("model_type"))
    return family, family.Config.from_pretrained(path)


def load_preprocess_spec(path: str | Path):
    """The checkpoint's PreprocessSpec (config.json + preprocessor_config.json; no weights read)."""
    family, config = load_config(path)
    return family.processing.preprocess_spec(config, read_config_dict(path, "preprocessor_config.json",
                                                                      required=False))
