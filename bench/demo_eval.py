"""Accuracy of a checkpoint on held-out synthetic questions (the demo checkpoint's report card).

    python bench/demo_eval.py                                   # qvl/demo, transformers backend, 7 x 75
    python bench/demo_eval.py --backend qvl --json out.json     # same questions through qvl.LLM
    python bench/demo_eval.py --model DIR --n-per-type 20 --show 3

Samples come from tools/demo_data.py with seed stream [3, --seed, type] (training uses [1, ...], the
in-training eval [2, ...]), so they are never trained on. Every question is asked alone, in the standard
chat layout (default system prompt, one image or video, then the question), answered greedily.

Scores: exact match of the reply (special tokens kept, <|im_end|> and surrounding blanks dropped) per
question type; for grounding also the fraction of replies whose first box (qvl.grounding.parse) has
IoU >= 0.5 with the true box, and the mean IoU.

Backends (same pixels, same prompt; they differ only in the model code):
  hf  : transformers' Qwen2VLForConditionalGeneration.generate on our PIL-path preprocessing, which is
        bit-identical to Qwen2VLImageProcessor (tests/test_demo_checkpoint.py), batched with left padding;
        videos are sized like qwen-vl-utils / qvl (per-frame min 128*28^2 pixels).
  qvl : qvl.LLM.chat with the PIL image / frame list.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT))
import demo_data as D  # noqa: E402

from qvl import grounding  # noqa: E402

VIDEO_MIN_PIXELS = 128 * 28 * 28
VIDEO_MAX_PIXELS = 768 * 28 * 28


def make_samples(n_per_type: int, seed: int, types=D.QTYPES, extremes: bool = False) -> list[dict]:
    out = []
    for ti, qt in enumerate(D.QTYPES):
        if qt not in types:
            continue
        rng = np.random.default_rng([3, seed, ti])
        for _ in range(n_per_type):
            scene, q, a = D.eval_sample(rng, qt, extremes)
            out.append({"type": qt, "scene": scene, "question": q, "answer": a})
    return out


def _messages(s: dict) -> list[dict]:
    sc = s["scene"]
    part = {"type": "video", "video": list(sc.frames)} if sc.is_video else {"type": "image", "image": sc.frames[0]}
    return [{"role": "user", "content": [part, {"type": "text", "text": s["question"]}]}]


def run_hf(model_dir: str, samples: list[dict], batch: int, max_new: int) -> list[str]:
    import torch
    from transformers import AutoTokenizer, Qwen2VLForConditionalGeneration

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    model = Qwen2VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    replies = []
    for i in range(0, len(samples), batch):
        chunk = samples[i:i + batch]
        texts, img_px, img_g, vid_px, vid_g = [], [], [], [], []
        for s in chunk:
            sc = s["scene"]
            if sc.is_video:
                px, grid, _ = D.to_pixels(sc, min_pixels=VIDEO_MIN_PIXELS, max_pixels=VIDEO_MAX_PIXELS)
                vid_px.append(D.normalize(px))
                vid_g.append(grid)
                pad = "<|video_pad|>"
            else:
                px, grid, _ = D.to_pixels(sc)
                x = D.normalize(px).reshape(-1, 3, 1, 196)
                img_px.append(np.concatenate([x, x], 2).reshape(-1, 1176))   # T duplicated, as the processor
                img_g.append(grid)
                pad = "<|image_pad|>"
            text = tok.apply_chat_template(_messages({**s, "scene": sc}), tokenize=False, add_generation_prompt=True)
            texts.append(text.replace(pad, pad * (grid[0] * grid[1] * grid[2] // 4), 1))
        enc = tok(texts, return_tensors="pt", padding=True)
        kw = {}
        if img_px:
            kw.update(pixel_values=torch.from_numpy(np.concatenate(img_px)), image_grid_thw=torch.tensor(img_g))
        if vid_px:
            kw.update(pixel_values_videos=torch.from_numpy(np.concatenate(vid_px)), video_grid_thw=torch.tensor(vid_g))
        with torch.no_grad():
            out = model.generate(**enc, **kw, max_new_tokens=max_new, do_sample=False, repetition_penalty=1.0)
        for row in out[:, enc["input_ids"].shape[1]:]:
            replies.append(tok.decode(row, skip_special_tokens=False).replace("<|endoftext|>", ""))
    return replies


def run_qvl(model_dir: str, samples: list[dict], batch: int, max_new: int) -> list[str]:
    from qvl import LLM, SamplingParams

    llm = LLM(model_dir, dtype="float32", device="cpu")
    params = SamplingParams(temperature=0.0, max_tokens=max_new, skip_special_tokens=False)
    replies = []
    for i in range(0, len(samples), batch):
        outs = llm.chat([_messages(s) for s in samples[i:i + batch]], params, use_tqdm=False)
        replies += [o.outputs[0].text for o in outs]
    return replies


def clean(reply: str) -> str:
    for s in ("<|im_end|>", "<|endoftext|>"):
        reply = reply.replace(s, "")
    return reply.strip()


def score(samples: list[dict], replies: list[str]) -> dict:
    per: dict[str, list] = {t: [] for t in D.QTYPES}
    ious = []
    for s, r in zip(samples, replies):
        r = clean(r)
        per[s["type"]].append(r == s["answer"])
        if s["type"] == "grounding":
            truth = grounding.parse(s["answer"])[0].coords
            got = grounding.parse(r)
            ious.append(D.iou(got[0].coords, truth) if got else 0.0)
    for s, r in zip(samples, replies):              # position, split by form: "A or B?" vs "furthest left?"
        if s["type"] == "position":
            form = "position: extreme" if s["question"].startswith("Which shape is") else "position: pair"
            per.setdefault(form, []).append(clean(r) == s["answer"])
    res = {t: {"n": len(v), "exact": round(100 * sum(v) / len(v), 1)} for t, v in per.items() if v}
    if ious:
        res["grounding"].update(iou50=round(100 * float(np.mean(np.array(ious) >= 0.5)), 1),
                                mean_iou=round(float(np.mean(ious)), 3))
    return res


def table(res: dict) -> str:
    lines = ["| question type | n | exact match | IoU >= 0.5 |", "|---|---|---|---|"]
    for t, r in res.items():
        lines.append(f"| {t} | {r['n']} | {r['exact']:.1f}% | "
                     + (f"{r['iou50']:.1f}% (mean IoU {r['mean_iou']:.2f})" if "iou50" in r else "") + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "qvl" / "demo"))
    ap.add_argument("--backend", choices=("hf", "qvl"), default="hf")
    ap.add_argument("--n-per-type", type=int, default=75)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--types", default=",".join(D.QTYPES), help="comma-separated subset of question types")
    ap.add_argument("--position-extremes", action="store_true", help='add "Which shape is furthest left?"')
    ap.add_argument("--json", help="write scores and every reply here")
    ap.add_argument("--show", type=int, default=0, help="print this many wrong answers per type")
    args = ap.parse_args(argv)
    import torch
    torch.set_num_threads(min(2, torch.get_num_threads()))
    samples = make_samples(args.n_per_type, args.seed, args.types.split(","), args.position_extremes)
    t0 = time.time()
    run = run_hf if args.backend == "hf" else run_qvl
    replies = run(args.model, samples, args.batch, args.max_new_tokens)
    res = score(samples, replies)
    print(f"{len(samples)} questions, backend {args.backend}, model {args.model}, "
          f"seed {args.seed}, {time.time() - t0:.0f} s")
    print(table(res))
    if args.show:
        for t in D.QTYPES:
            bad = [(s["question"], s["answer"], clean(r)) for s, r in zip(samples, replies)
                   if s["type"] == t and clean(r) != s["answer"]]
            for q, a, r in bad[:args.show]:
                print(f"  [{t}] {q!r}: want {a!r}, got {r!r}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "scores": res, "replies": [
            {"type": s["type"], "question": s["question"], "answer": s["answer"], "reply": r}
            for s, r in zip(samples, replies)]}, indent=1))


if __name__ == "__main__":
    main()
