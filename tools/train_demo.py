"""Train the qvl demo checkpoint: a few-M-parameter Qwen2-VL on tools/demo_data.py's synthetic task.

    python tools/train_demo.py --build-tokenizer qvl/demo            # once: tokenizer + chat template
    python tools/train_demo.py --smoke                                # CPU, seconds: every code path
    python tools/train_demo.py --device cuda --minutes 8 --out DIR    # the real run (GPU)
    python tools/train_demo.py --assemble DIR --into qvl/demo         # weights + config -> shipped dir

Recipe (see the report in bench/demo_eval.py's README section and ../shared/DEMO_TRAINING_NOTES.md):
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
import functools
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
from demo_model import DemoConfig, DemoQwen2VL, segment_mask  # noqa: E402

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
            "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
            "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                 r"\s*[\r\n]+|\s+(?!\S)|\s+")
SYSTEM = "You are a helpful assistant."
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
AUX_SPLITS = (6, 7, 5, 37, 37, 9, 9, 120, 4, 2)      # shape colour motion charL charR idxL idxR digits box cell
TYPE_WEIGHT = {"color": 1.0, "shape": 1.0, "count": 0.7, "position": 1.0, "grounding": 2.0, "text": 2.0,
               "motion": 1.0}
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


# ---------------------------------------------------------------- prompts, positions, batches

def mrope_positions(ids, grids, image_id: int, video_id: int) -> np.ndarray:
    """(3, N) M-RoPE positions of one prompt by the max+1 rule (QWEN2VL_SPEC 5.4); grids in patches."""
    ids = np.asarray(ids)
    out = np.zeros((3, len(ids)), np.int64)
    cur, i, g = 0, 0, 0
    while i < len(ids):
        if ids[i] in (image_id, video_id):
            t, h, w = grids[g]
            h, w = h // 2, w // 2
            n = t * h * w
            tt, hh, ww = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
            out[:, i:i + n] = cur + np.stack([tt.ravel(), hh.ravel(), ww.ravel()])
            cur += max(t, h, w)
            i, g = i + n, g + 1
        else:
            j = i
            while j < len(ids) and ids[j] not in (image_id, video_id):
                j += 1
            out[:, i:j] = cur + np.arange(j - i)
            cur += j - i
            i = j
    return out


class Prompter:
    """Token ids of the single-turn chat layout, split into a shared prefix and question segments."""

    def __init__(self, tok):
        self.tok = tok
        self.id = {s: tok.token_to_id(s) for s in SPECIALS}
        self.system = self.encode(f"<|im_start|>system\n{SYSTEM}<|im_end|>\n")
        self.user = self.encode("<|im_start|>user\n")
        self.gen = self.encode("<|im_end|>\n<|im_start|>assistant\n")

    @functools.lru_cache(maxsize=65536)
    def _enc(self, s: str) -> tuple:
        return tuple(self.tok.encode(s, add_special_tokens=False).ids)

    def encode(self, s: str) -> list[int]:
        return list(self._enc(s))

    def prefix(self, kind: str, grid, system: bool = True) -> tuple[list[int], np.ndarray]:
        pad = self.id["<|video_pad|>" if kind == "video" else "<|image_pad|>"]
        m = grid[0] * grid[1] * grid[2] // 4
        ids = (self.system if system else []) + self.user + [self.id["<|vision_start|>"]] + [pad] * m \
            + [self.id["<|vision_end|>"]]
        pos = mrope_positions(ids, [grid], self.id["<|image_pad|>"], self.id["<|video_pad|>"])
        return ids, pos


def _vision_positions(h: int, w: int) -> np.ndarray:
    hp = np.arange(h)[:, None].repeat(w, 1).reshape(h // 2, 2, w // 2, 2).transpose(0, 2, 1, 3).ravel()
    wp = np.arange(w)[None, :].repeat(h, 0).reshape(h // 2, 2, w // 2, 2).transpose(0, 2, 1, 3).ravel()
    return np.stack([hp, wp], -1)                                            # (h*w, 2)


def collate(rows: list[dict], pad_id: int) -> dict:
    """rows: {kind, px, grid, ids, pos (3,n), seg, tgt, ttype, aux_i?, aux_f?} -> padded numpy batch."""
    L = -(-max(len(r["ids"]) for r in rows) // 16) * 16
    R = len(rows)
    b = {"ids": np.full((R, L), pad_id, np.int64), "pos": np.zeros((3, R, L), np.int64),
         "seg": np.full((R, L), -1, np.int64), "tgt": np.full((R, L), -100, np.int64),
         "ttype": np.full((R, L), -1, np.int64)}
    for i, r in enumerate(rows):
        n = len(r["ids"])
        b["ids"][i, :n], b["pos"][:, i, :n], b["seg"][i, :n] = r["ids"], r["pos"], r["seg"]
        b["tgt"][i, :n], b["ttype"][i, :n] = r["tgt"], r["ttype"]
    segs = [(i, r["grid"][1], r["grid"][2]) for i, r in enumerate(rows) for _ in range(r["grid"][0])]
    lp = -(-max(h * w for _, h, w in segs) // 16) * 16
    b["v_pos"] = np.zeros((len(segs), lp, 2), np.int64)
    b["v_valid"] = np.zeros((len(segs), lp), bool)
    for s, (_, h, w) in enumerate(segs):
        b["v_pos"][s, :h * w] = _vision_positions(h, w)
        b["v_valid"][s, :h * w] = True
    first_seg = np.cumsum([0] + [r["grid"][0] for r in rows])
    dst_img, dst_vid = [], []
    for i, r in enumerate(rows):
        t, h, w = r["grid"]
        k = np.arange(t * h * w)
        d = (first_seg[i] + k // (h * w)) * lp + k % (h * w)
        (dst_vid if r["kind"] == "video" else dst_img).append(d)
    b["v_dst"] = np.concatenate(dst_img + dst_vid)
    b["img_px"] = np.concatenate([r["px"] for r in rows if r["kind"] == "image"] or [np.zeros((0, 588), np.uint8)])
    b["vid_px"] = np.concatenate([r["px"] for r in rows if r["kind"] == "video"] or [np.zeros((0, 1176), np.uint8)])
    b["v_keep"] = np.flatnonzero(b["v_valid"][:, ::4].ravel())
    b["t_vis"] = np.flatnonzero(np.isin(b["ids"], rows[0]["vis_ids"]).ravel())
    b["t_sel"] = np.flatnonzero(b["tgt"].ravel() != -100)
    if "aux_i" in rows[0]:
        b["aux_i"] = np.concatenate([r["aux_i"] for r in rows])
        b["aux_f"] = np.concatenate([r["aux_f"] for r in rows])
    return b


def make_row(p: Prompter, scene, qas: list[tuple[str, str, str]], *, system=True, min_pixels=D.MIN_PIXELS,
             aux=True, answers=True) -> dict:
    """One row: prefix + one segment per (qtype, question, answer). answers=False: eval prompt (1 question,
    ends with the generation prompt)."""
    px, grid, rhw = D.to_pixels(scene, min_pixels=min_pixels)
    kind = "video" if scene.is_video else "image"
    ids, pos = p.prefix(kind, grid, system)
    nxt = int(pos.max()) + 1
    seg, tgt, ttype = [0] * len(ids), [-100] * len(ids), [-1] * len(ids)
    pos = [pos]
    for k, (qt, q, a) in enumerate(qas, start=1):
        qi = p.encode(q) + p.gen
        ai = p.encode(a) + [p.id["<|im_end|>"]] if answers else []
        s = qi + ai
        ids += s
        pos.append(np.broadcast_to(nxt + np.arange(len(s)), (3, len(s))))
        seg += [k] * len(s)
        t = [-100] * len(s)
        t[len(qi) - 1:len(s) - 1] = ai
        tgt += t
        ttype += [D.QTYPES.index(qt)] * len(s)
    row = {"kind": kind, "px": px, "grid": grid, "ids": ids, "vis_ids": [p.id["<|image_pad|>"], p.id["<|video_pad|>"]], "pos": np.concatenate(pos, 1), "seg": seg,
           "tgt": tgt, "ttype": ttype}
    if aux:
        row["aux_i"], row["aux_f"] = D.token_targets(scene, rhw)
    return row


def sample_qas(rng, scene, k_max: int, must: str | None = None) -> list[tuple[str, str, str]]:
    """Up to k_max distinct questions, drawn with TYPE_WEIGHT; a `must` type (if askable) comes first."""
    cands = [(t, q, a) for t, qs in D.questions(rng, scene).items() for q, a in qs]
    first = [c for c in cands if c[0] == must][:1]
    cands = [c for c in cands if c not in first]
    w = np.array([TYPE_WEIGHT[t] for t, _, _ in cands])
    k = min(k_max - len(first), len(cands))
    idx = rng.choice(len(cands), size=k, replace=False, p=w / w.sum()) if k > 0 else []
    out = first + [cands[i] for i in idx]
    return [out[i] for i in rng.permutation(len(out))]


def train_batch(rng, p: Prompter, n_img: int, n_vid: int, k_max: int = 8) -> dict:
    rows = []
    for i in range(n_img + n_vid):
        video = i >= n_img
        scene = D.make_video(rng) if video else D.make_scene(rng)
        minp = int(rng.choice([D.MIN_PIXELS, 128 * 28 * 28])) if video else D.MIN_PIXELS
        rows.append(make_row(p, scene, sample_qas(rng, scene, 3 if video else k_max, must="motion" if video else None),
                             system=rng.random() > 0.1, min_pixels=minp))
    return collate(rows, p.id["<|endoftext|>"])


class BatchStream(torch.utils.data.IterableDataset):
    def __init__(self, tokfile: str, n_img: int, n_vid: int, seed: int):
        self.tokfile, self.n_img, self.n_vid, self.seed = tokfile, n_img, n_vid, seed

    def __iter__(self):
        from tokenizers import Tokenizer
        info = torch.utils.data.get_worker_info()
        wid = info.id if info else 0
        rng = np.random.default_rng([1, self.seed, wid])
        p = Prompter(Tokenizer.from_file(self.tokfile))
        while True:
            yield {k: torch.from_numpy(v) for k, v in train_batch(rng, p, self.n_img, self.n_vid).items()}


def eval_set(n_per_type: int, seed: int) -> list[tuple[str, D.Scene, str, str]]:
    """Held-out samples: (qtype, scene, question, answer); seed streams are [2, seed, type] (training: [1, ...])."""
    out = []
    for ti, qt in enumerate(D.QTYPES):
        rng = np.random.default_rng([2, seed, ti])
        out += [(qt, *D.eval_sample(rng, qt)) for _ in range(n_per_type)]
    return out


# ---------------------------------------------------------------- forward, loss, greedy decoding

def to_dev(b: dict, dev) -> dict:
    return {k: v.to(dev, non_blocking=True) if torch.is_tensor(v) else torch.from_numpy(v).to(dev)
            for k, v in b.items()}


def vision(model, b):
    return model.visual(b["img_px"], b["vid_px"], b["v_dst"], b["v_pos"], b["v_valid"], b["v_keep"])


def _masked_mean(x, m):
    return (x * m).sum() / m.sum().clamp(min=1)


def compute_loss(model, probe, b):
    """Answer CE (type-balanced) + aux probe loss. Integer indices from the loader: no host syncs."""
    vis = vision(model, b)
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
        dig = F.cross_entropy(a[7].reshape(-1, 10), ai[:, 7:].clamp(min=0).reshape(-1), reduction="none")
        aux = aux + _masked_mean(dig.view(-1, 12).mean(1), obj)
        aux = aux + 5 * _masked_mean((a[8] - af[:, :4].nan_to_num()).abs().mean(1), obj)
        aux = aux + 5 * F.l1_loss(a[9], af[:, 4:])
        parts["aux"] = aux.detach()
        loss = loss + aux
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


def iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


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
            res.setdefault("grounding_iou50", []).append(pb is not None and iou(pb, gb) >= 0.5)
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
    model = DemoQwen2VL(cfg).to(dev)
    probe = nn.Linear(cfg.hidden_size, sum(AUX_SPLITS)).to(dev)
    n_par = sum(x.numel() for x in model.parameters())
    decay = [x for x in list(model.parameters()) + list(probe.parameters()) if x.dim() >= 2]
    other = [x for x in list(model.parameters()) + list(probe.parameters()) if x.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": other, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), fused=dev.type == "cuda")
    samples = eval_set(args.eval_per_type, seed=args.eval_seed)
    eval_rows = [make_row(p, sc, [(qt, q, a)], aux=False, answers=False) for qt, sc, q, a in samples]
    loader = torch.utils.data.DataLoader(
        BatchStream(tokfile, args.images, args.videos, args.seed), batch_size=None,
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
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))
        for g in opt.param_groups:
            g["lr"] = lr
        try:
            with torch.autocast(dev.type, torch.bfloat16, enabled=dev.type == "cuda"):
                loss, parts = compute_loss(model, probe, b)
            opt.zero_grad(set_to_none=True)
            loss.backward()
        except torch.OutOfMemoryError:
            emit({"event": "oom_skip", "step": step, "shapes": {k: list(v.shape) for k, v in b.items()}})
            opt.zero_grad(set_to_none=True)
            del b
            torch.cuda.empty_cache()
            continue
        gn = torch.nn.utils.clip_grad_norm_(list(model.parameters()) + list(probe.parameters()), 1.0)
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
                  "examples": [(s[2], s[3], r) for s, r in zip(sub[::max(1, len(sub) // 6)], replies[::max(1, len(sub) // 6)])]})
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
        write_side_files(dst, Path(args.tokenizer), model_config(Tokenizer.from_file(str(Path(args.tokenizer) / "tokenizer.json"))))
    elif args.smoke:
        smoke(args)
    else:
        train(args)


if __name__ == "__main__":
    main()
