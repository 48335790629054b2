"""QuantSpec: the one quantization a model is loaded with, from config.json and/or the user's choice.

  resolve(quantization_config: dict | None, requested: str | None) -> QuantSpec | None

`quantization_config` is config.json's block as published (QUANT_FORMATS 1.1); `requested` is
EngineConfig.quantization (None: detect from the checkpoint, as vLLM does). Supported:
  gptq  checkpoint, `quant_method: gptq`, bits 4 or 8, `sym: true`, any group size (-1: one group per
        row); `checkpoint_format` gptq (v1: qzeros store zero - 1, the default) or gptq_v2 (zero as is);
        `desc_act: true` (act order: each linear's `g_idx` assigns input columns to groups, which
        qvl.quant.formats turns into a column permutation) needs the g_idx tensors (act_order)
  awq   checkpoint, `quant_method: awq`, `version: gemm`, bits 4, `zero_point: true`; its
        `modules_to_not_convert` are kept float in addition to the family's float modules
  int8  on the fly from a float checkpoint: symmetric, one scale per output channel
  int4  on the fly from a float checkpoint: symmetric, one scale per group of 128 input columns
        (64 or 32 where 128 does not divide the layer's input width)
Everything else (fp8, bitsandbytes, compressed-tensors, 2/3-bit, asymmetric GPTQ, other
AWQ kernels, a method that contradicts the checkpoint) is a ValueError of one line naming it.

Knows nothing about torch or modules.
"""
from __future__ import annotations

from dataclasses import dataclass

METHODS = ("gptq", "awq", "int8", "int4")
ON_THE_FLY = {"int8": (8, -1), "int4": (4, 128)}       # method -> (bits, group size; -1 = whole row)
_GPTQ_FORMATS = {"gptq": 1, "gptq_v2": 0}             # checkpoint_format -> offset added to stored zeros


@dataclass(frozen=True)
class QuantSpec:
    """method: one of METHODS; bits; group_size (-1: one group per output row); zero_offset: what the
    format adds to a stored zero (GPTQ v1: 1); not_convert: module-name substrings kept float;
    act_order: GPTQ desc_act (every quantized linear must carry its g_idx)."""

    method: str
    bits: int
    group_size: int
    zero_offset: int = 0
    not_convert: tuple[str, ...] = ()
    act_order: bool = False

    @property
    def from_checkpoint(self) -> bool:
        """True for a pre-quantized checkpoint (packed tensors on disk), False for on-the-fly."""
        return self.method in ("gptq", "awq")

    def keeps_float(self, module_name: str) -> bool:
        return any(s in module_name for s in self.not_convert)


def _refuse(what: str) -> ValueError:
    return ValueError(f"quantization: {what} is not supported")


def _int(qc: dict, key: str, method: str):
    v = qc.get(key)
    if not isinstance(v, int) or isinstance(v, bool):
        raise ValueError(f"quantization_config.{key} must be an integer for {method}, got {v!r}")
    return v


def _gptq(qc: dict) -> QuantSpec:
    bits = _int(qc, "bits", "gptq")
    if bits not in (4, 8):
        raise _refuse(f"GPTQ with bits={bits} (qvl runs 4 and 8)")
    if qc.get("sym", True) is not True:
        raise _refuse(f"asymmetric GPTQ (sym={qc.get('sym')!r})")
    fmt = qc.get("checkpoint_format", "gptq")
    if fmt not in _GPTQ_FORMATS:
        raise _refuse(f"GPTQ checkpoint_format={fmt!r} (qvl reads {', '.join(_GPTQ_FORMATS)})")
    group = _int(qc, "group_size", "gptq")
    if group != -1 and group <= 0:
        raise ValueError(f"quantization_config.group_size must be -1 or > 0, got {group}")
    act_order = bool(qc.get("desc_act"))
    if act_order and group == -1:
        raise ValueError("quantization_config: desc_act=true with group_size=-1 (act order needs groups)")
    return QuantSpec("gptq", bits, group, zero_offset=_GPTQ_FORMATS[fmt], act_order=act_order)


def _awq(qc: dict) -> QuantSpec:
    bits = _int(qc, "bits", "awq")
    if bits != 4:
        raise _refuse(f"AWQ with bits={bits} (AWQ is 4-bit)")
    version = str(qc.get("version", "gemm")).lower()
    if version != "gemm":
        raise _refuse(f"AWQ version={qc.get('version')!r} (qvl reads the gemm packing)")
    if qc.get("zero_point", True) is not True:
        raise _refuse("AWQ with zero_point=false")
    group = _int(qc, "group_size", "awq")
    if group <= 0:
        raise ValueError(f"quantization_config.group_size must be > 0 for AWQ, got {group}")
    skip = qc.get("modules_to_not_convert") or ()
    return QuantSpec("awq", bits, group, not_convert=tuple(str(s) for s in skip))


def _checkpoint_method(qc: dict) -> str:
    method = qc.get("quant_method")
    if method is None and (qc.get("load_in_4bit") or qc.get("load_in_8bit")):
        method = "bitsandbytes"
    return str(method).lower()


def resolve(quantization_config: dict | None, requested: str | None = None) -> QuantSpec | None:
    """The QuantSpec to load with (None: plain float weights); ValueError for anything unsupported."""
    if requested is not None and requested not in METHODS:
        raise ValueError(f"quantization must be one of {', '.join(METHODS)} or None, got {requested!r}")
    if quantization_config is None:
        if requested in ("gptq", "awq"):
            raise ValueError(f"quantization={requested!r} but config.json has no quantization_config "
                             f"(a float checkpoint); use int8 or int4 to quantize it while loading")
        if requested is None:
            return None
        bits, group = ON_THE_FLY[requested]
        return QuantSpec(requested, bits, group)
    if not isinstance(quantization_config, dict):
        raise ValueError(f"config.json quantization_config must be an object, got "
                         f"{type(quantization_config).__name__}")
    method = _checkpoint_method(quantization_config)
    parsers = {"gptq": _gptq, "awq": _awq}
    if method not in parsers:
        raise _refuse(f"quant_method={method!r} in config.json (qvl loads gptq and awq checkpoints)")
    if requested is not None and requested != method:
        raise ValueError(f"quantization={requested!r} contradicts the checkpoint, which is "
                         f"{method}-quantized (config.json quantization_config); pass {method!r} or None")
    return parsers[method](quantization_config)
