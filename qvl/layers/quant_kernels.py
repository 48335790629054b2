"""qvl's own CPU matmul kernels for bf16 activations: int4 / int8 weight-only and plain bf16 (few rows).

Why: on the bench machine (AMD EPYC, AVX512-BF16, 1 thread, shared) torch's `_weight_int4pack_mm_for_cpu`
and `_weight_int8pack_mm` read 7-10 GB/s of weight at one row and took 1.7-2.5x oneDNN's bf16 time at 16
rows; these kernels widen the integers to exact bf16 values in registers and use `vdpbf16ps` on 16-row
panels, reading 11-16 GB/s (bf16 head: 21.8 vs oneDNN's 14.3), and int4 at 16 rows matches oneDNN's bf16
(bench/quant.py --kernels, README "Quantized checkpoints").

  available() -> bool          the library compiled and loaded (g++ on first use, cached by source hash)
  native() -> bool             ... and this CPU has AVX-512 BF16 (checked at run time by the library)
  pack_int4(q (N, K) uint8) -> (N, K/2) uint8, pack_int8(w8 (N, K) int8) -> (N, K): the kernels' layout,
               panels of 16 output rows, 32 bytes per step of the input dim (one sequential stream each)
  QuantWeight(bits, w, s, z, zc, group)   one layer's weight bound to the library (what QuantLinear holds):
    .matmul(x, bias) -> (M, N) bf16       few rows: integers widened in registers
    .dequant_matmul(x, bias) -> (M, N)    many rows: W dequantized in bf16 blocks, each through torch.mm
    .dequant_rows(n0, n1, out)            rows of W = (q − z)·s in bf16
  int4_mm / int8_mm / dequant4_rows / dequant8_rows   the same as one-off calls (tests, bench)
  pack_bf16(w (N, K) bf16) -> 16-row panels; bf16_mm(x, panels, bias) -> (M, N) bf16   (the LM head)
int4: W = (q − z)·s, w4 from pack_int4, z (G, N) uint8 or None (then zc everywhere); int8: W = w8·s, w8
from pack_int8. N % 16 == 0. x is (M, K) bf16 contiguous, s fp32 (G, N), bias (N,) or None (added in fp32); `isa=0`
runs the scalar code (tests).

Numerics: products of bf16 x and small integers are exact in fp32 and summed in fp32; a group's sum is
scaled by its fp32 scale (int4: the zero is applied as (128 + z)·Σx, see the source); the result is rounded
to bf16 once. Held to the bf16 criterion, not to F.linear's bits. dequant_mm rounds W to bf16 first.

Fallbacks, never an assumed ISA: QVL_CPU_KERNELS=0 in the environment, no g++, a failed compile or a CPU
without AVX-512 BF16 -> available()/native() is False and qvl.layers.linear keeps torch's kernels.
The compiled library lives in $QVL_KERNEL_CACHE or ~/.cache/qvl/kernels/<hash>/ (written atomically, so
concurrent first uses are safe). The kernels release the GIL (ctypes).
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

from qvl.layers.cpu_kernels_src import SOURCE

log = logging.getLogger(__name__)
_lock = threading.Lock()
_state: dict = {}
_P, _I = ctypes.c_void_p, ctypes.c_int
_SIGS = {"qk_int4": [_P, _P, _P, _P, _I, _P, _P, _I, _I, _I, _I, _I, _I],
         "qk_int8": [_P, _P, _P, _P, _P, _I, _I, _I, _I, _I, _I],
         "qk_bf16": [_P, _P, _P, _P, _I, _I, _I, _I],
         "qk_dequant4": [_P, _P, _P, _I, _P, _I, _I, _I, _I, _I],
         "qk_dequant8": [_P, _P, _P, _I, _I, _I, _I, _I]}
BLOCK_ELEMS = 1 << 21          # dequant_mm: weight elements per bf16 block (4 MiB, stays in L2/L3)


def _build() -> ctypes.CDLL | None:
    if os.environ.get("QVL_CPU_KERNELS", "1") == "0":
        return None
    cxx = shutil.which(os.environ.get("CXX", "g++"))
    if cxx is None:
        log.info("qvl CPU kernels: no C++ compiler, using torch's kernels")
        return None
    digest = hashlib.sha256(SOURCE.encode()).hexdigest()[:16]
    root = Path(os.environ.get("QVL_KERNEL_CACHE") or Path.home() / ".cache" / "qvl" / "kernels")
    so = root / digest / "qk.so"
    if not so.is_file():
        try:
            so.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=so.parent) as tmp:
                cpp, out = Path(tmp) / "qk.cpp", Path(tmp) / "qk.so"
                cpp.write_text(SOURCE)
                subprocess.run([cxx, "-O3", "-std=c++17", "-shared", "-fPIC", "-o", str(out), str(cpp),
                                "-lpthread"], check=True, capture_output=True, timeout=300)
                os.replace(out, so)                 # atomic: a concurrent process sees all or nothing
        except (OSError, subprocess.SubprocessError) as e:
            err = getattr(e, "stderr", b"") or b""
            log.warning("qvl CPU kernels did not compile (%s %s); using torch's kernels", e,
                        err.decode(errors="replace")[-500:])
            return None
    try:
        lib = ctypes.CDLL(str(so))
    except OSError as e:
        log.warning("qvl CPU kernels did not load (%s); using torch's kernels", e)
        return None
    for name, sig in _SIGS.items():
        getattr(lib, name).argtypes = sig
        getattr(lib, name).restype = _I
    lib.qk_has_avx512bf16.restype = _I
    return lib


def _lib() -> ctypes.CDLL | None:
    with _lock:
        if "lib" not in _state:
            _state["lib"] = _build()
        return _state["lib"]


def available() -> bool:
    return _lib() is not None


def native() -> bool:
    lib = _lib()
    return lib is not None and bool(lib.qk_has_avx512bf16())


def _ptr(t: torch.Tensor | None):
    if t is not None and not (t.is_contiguous() and t.device.type == "cpu"):
        raise ValueError(f"qvl CPU kernels take contiguous CPU tensors, got shape {tuple(t.shape)} with strides "
                         f"{t.stride()} on {t.device}")
    return None if t is None else t.data_ptr()


def _check(rc: int, what: str) -> None:
    if rc:
        raise ValueError(f"qvl CPU kernel {what} refused its input (code {rc}: -1 shape, -2 ISA)")


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(N, K) integers in [0, 16) -> the kernels' 16-row panels, stored as (N, K/2) uint8 (N % 16 == 0,
    K % 4 == 0): per panel and 4 columns, 32 bytes, byte 2r + e = q[r, k + e] | q[r, k + 2 + e] << 4."""
    n, k = q.shape
    c = q.to(torch.uint8).view(n // 16, 16, k // 4, 2, 2)                                  # (P, r, K/4, half, e)
    b = c[:, :, :, 0] | (c[:, :, :, 1] << 4)                                                # (P, r, K/4, e)
    return b.transpose(1, 2).contiguous().view(n, k // 2)                                   # (N, K/2) storage


def pack_int8(w8: torch.Tensor) -> torch.Tensor:
    """(N, K) int8 -> the kernels' 16-row panels (N % 16 == 0, K even): per panel and column pair, 32 bytes."""
    n, k = w8.shape
    return w8.view(n // 16, 16, k // 2, 2).transpose(1, 2).contiguous().view(n, k)         # (N, K) storage


class QuantWeight:
    """One layer's integer weight bound to the library once (pointers and shapes resolved here, so a decode
    call costs one ctypes call): bits 4 -> w from pack_int4, z (G, N) uint8 or None (zc everywhere);
    bits 8 -> w from pack_int8, z unused. Holds its tensors: the pointers stay valid."""

    def __init__(self, bits: int, w: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None = None, zc: int = 0,
                 group: int = 128) -> None:
        lib = _lib()
        self.bits, self.w, self.s, self.z = bits, w, s, z
        n, k = w.shape[0], w.shape[1] * (2 if bits == 4 else 1)
        self.n, self.k = n, k
        wp, sp, zp = _ptr(w), _ptr(s), _ptr(z)
        if bits == 4:
            mm, dq = lib.qk_int4, lib.qk_dequant4
            self._mm = lambda xp, yp, bp, m, isa, nt: mm(xp, wp, sp, zp, zc, yp, bp, m, n, k, group, isa, nt)
            self._dq = lambda op, n0, n1: dq(wp, sp, zp, zc, op, n, k, group, n0, n1)
        else:
            mm, dq = lib.qk_int8, lib.qk_dequant8
            self._mm = lambda xp, yp, bp, m, isa, nt: mm(xp, wp, sp, yp, bp, m, n, k, group, isa, nt)
            self._dq = lambda op, n0, n1: dq(wp, sp, op, n, k, group, n0, n1)
        self._bias: tuple = (None, None)

    def bias32(self, bias: torch.Tensor | None) -> torch.Tensor | None:
        """The fp32 copy the kernels add, made once per bias tensor."""
        if bias is None:
            return None
        if self._bias[0] is not bias:
            self._bias = (bias, bias.float().contiguous())
        return self._bias[1]

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None, *, isa: int = 1) -> torch.Tensor:
        """(M, K) bf16 -> (M, N) bf16, integers widened in registers (few rows)."""
        if x.shape[-1] != self.k:
            raise ValueError(f"qvl CPU kernel: input has {x.shape[-1]} columns, the weight {self.k}")
        y = torch.empty(x.shape[0], self.n, dtype=torch.bfloat16)                          # (M, N)
        _check(self._mm(_ptr(x), y.data_ptr(), _ptr(self.bias32(bias)), x.shape[0], isa,
                        torch.get_num_threads()), f"int{self.bits}")
        return y

    def dequant_rows(self, n0: int, n1: int, out: torch.Tensor) -> torch.Tensor:
        """out (n1 − n0, K) bf16 = rows [n0, n1) of W = (q − z)·s (n0, n1 multiples of 16)."""
        _check(self._dq(_ptr(out), n0, n1), f"dequant{self.bits}")
        return out

    def dequant_matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return dequant_mm(x, self.dequant_rows, self.n, bias)


def int4_mm(x, w4, s, z, zc: int, group: int, bias=None, *, isa: int = 1) -> torch.Tensor:
    return QuantWeight(4, w4, s, z, zc, group).matmul(x, bias, isa=isa)


def int8_mm(x, w8, s, group: int, bias=None, *, isa: int = 1) -> torch.Tensor:
    return QuantWeight(8, w8, s, group=group).matmul(x, bias, isa=isa)


def pack_bf16(w: torch.Tensor) -> torch.Tensor:
    """(N, K) bf16 -> the bf16 kernel's 16-row panels (N % 16 == 0, K even), stored as (N, K): per panel and
    column pair, the 16 rows' two values side by side."""
    n, k = w.shape
    return w.detach().view(n // 16, 16, k // 2, 2).transpose(1, 2).contiguous().view(n, k)   # (N, K) storage


def bf16_mm(x, w, bias=None) -> torch.Tensor:
    """x (M, K) bf16 · Wᵀ with w = pack_bf16(W)."""
    m, k = x.shape
    y = torch.empty(m, w.shape[0], dtype=torch.bfloat16)                                   # (M, N)
    b = None if bias is None else bias.float().contiguous()
    _check(_lib().qk_bf16(_ptr(x), _ptr(w), _ptr(y), _ptr(b), m, w.shape[0], k, torch.get_num_threads()), "bf16")
    return y


def dequant4_rows(w4, s, z, zc: int, group: int, n0: int, n1: int, out: torch.Tensor) -> torch.Tensor:
    return QuantWeight(4, w4, s, z, zc, group).dequant_rows(n0, n1, out)


def dequant8_rows(w8, s, group: int, n0: int, n1: int, out: torch.Tensor) -> torch.Tensor:
    return QuantWeight(8, w8, s, group=group).dequant_rows(n0, n1, out)


def dequant_mm(x: torch.Tensor, dequant, n: int, bias=None) -> torch.Tensor:
    """x (M, K) · Wᵀ for many rows: `dequant(n0, n1, out)` writes rows [n0, n1) of W as bf16 into
    out (n1 − n0, K); each block goes through torch's bf16 GEMM (oneDNN), so the integer-to-bf16 work is
    paid once per block, not once per input row."""
    m, k = x.shape
    rows = max(16, min(n, BLOCK_ELEMS // k) // 16 * 16)                # whole 16-row panels
    scratch = torch.empty(rows, k, dtype=torch.bfloat16)                                   # (b, K)
    y = torch.empty(m, n, dtype=torch.bfloat16)                                            # (M, N)
    for n0 in range(0, n, rows):
        n1 = min(n, n0 + rows)
        blk = dequant(n0, n1, scratch[:n1 - n0])                                           # (b, K)
        y[:, n0:n1] = torch.mm(x, blk.t()) if bias is None else torch.addmm(bias[n0:n1].to(x.dtype), x, blk.t())
    return y
