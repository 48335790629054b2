"""QuantLinear: a weight-only quantized linear that loads its own tensors by name.

Built by qvl.quant.transform in place of an nn.Linear (it is *not* an nn.Linear subclass, so the bf16
weight packing of qvl.layers.packed_linear, which picks nn.Linear modules, never sees it).

Loading (qvl.build routes `<module>.<attr>` here): `accepts(attr)`, `load(attr, tensor)`, `missing()`.
  gptq    qweight, qzeros, scales (+ g_idx, bias)        awq    qweight, qzeros, scales (+ bias)
          (act order, spec.act_order: g_idx required; the integers are kept with their columns sorted by
          group and `perm` (K,) says which input column each is: the kernels multiply x[:, perm])
  int8 / int4 (on the fly)  weight (+ bias): quantized the moment it arrives, the float copy dropped
A module without a bias accepts an all-zero `bias` (older GPTQ revisions carry them) and refuses a
nonzero one. When the last tensor arrives the integers are converted to the kernel's form at once, so
loading never holds a whole model of unpacked integers.

Kernels (chosen at construction from dtype, device, shape and the CPU; `kernel` names it):
  qk-int4   CPU bf16 on AVX-512 VNNI or AVX2, 4 bit, group a multiple of 32, out of 16: qvl's own kernel
            (qvl.layers.quant_kernels), fp16 scales, uint8 zeros; up to MANY_ROWS − 1 input rows it multiplies
            the nibbles with int8-quantized activations in registers; from MANY_ROWS rows on (prefill, on
            CPUs with AMX only) it dequantizes bf16 blocks of W and runs torch's bf16 GEMM on them.
  qk-int8   the same for 8 bit (q − z as int8), one scale per row or per group (GPTQ-Int8, group 128).
  dequant   W = (q − z)·s in float32, cast to the activation dtype, then F.linear(x, W, b). In float32 this
            is exactly F.linear with the dequantized weight: the reference the tests hold to transformers.
            Also the CUDA path (untested on a GPU here) and the fallback for shapes the others refuse.
  Where those do not apply (no AVX2, no compiler, QVL_CPU_KERNELS=0, other shapes), torch's:
  int4pack  CPU bf16, 4 bit, group 32/64/128/256, out % 16 == 0: torch's
            `_weight_int4pack_mm_for_cpu`, W = (q − 8)·s + (8 − z)·s with s and the zero term in bf16.
  int8pack  CPU bf16, 8 bit, one scale per row: torch's `_weight_int8pack_mm` on (q − z) int8, s in bf16.
  int8group CPU bf16, 8 bit with groups (GPTQ-Int8, group 128): the same kernel per group of input
            columns, scales per group, partial products summed in float32.
Why these: measured in bench/quant.py (README "Quantized checkpoints").
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from qvl.layers import quant_kernels as qk
from qvl.quant import formats, onthefly
from qvl.quant.spec import QuantSpec

_INT4PACK_GROUPS = (32, 64, 128, 256)
# From this many input rows on, qk-int4/qk-int8 dequantize W block by block and use torch's bf16 GEMM.
# That pays only where oneDNN's bf16 GEMM runs on AMX tiles: on AVX-512 VNNI without AMX the in-register
# path (64 int8 multiply-adds an instruction against vdpbf16ps's 32) took half the dequant + GEMM's time
# at 32, 128 and 512 rows (8960 x 1536 int4, 1 thread: 3.5 vs 9.0, 10.8 vs 22.8, 42.8 vs 79.0 ms), so
# there it runs at every row count (bench/quant.py --kernels --rows 1 16 256). On AVX2 (Zen 3, no AVX-512)
# torch's bf16 GEMM is emulated and dequant + GEMM took 40-60x the in-register path's time at 16-256 rows.
MANY_ROWS = 32 if "amx_bf16" in (qk.cpu_flags() or ()) else 1 << 30
_FORMAT_TENSORS = {"gptq": ("qweight", "qzeros", "scales"), "awq": ("qweight", "qzeros", "scales"),
                   "int8": ("weight",), "int4": ("weight",)}


def choose_kernel(bits: int, group: int, in_features: int, out_features: int, dtype: torch.dtype,
                  device: torch.device) -> str:
    if dtype != torch.bfloat16 or device.type != "cpu":
        return "dequant"
    if qk.native_int() and out_features % 16 == 0 and group % 32 == 0 and in_features % group == 0:
        return f"qk-int{bits}"
    if bits == 4 and group in _INT4PACK_GROUPS and out_features % 16 == 0:
        return "int4pack"
    if bits == 8:
        return "int8pack" if group == in_features else "int8group"
    return "dequant"


class QuantLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, has_bias: bool, spec: QuantSpec, *,
                 dtype: torch.dtype, device: torch.device, name: str = "") -> None:
        super().__init__()
        self.in_features, self.out_features, self.has_bias = in_features, out_features, has_bias
        self.spec, self.dtype, self.device, self.name = spec, dtype, torch.device(device), name
        group = in_features if spec.group_size == -1 else spec.group_size
        if spec.method == "int4":
            group = onthefly.int4_group(in_features, spec.group_size)
        self.kernel = choose_kernel(spec.bits, group, in_features, out_features, dtype, self.device)
        self.group = group
        self.register_buffer("bias", None)
        self.register_buffer("perm", None)                # act-order GPTQ: (K,) int64, q's column order
        self._pending: dict[str, torch.Tensor] = {}
        self._required = (set(_FORMAT_TENSORS[spec.method]) | ({"bias"} if has_bias else set())
                          | ({"g_idx"} if spec.act_order else set()))
        self.loaded = False

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, bias={self.has_bias}, {self.spec.method} "
                f"{self.spec.bits}-bit group {self.group}{', act order' if self.perm is not None else ''}, "
                f"kernel={self.kernel}")

    # --- loading ---------------------------------------------------------------------------------
    def accepts(self, attr: str) -> bool:
        return attr in self._required or attr == "bias" or (self.spec.method == "gptq" and attr == "g_idx")

    def missing(self) -> list[str]:
        return [] if self.loaded else sorted(self._required - set(self._pending))

    def load(self, attr: str, tensor: torch.Tensor) -> None:
        if attr == "bias" and not self.has_bias:
            if bool((tensor != 0).any()):
                raise ValueError(f"{self.name}.bias is nonzero but {self.name} has no bias in this model")
            return                                        # an all-zero bias of older GPTQ revisions
        self._pending[attr] = tensor
        if not self.missing():
            self._finish()

    def _finish(self) -> None:
        p, spec, shape = self._pending, self.spec, (self.out_features, self.in_features)
        if spec.method == "gptq":
            qz = formats.gptq(p["qweight"], p["qzeros"], p["scales"], p.get("g_idx"), bits=spec.bits,
                              group_size=spec.group_size, zero_offset=spec.zero_offset, shape=shape,
                              name=self.name)
        elif spec.method == "awq":
            qz = formats.awq(p["qweight"], p["qzeros"], p["scales"], group_size=spec.group_size, shape=shape,
                             name=self.name)
        else:
            w = p["weight"]
            if tuple(w.shape) != shape:
                raise ValueError(f"{self.name}.weight has shape {tuple(w.shape)}, expected {shape} from config.json")
            qz = onthefly.quantize(w, spec.bits, spec.group_size, f"{self.name}.weight")
        if "bias" in p:
            b = p["bias"]
            if tuple(b.shape) != (self.out_features,):
                raise ValueError(f"{self.name}.bias has shape {tuple(b.shape)}, expected ({self.out_features},)")
            self._buffers_set(bias=b.to(device=self.device, dtype=self.dtype, copy=True))   # no file view
        self._pending = {}
        if qz.perm is not None:
            self._buffers_set(perm=qz.perm.to(self.device))
        self._set_kernel_tensors(qz)
        self.loaded = True

    def _set_kernel_tensors(self, qz: formats.Quantized) -> None:
        dev = self.device
        if self.kernel in ("qk-int4", "qk-int8") and not qk.fp16_holds(qz.scales):
            self.kernel = "dequant"                       # scales beyond fp16, the qk kernels' scale type
        if self.kernel == "int4pack":
            w4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(qz.q.to(torch.int32), 1)  # (N, K/2) uint8
            zero_term = (8 - qz.zeros) * qz.scales                                                # (G, N)
            self._buffers_set(w4=w4, scale_zeros=torch.stack([qz.scales, zero_term], -1).to(torch.bfloat16))  # (G, N, 2)
        elif self.kernel == "qk-int4":
            zeros = qz.zeros.to(torch.uint8)                                                      # (G, N)
            same = bool((zeros == zeros.flatten()[0]).all())     # symmetric formats: one zero everywhere
            self.zc = int(zeros.flatten()[0]) if same else 0
            self._buffers_set(w4=qk.pack_int4(qz.q), s4=qk.pack_scales(qz.scales),                 # (N, K/2), (P, G, 16)
                              z4=None if same else qk.pack_groups(zeros))
        elif self.kernel in ("int8pack", "int8group", "qk-int8"):
            w8 = qz.q.to(torch.int16) - qz.zeros.t().repeat_interleave(qz.group, 1).to(torch.int16)  # (N, K)
            if int(w8.min()) < -128 or int(w8.max()) > 127:
                self.kernel = "dequant"                   # zeros far from the middle: no int8 form
                return self._set_kernel_tensors(qz)
            w8 = w8.to(torch.int8)
            if self.kernel == "qk-int8":
                self._buffers_set(w8=qk.pack_int8(w8), s8=qk.pack_scales(qz.scales))               # (N, K), (P, G, 16)
            elif self.kernel == "int8pack":
                self._buffers_set(w8=w8, s8=qz.scales[0].to(torch.bfloat16))                       # s8 (N,)
            else:
                g = qz.zeros.shape[0]
                self._buffers_set(w8=w8.view(self.out_features, g, qz.group).transpose(0, 1).contiguous(),  # (G, N, g)
                                  s8=qz.scales.to(torch.bfloat16))                                    # (G, N)
        else:
            q = qz.q
            if self.spec.bits == 4:
                q = q[:, 0::2] | (q[:, 1::2] << 4)                      # (N, K/2): two nibbles a byte
            self._buffers_set(q=q.to(dev), zeros=qz.zeros.to(dev), scales=qz.scales.to(dev))    # (G, N)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("_qk", None)                    # the library binding (ctypes) is remade on first use
        return state

    def _buffers_set(self, **tensors: torch.Tensor) -> None:
        for name, t in tensors.items():
            self.register_buffer(name, t)

    # --- math ------------------------------------------------------------------------------------
    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W (N, K) = (q − z)·s (dequant kernel only: the other kernels keep torch's packed layouts)."""
        if self.kernel != "dequant":
            raise ValueError(f"{self.name}: dequantized_weight needs the dequant kernel, this one is {self.kernel}")
        q = self.q
        if self.spec.bits == 4:
            q = torch.stack([q & 0xF, q >> 4], -1).view(self.out_features, self.in_features)     # (N, K)
        return formats.dequantize(formats.Quantized(q, self.zeros, self.scales, self.group, self.perm), dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._linear(x, self.bias)

    def _linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x W^T (+ bias); a row-parallel subclass passes None and adds its bias after the all-reduce."""
        if self.kernel == "dequant":
            return F.linear(x, self.dequantized_weight().to(x.dtype), bias)
        if x.dtype != torch.bfloat16 or x.device.type != "cpu":
            raise ValueError(f"{self.name}: the {self.kernel} kernel runs bf16 on CPU, got {x.dtype} on {x.device}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)                                                     # (M, K)
        x2 = x2.contiguous() if self.perm is None else x2.index_select(1, self.perm)            # q's order
        if self.kernel in ("qk-int4", "qk-int8"):
            return self._qk_forward(x2).view(*lead, self.out_features)                           # (..., N)
        if self.kernel == "int4pack":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.w4, self.group, self.scale_zeros)
        elif self.kernel == "int8pack":
            y = torch.ops.aten._weight_int8pack_mm(x2, self.w8, self.s8)
        else:
            xg = x2.view(x2.shape[0], -1, self.group).transpose(0, 1)                            # (G, M, g)
            y = torch.zeros(x2.shape[0], self.out_features, dtype=torch.float32)                 # (M, N)
            for gi in range(xg.shape[0]):
                y += torch.ops.aten._weight_int8pack_mm(xg[gi].contiguous(), self.w8[gi], self.s8[gi])
            y = y.to(x.dtype)
        if bias is not None:
            y = y + bias
        return y.view(*lead, self.out_features)                                                  # (..., N)

    def kernel_weight(self) -> qk.QuantWeight:
        """The qk-int4 / qk-int8 weight bound to the library (once; again only if a buffer was replaced)."""
        plan, w = self.__dict__.get("_qk"), self._buffers["w4" if self.kernel == "qk-int4" else "w8"]
        if plan is None or plan.w is not w:
            s = self._buffers["s4" if self.kernel == "qk-int4" else "s8"]
            plan = qk.QuantWeight(4, w, s, self._buffers["z4"], self.zc, self.group) if self.kernel == "qk-int4" \
                else qk.QuantWeight(8, w, s, group=self.group)
            self.__dict__["_qk"] = plan
        return plan

    def _qk_forward(self, x2: torch.Tensor) -> torch.Tensor:
        plan = self.kernel_weight()
        if x2.shape[0] >= MANY_ROWS:
            return plan.dequant_matmul(x2, self.bias)
        return plan.matmul(x2, self.bias)
