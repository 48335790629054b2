"""Build the paged-attention Triton kernels (qvl.layers.attention_paged) for a CUDA target without a GPU and
print what each launch configuration costs: registers per thread, spill (stack) bytes, shared memory.

    python tools/attention_paged_compile.py              # sm_90 (H100/H200), the Qwen-VL head layouts
    python tools/attention_paged_compile.py --arch 80    # A100

The wheel's own ptxas compiles; nothing runs. Each row uses the tiling the wrappers choose
(`_query_tile`, `_tiling`) and the integer/pointer divisibility-by-16 hints the launcher gives real
arguments (16-byte aligned tensors, strides that are multiples of 16 — the head stride is head_dim, so
not for 72), so the numbers are those of the real launch. A non-zero STACK is a register spill: the
tiling to revisit. Not a test; about a minute.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget

import qvl.layers.attention_paged as ap

# (label, head_dim, q heads per kv head): Qwen2-VL-2B / 7B / 72B decoders, the vision towers (no GQA)
LAYOUTS = [("2B decoder", 128, 6), ("7B decoder", 128, 7), ("72B decoder", 128, 8)]
VISION = [("Qwen2/2.5-VL vision", 80), ("Qwen3-VL vision", 72), ("Qwen3-VL-2B vision", 64)]
DTYPES = {"bf16": ap.torch.bfloat16, "fp32": ap.torch.float32}


def build(kernel, types: dict, consts: dict, warps: int, stages: int, arch: int, unaligned=()):
    """unaligned: stride arguments that are not multiples of 16 in the real launch (no hint for them)."""
    signature = {n: ("constexpr" if n in consts else types[n]) for n in kernel.arg_names}
    hints = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(kernel.arg_names)
             if (n.endswith("_ptr") or n.startswith("s_")) and n not in unaligned}
    src = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=consts, attrs=hints)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=warps, num_stages=stages))


def usage(compiled) -> str:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    line = next((ln for ln in out.splitlines() if "REG:" in ln), "")
    fields = dict(tok.split(":") for tok in line.split() if tok.split(":")[0] in ("REG", "STACK"))
    return f"REG {fields.get('REG', '?'):>3}  STACK {fields.get('STACK', '?'):>5}  SHARED {compiled.metadata.shared:>6}"


def paged_types(dt: str, split: bool) -> dict:
    t = {n: "i32" for n in ap._paged_kernel.arg_names}
    t.update(q_ptr=f"*{dt}", k_ptr=f"*{dt}", v_ptr=f"*{dt}", o_ptr=f"*{dt}", bt_ptr="*i32", qsl_ptr="*i32",
             sl_ptr="*i32", qk_scale="fp32")
    t.update({n: ("*fp32" if split else f"*{dt}") for n in ("po_ptr", "pm_ptr", "pl_ptr")})
    return t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--block-size", type=int, default=16)
    args = p.parse_args()
    for dt, dtype in DTYPES.items():
        for label, d, g in LAYOUTS:
            for mode in ("decode", "decode split", "prefill"):
                decode = mode != "prefill"
                block_q, block_h = ap._query_tile(g, decode)
                block_n, warps, stages = ap._tiling(dtype, decode)
                consts = dict(G=g, HEAD_DIM=d, BLOCK_SIZE=args.block_size, BLOCK_Q=block_q, BLOCK_H=block_h,
                              BLOCK_N=block_n, BLOCK_D=max(16, ap._pow2(d)), SPLIT=mode == "decode split",
                              IEEE=dtype == ap.torch.float32, UPCAST=False)
                c = build(ap._paged_kernel, paged_types(dt, mode == "decode split"), consts, warps, stages, args.arch)
                print(f"paged   {dt}  {label:<20} {mode:<13} warps {warps} stages {stages}  {usage(c)}", flush=True)
        for label, d in VISION:
            block_n, warps, stages = ap._tiling(dtype, decode=False)
            types = {n: "i32" for n in ap._varlen_kernel.arg_names}
            types.update(q_ptr=f"*{dt}", k_ptr=f"*{dt}", v_ptr=f"*{dt}", o_ptr=f"*{dt}", cu_ptr="*i32", qk_scale="fp32")
            consts = dict(HEAD_DIM=d, BLOCK_M=64, BLOCK_N=block_n, BLOCK_D=max(16, ap._pow2(d)),
                          IEEE=dtype == ap.torch.float32, UPCAST=False, ALIGN=16 if d % 16 == 0 else d & -d)
            unaligned = () if d % 16 == 0 else ("s_qh", "s_kh", "s_vh", "s_oh")   # head stride = head_dim
            c = build(ap._varlen_kernel, types, consts, warps, stages, args.arch, unaligned)
            print(f"varlen  {dt}  {label:<20} {'':<13} warps {warps} stages {stages}  {usage(c)}", flush=True)
        types = {n: "i32" for n in ap._merge_kernel.arg_names}
        types.update(o_ptr=f"*{dt}", po_ptr="*fp32", pm_ptr="*fp32", pl_ptr="*fp32")
        c = build(ap._merge_kernel, types, dict(HEAD_DIM=128, BLOCK_S=ap._MAX_SPLITS, BLOCK_D=128), 4, 3, args.arch)
        print(f"merge   {dt}  {'head_dim 128':<20} {'':<13} warps 4 stages 3  {usage(c)}", flush=True)


if __name__ == "__main__":
    main()
