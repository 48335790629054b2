"""qvl's own CPU matmul kernels for bf16 activations: int4 / int8 weight-only and plain bf16 (few rows).

Why: on the bench machine (AMD EPYC, 1 thread, shared) torch's `_weight_int4pack_mm_for_cpu` and
`_weight_int8pack_mm` read 7-10 GB/s of weight at one row, a copy runs at ~23. These kernels read the
weight as one sequential stream per 16-row panel: the integers on int8-quantized activations through
AVX-512 VNNI (qvl/layers/cpu_kernels/vnni.h) or, on CPUs without it, AVX2 (avx2.h, the same bits), bf16
through AVX-512 BF16 or AVX2 + FMA (bf16.h); bench/quant.py and README "Quantized checkpoints" have the
figures.

  available() -> bool          the library compiled and loaded (g++ on first use, cached by source hash)
  native() -> bool             ... and this CPU has AVX-512 BF16 (native bf16 dot products; checked at run time)
  bf16_isa() -> int            the bf16 kernel's best ISA here: 1 AVX-512 BF16, 2 AVX2 + FMA (fp32 FMAs on
                               the widened weight, cpu_kernels/bf16.h), 0 none
  int_isa() -> int             the integer kernels' best ISA here: 1 AVX-512 VNNI, 2 AVX2 + FMA + F16C, 0 none
  native_int() -> bool         int_isa() > 0: the integer kernels run vectorized on this CPU
  pack_int4(q (N, K) uint8, il) -> (N, K/2) uint8, pack_int8(w8 (N, K) int8, il) -> (N, K) uint8: the
               kernels' 16-row panels, 64 bytes per step of the input dim, interleaved in blocks of 8
               panels (il 8: one sequential stream a block, the VNNI kernel's) or panel after panel (il
               1, the AVX2 kernels'); interleave() -> this CPU's choice, the default; weights with
               N % 128 == 0 concatenate along N as a cat
  pack_groups(t (G, N)) -> (N/16, G, 16) storage: scales and zeros, blocked like the weights
  pack_scales(s (G, N) float) -> pack_groups of s in fp16, the kernels' scale type (exact for the fp16
               scales GPTQ / AWQ store and qvl's on-the-fly ones; others round to nearest); ValueError
               where a scale is beyond fp16 (fp16_holds(s) says so first)
  QuantWeight(bits, w, s, z, zc, group, il)   one layer's weight bound to the library (what QuantLinear holds):
    .matmul(x, bias) -> (M, N) bf16       few rows: integers against int8-quantized x in registers
    .dequant_matmul(x, bias) -> (M, N)    many rows: Wᵀ dequantized in bf16 blocks, each through torch.mm
    .dequant_t(n0, n1, out)               columns [n0, n1) of Wᵀ = ((q − z)·s)ᵀ in bf16, out (K, n1 − n0):
                                          AVX-512 BF16 (cpu_kernels/dequant.h) where native(), else scalar
    .dequant_rows(n0, n1, out)            rows of W in bf16, out (n1 − n0, K) (the scalar code)
  pack_bf16(w (N, K) bf16) -> 16-row panels; bf16_mm(x, panels, bias, isa=None) -> (M, N) bf16
  bf16_gemm(x, w (N, K) bf16 as stored, bias) -> (M, N) bf16: many rows in fp32 on AVX2 + FMA (gemm.h;
               widened_linear's path); ~850 KB of per-thread scratch stays allocated after the first call
Packed weights, scales and zeros of 64 KiB and more live on transparent huge pages (qvl.layers.huge_pages).
int4: W = (q − z)·s, w4 from pack_int4, z packed (uint8) or None (then zc everywhere); int8: W = w8·s, w8
from pack_int8. N % 16 == 0, group % 32 == 0. x is (M, K) bf16 contiguous, s from pack_scales, bias (N,) or
None (added in fp32); `isa=0` runs the exact scalar code (tests), 1 / 2 VNNI / AVX2, None the best.

Numerics: integer kernels quantize x per block of 128 columns (absmax/127, the group when 128 does not
divide it) and sum each block exactly in int32, then scale in fp32; bf16: products exact in fp32, summed
in fp32; the result is rounded to bf16 once. Held to the bf16 criterion, not to F.linear's bits. isa=0
and the dequantizers are exact (fp32 sums of bf16 x times the integers; W rounded to bf16 once). Scales
are fp16, the checkpoints' own type, half the bytes of fp32 (whose scales were 1/16 of an int4 weight's):
the 2B's 112 int4 linears ran 1.03-1.09x as fast in a C++ harness (Zen 5, paired rounds); end to end,
within the machine's noise (bench/quant_interleaved.py, int4 / bf16 2.43 -> 2.44, medians of 5 runs).

Threads: a call's panels are split over torch.get_num_threads() threads of torch's own OpenMP pool (the
library links the libgomp torch loaded), whole blocks of 8 panels each: the output does not depend on
the thread count.

Fallbacks, never an assumed ISA: QVL_CPU_KERNELS=0 in the environment, no g++, a failed compile or a CPU
without the ISA -> available() / native() / native_int() is False and qvl.layers.linear keeps torch's
kernels. The compiled library lives in $QVL_KERNEL_CACHE or ~/.cache/qvl/kernels/<hash>/ (written
atomically, so concurrent first uses are safe). The kernels release the GIL (ctypes).
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

from qvl.layers.huge_pages import empty_huge, on_huge_pages

log = logging.getLogger(__name__)
_lock = threading.Lock()
_state: dict = {}
_P, _I, _L, _F = ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_float
_SIGS = {"qk_int4": [_P, _P, _P, _P, _I, _P, _P, _I, _I, _I, _I, _I, _I, _I],
         "qk_int8": [_P, _P, _P, _P, _P, _I, _I, _I, _I, _I, _I, _I],
         "qk_bf16": [_P, _P, _P, _P, _I, _I, _I, _I, _I],
         "qk_bf16_gemm": [_P, _P, _P, _P, _I, _I, _I, _I],
         "qk_dequant4": [_P, _P, _P, _I, _P, _I, _I, _I, _I, _I, _I, _I, _I, _I, _I],
         "qk_dequant8": [_P, _P, _P, _I, _I, _I, _I, _I, _I, _I, _I, _I, _I],
         # the glue ops (qvl.layers.cpu_ops); _L strides in elements, _F eps / scale
         "qk_rms_norm": [_P, _L, _P, _P, _L, _I, _I, _F],
         "qk_rotary": [_P, _L, _P, _P, _P, _L, _I, _I, _I],
         "qk_silu_mul": [_P, _L, _P, _L, _P, _L, _I, _I],
         "qk_decode_attention": [_P, _L, _P, _L, _L, _P, _L, _L, _P, _P, _I, _I, _I, _I, _I, _F, _I]}
SOURCES = Path(__file__).with_name("cpu_kernels")        # qk.cpp and the headers it includes
_FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC"]
BLOCK_ELEMS = 1 << 21          # dequant_mm: weight elements per bf16 block (4 MiB, stays in L2/L3)


def _compile(cxx: str, so: Path) -> None:
    """qk.cpp -> so, with OpenMP (torch's libgomp at run time) or, where that does not build, without."""
    with tempfile.TemporaryDirectory(dir=so.parent) as tmp:
        out = Path(tmp) / "qk.so"
        cmd = [cxx, *_FLAGS, f"-I{SOURCES}", "-o", str(out), str(SOURCES / "qk.cpp")]
        try:
            subprocess.run(cmd[:1] + ["-fopenmp"] + cmd[1:], check=True, capture_output=True, timeout=300)
        except subprocess.CalledProcessError:
            log.info("qvl CPU kernels: no OpenMP here, building them single-threaded")
            subprocess.run(cmd, check=True, capture_output=True, timeout=300)
        os.replace(out, so)                     # atomic: a concurrent process sees all or nothing


def _build() -> ctypes.CDLL | None:
    if os.environ.get("QVL_CPU_KERNELS", "1") == "0":
        return None
    cxx = shutil.which(os.environ.get("CXX", "g++"))
    if cxx is None:
        log.info("qvl CPU kernels: no C++ compiler, using torch's kernels")
        return None
    h = hashlib.sha256(" ".join(_FLAGS).encode())
    for f in sorted(SOURCES.iterdir()):
        if f.suffix in (".cpp", ".h"):
            h.update(f.name.encode() + f.read_bytes())
    root = Path(os.environ.get("QVL_KERNEL_CACHE") or Path.home() / ".cache" / "qvl" / "kernels")
    so = root / h.hexdigest()[:16] / "qk.so"
    if not so.is_file():
        try:
            so.parent.mkdir(parents=True, exist_ok=True)
            _compile(cxx, so)
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
    for name in ("qk_has_avx512bf16", "qk_has_avx512vnni", "qk_int_isa", "qk_bf16_isa", "qk_glue_ok"):
        getattr(lib, name).restype = _I
    lib.qk_omp_threads.argtypes, lib.qk_omp_threads.restype = [_I], _I
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


def int_isa() -> int:
    lib = _lib()
    return 0 if lib is None else int(lib.qk_int_isa())


def native_int() -> bool:
    return int_isa() > 0


def bf16_isa() -> int:
    if "bf16_isa" not in _state:                  # asked on every bf16_mm call: cached
        lib = _lib()
        _state["bf16_isa"] = 0 if lib is None else int(lib.qk_bf16_isa())
    return _state["bf16_isa"]


def cpu_flags() -> frozenset[str] | None:
    """This CPU's /proc/cpuinfo flags; None where unknown (not Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def _ptr(t: torch.Tensor | None):
    if t is not None and not (t.is_contiguous() and t.device.type == "cpu"):
        raise ValueError(f"qvl CPU kernels take contiguous CPU tensors, got shape {tuple(t.shape)} with strides "
                         f"{t.stride()} on {t.device}")
    return None if t is None else t.data_ptr()


def _check(rc: int, what: str) -> None:
    if rc:
        raise ValueError(f"qvl CPU kernel {what} refused its input (code {rc}: -1 shape, -2 ISA)")


def interleave() -> int:
    """How pack_int4 / pack_int8 order their panels here (cpu_kernels/common.h): 8, in blocks of 8 panels
    interleaved per step, where the VNNI kernel runs (a block is then one stream); 1, panel after panel,
    for the AVX2 kernels (a one-row tile reads 4 panels as 4 streams: int8 1.28x, int4 1.07-1.29x the
    blocked layout's rate from DRAM on Zen 3, 1 thread). Every kernel reads both."""
    return 8 if int_isa() == 1 else 1


def _blocked(panels: torch.Tensor, il: int = 8) -> torch.Tensor:
    """(P, steps, E), panel after panel -> flat in the kernels' order (cpu_kernels/common.h): il 8, blocks
    of 8 panels interleaved per step (the last block may hold fewer); il 1, as they are. Weights (E = 64
    bytes), scales and zeros (always il 8; steps = groups, E = 16 values)."""
    if il == 1:
        return panels.reshape(-1)
    p, steps, e = panels.shape
    full = p // 8 * 8
    head = panels[:full].view(p // 8, 8, steps, e).transpose(1, 2).reshape(-1)             # (B, steps, 8, E)
    tail = panels[full:].transpose(0, 1).reshape(-1)                                        # (steps, P - full, E)
    return torch.cat((head, tail))


def pack_int4(q: torch.Tensor, il: int | None = None) -> torch.Tensor:
    """(N, K) integers in [0, 16) -> the kernels' layout, stored as (N, K/2) uint8 (N % 16 == 0, K % 8 ==
    0): per panel of 16 rows and 8 columns, 64 bytes, byte 4r + j = q[r, k + j] | q[r, k + 4 + j] << 4;
    panels interleaved il (None: interleave()) at a time."""
    il = interleave() if il is None else il
    n, k = q.shape
    c = q.to(torch.uint8).view(n // 16, 16, k // 8, 2, 4)                                  # (P, r, K/8, half, j)
    b = (c[:, :, :, 0] | (c[:, :, :, 1] << 4)).transpose(1, 2)                              # (P, K/8, r, j)
    return on_huge_pages(_blocked(b.reshape(n // 16, k // 8, 64), il).view(n, k // 2))     # (N, K/2) storage


def pack_int8(w8: torch.Tensor, il: int | None = None) -> torch.Tensor:
    """(N, K) int8 -> the kernels' layout of w8 + 128 as uint8 (N % 16 == 0, K % 4 == 0): per panel and 4
    columns, 64 bytes, bytes 4r .. 4r + 3 = row r's; panels interleaved il (None: interleave()) at a time."""
    il = interleave() if il is None else il
    n, k = w8.shape
    u = (w8.to(torch.int16) + 128).to(torch.uint8)                                          # (N, K)
    b = u.view(n // 16, 16, k // 4, 4).transpose(1, 2)                                      # (P, K/4, r, 4)
    return on_huge_pages(_blocked(b.reshape(n // 16, k // 4, 64), il).view(n, k))          # (N, K) storage


def pack_groups(t: torch.Tensor) -> torch.Tensor:
    """Per-group scales or zeros (G, N) -> the kernels' order, stored as (N/16, G, 16): per panel and group
    the 16 rows' values, blocked like the weights (a block's panels side by side per group)."""
    g, n = t.shape
    panels = t.reshape(g, n // 16, 16).transpose(0, 1)                                     # (P, G, 16)
    return on_huge_pages(_blocked(panels).view(n // 16, g, 16))


FP16_MAX = torch.finfo(torch.float16).max                  # 65504


def fp16_holds(s: torch.Tensor) -> bool:
    """Every scale within fp16's range (the kernels' scale type; a real checkpoint's always are)."""
    return bool(torch.isfinite(s).all()) and float(s.abs().max()) <= FP16_MAX


def pack_scales(s: torch.Tensor) -> torch.Tensor:
    """Per-group scales (G, N) -> fp16 (N/16, G, 16) in pack_groups' order: exact for fp16 values, others
    rounded to the nearest fp16 (the bf16 kernels are held to the bf16 criterion, not to the bits)."""
    if not fp16_holds(s):
        raise ValueError(f"qvl CPU kernels keep fp16 scales (|s| <= {FP16_MAX:g}); these reach "
                         f"{float(s.abs().max()):g}")
    return pack_groups(s.to(torch.float16))


class QuantWeight:
    """One layer's integer weight bound to the library once (pointers and shapes resolved here, so a decode
    call costs one ctypes call): bits 4 -> w from pack_int4, z from pack_groups (uint8) or None (zc
    everywhere); bits 8 -> w from pack_int8, z unused; s from pack_scales (fp16); il: the interleave w was
    packed with (None: interleave()). Holds its tensors: the pointers stay valid."""

    def __init__(self, bits: int, w: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None = None, zc: int = 0,
                 group: int = 128, il: int | None = None) -> None:
        if s.dtype != torch.float16:
            raise ValueError(f"qvl CPU kernels take fp16 scales (pack_scales), got {s.dtype}")
        lib = _lib()
        il = interleave() if il is None else il
        self.bits, self.w, self.s, self.z, self.zc, self.group, self.il = bits, w, s, z, zc, group, il
        n, k = w.shape[0], w.shape[1] * (2 if bits == 4 else 1)
        self.n, self.k = n, k
        wp, sp, zp = _ptr(w), _ptr(s), _ptr(z)
        if bits == 4:
            mm, dq = lib.qk_int4, lib.qk_dequant4
            self._mm = lambda xp, yp, bp, m, isa, nt: mm(xp, wp, sp, zp, zc, yp, bp, m, n, k, group, il, isa, nt)
            self._dq = lambda op, ld, n0, n1, tr, isa, nt: dq(wp, sp, zp, zc, op, ld, n, k, group, il, n0, n1, tr, isa, nt)
        else:
            mm, dq = lib.qk_int8, lib.qk_dequant8
            self._mm = lambda xp, yp, bp, m, isa, nt: mm(xp, wp, sp, yp, bp, m, n, k, group, il, isa, nt)
            self._dq = lambda op, ld, n0, n1, tr, isa, nt: dq(wp, sp, op, ld, n, k, group, il, n0, n1, tr, isa, nt)
        self._bias: tuple = (None, None)
        self.isa = int_isa()

    def bias32(self, bias: torch.Tensor | None) -> torch.Tensor | None:
        """The fp32 copy the kernels add, made once per bias tensor."""
        if bias is None:
            return None
        if self._bias[0] is not bias:
            self._bias = (bias, bias.float().contiguous())
        return self._bias[1]

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None, *, isa: int | None = None) -> torch.Tensor:
        """(M, K) bf16 -> (M, N) bf16, integers widened in registers; isa None: int_isa()."""
        isa = self.isa if isa is None else isa
        if x.shape[-1] != self.k:
            raise ValueError(f"qvl CPU kernel: input has {x.shape[-1]} columns, the weight {self.k}")
        y = torch.empty(x.shape[0], self.n, dtype=torch.bfloat16)                          # (M, N)
        _check(self._mm(_ptr(x), y.data_ptr(), _ptr(self.bias32(bias)), x.shape[0], isa,
                        torch.get_num_threads()), f"int{self.bits}")
        return y

    def dequant_rows(self, n0: int, n1: int, out: torch.Tensor) -> torch.Tensor:
        """out (n1 − n0, K) bf16 (rows may be strided) = rows [n0, n1) of W = (q − z)·s (n0, n1 multiples of
        16; the scalar code)."""
        _check(self._dq(*_rows_of(out, n1 - n0, self.k), n0, n1, 0, 0, torch.get_num_threads()),
               f"dequant{self.bits}")
        return out

    def dequant_t(self, n0: int, n1: int, out: torch.Tensor, *, isa: int | None = None) -> torch.Tensor:
        """out (K, n1 − n0) bf16 (rows may be strided) = Wᵀ, columns [n0, n1) (the many-row GEMM's operand);
        isa 1: AVX-512 BF16 (cpu_kernels/dequant.h), 0: the scalar code, None: 1 where native(). Same bits."""
        isa = (1 if native() else 0) if isa is None else isa
        _check(self._dq(*_rows_of(out, self.k, n1 - n0), n0, n1, 1, isa, torch.get_num_threads()),
               f"dequant{self.bits}")
        return out

    def dequant_matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return dequant_mm(x, self.dequant_t, self.n, bias)


def pack_bf16(w: torch.Tensor) -> torch.Tensor:
    """(N, K) bf16 -> the bf16 kernel's 16-row panels (N % 16 == 0, K even), stored as (N, K): per panel and
    column pair, the 16 rows' two values side by side."""
    n, k = w.shape
    panels = empty_huge((n // 16, k // 2, 16, 2), torch.bfloat16)
    panels.copy_(w.detach().view(n // 16, 16, k // 2, 2).transpose(1, 2))                   # (P, K/2, 16, 2)
    return panels.view(n, k)                                                                # (N, K) storage


def bf16_mm(x, w, bias=None, *, isa: int | None = None) -> torch.Tensor:
    """x (M, K) bf16 · Wᵀ with w = pack_bf16(W); isa 1 AVX-512 BF16, 2 AVX2 + FMA, None bf16_isa()."""
    isa = bf16_isa() if isa is None else isa
    m, k = x.shape
    y = torch.empty(m, w.shape[0], dtype=torch.bfloat16)                                   # (M, N)
    b = None if bias is None else bias.float().contiguous()
    _check(_lib().qk_bf16(_ptr(x), _ptr(w), _ptr(y), _ptr(b), m, w.shape[0], k, isa, torch.get_num_threads()), "bf16")
    return y


def bf16_gemm(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (M, K) bf16 · Wᵀ (+ bias) -> (M, N) bf16 for W (N, K) bf16 as stored, computed in fp32 on AVX2 + FMA
    (cpu_kernels/gemm.h; bf16_isa() > 0). x and W contiguous on the CPU."""
    m, k = x.shape
    y = torch.empty(m, w.shape[0], dtype=torch.bfloat16)                                   # (M, N)
    b = None if bias is None else bias.float().contiguous()
    _check(_lib().qk_bf16_gemm(_ptr(x), _ptr(w), _ptr(y), _ptr(b), m, w.shape[0], k, torch.get_num_threads()),
           "bf16 GEMM")
    return y


def _rows_of(out: torch.Tensor, rows: int, cols: int) -> tuple[int, int]:
    """(pointer, row stride) of a dequantizer's output: (rows, cols) bf16 on CPU, unit column stride."""
    if (out.dtype != torch.bfloat16 or tuple(out.shape) != (rows, cols) or out.device.type != "cpu"
            or out.stride(1) != 1 or out.stride(0) < cols):
        raise ValueError(f"qvl CPU dequantizer: out must be ({rows}, {cols}) bf16 on CPU with unit column stride, "
                         f"got {tuple(out.shape)} {out.dtype} strides {out.stride()} on {out.device}")
    return out.data_ptr(), out.stride(0)


def _block_stride(cols: int) -> int:
    """Row stride of the Wᵀ blocks: an odd number of 64-byte lines (32 bf16) >= cols. Rows then start on a
    line (a pair of panels writes whole lines) and the K rows' stores spread over every L1 set; 1024 or
    2048 columns put them all in a few (measured 2-4x slower)."""
    lines = (cols + 31) // 32
    return (lines + 1 - lines % 2) * 32


def dequant_mm(x: torch.Tensor, dequant_t, n: int, bias=None) -> torch.Tensor:
    """x (M, K) · Wᵀ for many rows: `dequant_t(n0, n1, out)` writes columns [n0, n1) of Wᵀ as bf16 into
    out (K, n1 − n0); each block goes through torch's bf16 GEMM (oneDNN), so the integer-to-bf16 work is
    paid once per block, not once per input row."""
    m, k = x.shape
    cols = max(16, min(n, BLOCK_ELEMS // k) // 16 * 16)                # whole 16-row panels
    cols = cols // 128 * 128 or cols                # whole blocks of 8 panels (one sequential read each)
    scratch = torch.empty(k, _block_stride(cols), dtype=torch.bfloat16)                    # (K, ld)
    y = torch.empty(m, n, dtype=torch.bfloat16)                                            # (M, N)
    for n0 in range(0, n, cols):
        n1 = min(n, n0 + cols)
        blk = dequant_t(n0, n1, scratch[:, :n1 - n0])                                       # (K, b), strided
        if bias is None:                    # straight into y's columns (BLAS's ldc: no copy of the block)
            torch.mm(x, blk, out=y[:, n0:n1])
        else:
            torch.addmm(bias[n0:n1].to(x.dtype), x, blk, out=y[:, n0:n1])
    return y
