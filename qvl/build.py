"""Build a model from a checkpoint (safetensors, single file or sharded) through its family (qvl.models).

  resolve_model_path(path_or_hub_id) -> local directory (a local dir as is; otherwise
      huggingface_hub.snapshot_download of the weights, configs and tokenizer files; a clear error when
      the download fails or the hub is unreachable).
  resolve_device(device) / resolve_dtype(dtype, device): EngineConfig's strings -> torch ("auto": cuda when
      available, then bfloat16 on CUDA and float32 on CPU; a clear error for a CUDA device that is not there).
  load_model(path_or_hub_id, dtype=torch.float32, device="cpu", progress=None, quantization=None, tp=None)
      -> (model, config); `model.quantization` is the QuantSpec it was loaded with (or None); with
      `tp` (qvl.parallel.shard.TPInfo) of size > 1 the model is rank tp.rank's shard (qvl.parallel.shard).

Pipeline:
  1. config.json's model_type picks the family; its `quantization_config` and the `quantization`
     argument resolve to one QuantSpec or None (qvl.quant.spec refuses what qvl cannot run); the vision
     merger's stored width is checked against the config (family.Config.check_merger_width).
  2. The family's Model is built on the meta device (no random init).
  3. Structural transforms: quantize replaces the family's `weights.QUANTIZABLE` linears by QuantLinear
     modules (qvl.quant.transform), which load their own tensors. With tp: the shard transform
     (qvl.parallel.shard; refused first by check_shardable, with the numbers) swaps the decoder's linears
     for the rank's column / row-parallel ones, each carrying the slices it reads (`tp_slices`), and drops
     what only rank 0 holds on the other ranks (whose stored tensors are then skipped, never read).
  4. Load by name: every stored tensor is renamed by the family's `weights.canonical_key`, passed through
     its `weights.sanitize` (checkpoint quirks; a sharded module's tensors are read as memory-mapped slices,
     qvl.parallel.slices, never whole), and either handed to its QuantLinear (integers keep their
     dtype; a module converts to its kernel's form once its last tensor arrives; on-the-fly int8/int4
     quantize each float weight as it is read) or checked for shape, cast to `dtype` and placed on `device`
     — one tensor at a time (peak extra memory = one tensor). A missing head (`weights.TIED[0]`, or
     tie_word_embeddings) shares the embedding, with a warning when config.json says the model is untied.
     Unexpected or missing keys -> ValueError listing them.
  5. Runtime transforms: the quantized kernels' layouts are made in step 4; the CPU bf16 packing of float
     linears is the runner's (qvl.layers.packed_linear).

Knows nothing about tokenizers, the engine or the KV cache, and no family fact.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from qvl.layers.linear import QuantLinear
from qvl.models import family_for, load_config, read_config_dict
from qvl.parallel.shard import TPInfo, check_shardable, shard_model
from qvl.parallel.slices import read as read_tensor
from qvl.quant import resolve as resolve_quantization
from qvl.quant.transform import quantize_linears

_HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.jinja", "*.model", "*.tiktoken"]
_PROGRESS_BYTES = 1 << 30  # show a progress bar above 1 GiB of weights


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    """EngineConfig.device -> a torch.device ("auto": cuda when available)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        build = "without CUDA" if torch.version.cuda is None else f"with CUDA {torch.version.cuda}"
        raise ValueError(f"device {device!r}: no CUDA device is available to this torch {torch.__version__} "
                         f"(built {build}); use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """EngineConfig.dtype -> a torch.dtype ("auto": bfloat16 on CUDA, float32 on CPU)."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[dtype]


def resolve_model_path(path_or_hub_id: str | os.PathLike) -> Path:
    """A local checkpoint directory for `path_or_hub_id` (downloading from the Hugging Face Hub if needed)."""
    s = str(path_or_hub_id)
    p = Path(s).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise ValueError(f"{s} is a file; pass a checkpoint directory or a Hugging Face Hub id")
    looks_local = s.startswith((".", "/", "~")) or s.count("/") > 1 or os.sep != "/" and os.sep in s
    if looks_local:
        raise FileNotFoundError(f"model directory {s} does not exist")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=s, allow_patterns=_HUB_PATTERNS))
    except Exception as e:  # offline, unknown repo, gated, network...
        raise FileNotFoundError(
            f"could not download {s} from the Hugging Face Hub: {type(e).__name__}: {e}; "
            f"pass a local directory"
        ) from e


def _checkpoint_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = sorted({path / f for f in weight_map.values()})
        missing = [str(f.name) for f in files if not f.is_file()]
        if missing:
            raise ValueError(f"{index} lists shard(s) that do not exist: {missing}")
        return files
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    files = sorted(path.glob("*.safetensors"))
    if files:
        return files
    bins = sorted(p.name for p in path.glob("*.bin"))
    hint = f" (found {bins}; only safetensors is supported)" if bins else ""
    raise ValueError(f"no safetensors weights in {path}{hint}")


def _name_list(names: list[str], limit: int = 20) -> str:
    shown = ", ".join(sorted(names)[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _warn_fp16(dtype: torch.dtype, family) -> None:
    if dtype == torch.float16:
        warnings.warn(f"{family.DISPLAY_NAME} in float16 overflows (NaN / '!!!!' outputs, transformers#33294); "
                      f"use bfloat16", stacklevel=3)


def _check_merger(path: Path, raw: dict, family, handles) -> None:
    """The vision merger's stored output width against config.json (family.weights.MERGER_OUT)."""
    for h in handles:
        for key in h.keys():
            if family.weights.canonical_key(key) == family.weights.MERGER_OUT:
                family.Config.check_merger_width(raw, h.get_slice(key).get_shape()[0])
                return


def _warn_untied(path: Path, head: str, config) -> None:
    if not config.tie_word_embeddings:
        warnings.warn(f"{path}: config.json has tie_word_embeddings=false but the weights have no {head}; "
                      f"the head shares the embedding", stacklevel=3)


def load_model(path_or_hub_id: str | os.PathLike, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu", progress: bool | None = None,
               quantization: str | None = None, tp: TPInfo | None = None) -> tuple[nn.Module, object]:
    """Build the model and load its weights; returns (model in eval mode, its family's config).

    quantization: None (a GPTQ/AWQ checkpoint is detected from config.json), "gptq" / "awq" (must match
    the checkpoint), "int8" / "int4" (a float checkpoint quantized while loading); see qvl.quant.
    tp: this process's place in the tensor-parallel group (None or size 1: the whole model)."""
    from safetensors import safe_open

    path = resolve_model_path(path_or_hub_id)
    raw = read_config_dict(path)
    family = family_for(raw.get("model_type"))
    weights = family.weights
    files = _checkpoint_files(path)
    handles = [safe_open(str(f), framework="pt", device="cpu") for f in files]
    _check_merger(path, raw, family, handles)
    family, config = load_config(path)
    spec = resolve_quantization(raw.get("quantization_config"), quantization)
    _warn_fp16(dtype, family)
    device = torch.device(device)
    sharded = tp is not None and tp.size > 1
    if sharded:
        check_shardable(config, spec, tp.size)

    with torch.device("meta"):
        model = family.Model(config)
    quant = quantize_linears(model, spec, weights.QUANTIZABLE, dtype=dtype, device=device) if spec else {}
    slices: dict = {}                      # canonical name -> the TensorSlice this rank reads of it
    dropped: tuple[str, ...] = ()          # name prefixes this rank does not hold (rank 0 only parts)
    if sharded:
        shard_model(model, tp)
        quant = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
        slices = {f"{n}.{a}": s for n, m in model.named_modules() for a, s in getattr(m, "tp_slices", {}).items()}
        dropped = model.tp_dropped
    head, embedding = weights.TIED
    params = dict(model.named_parameters(remove_duplicate=False))
    expected = set(params)
    tie = config.tie_word_embeddings

    sources: dict[str, tuple[int, str]] = {}  # canonical name -> (file index, stored key)
    unexpected: list[str] = []
    for fi, keys in enumerate([h.keys() for h in handles]):   # no loop variable keeps a file mapped
        for key in keys:
            name = weights.canonical_key(key)
            mod_name, _, attr = name.rpartition(".")
            if dropped and name.startswith(dropped):
                continue                       # another rank's part: never read here
            if name in expected or mod_name in quant and quant[mod_name].accepts(attr):
                sources[name] = (fi, key)
            else:
                unexpected.append(key)
    if unexpected:
        hint = ""
        if spec is None and any(k.endswith((".qweight", ".qzeros")) for k in unexpected):
            hint = " (packed quantized tensors, but config.json has no quantization_config)"
        raise ValueError(f"{path}: unexpected keys for {family.DISPLAY_NAME}{hint}: {_name_list(unexpected)}")
    holds_head = not head.startswith(dropped) if dropped else True
    if not holds_head:
        pass                                   # neither the head nor the embedding lives on this rank
    elif head not in sources:
        _warn_untied(path, head, config)
        tie = True
    elif tie:
        del sources[head]  # tied: the head is the embedding, like transformers
    missing = [n for n in expected if n not in sources and not (tie and n == head)]
    missing += [f"{m}.{a}" for m, q in quant.items() for a in q.missing() if f"{m}.{a}" not in sources]
    if missing:
        raise ValueError(f"{path}: missing keys: {_name_list(missing)}")

    total_bytes = sum(f.stat().st_size for f in files)
    show = progress if progress is not None else total_bytes > _PROGRESS_BYTES
    from tqdm.auto import tqdm

    loaded: dict[str, nn.Parameter] = {}
    for name in tqdm(sorted(sources), desc="loading weights", unit="tensor", disable=not show):
        fi, key = sources[name]
        t = weights.sanitize(name, read_tensor(handles[fi], key, slices.get(name)))
        mod_name, _, attr = name.rpartition(".")
        if mod_name in quant:             # a quantized linear loads its own tensors (integers stay integers)
            quant[mod_name].load(attr, t)
            continue
        want = tuple(params[name].shape)
        if tuple(t.shape) != want:
            raise ValueError(f"{path}: {key} has shape {tuple(t.shape)}, expected {want} from config.json")
        # Quantized: copy the float tensors too, so no view keeps the file's mapping (and every page the
        # packed tensors were read from) resident after loading. Sharded: a slice is a view of the whole
        # mapped tensor, so it is copied out (contiguous) too.
        t = t.to(device=device, dtype=dtype, copy=bool(quant) or sharded, memory_format=torch.contiguous_format)
        loaded[name] = nn.Parameter(t, requires_grad=False)
    del handles, t          # the last stored tensor too: any view of a file keeps all of it mapped

    for name, p in loaded.items():
        mod_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(mod_name), attr, p)
    if tie and holds_head:
        mod_name, _, attr = head.rpartition(".")
        setattr(model.get_submodule(mod_name), attr, model.get_parameter(embedding))
    model.config.tie_word_embeddings = tie
    model.quantization = spec
    return model.eval(), config
