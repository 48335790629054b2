"""Quantized decode on CPU: bf16 vs int8 / int4 on the fly vs GPTQ / AWQ-format checkpoints, against each
one's memory-bandwidth roofline.

    python bench/quant.py                                   # Qwen2-VL-2B text dims, all variants, ~25 min
    python bench/quant.py --variants bf16,int4 --layers 8   # quicker
    python bench/quant.py --kernels                         # per-linear kernel timings only, ~2 min
    python bench/quant.py --profile --variants bf16,int4     # where one decode step's time goes

The checkpoint is the Qwen2-VL-2B text config (28 layers, hidden 1536, intermediate 8960, vocab 151936,
tied head; --family qwen3-vl: Qwen3-VL-2B's, hidden 2048, intermediate 6144, q/k norms) with random bf16
weights, written once under --workdir; the vision tower is cut to one block
(it is not read while decoding; --layers cuts decoder layers too). GPTQ (v1, sym, group 128; gptq-int4-act:
act order, desc_act true) and AWQ (gemm, group 128) copies are packed from the same weights by
tests/quant_fixtures.py. Each variant runs in its own
subprocess (load_model in bf16 + an LLMEngine without tokenizer):
  rss_gb        resident memory after loading and one warm-up request (whole process, torch, the runner's
                packed bf16 copies and the KV pool pages touched included; the bf16 weights of a bf16
                checkpoint are mmapped by safetensors, so they count once read)
  decode_tok_s  batch 1: --prompt-len random tokens, --new-tokens greedy tokens, (new − 1) / (last − first)
  batch16_tok_s 16 requests at once, generated tokens / wall time (prefill included)
  roofline      weight bytes one decode step reads (decoder linears in their stored form + norms + LM head)
                / copy bandwidth (read + write of 512 MiB, measured in the same subprocess right before each
                decode repeat; of_roofline is the median of the repeats' own ratios)
  --glue-ab     also --profile's decode (1-token prompt, timers on the linears) with qvl.layers.cpu_ops (the
                C++ norm / rotary / attention / SiLU calls) off and on, alternating in the same process: the
                medians of the time outside the linears and of tok/s, and of the paired tok/s speedups
  --stack-ab    also batch-1 decode with qvl.layers.cpu_stack (a decode step's layers in one C++ call)
                unbound and bound, alternating in the same process: median tok/s of each, paired speedup
(--profile and --glue-ab time the Python layers, so they unbind the stack while they run.)
--kernels times each CPU bf16 candidate (torch's F.linear, the oneDNN prepacked bf16 weight, qvl's own
qk-int8 / qk-int4 / bf16 kernels, both qk paths (in-register and dequant + GEMM) from 8 rows on, int8pack,
int8group, int4pack, dequantize + F.linear) on the 2B decoder shapes (--head: and the LM head) at 1, 16
and 256 rows, interleaved, each call on a weight evicted from the caches first, with the GB/s of weight
each moves beside the copy bandwidth.
Medians over --repeats. On a machine whose memory bandwidth moves from minute to minute, the ratios between
variants measured here come from different moments: bench/quant_interleaved.py runs the variants in one
process, taking turns, and takes each round's own ratio. --threads defaults to 1 (on a shared machine oneDNN/OpenMP threads spin-wait on each
other). Prints one JSON line per variant and a table. Not a test: nothing is asserted.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

from quant_checkpoints import FAMILIES, ensure_checkpoints, work_dir  # noqa: E402

VARIANTS = {  # name -> (checkpoint, EngineConfig.quantization)
    "bf16": ("float", None), "int8": ("float", "int8"), "int4": ("float", "int4"),
    "gptq-int8": ("gptq8", None), "gptq-int4": ("gptq4", None), "awq": ("awq", None),
    "gptq-int4-act": ("gptq4-act", None),
}


def _rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def _weight_bytes(model) -> int:
    from qvl.layers.linear import QuantLinear

    seen, total = set(), 0
    for name, p in model.named_parameters(remove_duplicate=False):
        if name.startswith("visual.") or name == "model.embed_tokens.weight" or p.data_ptr() in seen:
            continue                                    # the ViT and the embedding (one row) are not read
        seen.add(p.data_ptr())
        total += p.numel() * p.element_size()
    for m in model.modules():
        if isinstance(m, QuantLinear):
            total += sum(b.numel() * b.element_size() for b in m.buffers())
    return total


def _throughput(eng, vocab: int, prompt_len: int, new: int, n: int) -> float:
    from qvl.multimodal.prompt import ProcessedPrompt
    from qvl.sampling_params import SamplingParams

    g = torch.Generator().manual_seed(1)
    t0 = time.perf_counter()
    for i in range(n):
        ids = torch.randint(0, vocab, (prompt_len,), generator=g).tolist()
        eng.add_request(f"t{i}-{t0}", ProcessedPrompt.from_token_ids(ids),
                        SamplingParams(temperature=0, max_tokens=new, min_tokens=new))
    while eng.has_unfinished_requests():
        eng.step()
    return n * new / (time.perf_counter() - t0)


def profile_decode(model, eng, ids, new: int, bw: float) -> dict:
    """One batch-1 decode of `new` tokens with a timer around every decoder linear and the LM head (and
    every fused call, e.g. `q_proj+k_proj+v_proj`): ms per token and GB/s of weight per group, the rest
    as `other`."""
    import torch.nn as nn

    from decode import qvl_decode

    from qvl.layers.linear import QuantLinear

    from qvl.layers import cpu_stack

    spent, nbytes, hooks, t0 = {}, {}, [], {}
    bound = cpu_stack.stack_of(model.model) is not None
    cpu_stack.uninstall(model.model)           # the timers sit on the Python layers' linears

    def size(m) -> int:
        return sum(t.numel() * t.element_size() for t in (m.buffers() if isinstance(m, QuantLinear) else [m.weight])
                   if t is not None)
    for name, m in model.named_modules():
        if not (isinstance(m, (QuantLinear, nn.Linear)) and (name.startswith("model.") or name == "lm_head")):
            continue
        group = name.rsplit(".", 1)[-1]
        nbytes[group] = nbytes.get(group, 0) + size(m)
        hooks.append(m.register_forward_pre_hook(lambda mod, inp, k=id(m): t0.__setitem__(k, time.perf_counter())))
        hooks.append(m.register_forward_hook(lambda mod, inp, out, k=id(m), g=group: spent.__setitem__(
            g, spent.get(g, 0.0) + time.perf_counter() - t0[k])))
    fused = []                        # fused q/k/v and gate/up calls (qvl.layers.fused_linear) bypass the hooks
    for m in model.modules():
        for names, f in m.__dict__.get("_fused_linears", {}).items():
            group = "+".join(names)
            nbytes[group] = nbytes.get(group, 0) + sum(size(getattr(m, n)) for n in names)

            def timed(x, run=f.run, g=group):
                t = time.perf_counter()
                y = run(x)
                spent[g] = spent.get(g, 0.0) + time.perf_counter() - t
                return y
            f.run = timed
            fused.append(f)
    start = time.perf_counter()
    tok_s = qvl_decode(eng, ids, new, "cpu")[0]
    total = time.perf_counter() - start
    for h in hooks:
        h.remove()
    for f in fused:
        del f.run
    if bound:
        cpu_stack.install(model.model)
    steps = new                                       # prefill + new − 1 decode steps: per token, roughly
    out = {g: dict(ms_per_token=round(spent[g] / steps * 1e3, 2), gb_s=round(nbytes[g] / (spent[g] / steps) / 1e9, 1))
           for g in spent}
    out["other"] = dict(ms_per_token=round((total - sum(spent.values())) / steps * 1e3, 2))
    return dict(profile=out, decode_tok_s_with_timers=round(tok_s, 2), copy_bw_gb_s=round(bw / 1e9, 1))


def child(args) -> None:
    from decode import copy_bandwidth, make_engine, qvl_decode

    from qvl.build import load_model

    torch.set_num_threads(args.threads)
    ckpt, method = VARIANTS[args.child]
    before = _rss()
    dev = args.device
    model, config = load_model(Path(args.workdir) / ckpt, dtype=torch.bfloat16, quantization=method, device=dev)
    eng = make_engine(model, config, max_num_seqs=16, enable_prefix_caching=False, max_model_len=1024)
    vocab = min(config.vocab_size, 150000)
    ids = torch.randint(0, vocab, (args.prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
    qvl_decode(eng, ids, 4, dev)                                      # warm-up
    rss = _rss()               # after a forward: every weight page touched (load_model may mmap bf16)
    if dev == "cuda":          # on a GPU, the weights' device memory (the KV pool excluded)
        rss, before = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]), 0
    if args.profile:
        prompt = ids[:1]                  # one prompt token: the profiled steps are (almost all) decode steps
        print(json.dumps(dict(variant=args.child, **profile_decode(model, eng, prompt, args.new_tokens,
                                                                   copy_bandwidth("cpu")))))
        return
    wbytes = _weight_bytes(model)
    decs, bws = [], []                # the copy bandwidth beside each decode: the machine's load moves
    for _ in range(args.repeats):
        bws.append(copy_bandwidth(dev))
        decs.append(qvl_decode(eng, ids, args.new_tokens, dev)[0])
    dec, bw = statistics.median(decs), statistics.median(bws)
    of_roof = statistics.median(d * wbytes / b for d, b in zip(decs, bws))
    thr = statistics.median(_throughput(eng, vocab, args.prompt_len, args.new_tokens, 16)
                            for _ in range(max(1, args.repeats - 1)))
    ab = {}
    if args.glue_ab:                  # qvl.layers.cpu_ops off and on, alternating, in this process
        from qvl.layers import cpu_ops

        runs = {True: [], False: []}
        for _ in range(args.repeats):
            for on in (False, True):
                cpu_ops.ENABLED = on
                runs[on].append(profile_decode(model, eng, ids[:1], args.new_tokens, bw))
        cpu_ops.ENABLED = True
        tok = {on: [r["decode_tok_s_with_timers"] for r in v] for on, v in runs.items()}
        other = {on: [r["profile"]["other"]["ms_per_token"] for r in v] for on, v in runs.items()}
        ab = dict(glue_off_other_ms=statistics.median(other[False]), glue_on_other_ms=statistics.median(other[True]),
                  glue_off_tok_s=statistics.median(tok[False]), glue_on_tok_s=statistics.median(tok[True]),
                  glue_speedup=round(statistics.median(a / b for a, b in zip(tok[True], tok[False])), 3))
    if args.stack_ab:                 # qvl.layers.cpu_stack unbound and bound, alternating, in this process
        from qvl.layers import cpu_stack

        tok = {True: [], False: []}
        for _ in range(args.repeats):
            for on in (False, True):
                (cpu_stack.install if on else cpu_stack.uninstall)(model.model)
                tok[on].append(qvl_decode(eng, ids, args.new_tokens, dev)[0])
        ab.update(stack_off_tok_s=round(statistics.median(tok[False]), 2),
                  stack_on_tok_s=round(statistics.median(tok[True]), 2),
                  stack_speedup=round(statistics.median(a / b for a, b in zip(tok[True], tok[False])), 3))
    kernels = sorted({getattr(m, "kernel", None) for m in model.modules()} - {None})
    print(json.dumps(dict(variant=args.child, kernels=kernels or ["bf16 F.linear / packed"],
                          threads=torch.get_num_threads(), layers=config.num_hidden_layers,
                          rss_gb=round(rss / 1e9, 2), load_rss_gb=round((rss - before) / 1e9, 2),
                          weight_gb_per_token=round(wbytes / 1e9, 3), copy_bw_gb_s=round(bw / 1e9, 1),
                          decode_tok_s=round(dec, 2), roofline_tok_s=round(bw / wbytes, 2),
                          of_roofline=round(of_roof, 3), batch16_tok_s=round(thr, 1), **ab)))


def kernels(args) -> None:
    """Per-linear time of every CPU bf16 candidate on the 2B decoder shapes (+ the LM head with --head),
    at each of --rows, and the GB/s of weight each moves (copy bandwidth measured in the same run). Before
    each timed call 64 MiB pass through the caches, so every kernel reads its weight from memory, as in a
    model whose weights are far larger than the L3."""
    import torch.nn.functional as F

    from decode import copy_bandwidth

    from qvl.layers import linear as qlinear
    from qvl.layers import quant_kernels as qk
    from qvl.layers.linear import QuantLinear
    from qvl.layers.packed_linear import pack_linears
    from qvl.quant import onthefly
    from qvl.quant.spec import QuantSpec

    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    print(json.dumps(dict(bench="copy-bandwidth", gb_s=round(copy_bandwidth("cpu") / 1e9, 1),
                          qk_native=qk.native())), flush=True)
    shapes = ((1536, 1536), (8960, 1536), (1536, 8960)) + (((151936, 1536),) if args.head else ())
    for n, k in shapes:
        w = torch.randn(n, k, generator=g) * 0.02
        packed = torch.nn.Linear(k, n, bias=False).bfloat16()
        packed.weight.data = w.bfloat16()
        pack_linears([packed])
        cands = {"bf16 F.linear": (lambda x: F.linear(x, packed.weight), 2 * n * k),
                 "bf16 oneDNN packed": (packed, 2 * n * k)}
        if qk.bf16_isa():                                # AVX-512 BF16 or the AVX2 + FMA kernel
            panels = qk.pack_bf16(packed.weight)
            cands["bf16 qk panels"] = (lambda x: qk.bf16_mm(x, panels), 2 * n * k)
        if n < 100000:
            for label, method, bits, group, kernel in (
                    ("int8 per-row", "int8", 8, -1, "qk-int8"), ("int8 per-row", "int8", 8, -1, "int8pack"),
                    ("int8 g128", "gptq", 8, 128, "qk-int8"), ("int8 g128", "gptq", 8, 128, "int8group"),
                    ("int4 g128", "int4", 4, 128, "qk-int4"), ("int4 g128", "int4", 4, 128, "int4pack"),
                    ("int4 g128", "int4", 4, 128, "dequant")):
                if kernel.startswith("qk") and not qk.native_int():
                    continue
                m = QuantLinear(k, n, False, QuantSpec(method, bits, group), dtype=torch.bfloat16,
                                device=torch.device("cpu"))
                m.kernel = kernel
                m._set_kernel_tensors(onthefly.quantize(w, bits, group))
                nbytes = sum(b.numel() * b.element_size() for b in m.buffers())
                cands[f"{label} {m.kernel}"] = (m, nbytes)
        evict = torch.zeros(16 << 20)                    # twice the L3 of the bench machine
        many_rows = qlinear.MANY_ROWS
        for rows in args.rows:
            x = torch.randn(rows, k, generator=g).bfloat16()
            times = {name: [] for name in cands}
            with torch.no_grad():
                for _ in range(args.repeats * 5):            # interleaved: a noisy neighbour hits all alike
                    for name, (f, _) in cands.items():
                        if name.endswith("dequant") and rows > 16:
                            continue
                        for many in ((False, True) if "qk-" in name and rows >= 8 else (None,)):
                            if many is not None:             # both qk paths: in-register and dequant + GEMM
                                qlinear.MANY_ROWS = 1 if many else 1 << 30
                            evict.sum()              # 64 MiB read through the caches (clean lines): W comes from memory
                            t0 = time.perf_counter()
                            f(x)
                            times.setdefault(name + (" (dequant+GEMM)" if many else ""), []).append(
                                time.perf_counter() - t0)
            qlinear.MANY_ROWS = many_rows
            res = {name: round(statistics.median(t[2:]) * 1e6) for name, t in times.items() if t}
            gbs = {name: round(cands[name.split(" (")[0]][1] / (us * 1e-6) / 1e9, 1) for name, us in res.items()}
            print(json.dumps(dict(bench="quant-kernels", out=n, inp=k, rows=rows, threads=args.threads,
                                  median_us=res, weight_gb_s=gbs)), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--family", choices=FAMILIES, default="qwen2-vl",
                    help="qwen3-vl: Qwen3-VL-2B's decoder (hidden 2048, q/k norms) instead of Qwen2-VL-2B's")
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="cuda: the quantized linears' CUDA path (dequant + matmul); RSS is then weight bytes")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", default="/tmp/qvl-bench-quant")
    ap.add_argument("--kernels", action="store_true", help="only the per-linear kernel timings")
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 16, 256], help="--kernels: input rows")
    ap.add_argument("--head", action="store_true", help="--kernels: also the 151936 x 1536 LM head")
    ap.add_argument("--profile", action="store_true",
                    help="per-group time of one batch-1 decode (decoder linears, LM head, other) instead")
    ap.add_argument("--glue-ab", action="store_true",
                    help="also batch-1 decode with qvl.layers.cpu_ops off and on, alternating in one process")
    ap.add_argument("--stack-ab", action="store_true",
                    help="also batch-1 decode with qvl.layers.cpu_stack unbound and bound, alternating")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    if args.kernels:
        return kernels(args)
    work = work_dir(args)
    variants = args.variants.split(",")
    ensure_checkpoints(work, args.layers, args.family, {VARIANTS[name][0] for name in variants})
    rows = []
    for name in variants:
        cmd = [sys.executable, __file__, "--child", name, "--workdir", str(work), "--threads", str(args.threads), "--device", args.device,
               "--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens),
               "--repeats", str(args.repeats)] + (["--profile"] if args.profile else []) \
            + (["--glue-ab"] if args.glue_ab else []) + (["--stack-ab"] if args.stack_ab else [])
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    if args.profile:
        return
    base = next((r for r in rows if r["variant"] == "bf16"), rows[0])
    print(f"\n{'variant':10} {'kernel':12} {'RSS GB':>7} {'GB/tok':>7} {'decode tok/s':>12} {'x bf16':>7} "
          f"{'roofline':>8} {'of roof':>7} {'16 req tok/s':>12} {'x bf16':>7}")
    for r in rows:
        print(f"{r['variant']:10} {r['kernels'][0][:12]:12} {r['rss_gb']:7.2f} {r['weight_gb_per_token']:7.3f} "
              f"{r['decode_tok_s']:12.2f} {r['decode_tok_s'] / base['decode_tok_s']:7.2f} "
              f"{r['roofline_tok_s']:8.2f} {r['of_roofline']:7.2f} {r['batch16_tok_s']:12.1f} "
              f"{r['batch16_tok_s'] / base['batch16_tok_s']:7.2f}")


if __name__ == "__main__":
    main()
