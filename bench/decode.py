"""Batch-1 decode speed: qvl vs transformers `generate`, and the memory-bandwidth roofline.

    python bench/decode.py --config small               # tiny dims, CPU fp32, well under a minute
    python bench/decode.py --config 2b --device cuda    # Qwen2-VL-2B dims, random bf16 weights

Both models hold the *same* random weights (transformers builds them, qvl takes its state dict).
qvl: one request of --prompt-len random text tokens, --new-tokens greedy tokens (eos banned); decode
tok/s = (new - 1) / (time of the last token - time of the first). transformers: generate() with
max_new_tokens = new and = 1 (min_new_tokens equal), decode tok/s = (new - 1) / (difference).
Roofline: bytes of the weights one decode step must read (decoder layers + final norm + LM head;
the vision tower is not read) / copy bandwidth measured here (device-to-device copy of 512 MiB,
read + write counted). Medians over --repeats. --threads sets torch's CPU threads for both engines
and the copy (default: torch's; on a machine shared with other jobs 1 thread is far faster, because
oneDNN/OpenMP threads spin-wait on each other). Not a test: nothing is asserted.

Also the shared helpers for bench/throughput.py and bench/cache.py: CONFIGS, build_pair, make_engine,
image_prompt, timer.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

_IDS = dict(bos_token_id=151643, eos_token_id=151645, vision_start_token_id=151652,
            vision_end_token_id=151653, vision_token_id=151654, image_token_id=151655,
            video_token_id=151656)
_SMALL_IDS = {k: v - 151643 + 4000 for k, v in _IDS.items()}

CONFIGS = {
    "2b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
               num_attention_heads=12, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1e6,
               max_position_embeddings=32768, tie_word_embeddings=True, **_IDS,
               vision_config=dict(depth=32, embed_dim=1280, hidden_size=1536, num_heads=16,
                                  mlp_ratio=4, in_chans=3, patch_size=14, spatial_merge_size=2,
                                  temporal_patch_size=2)),
    "small": dict(vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1e6,
                  max_position_embeddings=4096, tie_word_embeddings=True, **_SMALL_IDS,
                  vision_config=dict(depth=2, embed_dim=64, hidden_size=256, num_heads=2,
                                     mlp_ratio=2, in_chans=3, patch_size=14, spatial_merge_size=2,
                                     temporal_patch_size=2)),
}
# Between the two: Qwen2's vocabulary, 1024 wide, 8 layers, a 2-block vision tower (also bench/structured.py's).
CONFIGS["mid"] = dict(CONFIGS["2b"], hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                      num_attention_heads=16, num_key_value_heads=2,
                      vision_config=dict(CONFIGS["2b"]["vision_config"], depth=2, hidden_size=1024))


def config_dict(name: str) -> dict:
    d = dict(CONFIGS[name], model_type="qwen2_vl", architectures=["Qwen2VLForConditionalGeneration"],
             hidden_act="silu", use_sliding_window=False, attention_dropout=0.0)
    mrope = [16, 24, 24] if name == "2b" else [8, 12, 12]     # head_dim 128 (2b), 64 (mid, small)
    d["rope_scaling"] = {"type": "mrope", "mrope_section": mrope}
    return d


def default_device(device: str | None) -> str:
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def add_common_args(ap: argparse.ArgumentParser) -> None:
    """--config, --device, --threads, --enforce-eager, --attention-backend: shared by decode, throughput,
    ttft and cache benches (engine_options(args) gives the engine's fields)."""
    ap.add_argument("--config", choices=list(CONFIGS), default="small")
    ap.add_argument("--device", default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    ap.add_argument("--attention-backend", choices=["auto", "reference", "paged"], default="auto")


def engine_options(args) -> dict:
    """The EngineConfig fields the common flags set."""
    return dict(enforce_eager=args.enforce_eager, attention_backend=args.attention_backend)


def add_emulate_avx2_arg(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--emulate-avx2", action="store_true", help="rerun with the ISA capped at AVX2")


def rerun_if_emulating_avx2(args, script: str) -> None:
    """--emulate-avx2: run `script` again in a fresh process whose ISA is capped at AVX2 (torch and oneDNN
    read the cap at start-up, so it cannot be applied in this one) and exit with its status."""
    if args.emulate_avx2:
        env = dict(os.environ, ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2")
        argv = [a for a in sys.argv[1:] if a != "--emulate-avx2"]
        sys.exit(subprocess.run([sys.executable, script, *argv], env=env).returncode)


def setup(args) -> tuple[str, torch.dtype]:
    """Apply --threads; the device and dtype of the run (fp32 for the small config, else bf16)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    return default_device(args.device), (torch.float32 if args.config == "small" else torch.bfloat16)


def build_pair(name: str, device: str, dtype: torch.dtype):
    """(transformers model, qvl model, qvl ModelConfig) with the same random weights."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration as HF

    from qvl.models.qwen2_vl.config import ModelConfig
    from qvl.models.qwen2_vl.weights import canonical_key
    from qvl.models.qwen2_vl.model import Qwen2VLForConditionalGeneration

    d = config_dict(name)
    torch.manual_seed(0)
    with torch.device(device):
        hf = HF._from_config(Qwen2VLConfig(**d), attn_implementation="sdpa", dtype=dtype).eval()
    config = ModelConfig.from_dict(d)
    with torch.device("meta"):
        ours = Qwen2VLForConditionalGeneration(config)
    state = {canonical_key(k): v for k, v in hf.state_dict().items()}
    ours.load_state_dict(state, strict=True, assign=True)
    if config.tie_word_embeddings:
        ours.lm_head.weight = ours.model.embed_tokens.weight
    return hf, ours.eval(), config


def make_engine(model, config, **kw):
    from qvl.engine.llm_engine import LLMEngine

    kw.setdefault("max_model_len", 8192)
    kw.setdefault("kv_cache_memory", (4 << 30) if model.device.type == "cuda" else (256 << 20))
    return LLMEngine(model, config, None, **kw)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timer(device: str) -> float:
    sync(device)
    return time.perf_counter()


def image_prompt(config, image, text_before: list[int], text_after: list[int]):
    """A ProcessedPrompt: text, one image (its pads), text — built without a tokenizer."""
    from qvl.models.qwen2_vl.rope import mrope_positions
    from qvl.multimodal.image import process_image
    from qvl.multimodal.prompt import ProcessedPrompt

    vi = process_image(image)
    ids = (text_before + [config.vision_start_token_id] + [config.image_token_id] * vi.num_tokens
           + [config.vision_end_token_id] + text_after)
    pos, delta = mrope_positions(ids, [vi.grid_thw], config.image_token_id, config.video_token_id)
    return ProcessedPrompt(ids, pos, int(delta), [vi], [len(text_before) + 1])


def hf_inputs(prompt, device: str, dtype: torch.dtype) -> dict:
    ids = torch.tensor([prompt.token_ids], device=device)
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids))
    if prompt.items:
        kw["pixel_values"] = torch.cat([vi.pixel_values for vi in prompt.items]).to(device, dtype)
        kw["image_grid_thw"] = torch.tensor([list(vi.grid_thw) for vi in prompt.items], device=device)
    return kw


def copy_bandwidth(device: str, nbytes: int = 512 << 20, iters: int = 10) -> float:
    """Bytes/s of a device-to-device copy (read + write).

    The source is written first: a never-touched CPU buffer reads as the kernel's shared zero page,
    which sits in cache and would inflate the figure (by ~30% on the 2-core bench machine)."""
    x = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    times = []
    for _ in range(iters):
        t0 = timer(device)
        y.copy_(x)
        times.append(timer(device) - t0)
    return 2 * nbytes / statistics.median(times)


def decode_weight_bytes(model) -> int:
    seen, total = set(), 0
    for name, p in model.named_parameters(remove_duplicate=False):
        if name.startswith("visual.") or name == "model.embed_tokens.weight":
            continue                      # not read per token (the embedding: one row)
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        total += p.numel() * p.element_size()
    return total


def qvl_decode(eng, prompt_ids: list[int], new: int, device: str) -> tuple[float, list[int]]:
    """(decode tok/s, the generated tokens)."""
    from qvl.multimodal.prompt import ProcessedPrompt
    from qvl.sampling_params import SamplingParams

    rid = f"d{time.monotonic_ns()}"
    eng.add_request(rid, ProcessedPrompt.from_token_ids(prompt_ids),
                    SamplingParams(temperature=0, max_tokens=new, min_tokens=new))
    first, tokens = None, []
    while eng.has_unfinished_requests():
        outs = eng.step()
        if first is None and outs:
            first = timer(device)
        tokens = next((o.outputs[0].token_ids for o in outs if o.finished), tokens)
    return (new - 1) / (timer(device) - first), tokens


def hf_generate_time(hf, kw: dict, new: int, device: str) -> tuple[float, list[int]]:
    """(seconds for generate(), the generated tokens)."""
    t0 = timer(device)
    with torch.inference_mode():
        out = hf.generate(**kw, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                          pad_token_id=0)
    return timer(device) - t0, out[0, kw["input_ids"].shape[1]:].tolist()


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(ap)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=None, help="default: 256 (2b), 64 (small)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    device, dtype = setup(args)
    new = args.new_tokens or (256 if args.config == "2b" else 64)

    hf, ours, config = build_pair(args.config, device, dtype)
    eng = make_engine(ours, config, max_num_seqs=8, enable_prefix_caching=False, **engine_options(args))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, min(config.vocab_size, 150000), (args.prompt_len,), generator=g).tolist()
    kw = hf_inputs(type("P", (), {"token_ids": ids, "items": []})(), device, dtype)

    qvl_decode(eng, ids, 8, device)                                   # warm-up
    hf_generate_time(hf, kw, 8, device)
    runs = [qvl_decode(eng, ids, new, device) for _ in range(args.repeats)]
    ours_tps, ours_tokens = statistics.median(r[0] for r in runs), runs[0][1]
    hf_tps = []
    for _ in range(args.repeats):
        t_n, hf_tokens = hf_generate_time(hf, kw, new, device)
        t_1, _ = hf_generate_time(hf, kw, 1, device)
        hf_tps.append((new - 1) / (t_n - t_1))
    hf_tps = statistics.median(hf_tps)
    bw = copy_bandwidth(device)
    wbytes = decode_weight_bytes(ours)
    roof = bw / wbytes
    res = dict(bench="decode", config=args.config, device=device, dtype=str(dtype).split(".")[-1],
               threads=torch.get_num_threads(), cpu_kernels=eng.cpu_runtime.mode,
               attention=eng.runner.attention_backend.name, cuda_graphs=eng.runner.graphs is not None,
               kernel_linears=eng.cpu_runtime.num_linears,
               prompt_len=args.prompt_len, new_tokens=new, qvl_tok_s=round(ours_tps, 2),
               hf_tok_s=round(hf_tps, 2), qvl_over_hf=round(ours_tps / hf_tps, 3),
               weight_gb_per_token=round(wbytes / 1e9, 3), copy_bw_gb_s=round(bw / 1e9, 1),
               roofline_tok_s=round(roof, 1), qvl_over_roofline=round(ours_tps / roof, 3),
               greedy_tokens_equal_to_hf=common_prefix(ours_tokens, hf_tokens))
    print(f"decode [{args.config}, {device}, {res['dtype']}, {res['threads']} threads, {res['attention']} "
          f"attention, graphs {'on' if res['cuda_graphs'] else 'off'}] batch 1, {new} new tokens: "
          f"qvl {ours_tps:.1f} tok/s, transformers {hf_tps:.1f} tok/s (x{ours_tps / hf_tps:.2f}); "
          f"roofline {roof:.0f} tok/s ({wbytes / 1e9:.2f} GB/token at {bw / 1e9:.0f} GB/s): "
          f"{ours_tps / roof:.2f} of roofline; first {res['greedy_tokens_equal_to_hf']}/{new} greedy "
          f"tokens equal to transformers'")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
