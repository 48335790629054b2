"""Prefill speed on the CPU: bf16 (with the kernels qvl.layers.cpu_runtime picks, and without) vs float32.

    python bench/prefill.py --config 2b --threads 2                  # this CPU as it is
    python bench/prefill.py --config 2b --threads 2 --emulate-avx2   # the same, ISA capped at AVX2

The issue's target: bf16 prefill no slower than float32 prefill on any machine. --emulate-avx2 reruns
this script in a fresh process with ATEN_CPU_CAPABILITY=avx2 and ONEDNN_MAX_CPU_ISA=AVX2, so torch and
oneDNN use no AVX-512 and no bf16 instruction, and the probe sees an AVX2 CPU (as on a machine
without native bf16). Per dtype: the qvl model with random weights (decode.build_pair), an engine,
one text prompt of --prompt-len random tokens, max_tokens 1; prefill tok/s = prompt_len / time to
the first token. Both engines live in one process and take turns, --repeats rounds of one prefill
each (a shared machine's speed drifts by 10-20% within minutes: each round's bf16 / float32 ratio
compares neighbours); the medians of tok/s and of the rounds' ratios are reported. Then the bf16 model
is timed once more with the runtime kernels removed (restore_cpu_model: plain F.linear everywhere).
Not a test.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from decode import (add_common_args, add_emulate_avx2_arg, build_pair, make_engine,  # noqa: E402
                    rerun_if_emulating_avx2, timer)


def prefill_once(eng, ids: list[int], tag: str) -> float:
    """One prefill of ids (max_tokens 1): tok/s."""
    from qvl.multimodal.prompt import ProcessedPrompt
    from qvl.sampling_params import SamplingParams

    t0 = timer("cpu")
    eng.add_request(tag, ProcessedPrompt.from_token_ids(ids), SamplingParams(temperature=0, max_tokens=1))
    while eng.has_unfinished_requests():
        eng.step()
    return len(ids) / (timer("cpu") - t0)


def prefill_tok_s(eng, ids: list[int], repeats: int) -> float:
    """One engine alone: a warm-up, then the median tok/s of `repeats` prefills."""
    prefill_once(eng, ids, "warm-up")
    return statistics.median(prefill_once(eng, ids, f"p{r}") for r in range(repeats))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(ap)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    add_emulate_avx2_arg(ap)
    args = ap.parse_args()
    rerun_if_emulating_avx2(args, __file__)
    if args.threads:
        torch.set_num_threads(args.threads)
    from qvl.layers.cpu_runtime import restore_cpu_model

    engines, ids = {}, None
    for dtype in (torch.float32, torch.bfloat16):
        hf, ours, config = build_pair(args.config, "cpu", dtype)
        del hf
        engines[str(dtype).split(".")[-1]] = make_engine(ours, config, max_num_seqs=1, enable_prefix_caching=False,
                                                         max_model_len=max(2048, args.prompt_len + 1))
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, min(config.vocab_size, 150000), (args.prompt_len,), generator=g).tolist()
    times: dict[str, list[float]] = {name: [] for name in engines}
    for r in range(args.repeats + 1):                      # round 0 warms up
        for name, eng in engines.items():
            t = prefill_once(eng, ids, f"{name}{r}")
            if r:
                times[name].append(t)
    rows = {}
    for name, eng in engines.items():
        rt = eng.cpu_runtime
        rows[name] = dict(tok_s=statistics.median(times[name]), kernels=rt.mode + (" + qvl GEMM" if rt.gemm else ""),
                          features=None if rt.features is None else
                          dict(capability=rt.features.capability, onednn_bf16=rt.features.onednn_bf16,
                               native_bf16=rt.features.native_bf16))
    rows["bfloat16"]["round_ratio"] = round(statistics.median(
        b / f for b, f in zip(times["bfloat16"], times["float32"])), 3)
    eng = engines.pop("bfloat16")
    if eng.cpu_runtime.mode != "plain":
        restore_cpu_model(eng.model)
        rows["bfloat16 plain"] = dict(tok_s=prefill_once(eng, ids, "plain"), kernels="plain")
    del eng, engines
    gc.collect()
    fp32 = rows["float32"]["tok_s"]
    cap = torch.backends.cpu.get_cpu_capability()
    for name, r in rows.items():
        r["tok_s"] = round(r["tok_s"], 2)
        r["over_fp32"] = round(r["tok_s"] / fp32, 3)
        print(f"prefill [{args.config}, cpu {cap}, {torch.get_num_threads()} threads] {args.prompt_len} tokens, "
              f"{name} ({r['kernels']}): {r['tok_s']:.1f} tok/s, x{r['over_fp32']:.2f} of float32"
              + (f" (median of the rounds' own ratios x{r['round_ratio']:.2f})" if "round_ratio" in r else ""))
    print(json.dumps(dict(bench="prefill", config=args.config, capability=cap, threads=torch.get_num_threads(),
                          prompt_len=args.prompt_len, rows=rows)))


if __name__ == "__main__":
    main()
