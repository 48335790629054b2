"""Training rows for the demo checkpoint: prompts, M-RoPE positions, prefix-shared packing, collation.

One row = one image or video + question segments in the single-turn chat layout (default system prompt,
user turn with the vision block, the question, `<|im_end|>\n<|im_start|>assistant\n`, the answer, `<|im_end|>`).
The prefix (system + user + vision) is shared; segment k has seg id k, attends to the prefix and itself, and
sits at the positions it would have in a single-turn prompt (`mrope_positions`, max+1 rule). `collate` pads
rows into numpy arrays and precomputes every gather/scatter index, so the training step never syncs on a
boolean mask. Used by tools/train_demo.py (training, in-training eval) and tests/test_demo_checkpoint.py.
"""
from __future__ import annotations

import functools

import numpy as np
import torch

import demo_data as D

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
            "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
            "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
SYSTEM = "You are a helpful assistant."
TYPE_WEIGHT = {"color": 1.0, "shape": 1.0, "count": 0.7, "position": 1.0, "grounding": 2.0, "text": 2.0,
               "motion": 1.0}                     # question sampling weights (per image)


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
    row = {"kind": kind, "px": px, "grid": grid, "ids": ids, "pos": np.concatenate(pos, 1), "seg": seg,
           "vis_ids": [p.id["<|image_pad|>"], p.id["<|video_pad|>"]],
           "tgt": tgt, "ttype": ttype}
    if aux:
        row["aux_i"], row["aux_f"] = D.token_targets(scene, rhw)
    return row


def sample_qas(rng, scene, k_max: int, must: str | None = None, extremes: bool = False) -> list[tuple[str, str, str]]:
    """Up to k_max distinct questions, drawn with TYPE_WEIGHT; a `must` type (if askable) comes first."""
    cands = [(t, q, a) for t, qs in D.questions(rng, scene, extremes).items() for q, a in qs]
    first = [c for c in cands if c[0] == must][:1]
    cands = [c for c in cands if c not in first]
    w = np.array([TYPE_WEIGHT[t] for t, _, _ in cands])
    k = min(k_max - len(first), len(cands))
    idx = rng.choice(len(cands), size=k, replace=False, p=w / w.sum()) if k > 0 else []
    out = first + [cands[i] for i in idx]
    return [out[i] for i in rng.permutation(len(out))]


def train_batch(rng, p: Prompter, n_img: int, n_vid: int, k_max: int = 8, text_prob: float = 0.35,
                extremes: bool = False) -> dict:
    rows = []
    for i in range(n_img + n_vid):
        video = i >= n_img
        scene = D.make_video(rng) if video else D.make_scene(rng, with_text=bool(rng.random() < text_prob))
        minp = int(rng.choice([D.MIN_PIXELS, 128 * 28 * 28])) if video else D.MIN_PIXELS
        rows.append(make_row(p, scene, sample_qas(rng, scene, 3 if video else k_max,
                                                  must="motion" if video else None, extremes=extremes),
                             system=rng.random() > 0.1, min_pixels=minp))
    return collate(rows, p.id["<|endoftext|>"])


class BatchStream(torch.utils.data.IterableDataset):
    def __init__(self, tokfile: str, n_img: int, n_vid: int, seed: int, text_prob: float = 0.35,
                 type_weight: dict | None = None, extremes: bool = False):
        self.tokfile, self.n_img, self.n_vid, self.seed = tokfile, n_img, n_vid, seed
        self.text_prob, self.type_weight, self.extremes = text_prob, type_weight, extremes

    def __iter__(self):
        from tokenizers import Tokenizer
        info = torch.utils.data.get_worker_info()
        wid = info.id if info else 0
        rng = np.random.default_rng([1, self.seed, wid])
        p = Prompter(Tokenizer.from_file(self.tokfile))
        if self.type_weight:
            TYPE_WEIGHT.update({k: float(v) for k, v in self.type_weight.items()})
        while True:
            b = train_batch(rng, p, self.n_img, self.n_vid, text_prob=self.text_prob, extremes=self.extremes)
            yield {k: torch.from_numpy(v) for k, v in b.items()}


def eval_set(n_per_type: int, seed: int, extremes: bool = False) -> list[tuple[str, D.Scene, str, str]]:
    """Held-out samples: (qtype, scene, question, answer); seed streams are [2, seed, type] (training: [1, ...])."""
    out = []
    for ti, qt in enumerate(D.QTYPES):
        rng = np.random.default_rng([2, seed, ti])
        out += [(qt, *D.eval_sample(rng, qt, extremes)) for _ in range(n_per_type)]
    return out
