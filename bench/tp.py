"""Tensor parallelism: per-rank weight bytes and load time, decode tok/s for each TP size, and the cost of
broadcasting one step (qvl.parallel.step_message vs torch's broadcast_object_list).

    python bench/tp.py                                  # "mid" random Qwen2-VL (1024 wide, 8 layers), CPU fp32
    python bench/tp.py --config tiny --tp 1 2           # the test checkpoint, seconds
    python bench/tp.py --device cuda --dtype bfloat16   # on a CUDA machine: NCCL; with one GPU both ranks
                                                        # share it (a check that NCCL works, not a speed-up;
                                                        # NCCL may refuse two ranks on one GPU: --backend gloo)

The checkpoint is random, written once to --dir with transformers' save_pretrained (tests/tiny.py). Load: each
rank's shard loaded in this process, one after the other (qvl.build.load_model(tp=TPInfo)); bytes = its
parameters and buffers. Decode: LLMEngine.from_config with tensor_parallel_size = each --tp (local workers
spawned), one request (and --batch requests) of --prompt-len token ids, --new-tokens greedy tokens; tok/s =
(tokens after the first) / (time after the first token), median of --repeats. Broadcast: 2 gloo (or NCCL)
ranks, the median time rank 0 spends sending a decode step of --batch rows. On a 2-core CPU shared with
other jobs tp=2 is not expected to be faster: two processes split the same two cores and add two
all-reduces per layer. Also the README's fit table (--memory-table: computed, not measured). Not a test:
nothing is asserted.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

MID = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
           num_key_value_heads=2, vocab_size=4096, rope_scaling={"type": "mrope", "mrope_section": [8, 12, 12]})


def write_checkpoint(name: str, path: Path) -> Path:
    import json as _json

    from transformers import Qwen2VLConfig

    import tiny

    if (path / "config.json").is_file():
        return path
    if name == "tiny":
        return tiny.make_tiny_checkpoint(path)
    ids = tiny.write_tokenizer(path)
    d = {**tiny.tiny_config_dict(ids), **MID}
    d["vision_config"] = {**d["vision_config"], "hidden_size": MID["hidden_size"]}      # the merger's output
    model = tiny.random_qwen2_vl(Qwen2VLConfig(**d), seed=0)
    model.save_pretrained(path, safe_serialization=True)
    (path / "config.json").write_text(_json.dumps(d, indent=1))
    tiny._write_side_files(path, ids, 200704, "Qwen2VLProcessor")
    return path


def shard_sizes(path: Path, tp: int, dtype: torch.dtype, device: str) -> list[dict]:
    from qvl.build import load_model
    from qvl.parallel.shard import TPInfo

    rows = []
    for r in range(tp):
        t0 = time.perf_counter()
        model, _ = load_model(path, dtype=dtype, device=device, tp=TPInfo(r, tp) if tp > 1 else None)
        secs = time.perf_counter() - t0
        seen, nbytes = set(), 0
        for t in list(model.parameters()) + list(model.buffers()):
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                nbytes += t.numel() * t.element_size()
        rows.append({"tp": tp, "rank": r, "weight_bytes": nbytes, "load_s": round(secs, 3)})
        del model
    return rows


def decode(path: Path, tp: int, args) -> dict:
    from qvl.engine.llm_engine import LLMEngine
    from qvl.config import EngineConfig
    from qvl.multimodal.prompt import ProcessedPrompt
    from qvl.sampling_params import SamplingParams

    t0 = time.perf_counter()
    eng = LLMEngine.from_config(EngineConfig(model=str(path), tensor_parallel_size=tp, device=args.device,
                                             dtype=args.dtype, threads=args.threads, max_model_len=2048,
                                             kv_cache_memory=256 << 20, enforce_eager=True,
                                             distributed_backend=args.backend))
    start_s = time.perf_counter() - t0
    out = {"tp": tp, "start_s": round(start_s, 2)}
    try:
        for batch in sorted({1, args.batch}):
            rates = []
            for rep in range(args.repeats):
                ids = [[(7 * i + 13 * b + rep) % 400 for i in range(args.prompt_len)] for b in range(batch)]
                params = SamplingParams(temperature=0, max_tokens=args.new_tokens, min_tokens=args.new_tokens)
                for b, p in enumerate(ids):
                    eng.add_request(f"r{tp}-{batch}-{rep}-{b}", ProcessedPrompt.from_token_ids(p), params)
                first, n = None, 0
                while eng.has_unfinished_requests():
                    outs = eng.step()
                    if first is None and outs:
                        first = time.perf_counter()
                    else:
                        n += len(outs)
                rates.append(n / (time.perf_counter() - first))
            out[f"decode_tok_s_batch{batch}"] = round(statistics.median(rates), 1)
    finally:
        eng.close()
    return out


# ------------------------------------------------------------------------------- memory arithmetic

# The published Qwen2-VL shapes (config.json); ViT = 675 M parameters in every size. Qwen's int4 72B
# checkpoints pad intermediate_size to 29,696 (232 groups of 128) so that tp 2/4/8 divide the groups.
SHAPES = {
    "2B": dict(V=151936, H=1536, L=28, nH=12, nKV=2, D=128, I=8960, tied=True),
    "7B": dict(V=152064, H=3584, L=28, nH=28, nKV=4, D=128, I=18944, tied=False),
    "72B": dict(V=152064, H=8192, L=80, nH=64, nKV=8, D=128, I=29568, tied=False),
}
VIT_PARAMS = 675e6
INT4_BYTES = 0.5 + 2 / 128 + 0.5 / 128      # a 4-bit weight + its group's fp16 scale and 4-bit zero (g128)
RESERVE_GIB = 2.0                           # per GPU: CUDA context, activations, the vision encode on rank 0
CONTEXT = 32768                             # KV-cache tokens the table provisions (e.g. 4 requests of 8K)
TABLE = [("2B", "bf16", 1, 8), ("7B", "bf16", 1, 24), ("7B", "bf16", 2, 16), ("7B", "int4", 2, 8),
         ("7B", "bf16", 4, 8), ("72B", "bf16", 2, 80), ("72B", "bf16", 4, 80), ("72B", "bf16", 8, 24),
         ("72B", "int4", 2, 48), ("72B", "int4", 4, 24), ("72B", "int4", 8, 16), ("72B", "int4 unpadded", 4, 24)]


def rank_memory(name: str, fmt: str, tp: int) -> dict:
    """GiB per rank: decoder weights (rank 0 also the embedding, LM head and ViT, in 16 bits), KV at CONTEXT."""
    s = dict(SHAPES[name])
    if fmt == "int4" and name == "72B":          # "int4 unpadded": a checkpoint quantized from the 29,568 shape
        s["I"] = 29696
    H, D, L, nH, nKV, I = s["H"], s["D"], s["L"], s["nH"], s["nKV"], s["I"]
    kv_rank = nKV // tp if nKV >= tp else 1                  # replicated KV heads when tp > nKV
    lin = L * (H * nH * D / tp + 2 * H * kv_rank * D + nH * D * H / tp + 3 * H * I / tp)   # matrices
    small = L * (nH * D / tp + 2 * kv_rank * D + 2 * H) + H                              # biases, norms
    w = lin * (INT4_BYTES if fmt.startswith("int4") else 2) + small * 2
    extra = (s["V"] * H * (1 if s["tied"] else 2) + VIT_PARAMS) * 2
    kv = CONTEXT * 2 * L * kv_rank * D * 2
    gib = 2 ** 30
    return {"weights_rank1": w / gib, "weights_rank0": (w + extra) / gib, "kv": kv / gib,
            "rank0_total": (w + extra + kv) / gib + RESERVE_GIB, "I": I}


def memory_table() -> str:
    rows = ["| model, format | GPUs | weights per rank (rank 0 / others) | KV per rank at 32K tokens | "
            "rank 0 needs | fits? |", "|---|---|---|---|---|---|"]
    for name, fmt, tp, gpu in TABLE:
        m = rank_memory(name, fmt, tp)
        fits = m["rank0_total"] <= gpu
        groups = m["I"] // 128
        note = "" if not fmt.startswith("int4") or groups % tp == 0 else \
            f": refused at start ({m['I']} = {groups} groups of 128, not divisible by {tp})"
        fits = fits and not note
        rows.append(f"| Qwen2-VL-{name} {fmt} | {tp} × {gpu} GiB | {m['weights_rank0']:.1f} / "
                    f"{m['weights_rank1'] if tp > 1 else m['weights_rank0']:.1f} GiB | {m['kv']:.1f} GiB | "
                    f"{m['rank0_total']:.1f} GiB | {'yes' if fits else 'no'}{note} |")
    return "\n".join(rows)


# ----------------------------------------------------------------------------------------- broadcast

def _bcast_rank(rank: int, port: int, backend: str, batch: int, hidden: int, iters: int, q) -> None:
    import torch.distributed as dist

    from qvl.layers.attention import AttentionMetadata
    from qvl.parallel import group, step_message

    torch.set_num_threads(1)
    group.join(group.GroupSpec(rank, 2, master_port=port, backend=backend))
    dev = torch.device("cuda", 0) if backend == "nccl" else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    md = AttentionMetadata(seq_lens_q=[1] * batch, context_lens=[300] * batch, device=dev,
                           slot_mapping=torch.arange(batch, device=dev) * 300,
                           block_tables=[list(range(b * 19, b * 19 + 19)) for b in range(batch)])
    call = step_message.StepCall(torch.zeros(3, batch, dtype=torch.long, device=dev), md,
                                 torch.randn(batch, hidden, device=dev))
    times = {"tensors": [], "objects": []}
    for _ in range(iters):
        dist.barrier()
        t0 = time.perf_counter()
        if rank == 0:
            step_message.send(call, device=dev, control=group.control_group())
        else:
            step_message.recv(hidden_size=hidden, dtype=torch.float32, device=dev, control=group.control_group())
        times["tensors"].append(time.perf_counter() - t0)
        dist.barrier()
        t0 = time.perf_counter()
        obj = [(call.positions.cpu(), md.seq_lens_q, md.context_lens, md.slot_mapping.cpu(),
                md.block_tables.cpu(), call.inputs_embeds.cpu())] if rank == 0 else [None]
        dist.broadcast_object_list(obj, src=0)
        times["objects"].append(time.perf_counter() - t0)
    if rank == 0:
        q.put({k: round(statistics.median(v) * 1e6, 1) for k, v in times.items()})
    group.leave()


def broadcast_cost(backend: str, batch: int, hidden: int, iters: int = 200) -> dict:
    from qvl.parallel.group import free_port

    ctx = multiprocessing.get_context("spawn")
    q, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_bcast_rank, args=(r, port, backend, batch, hidden, iters, q)) for r in (0, 1)]
    for p in procs:
        p.start()
    res = q.get(timeout=300)
    for p in procs:
        p.join(30)
    return {"backend": backend, "batch": batch, "hidden": hidden, "median_us_step_message": res["tensors"],
            "median_us_broadcast_object_list": res["objects"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", choices=("tiny", "mid"), default="mid")
    ap.add_argument("--dir", default="/tmp/qvl-bench-tp", help="where the random checkpoint is written (once)")
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank (default 1)")
    ap.add_argument("--backend", choices=("nccl", "gloo"), default=None,
                    help="torch.distributed backend (default: nccl on CUDA, gloo on CPU)")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3, help="decode runs per measurement (median)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--memory-table", action="store_true", help="print the README's computed fit table and exit")
    args = ap.parse_args()
    if args.memory_table:
        print(memory_table())
        return
    torch.set_num_threads(args.threads)
    from qvl.build import resolve_dtype

    path = write_checkpoint(args.config, Path(args.dir) / args.config)
    dtype = resolve_dtype(args.dtype, torch.device(args.device))
    report = {"config": args.config, "device": args.device, "dtype": str(dtype).removeprefix("torch."),
              "threads_per_rank": args.threads, "shards": [], "decode": []}
    for tp in args.tp:
        report["shards"] += shard_sizes(path, tp, dtype, "cuda:0" if args.device.startswith("cuda") else "cpu")
    for tp in args.tp:
        report["decode"].append(decode(path, tp, args))
    hidden = json.loads((path / "config.json").read_text())["hidden_size"]
    backend = args.backend or ("nccl" if args.device.startswith("cuda") else "gloo")
    report["broadcast"] = broadcast_cost(backend, args.batch, hidden)
    if args.json:
        print(json.dumps(report, indent=1))
        return
    print(f"bench/tp.py: {args.config} on {args.device} ({report['dtype']}, {args.threads} thread(s) per rank)")
    for r in report["shards"]:
        print(f"  tp={r['tp']} rank {r['rank']}: {r['weight_bytes'] / 2**20:8.1f} MiB weights, "
              f"load {r['load_s']:.2f} s")
    for d in report["decode"]:
        print("  " + "  ".join(f"{k}={v}" for k, v in d.items()))
    b = report["broadcast"]
    print(f"  one decode step of {b['batch']} rows to the other rank ({b['backend']}): step_message "
          f"{b['median_us_step_message']} us, broadcast_object_list {b['median_us_broadcast_object_list']} us (median)")


if __name__ == "__main__":
    main()
