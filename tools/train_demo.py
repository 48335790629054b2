"""Train the qvl demo checkpoint: a few-M-parameter Qwen2-VL on tools/demo_data.py's synthetic task.

    python tools/train_demo.py --build-tokenizer qvl/demo            # once: tokenizer + chat template
    python tools/train_demo.py --smoke                                # CPU, seconds: every code path
    python tools/train_demo.py --device cuda --minutes 8 --out DIR    # the real run (GPU)
    python tools/train_demo.py --assemble DIR --into qvl/demo         # weights + config -> shipped dir

Recipe (results in qvl/demo/README.md; background in ../shared/DEMO_TRAINING_NOTES.md):
  * rows = one image (or video) + up to 8 questions; each question attends to the shared prefix
    (system + user + vision) and to itself (prefix-shared packing), positions = single-turn layout;
  * loss = answer tokens (+ closing <|im_end|>) CE  +  a training-only linear probe on the merger output
    with dense per-token targets (shape, colour, motion, characters and their order, the object's box
    as 0..1000 digits and as floats, the cell's own normalised centre). The probe is never saved;
  * AdamW, warmup then cosine *in wall time*, so the run ends inside its budget; periodic evals (greedy,
    own forward) and checkpoints (weights-only, bf16 safetensors) so a killed run still leaves one.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import demo_data as D  # noqa: E402
from demo_batches import (SPECIALS, SYSTEM, BatchStream, Prompter, collate, eval_set, make_row,  # noqa: E402,F401
                           mrope_positions, sample_qas, train_batch)
from demo_model import DemoConfig, DemoQwen2VL, segment_mask  # noqa: E402

QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                 r"\s*[\r\n]+|\s+(?!\S)|\s+")
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in "
    "messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful "
    "assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string "
    "%}{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}{% if "
    "content['type'] == 'image' or 'image' in content or 'image_url' in content %}{% set image_count.value "
    "= image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif "
    "%}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' or 'video' in content "
    "%}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ "
    "video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if "
    "add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
AUX_SPLITS = (6, 7, 5, 37, 37, 9, 9, 120, 4, 2, 20)  # shape colour motion charL charR idxL idxR digits box cell ranks
TYPE_LOSS_WEIGHT = torch.tensor([1.0, 1.0, 1.0, 1.0, 3.0, 1.5, 1.5])   # QTYPES order; grounding has 12 digits
ENGLISH = """The quick brown fox jumps over the lazy dog. A picture is worth a thousand words.
This is a small demo model trained on synthetic shapes. It can answer simple questions about colors,
shapes, counts, positions, text and motion. Please describe the image. What is in this picture?
Hello, how are you today? I am fine, thank you. The weather is nice and the sky is blue.
Numbers like 1, 2, 3, 10, 42, 100 and 2024 appear in documents, tables, receipts and charts.
Picture 1: Video 1: system user assistant"""


# ---------------------------------------------------------------- tokenizer / checkpoint files

def build_tokenizer(out: Path) -> None:
    """Byte-level BPE with Qwen2's pre-tokenizer; the 14 Qwen2-VL specials follow the BPE vocab."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from tokenizers import processors, trainers
    rng = np.random.default_rng(7)
    corpus = ENGLISH.splitlines() + [f"system\n{SYSTEM}", "user\n", "assistant\n"] * 50 + list(D.WORDS) * 20
    for _ in range(4000):
        sc = D.make_video(rng) if rng.random() < 0.1 else D.make_scene(rng)
        for qs in D.questions(rng, sc).values():
            for q, a in qs:
                corpus.append(q)
                for s in SPECIALS:
                    a = a.replace(s, " ")
                corpus.append(a)
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=4096, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(corpus, trainer)
    n_bpe = tok.get_vocab_size()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    decoder = {str(n_bpe + i): {"content": s, "lstrip": False, "normalized": False, "rstrip": False,
                                "single_word": False, "special": True} for i, s in enumerate(SPECIALS)}
    (out / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": False, "add_prefix_space": False, "added_tokens_decoder": decoder,
        "additional_special_tokens": SPECIALS[1:], "bos_token": None, "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False, "eos_token": "<|im_end|>", "errors": "replace",
        "model_max_length": 32768, "pad_token": "<|endoftext|>", "padding_side": "left",
        "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer", "unk_token": None}, indent=2))
    (out / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}, indent=2))
    print(f"tokenizer: {n_bpe} BPE tokens + {len(SPECIALS)} specials -> {out}")


def model_config(tok, small: bool = False) -> DemoConfig:
    ids = {s: tok.token_to_id(s) for s in SPECIALS}
    n = tok.get_vocab_size()
    kw = dict(vocab_size=-(-n // 64) * 64, pad_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
              image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
              vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
              vision_token_id=ids["<|vision_pad|>"])
    if small:
        kw.update(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, vision_depth=2,
                  vision_embed_dim=64, vision_num_heads=2, vision_mlp_ratio=2)
    return DemoConfig(**kw)


def save_checkpoint(model: DemoQwen2VL, out: Path, tokdir: Path | None = None) -> None:
    """Weights (bf16 safetensors, hub key names, no aux probe) + config.json; with tokdir, the whole
    checkpoint directory. Written to temp names then renamed, so a kill never leaves half a file."""
    from safetensors.torch import save_file
    out.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().to("cpu", torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(out / "model.safetensors.tmp"), metadata={"format": "pt"})
    os.replace(out / "model.safetensors.tmp", out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(model.cfg.hub_config("bfloat16"), indent=2))
    if tokdir is not None:
        write_side_files(out, tokdir, model.cfg)


def write_side_files(out: Path, tokdir: Path, cfg: DemoConfig) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.json"):
        if (tokdir / name).resolve() != (out / name).resolve():
            shutil.copy(tokdir / name, out / name)
    (out / "preprocessor_config.json").write_text(json.dumps({
        "min_pixels": D.MIN_PIXELS, "max_pixels": D.IMAGE_MAX_PIXELS,
        "size": {"shortest_edge": D.MIN_PIXELS, "longest_edge": D.IMAGE_MAX_PIXELS},
        "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2, "image_mean": D.MEAN.tolist(),
        "image_std": D.STD.tolist(), "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "do_convert_rgb": True, "resample": 3,
        "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2VLProcessor"}, indent=2))
    (out / "generation_config.json").write_text(json.dumps({
        "bos_token_id": cfg.pad_token_id, "pad_token_id": cfg.pad_token_id,
        "eos_token_id": [cfg.eos_token_id, cfg.pad_token_id], "do_sample": False,
        "repetition_penalty": 1.0, "max_new_tokens": 64}, indent=2))


# ---------------------------------------------------------------- forward, loss, greedy decoding

def to_dev(b: dict, dev) -> dict:
    return {k: v.to(dev, non_blocking=True) if torch.is_tensor(v) else torch.from_numpy(v).to(dev)
            for k, v in b.items()}


def vision(model, b):
    return model.visual(b["img_px"], b["vid_px"], b["v_dst"], b["v_pos"], b["v_valid"], b["v_keep"])


def _masked_mean(x, m):
    return (x * m).sum() / m.sum().clamp(min=1)


def compute_loss(model, probe, b, aux_weight: float = 1.0, rank_weight: float = 0.0):
    """Answer CE (type-balanced) + aux probe loss. Integer indices from the loader: no host syncs."""
    with torch.set_grad_enabled(torch.is_grad_enabled() and model.visual.patch_embed.proj.weight.requires_grad):
        vis = vision(model, b)                          # no graph through a frozen tower (--freeze-vision)
    h = model.text(b["ids"], b["pos"], segment_mask(b["seg"]), vis, b["t_vis"])
    sel = b["t_sel"]
    logits = model.lm_head(h.reshape(-1, h.shape[-1])[sel]).float()
    ce = F.cross_entropy(logits, b["tgt"].reshape(-1)[sel], reduction="none")
    tt = b["ttype"].reshape(-1)[sel]
    onehot = (tt[:, None] == torch.arange(len(D.QTYPES), device=tt.device)).float()     # (K, 7)
    n = onehot.sum(0)
    per_type = (ce[:, None] * onehot).sum(0) / n.clamp(min=1)                          # (7,)
    w = TYPE_LOSS_WEIGHT.to(ce.device) * (n > 0)
    loss = (per_type * w).sum() / w.sum()           # type-balanced: rare short answers still count
    parts = {"ans": ce.mean().detach()}
    for i, qt in enumerate(D.QTYPES):
        parts[qt] = torch.where(n[i] > 0, per_type[i], torch.nan).detach()
    if probe is not None:
        a = probe(vis.float()).split(AUX_SPLITS, -1)
        ai, af = b["aux_i"], b["aux_f"]
        ce_ = lambda x, y: F.cross_entropy(x, y, ignore_index=-100)  # noqa: E731
        aux = ce_(a[0], ai[:, 0]) + ce_(a[1], ai[:, 1]) + ce_(a[2], ai[:, 2])
        aux = aux + (ce_(a[3], ai[:, 3]) + ce_(a[4], ai[:, 4]) + ce_(a[5], ai[:, 5]) + ce_(a[6], ai[:, 6])) / 2
        obj = (ai[:, 7] != -100).float()                                   # (M,)
        dig = F.cross_entropy(a[7].reshape(-1, 10), ai[:, 7:19].clamp(min=0).reshape(-1), reduction="none")
        aux = aux + _masked_mean(dig.view(-1, 12).mean(1), obj)
        aux = aux + 5 * _masked_mean((a[8] - af[:, :4].nan_to_num()).abs().mean(1), obj)
        aux = aux + 5 * F.l1_loss(a[9], af[:, 4:])
        if rank_weight:                                  # position ranks: only with --position-extremes
            aux = aux + rank_weight * F.cross_entropy(a[10].reshape(-1, 5), ai[:, 19:23].reshape(-1))
        parts["aux"] = aux.detach()
        loss = loss + aux_weight * aux
    return loss, parts


@torch.no_grad()
def greedy(model, b: dict, eos: int, max_new: int = 40) -> list[list[int]]:
    """Greedy answers for a collated eval batch (one question per row, no answers) without KV cache."""
    vis = vision(model, b)
    ids, pos, seg = b["ids"], b["pos"], b["seg"]
    r, l0 = ids.shape
    lens = (seg >= 0).sum(1)
    ids = F.pad(ids, (0, max_new), value=0)
    pos = F.pad(pos, (0, max_new))
    seg = F.pad(seg, (0, max_new), value=-1)
    qseg = seg[torch.arange(r, device=ids.device), lens - 1].clone()       # generated tokens join the question
    out = [[] for _ in range(r)]
    done = torch.zeros(r, dtype=torch.bool, device=ids.device)
    ar = torch.arange(r, device=ids.device)
    for _ in range(max_new):
        n = int(lens.max())
        h = model.text(ids[:, :n], pos[:, :, :n], segment_mask(seg[:, :n]), vis)
        nxt = model.lm_head(h[ar, lens - 1]).float().argmax(-1)
        live = ~done
        ids[ar[live], lens[live]] = nxt[live]
        pos[:, ar[live], lens[live]] = pos[0, ar[live], lens[live] - 1] + 1
        seg[ar[live], lens[live]] = qseg[live]
        for i in ar[live].tolist():
            out[i].append(int(nxt[i]))
        lens = lens + live.long()
        done |= nxt == eos
        if bool(done.all()):
            break
    return out


def parse_box(text: str):
    import re
    m = re.search(r"\((\d+),(\d+)\),\((\d+),(\d+)\)", text)
    return tuple(int(x) for x in m.groups()) if m else None


def score(samples, replies) -> dict:
    """Exact match per type, grounding IoU>=0.5 fraction; replies are decoded strings."""
    res: dict[str, list] = {}
    for (qt, _, _, ans), rep in zip(samples, replies):
        rep = rep.replace("<|im_end|>", "").replace("<|endoftext|>", "").strip()
        res.setdefault(qt, []).append(rep == ans)
        if qt == "grounding":
            pb, gb = parse_box(rep), parse_box(ans)
            res.setdefault("grounding_iou50", []).append(pb is not None and D.iou(pb, gb) >= 0.5)
    return {k: round(100 * sum(v) / len(v), 1) for k, v in res.items()}


def run_eval(model, p: Prompter, rows, samples, dev, bs: int = 64) -> tuple[dict, list[str]]:
    model.eval()
    replies = []
    for i in range(0, len(rows), bs):
        b = to_dev(collate(rows[i:i + bs], p.id["<|endoftext|>"]), dev)
        with torch.autocast(dev.type, torch.bfloat16, enabled=dev.type == "cuda"):
            outs = greedy(model, b, p.id["<|im_end|>"])
        replies += [p.tok.decode(o, skip_special_tokens=False) for o in outs]
    model.train()
    return score(samples, replies), replies


# ---------------------------------------------------------------- main loop

def train(args) -> None:
    from tokenizers import Tokenizer
    t_start = time.time()
    dev = torch.device(args.device)
    torch.manual_seed(args.seed)
    tokfile = str(Path(args.tokenizer) / "tokenizer.json")
    p = Prompter(Tokenizer.from_file(tokfile))
    cfg = model_config(p.tok, small=args.small)
    model = DemoQwen2VL(cfg)
    if args.init:                                   # fine-tune: start from a saved checkpoint's weights
        from safetensors.torch import load_file
        model.load_state_dict({k: v.float() for k, v in load_file(str(Path(args.init) / "model.safetensors")).items()})
    model = model.to(dev)
    if args.threads:
        torch.set_num_threads(args.threads)
    n_par = sum(x.numel() for x in model.parameters())
    if args.freeze_vision:                          # fine-tune the text model only; the probe has no use
        model.visual.requires_grad_(False)
    probe = None if args.freeze_vision else nn.Linear(cfg.hidden_size, sum(AUX_SPLITS)).to(dev)
    trained = [x for x in model.parameters() if x.requires_grad]
    groups = [{"params": [x for x in trained if x.dim() >= 2], "weight_decay": 0.05},
              {"params": [x for x in trained if x.dim() < 2], "weight_decay": 0.0}]
    if probe is not None:
        groups.append({"params": list(probe.parameters()), "weight_decay": 0.0, "lr_mult": args.probe_lr_mult})
        trained += list(probe.parameters())
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), fused=dev.type == "cuda")
    samples = eval_set(args.eval_per_type, seed=args.eval_seed, extremes=args.position_extremes)
    eval_rows = [make_row(p, sc, [(qt, q, a)], aux=False, answers=False) for qt, sc, q, a in samples]
    loader = torch.utils.data.DataLoader(
        BatchStream(tokfile, args.images, args.videos, args.seed, args.text_prob,
                    dict(kv.split("=") for kv in args.type_weights.split(",")) if args.type_weights else None,
                    args.position_extremes),
        batch_size=None,
        num_workers=args.workers, pin_memory=dev.type == "cuda",
        prefetch_factor=4 if args.workers else None, persistent_workers=args.workers > 0)
    log = open(args.log, "a") if args.log else None

    def emit(rec):
        line = json.dumps(rec)
        print(line, flush=True)
        if log:
            log.write(line + "\n")
            log.flush()

    emit({"event": "start", "params": n_par, "config": cfg.hub_config(), "args": vars(args),
          "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "eval_n": len(samples)})
    budget = args.minutes * 60 - args.reserve_s
    t_train0 = time.time()
    next_eval, next_save, next_log = t_train0 + args.eval_every, t_train0 + args.save_every, t_train0 + 15
    acc: dict[str, list] = {}
    step, images, t_data = 0, 0, 0.0
    t_prev = time.time()
    it = iter(loader)
    while True:
        t0 = time.time()
        b = to_dev(next(it), dev)
        t_data += time.time() - t0
        frac = (time.time() - t_train0) / budget
        cosine = 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * cosine
        for g in opt.param_groups:
            g["lr"] = lr * g.get("lr_mult", 1.0)
        try:
            with torch.autocast(dev.type, torch.bfloat16, enabled=dev.type == "cuda"):
                loss, parts = compute_loss(model, probe, b, aux_weight=min(1.0, (step + 1) / args.aux_ramp),
                                           rank_weight=float(args.position_extremes))
            opt.zero_grad(set_to_none=True)
            loss.backward()
        except torch.OutOfMemoryError:
            emit({"event": "oom_skip", "step": step, "shapes": {k: list(v.shape) for k, v in b.items()}})
            opt.zero_grad(set_to_none=True)
            del b
            torch.cuda.empty_cache()
            continue
        gn = torch.nn.utils.clip_grad_norm_(trained, 1.0)
        opt.step()
        step += 1
        images += args.images + args.videos
        for k, v in parts.items():
            acc.setdefault(k, []).append(v)
        now = time.time()
        if now >= next_log or step == 3:
            stats = {k: round(float(torch.nanmean(torch.stack(v))), 4) for k, v in acc.items()}
            emit({"event": "train", "step": step, "min": round((now - t_train0) / 60, 2), "images": images,
                  "lr": round(lr, 6), "gnorm": round(float(gn), 3), "data_wait_frac": round(t_data / (now - t_prev), 3),
                  "steps_per_s": round(len(acc["ans"]) / (now - t_prev), 2), **stats})
            acc, t_data, t_prev, next_log = {}, 0.0, now, now + args.log_every
        last = now - t_train0 >= budget or (args.max_steps and step >= args.max_steps)
        if now >= next_eval or step == args.early_check or last:
            te = time.time()
            n_ev = len(samples) if last else min(len(samples), args.eval_quick)
            sub = [samples[i] for i in range(0, len(samples), max(1, len(samples) // n_ev))][:n_ev]
            subr = [eval_rows[i] for i in range(0, len(samples), max(1, len(samples) // n_ev))][:n_ev]
            acc_ev, replies = run_eval(model, p, subr, sub, dev)
            emit({"event": "eval", "step": step, "min": round((now - t_train0) / 60, 2), "images": images,
                  "n": len(sub), **acc_ev, "eval_s": round(time.time() - te, 1),
                  "examples": [(s[2], s[3], r) for s, r in list(zip(sub, replies))[::max(1, len(sub) // 6)]]})
            next_eval = time.time() + args.eval_every
        if args.out and (now >= next_save or step == args.early_check or last):
            save_checkpoint(model, Path(args.out), Path(args.tokenizer) if args.full else None)
            emit({"event": "saved", "step": step, "min": round((now - t_train0) / 60, 2)})
            next_save = time.time() + args.save_every
        if last:
            break
    emit({"event": "done", "steps": step, "images": images, "wall_s": round(time.time() - t_start, 1),
          "max_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if dev.type == "cuda" else None})
    if log:
        log.close()
    sys.stdout.flush()
    os._exit(0)      # skip DataLoader worker teardown: files are closed, nothing else to flush


def smoke(args) -> None:
    """Every code path in seconds: data, tiny model, loss, backward, greedy eval, save (CPU or GPU)."""
    out = Path(tempfile.mkdtemp(prefix="demo_smoke_"))
    args.small, args.minutes, args.reserve_s, args.images, args.videos = True, 10, 0, 3, 1
    args.max_steps, args.early_check, args.eval_per_type, args.eval_quick = 4, 2, 2, 14
    args.workers, args.out, args.full, args.log = min(args.workers, 2), str(out), True, str(out / "log.jsonl")
    pid = os.fork()
    if pid == 0:
        train(args)
    _, status = os.waitpid(pid, 0)
    if status != 0 or not (out / "model.safetensors").exists():
        sys.exit(f"smoke failed (status {status})")
    print(f"smoke ok: {sorted(x.name for x in out.iterdir())}", flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build-tokenizer", metavar="DIR")
    ap.add_argument("--assemble", metavar="RUN_DIR", help="weights+config dir to turn into a full checkpoint")
    ap.add_argument("--into", metavar="DIR", default="qvl/demo")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--tokenizer", default=str(Path(__file__).resolve().parent.parent / "qvl" / "demo"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--minutes", type=float, default=1.0, help="wall budget of the whole run")
    ap.add_argument("--reserve-s", type=float, default=25.0, help="kept for the final eval and save")
    ap.add_argument("--out")
    ap.add_argument("--full", action="store_true", help="write the whole checkpoint dir, not weights+config")
    ap.add_argument("--log")
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--videos", type=int, default=12)
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--warmup", type=int, default=150)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-seed", type=int, default=1)
    ap.add_argument("--eval-per-type", type=int, default=40)
    ap.add_argument("--eval-quick", type=int, default=140)
    ap.add_argument("--eval-every", type=float, default=60.0)
    ap.add_argument("--save-every", type=float, default=90.0)
    ap.add_argument("--log-every", type=float, default=20.0)
    ap.add_argument("--early-check", type=int, default=5, help="eval+save at this step to catch late bugs early")
    ap.add_argument("--max-steps", type=int, default=0)
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--init", help="checkpoint dir to fine-tune from (weights only; the probe starts fresh)")
    ap.add_argument("--aux-ramp", type=int, default=1, help="steps over which the aux loss weight ramps to 1")
    ap.add_argument("--text-prob", type=float, default=0.35, help="fraction of images with rendered text")
    ap.add_argument("--type-weights", default="", help="question sampling weights, e.g. text=3,position=3")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--probe-lr-mult", type=float, default=1.0)
    ap.add_argument("--freeze-vision", action="store_true", help="train the text model only (with --init)")
    ap.add_argument("--position-extremes", action="store_true",
                    help='also ask "Which shape is furthest left?" (not in the shipped checkpoint\'s recipe)')
    args = ap.parse_args(argv)
    if args.build_tokenizer:
        build_tokenizer(Path(args.build_tokenizer))
    elif args.assemble:
        from tokenizers import Tokenizer
        src, dst = Path(args.assemble), Path(args.into)
        dst.mkdir(parents=True, exist_ok=True)
        for name in ("model.safetensors", "config.json"):
            if (src / name).resolve() != (dst / name).resolve():
                shutil.copy(src / name, dst / name)
        tok = Tokenizer.from_file(str(Path(args.tokenizer) / "tokenizer.json"))
        write_side_files(dst, Path(args.tokenizer), model_config(tok))
    elif args.smoke:
        smoke(args)
    else:
        train(args)


if __name__ == "__main__":
    main()
