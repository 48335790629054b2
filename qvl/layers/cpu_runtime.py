"""The CPU runtime transform: after load, give a model's linears the kernels this CPU runs fast.

DESIGN.md's build pipeline ends with runtime transforms of the built model; this is the CPU one.
`prepare_cpu_model(model, max_bytes=...)` is applied once, by the engine, after the weights are
loaded; it reads the CPU (`probe_cpu()`, or the `features` a caller passes: tests force the AVX2 path
on any machine) and returns a `CpuRuntime` saying what it chose:

  * float32, float16, or a model not on the CPU: nothing changes ("plain": F.linear everywhere;
    float32 stays the exact reference).
  * bf16 on a CPU with native bf16 dot products (AVX512-BF16 or AMX, and torch's oneDNN has bf16
    kernels): "onednn-packed": the text decoder's and the LM head's linears get a packed copy of their
    weights for decode-sized inputs (up to 32 rows; qvl.layers.packed_linear, exact=False: held to the
    bf16 criterion, not to F.linear's bits): qvl's own 16-row panels where that kernel runs (AVX-512
    BF16), else oneDNN's blocked layout, if the copies fit in `max_bytes` (the engine passes half the RAM
    its KV pool leaves). Prefill and the
    vision tower keep F.linear: oneDNN's own bf16 GEMM is already near the machine's bf16 rate there.
  * bf16 on a CPU without them (AVX2; AVX-512F without BF16, where oneDNN would emulate bf16):
    "fp32-from-bf16": every linear of the model, vision tower included, computes inputs of 16 rows or
    more in fp32 from its bf16 weight (qvl.layers.widened_linear); weights stay bf16.
    Where the CPU has AVX2 + FMA, the text decoder's and the LM head's linears also get a copy of their
    weights in qvl's 16-row panels (within `max_bytes`), which its AVX2 kernel reads for up to 32 rows
    (qvl.layers.packed_linear.panel_linears: 2x F.linear's speed at one row, 5x at 15); more rows
    (prefill) take the fp32 path: qvl's AVX2 GEMM on the stored weight (cpu_kernels/gemm.h) where torch
    dispatches AVX2 (`gemm`), torch's fp32 GEMM on converted blocks on AVX-512F without BF16, whose
    fp32 kernels are twice as wide (no such CPU here: that choice is not measured).
  * In every bf16 mode, then, the decoder's groups of linears that read one input (q/k/v, gate/up) and
    run one qvl kernel are fused into one call (qvl.layers.fused_linear; `fused_groups` counts them),
    and where every layer's linears then run qvl's kernels (qk-int4 / qk-int8, bf16 panels) a decode
    step's layers are bound as one C++ call (qvl.layers.cpu_stack; `decode_stack`).

The decision reads what the CPU has, never assumes it: torch's dispatch capability
(`torch.backends.cpu.get_cpu_capability()`), whether oneDNN has bf16 kernels
(`torch.ops.mkldnn._is_mkldnn_bf16_supported()`) and, where /proc/cpuinfo exists, its flags.
Capping the ISA (`ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2` in the environment of a fresh
process) makes a native-bf16 machine probe as an AVX2 one, which is how bench/prefill.py measures the
fallback here. Knows nothing about the engine; of the model only `model.model` (text decoder),
`model.lm_head`, `model.dtype` and `model.device`.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch
import torch.nn as nn

from qvl.layers import cpu_stack
from qvl.layers import quant_kernels as qk
from qvl.layers.fused_linear import fuse_linears, unfuse_linears
from qvl.layers.quant_kernels import cpu_flags
from qvl.layers.packed_linear import pack_linears, packing_supported, panel_linears, unpack_linears
from qvl.layers.widened_linear import unwiden_linears, widen_linears

_NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


@dataclass(frozen=True)
class CpuFeatures:
    capability: str                  # torch's dispatch level: "AVX2", "AVX512", "DEFAULT", ...
    onednn_bf16: bool                # oneDNN has bf16 kernels for this CPU
    flags: frozenset[str] | None     # /proc/cpuinfo flags; None where unknown (not Linux)

    @property
    def native_bf16(self) -> bool:
        """bf16 dot products in hardware, usable through oneDNN."""
        return (self.onednn_bf16 and self.capability.startswith("AVX512")
                and (self.flags is None or bool(self.flags & _NATIVE_BF16_FLAGS)))


def probe_cpu() -> CpuFeatures:
    """What this process's CPU offers (as capped by ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA)."""
    flags = cpu_flags()
    onednn = (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported")
              and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()))
    return CpuFeatures(torch.backends.cpu.get_cpu_capability(), onednn, flags)


@dataclass(frozen=True)
class CpuRuntime:
    mode: str                        # "plain" | "onednn-packed" | "fp32-from-bf16"
    num_linears: int                 # linears whose forward was replaced
    features: CpuFeatures | None     # None when the model is not on the CPU
    fused_groups: int = 0            # groups of linears computed in one call (qvl.layers.fused_linear)
    panel_linears: int = 0           # fp32-from-bf16: linears on qvl's AVX2 bf16 panels for few rows
    gemm: bool = False               # fp32-from-bf16: many rows on qvl's AVX2 GEMM (else torch's fp32 GEMM)
    decode_stack: bool = False       # a decode step's decoder layers run as one call (qvl.layers.cpu_stack)


def _linears(module: nn.Module) -> list[nn.Linear]:
    return [m for m in module.modules() if isinstance(m, nn.Linear)]


def prepare_cpu_model(model: nn.Module, *, max_bytes: int | None = None,
                      features: CpuFeatures | None = None) -> CpuRuntime:
    """Apply the CPU runtime transform to `model` (see the module docstring); returns what was done.

    max_bytes: bound on the memory of new weight copies (None: no bound). features: default probe_cpu().
    """
    if model.device.type != "cpu" or model.dtype != torch.bfloat16:
        return CpuRuntime("plain", 0, None)
    features, panels, gemm = features or probe_cpu(), 0, False
    if not features.native_bf16:
        # AVX-512F without BF16: torch's fp32 GEMM has 16-lane kernels there, qvl's GEMM 8-lane ones
        gemm = qk.bf16_isa() > 0 and not features.capability.startswith("AVX512")
        mode, n = "fp32-from-bf16", widen_linears(_linears(model), library=gemm)
        if features.flags is None or {"avx2", "fma"} <= features.flags:
            panels = panel_linears(_linears(model.model) + [model.lm_head],
                                   max_bytes=None if max_bytes is None else max(0, max_bytes))
    elif not packing_supported(model.dtype, model.device):
        mode, n = "plain", 0
    else:
        n = pack_linears(_linears(model.model), head=model.lm_head,
                         max_bytes=None if max_bytes is None else max(0, max_bytes), exact=False)
        mode = "onednn-packed" if n else "plain"
    fused = fuse_linears(model.model)
    runtime = CpuRuntime(mode, n, features, fused, panels, gemm=gemm, decode_stack=cpu_stack.install(model.model))
    _trim_heap()
    return runtime


def _trim_heap() -> None:
    """Give the heap pages that loading, packing and fusing freed back to the OS (glibc's malloc_trim):
    without it a 2B int8 model's process stayed at 5.08 GB resident instead of 2.78 (bench/quant.py)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):      # not glibc
        pass


def restore_cpu_model(model: nn.Module) -> None:
    """Undo prepare_cpu_model: every linear back to F.linear."""
    cpu_stack.uninstall(model.model)
    unfuse_linears(model)
    linears = _linears(model)
    unpack_linears(linears)
    unwiden_linears(linears)
