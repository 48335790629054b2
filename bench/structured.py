"""Structured output cost: per-token masking at batch 1 and 16 vs unconstrained decoding, and the compile
time of a 30-field invoice schema.

    python bench/structured.py --config small            # tiny dims, CPU fp32
    python bench/structured.py --config mid --threads 2  # 1024-wide, 8 layers, Qwen2 vocab (151,936 rows)
    python bench/structured.py --config 2b --device cuda # Qwen2-VL-2B dims, random bf16 weights

The mask cost depends on the tokenizer, not the weights, so every config uses a byte-level BPE of
--vocab tokens with Qwen2's pre-tokenizer, trained here on local text (the Python standard library's
sources; cached under --cache) — a stand-in for Qwen2's 151,643-token vocabulary, with no download.
The model's vocabulary (embedding rows) is the config's (151,936 for mid and 2b): masks are that wide.

Decode: B requests of --prompt-len random tokens; each step's wall time is taken from the engine's
step() while all B sequences decode, unconstrained (greedy, eos banned) and constrained by the invoice
schema (greedy; the grammar decides when to stop, so only full-batch steps count); overhead = constrained /
unconstrained - 1. `fill ms` is the time llguidance takes to fill the step's bitmask (inline on a CPU, on the
mask thread overlapping the forward on CUDA); `apply ms` the sampler's masking of the logits with it. On a machine shared
with other jobs the step medians are noisy; fill + apply is the cost itself.
Compile: the grammar of the 30-field invoice schema, cold (first compile, tokenizer already built) and
cached (a second request with the same schema text); also the one-time tokenizer build. Medians.
Not a test: nothing is asserted.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import sysconfig
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from decode import CONFIGS, _IDS, build_pair, config_dict, default_device, make_engine  # noqa: E402

CONFIGS.setdefault("mid", dict(CONFIGS["2b"], hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                               num_attention_heads=16, num_key_value_heads=2,
                               vision_config=dict(CONFIGS["2b"]["vision_config"], depth=2, hidden_size=1024)))
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def invoice_schema() -> dict:
    """30 fields: vendor/buyer blocks, dates, totals, an array of line items, enums, patterns, bounds."""
    party = {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 40}, "street": {"type": "string", "maxLength": 40},
        "city": {"type": "string", "maxLength": 30}, "postal_code": {"type": "string", "pattern": "^[0-9]{5}$"},
        "country": {"type": "string", "enum": ["DE", "FR", "US", "GB", "CN", "JP"]},
        "vat_id": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{8,12}$"}},
        "required": ["name", "city", "country"], "additionalProperties": False}
    line = {"type": "object", "properties": {
        "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"}, "description": {"type": "string", "maxLength": 60},
        "quantity": {"type": "integer", "minimum": 1, "maximum": 10000},
        "unit_price": {"type": "number", "minimum": 0}, "tax_rate": {"type": "number", "enum": [0, 0.07, 0.19, 0.2]},
        "amount": {"type": "number", "minimum": 0}},
        "required": ["description", "quantity", "unit_price", "amount"], "additionalProperties": False}
    props = {
        "invoice_number": {"type": "string", "pattern": "^INV-[0-9]{6}$"},
        "issue_date": {"type": "string", "format": "date"}, "due_date": {"type": "string", "format": "date"},
        "currency": {"type": "string", "enum": ["EUR", "USD", "GBP", "CNY", "JPY"]},
        "vendor": party, "buyer": party,
        "payment_terms": {"type": "string", "enum": ["net15", "net30", "net60", "due_on_receipt"]},
        "iban": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{2}[A-Z0-9]{11,30}$"},
        "lines": {"type": "array", "items": line, "minItems": 1, "maxItems": 50},
        "subtotal": {"type": "number", "minimum": 0}, "tax_total": {"type": "number", "minimum": 0},
        "total": {"type": "number", "minimum": 0}}
    return {"type": "object", "properties": props, "additionalProperties": False,
            "required": ["invoice_number", "issue_date", "currency", "vendor", "buyer", "lines", "total"]}


def count_fields(schema: dict) -> int:
    n = 0
    for v in schema.get("properties", {}).values():
        n += 1 + count_fields(v) + (count_fields(v["items"]) if isinstance(v.get("items"), dict) else 0)
    return n


def train_tokenizer(vocab: int, cache: Path):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    path = cache / f"bpe_{vocab}.json"
    if path.is_file():
        return Tokenizer.from_file(str(path))
    files = sorted(str(p) for p in Path(sysconfig.get_paths()["stdlib"]).rglob("*.py"))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab - len(SPECIALS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((Path(f).read_text(errors="ignore") for f in files), trainer)
    tok.add_special_tokens(SPECIALS)
    cache.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return tok


def median_ms(xs: list[float]) -> float:
    return round(statistics.median(xs) * 1000, 3) if xs else float("nan")


def decode_steps(eng, batch: int, prompt_len: int, new: int, spec) -> tuple[list[float], list[float]]:
    """Wall time of each engine step in which all `batch` sequences decode; and the mask fill times."""
    from qvl.multimodal.prompt import ProcessedPrompt
    from qvl.sampling_params import SamplingParams

    g = torch.Generator().manual_seed(batch)
    for i in range(batch):
        ids = torch.randint(0, 4000, (prompt_len,), generator=g).tolist()
        sp = SamplingParams(temperature=0, max_tokens=new, structured_outputs=spec, ignore_eos=spec is None)
        eng.add_request(f"r{batch}-{i}-{spec is not None}", ProcessedPrompt.from_token_ids(ids), sp)
    mask_times: list[float] = []
    s = eng._structured
    if s is not None and not hasattr(s, "_bench_wrapped"):
        inner = s.bitmask

        def timed(*a, **k):
            t = time.perf_counter()
            out = inner(*a, **k)
            mask_times.append(time.perf_counter() - t)
            return out
        s.bitmask, s._bench_wrapped = timed, mask_times
    elif s is not None:
        mask_times = s._bench_wrapped
        mask_times.clear()
    steps = []
    while eng.has_unfinished_requests():
        full = (eng.scheduler.num_running == batch and not eng.scheduler.waiting
                and all(not q.is_prefill for q in eng.scheduler.running))
        sync(eng)
        t = time.perf_counter()
        eng.step()
        sync(eng)
        if full:
            steps.append(time.perf_counter() - t)
    return steps[1:], list(mask_times)


def apply_ms(batch: int, vocab: int, device: str, iters: int = 20) -> float:
    """The sampler's share: applying a (batch, ceil(V/32)) bitmask to (batch, V) logits."""
    from qvl.layers.sampler import apply_token_bitmask

    logits = torch.randn(batch, vocab, device=device)
    mask = torch.randint(-2**31, 2**31 - 1, (batch, (vocab + 31) // 32), dtype=torch.int32)
    times = []
    for _ in range(iters):
        x = logits.clone()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        apply_token_bitmask(x, mask)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return median_ms(times)


def sync(eng) -> None:
    if eng.model.device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=list(CONFIGS), default="small")
    ap.add_argument("--device", default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--vocab", type=int, default=151643, help="BPE tokens to train (default: Qwen2's count)")
    ap.add_argument("--cache", default="/tmp/qvl-bench-tokenizers")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = default_device(args.device)
    dtype = torch.bfloat16 if args.config == "2b" else torch.float32

    from qvl.sampling_params import StructuredOutputsParams
    from qvl.structured import StructuredOutputs
    from qvl.structured.llguidance_backend import LLGuidanceBackend

    t = time.perf_counter()
    tok = train_tokenizer(args.vocab, Path(args.cache))
    train_s = time.perf_counter() - t
    d = config_dict(args.config)
    model_vocab = d["vocab_size"]
    if model_vocab < tok.get_vocab_size():
        raise SystemExit(f"--vocab {args.vocab} exceeds the {args.config} config's vocab_size {model_vocab}")
    eos = [tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")]

    schema = invoice_schema()
    spec = StructuredOutputsParams(json=schema)
    tok_json = tok.to_str()
    t = time.perf_counter()
    backend = LLGuidanceBackend(tok_json, model_vocab, eos)
    tokenizer_s = time.perf_counter() - t
    cold, warm = [], []
    for i in range(5):                  # a fresh manager each time: nothing cached but the tokenizer
        so = StructuredOutputs(lambda: backend, model_vocab)
        t = time.perf_counter()
        so.check(StructuredOutputsParams(json=dict(schema, description=f"run {i}")))
        cold.append(time.perf_counter() - t)
        t = time.perf_counter()
        so.check(StructuredOutputsParams(json=json.dumps(dict(schema, description=f"run {i}"), indent=2)))
        warm.append(time.perf_counter() - t)
        so.shutdown()

    hf, model, config = build_pair(args.config, device, dtype)
    del hf
    # the bench's tokenizer stands in for the checkpoint's; eos ids are its specials'
    config.eos_token_id = eos
    rows = []
    for batch in args.batch:
        eng = make_engine(model, config, max_num_seqs=max(args.batch), max_model_len=1024,
                          kv_cache_memory=(1 << 30) if device == "cuda" else (512 << 20))
        eng.processor = types.SimpleNamespace(tokenizer=tok)
        eng.eos_token_ids = set(eos)
        eng._structured = StructuredOutputs(lambda: backend, model_vocab)
        decode_steps(eng, batch, args.prompt_len, 4, None)               # warm-up
        eng.check_structured_outputs(types.SimpleNamespace(structured_outputs=spec))
        free, constrained, masks = [], [], []
        for _ in range(args.repeats):      # interleaved, so drift in the machine's load hits both
            free += decode_steps(eng, batch, args.prompt_len, args.new_tokens, None)[0]
            c, m = decode_steps(eng, batch, args.prompt_len, args.new_tokens, spec)
            constrained += c
            masks += m
        row = {"batch": batch, "unconstrained_ms": median_ms(free), "constrained_ms": median_ms(constrained),
               "mask_ms": median_ms(masks), "steps": [len(free), len(constrained)]}
        row["overhead_pct"] = round(100 * (row["constrained_ms"] / row["unconstrained_ms"] - 1), 1)
        row["apply_ms"] = apply_ms(batch, model_vocab, device)
        rows.append(row)
    out = {"config": args.config, "device": device, "dtype": str(dtype).removeprefix("torch."),
           "threads": torch.get_num_threads(), "tokenizer_vocab": tok.get_vocab_size(), "model_vocab": model_vocab,
           "tokenizer_train_s": round(train_s, 1), "llguidance_tokenizer_s": round(tokenizer_s, 3),
           "invoice_fields": count_fields(schema), "compile_cold_ms": median_ms(cold),
           "compile_cached_ms": median_ms(warm), "rows": rows}
    if args.json:
        print(json.dumps(out, indent=1))
        return
    print(f"structured output bench: config {args.config} on {device} ({out['dtype']}, {out['threads']} threads); "
          f"tokenizer {out['tokenizer_vocab']} tokens (trained in {out['tokenizer_train_s']} s), "
          f"model vocab {model_vocab}")
    print(f"llguidance tokenizer build {out['llguidance_tokenizer_s'] * 1000:.0f} ms (once per engine); "
          f"{out['invoice_fields']}-field invoice schema: compile {out['compile_cold_ms']} ms cold, "
          f"{out['compile_cached_ms']} ms cached")
    print(f"{'batch':>5} {'free ms/step':>13} {'json ms/step':>13} {'overhead':>9} {'fill ms':>8} {'apply ms':>9}  steps")
    for r in rows:
        print(f"{r['batch']:>5} {r['unconstrained_ms']:>13} {r['constrained_ms']:>13} {r['overhead_pct']:>8}% "
              f"{r['mask_ms']:>8} {r['apply_ms']:>9}  {r['steps']}")


if __name__ == "__main__":
    main()
