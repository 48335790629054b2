"""bench/quant.py's decode measures with every variant in one process, taking turns: the ratios to bf16 on
a machine whose memory bandwidth moves while it runs.

    python bench/quant_interleaved.py                                  # bf16, int8, int4; ~15 min on 2 cores
    python bench/quant_interleaved.py --variants bf16,int4,awq --rounds 7

bench/quant.py runs each variant in its own subprocess, minutes apart; on a shared VM (the Zen 3 bench
machine: copy bandwidth 9.3-13.2 GB/s within one hour) two variants' figures then come from different
machines in effect. Here the variants are loaded side by side (the 2B bf16 with its panels 6.6 GB,
int8 2.8, int4 2.2) and each round runs, for every variant in turn, the copy bandwidth and a batch-1
decode (--prompt-len random tokens, --new-tokens greedy tokens; then, with --batch16, 16 requests at
once). Per variant: the median decode tok/s, `x_bf16` = the median over rounds of the round's own
ratio to bf16, `of_roofline` = the median over rounds of tok/s x weight bytes per token / that round's
copy bandwidth. Not a test: nothing is asserted.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

from quant import VARIANTS, _throughput, _weight_bytes  # noqa: E402
from quant_checkpoints import FAMILIES, ensure_checkpoints, work_dir  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", default="bf16,int8,int4")
    ap.add_argument("--family", choices=FAMILIES, default="qwen2-vl", help="as bench/quant.py's")
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch16", action="store_true", help="also 16 requests at once, every round")
    ap.add_argument("--workdir", default="/tmp/qvl-bench-quant")
    args = ap.parse_args()
    from decode import copy_bandwidth, make_engine, qvl_decode

    from qvl.build import load_model

    torch.set_num_threads(args.threads)
    work, names = work_dir(args), args.variants.split(",")
    if "bf16" not in names:
        raise SystemExit("--variants must include bf16 (the ratios' reference)")
    ensure_checkpoints(work, args.layers, args.family, {VARIANTS[name][0] for name in names})
    engines, wbytes = {}, {}
    for name in names:
        ckpt, method = VARIANTS[name]
        model, config = load_model(work / ckpt, dtype=torch.bfloat16, quantization=method, device="cpu")
        engines[name] = make_engine(model, config, max_num_seqs=16, enable_prefix_caching=False, max_model_len=1024)
        wbytes[name] = _weight_bytes(model)
        vocab = min(config.vocab_size, 150000)
    ids = torch.randint(0, vocab, (args.prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
    for eng in engines.values():
        qvl_decode(eng, ids, 4, "cpu")                                  # warm-up
    dec, roof, thr = ({n: [] for n in names} for _ in range(3))
    for r in range(args.rounds):
        for name in names:
            bw = copy_bandwidth("cpu")
            dec[name].append(qvl_decode(engines[name], ids, args.new_tokens, "cpu")[0])
            roof[name].append(dec[name][-1] * wbytes[name] / bw)
            if args.batch16:
                thr[name].append(_throughput(engines[name], vocab, args.prompt_len, args.new_tokens, 16))
        print(json.dumps(dict(round=r, decode_tok_s={n: round(v[-1], 2) for n, v in dec.items()})), flush=True)
    med = statistics.median
    print(f"\n{'variant':10} {'GB/tok':>7} {'decode tok/s':>12} {'x bf16':>7} {'of roof':>7} {'16 req tok/s':>12} {'x bf16':>7}")
    for name in names:
        row = dict(variant=name, threads=args.threads, rounds=args.rounds, weight_gb_per_token=round(wbytes[name] / 1e9, 3),
                   decode_tok_s=round(med(dec[name]), 2),
                   x_bf16=round(med(a / b for a, b in zip(dec[name], dec["bf16"])), 3),
                   of_roofline=round(med(roof[name]), 3))
        if args.batch16:
            row.update(batch16_tok_s=round(med(thr[name]), 1),
                       batch16_x_bf16=round(med(a / b for a, b in zip(thr[name], thr["bf16"])), 3))
        print(json.dumps(row))
        print(f"{name:10} {row['weight_gb_per_token']:7.3f} {row['decode_tok_s']:12.2f} {row['x_bf16']:7.2f} "
              f"{row['of_roofline']:7.2f} {row.get('batch16_tok_s', float('nan')):12.1f} "
              f"{row.get('batch16_x_bf16', float('nan')):7.2f}")


if __name__ == "__main__":
    main()
