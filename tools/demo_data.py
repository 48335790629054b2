"""Seeded synthetic scenes, videos and questions for the qvl demo checkpoint (training and eval share it).

What it owns:
  * scenes: a light canvas of varied size/aspect with 1-4 non-overlapping shapes in distinct colours and,
    sometimes, a rendered number or word; videos: 4-8 frames of one shape moving left/right/up/down among
    static distractors. Every scene is a pure function of a numpy Generator, so a seed reproduces it.
  * questions with exact answers (QTYPES): colour of a shape, shape of a colour, count, relative position,
    grounding in Qwen2-VL's `<|object_ref_start|>..<|box_start|>(x1,y1),(x2,y2)<|box_end|>` format with
    0-1000 ints of the *original* image, text reading, motion direction.
  * the pixel path, re-implemented to match transformers' PIL image processor (QWEN2VL_SPEC 4.1-4.3):
    smart_resize, bicubic resize, patchify in merge-block-major order. Patches leave this module as uint8
    (normalisation happens on the consumer's side; `normalize` is the exact PIL-path float version).
  * dense per-token targets for the training-only auxiliary probe (see `token_targets`).
It knows nothing about tokenizers or models: prompts and token ids are built in tools/train_demo.py.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the repo root, for the qvl package
from qvl.multimodal.image import smart_resize  # noqa: E402  (the one transformers-exact implementation)

SHAPES = ("circle", "square", "triangle", "star")
COLORS = {"red": (215, 35, 35), "green": (35, 160, 60), "blue": (35, 75, 215),
          "yellow": (235, 195, 20), "purple": (135, 55, 185), "orange": (245, 130, 25)}
COLOR_NAMES = tuple(COLORS)
WORDS = ("cat", "dog", "sun", "hat", "box", "pen", "cup", "map", "key", "book", "fish", "tree",
         "milk", "door", "lamp", "road", "cake", "ship", "moon", "frog")
CHARS = "0123456789abcdefghijklmnopqrstuvwxyz"          # char class = CHARS.index(c) + 1, 0 = none
DIRECTIONS = ("left", "right", "up", "down")            # motion class = index + 1, 0 = none
QTYPES = ("color", "shape", "count", "position", "grounding", "text", "motion")
MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
IMAGE_MAX_PIXELS = 448 * 448
VIDEO_MAX_PIXELS = 160 * 28 * 28
MIN_PIXELS = 56 * 56
N_AUX_INT = 23   # shape, color, motion, char_l, char_r, idx_l, idx_r, 12 box digits, 4 position ranks
N_AUX_FLT = 6    # box x1,y1,x2,y2 (0..1), cell centre x,y (0..1)


@dataclass
class Obj:
    shape: str
    color: str
    box: tuple[float, float, float, float]   # tight pixel box of the drawn shape (x1, y1, x2, y2)

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


@dataclass
class Scene:
    """One image (frames has 1 entry) or one video (frames has 4-8 entries)."""
    frames: list[Image.Image]
    objects: list[Obj]                        # boxes as in frame 0
    obj_labels: list[Image.Image]             # per frame, 'L' map: 0 bg, k = objects[k-1]
    text: str | None = None
    text_label: Image.Image | None = None     # 'L' map: 0 none, k = k-th character (1-based)
    moving: int | None = None                 # index of the moving object (videos)
    direction: str | None = None
    boxes_per_frame: list[list[tuple]] = field(default_factory=list)

    @property
    def size(self) -> tuple[int, int]:        # (width, height)
        return self.frames[0].size

    @property
    def is_video(self) -> bool:
        return len(self.frames) > 1


# ---------------------------------------------------------------- drawing

_FONTS: dict[int, ImageFont.FreeTypeFont] = {}


def _font(size: int):
    if size not in _FONTS:
        _FONTS[size] = ImageFont.load_default(size=size)
    return _FONTS[size]


def _shape_points(shape: str, x: float, y: float, s: float) -> list[tuple[float, float]] | None:
    """Polygon of a shape inside the square (x, y, x+s, y+s); None for the circle (drawn as an ellipse)."""
    if shape == "triangle":
        return [(x, y + s * 0.9), (x + s, y + s * 0.9), (x + s / 2, y)]
    if shape == "star":
        cx, cy, r = x + s / 2, y + s / 2, s / 2
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.45
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        return pts
    return None


def _draw_shape(draws, fills, shape: str, x: float, y: float, s: float) -> tuple:
    pts = _shape_points(shape, x, y, s)
    for d, f in zip(draws, fills):
        if shape == "circle":
            d.ellipse([x, y, x + s, y + s], fill=f)
        elif shape == "square":
            d.rectangle([x, y, x + s, y + s], fill=f)
        else:
            d.polygon(pts, fill=f)
    if pts is None:
        return (x, y, x + s, y + s)
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    return (min(xs), min(ys), max(xs), max(ys))


def _jitter(rng, rgb):
    return tuple(int(np.clip(c + rng.integers(-18, 19), 0, 255)) for c in rgb)


def _free(box, taken, gap=4.0) -> bool:
    x1, y1, x2, y2 = box
    return all(x2 + gap <= a1 or a2 + gap <= x1 or y2 + gap <= b1 or b2 + gap <= y1
               for a1, b1, a2, b2 in taken)


def _canvas_size(rng, lo=160, hi=720, max_aspect=2.5):
    long = rng.uniform(lo, hi)
    short = max(112.0, long / rng.uniform(1.0, max_aspect))
    w, h = (long, short) if rng.random() < 0.5 else (short, long)
    return int(w), int(h)


def _text_string(rng) -> str:
    if rng.random() < 0.6:
        n = int(rng.integers(2, 5))
        return str(int(rng.integers(1, 10))) + "".join(str(int(d)) for d in rng.integers(0, 10, n - 1))
    return WORDS[int(rng.integers(len(WORDS)))]


def make_scene(rng: np.random.Generator, *, n_objects: int | None = None, with_text: bool | None = None,
               size: tuple[int, int] | None = None) -> Scene:
    """A still image: 1-4 shapes (distinct colours) and optionally a rendered number or word."""
    w, h = size or _canvas_size(rng)
    bg = tuple(int(c) for c in rng.integers(215, 256, 3))
    img = Image.new("RGB", (w, h), bg)
    lab = Image.new("L", (w, h), 0)
    tlab = None
    d, dl = ImageDraw.Draw(img), ImageDraw.Draw(lab)
    taken: list[tuple] = []
    text = None
    if with_text is None:
        with_text = rng.random() < 0.35
    if with_text:
        text = _text_string(rng)
        fs = max(24, min(int(rng.uniform(0.15, 0.3) * min(w, h)), 80))
        while _font(fs).getlength(text) > 0.9 * w and fs > 12:
            fs -= 2
        font = _font(fs)
        tw = font.getlength(text)
        tx = rng.uniform(2, max(3.0, w - tw - 2))
        ty = rng.uniform(2, max(3.0, h - fs * 1.3 - 2))
        ink = tuple(int(c) for c in rng.integers(0, 80, 3))
        tlab = Image.new("L", (w, h), 0)
        dt = ImageDraw.Draw(tlab)
        x = tx
        boxes = []
        for k, ch in enumerate(text):
            d.text((x, ty), ch, font=font, fill=ink)
            bb = d.textbbox((x, ty), ch, font=font)
            dt.rectangle(bb, fill=k + 1)
            boxes.append(bb)
            x += font.getlength(ch)
        taken.append((min(b[0] for b in boxes), min(b[1] for b in boxes),
                      max(b[2] for b in boxes), max(b[3] for b in boxes)))
    if n_objects is None:
        n_objects = int(rng.integers(1, 4 if with_text else 5))
    colors = rng.permutation(len(COLOR_NAMES))[:n_objects]
    objects: list[Obj] = []
    m = min(w, h)
    for ci in colors:
        for _ in range(60):
            s = max(24.0, rng.uniform(0.14, 0.38) * m)
            s = min(s, m - 6)
            x, y = rng.uniform(2, w - s - 2), rng.uniform(2, h - s - 2)
            if _free((x, y, x + s, y + s), taken):
                break
        else:
            continue
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        cname = COLOR_NAMES[int(ci)]
        box = _draw_shape((d, dl), (_jitter(rng, COLORS[cname]), len(objects) + 1), shape, x, y, s)
        taken.append((x, y, x + s, y + s))
        objects.append(Obj(shape, cname, box))
    return Scene([img], objects, [lab], text=text, text_label=tlab, boxes_per_frame=[[o.box for o in objects]])


def make_video(rng: np.random.Generator, *, n_frames: int | None = None) -> Scene:
    """4, 6 or 8 frames; object 0 moves in one direction with constant speed, 0-2 static distractors."""
    w, h = _canvas_size(rng, lo=160, hi=448, max_aspect=2.0)
    n_frames = n_frames or int(rng.choice([4, 6, 8]))
    bg = tuple(int(c) for c in rng.integers(215, 256, 3))
    direction = DIRECTIONS[int(rng.integers(4))]
    m = min(w, h)
    s = max(24.0, rng.uniform(0.15, 0.3) * m)
    horiz = direction in ("left", "right")
    span = (w if horiz else h) - s - 4
    dist = rng.uniform(0.45, 0.8) * span
    start = rng.uniform(2, 2 + span - dist)
    other = rng.uniform(2, (h if horiz else w) - s - 2)
    p0, p1 = (start, start + dist) if direction in ("right", "down") else (start + dist, start)
    path = [p0 + (p1 - p0) * k / (n_frames - 1) for k in range(n_frames)]
    xy = [(p, other) if horiz else (other, p) for p in path]
    swept = (min(a for a, _ in xy), min(b for _, b in xy), max(a for a, _ in xy) + s, max(b for _, b in xy) + s)
    colors = rng.permutation(len(COLOR_NAMES))
    specs = [(SHAPES[int(rng.integers(len(SHAPES)))], COLOR_NAMES[int(colors[0])], None, s)]
    taken = [swept]
    for ci in colors[1:1 + int(rng.integers(0, 3))]:
        for _ in range(40):
            s2 = max(24.0, rng.uniform(0.12, 0.25) * m)
            x, y = rng.uniform(2, w - s2 - 2), rng.uniform(2, h - s2 - 2)
            if _free((x, y, x + s2, y + s2), taken):
                taken.append((x, y, x + s2, y + s2))
                specs.append((SHAPES[int(rng.integers(len(SHAPES)))], COLOR_NAMES[int(ci)], (x, y), s2))
                break
    fills = [_jitter(rng, COLORS[c]) for _, c, _, _ in specs]
    frames, labels, boxes_pf = [], [], []
    for k in range(n_frames):
        img = Image.new("RGB", (w, h), bg)
        lab = Image.new("L", (w, h), 0)
        d, dl = ImageDraw.Draw(img), ImageDraw.Draw(lab)
        boxes = []
        for j, (shape, _, pos, sz) in enumerate(specs):
            x, y = xy[k] if pos is None else pos
            boxes.append(_draw_shape((d, dl), (fills[j], j + 1), shape, x, y, sz))
        frames.append(img)
        labels.append(lab)
        boxes_pf.append(boxes)
    objects = [Obj(sh, c, boxes_pf[0][j]) for j, (sh, c, _, _) in enumerate(specs)]
    return Scene(frames, objects, labels, moving=0, direction=direction, boxes_per_frame=boxes_pf)


# ---------------------------------------------------------------- questions

def norm_box(box, size) -> tuple[int, int, int, int]:
    """Pixel box -> Qwen2-VL 0..1000 ints of the original image (floor, clamped to 0..999)."""
    w, h = size
    x1, y1, x2, y2 = box
    f = lambda v, n: int(min(999, max(0, math.floor(v / n * 1000))))  # noqa: E731
    return f(x1, w), f(y1, h), f(x2, w), f(y2, h)


def box_answer(ref: str, nb) -> str:
    return (f"<|object_ref_start|>{ref}<|object_ref_end|>"
            f"<|box_start|>({nb[0]},{nb[1]}),({nb[2]},{nb[3]})<|box_end|>")


def questions(rng: np.random.Generator, scene: Scene, extremes: bool = False) -> dict[str, list[tuple[str, str]]]:
    """Every askable (question, answer) of a scene, grouped by QTYPES entry. extremes=True adds position
    questions of the form "Which shape is furthest left?" (not in the shipped checkpoint's training; off by
    default so seeds reproduce its data and eval set)."""
    objs = scene.objects
    out: dict[str, list[tuple[str, str]]] = {t: [] for t in QTYPES}
    shape_count = {s: sum(o.shape == s for o in objs) for s in SHAPES}
    pick = lambda xs: xs[int(rng.integers(len(xs)))]  # noqa: E731
    for o in objs:
        if shape_count[o.shape] == 1:
            q = pick(("What color is the {s}?", "What is the color of the {s}?", "Which color is the {s}?"))
            out["color"].append((q.format(s=o.shape), o.color))
        q = pick(("What shape is the {c} object?", "What shape is {c}?", "Which shape is {c}?"))
        out["shape"].append((q.format(c=o.color), o.shape))
    q = pick(("How many shapes are there?", "How many shapes are in the image?", "Count the shapes."))
    out["count"].append((q, str(len(objs))))
    if scene.is_video:
        if scene.moving is not None:
            o = objs[scene.moving]
            ref = o.name if len(objs) > 1 else pick((o.name, "shape"))
            q = pick(("Which way does the {r} move?", "In which direction does the {r} move?",
                      "Which direction is the {r} moving?"))
            out["motion"].append((q.format(r=ref), scene.direction))
        return out
    w, h = scene.size
    for i, a in enumerate(objs):
        for b in objs[i + 1:]:
            (ax, ay), (bx, by) = _centre(a.box), _centre(b.box)
            first, second = (a, b) if rng.random() < 0.5 else (b, a)
            if abs(ax - bx) > 0.12 * w:
                left = a if ax < bx else b
                right = b if left is a else a
                if rng.random() < 0.5:
                    q, ans = "Which is further left, the {x} or the {y}?", left
                else:
                    q, ans = "Which is further right, the {x} or the {y}?", right
                out["position"].append((q.format(x=first.name, y=second.name), f"the {ans.name}"))
            if abs(ay - by) > 0.12 * h:
                top = a if ay < by else b
                low = b if top is a else a
                if rng.random() < 0.5:
                    q, ans = "Which is higher, the {x} or the {y}?", top
                else:
                    q, ans = "Which is lower, the {x} or the {y}?", low
                out["position"].append((q.format(x=first.name, y=second.name), f"the {ans.name}"))
    if extremes and len(objs) >= 2:                       # "Which shape is furthest left?"
        cs = [_centre(o.box) for o in objs]
        for axis, dim, lo_qs, hi_qs in ((0, w, ("Which shape is furthest left?", "Which shape is leftmost?"),
                                         ("Which shape is furthest right?", "Which shape is rightmost?")),
                                        (1, h, ("Which shape is highest?", "Which shape is at the top?"),
                                         ("Which shape is lowest?", "Which shape is at the bottom?"))):
            v = sorted((c[axis], k) for k, c in enumerate(cs))
            if v[1][0] - v[0][0] > 0.12 * dim:
                out["position"].append((pick(lo_qs), f"the {objs[v[0][1]].name}"))
            if v[-1][0] - v[-2][0] > 0.12 * dim:
                out["position"].append((pick(hi_qs), f"the {objs[v[-1][1]].name}"))
    for o in objs:
        ref = o.shape if shape_count[o.shape] == 1 and rng.random() < 0.3 else o.name
        q = pick(("Where is the {r}?", "Locate the {r}.", "Find the {r}.", "Give the bounding box of the {r}."))
        out["grounding"].append((q.format(r=ref), box_answer(f"the {ref}", norm_box(o.box, scene.size))))
    if scene.text is not None:
        q = "What number is written?" if scene.text.isdigit() else "What word is written?"
        q = pick((q, "What is written in the image?", "What does the text say?", "Read the text."))
        out["text"].append((q, scene.text))
    return out


def _centre(box):
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


def eval_sample(rng: np.random.Generator, qtype: str, extremes: bool = False) -> tuple[Scene, str, str]:
    """One held-out (scene, question, answer) of the given type (re-draws until the type is askable)."""
    for _ in range(100):
        if qtype == "motion":
            scene = make_video(rng)
        else:
            scene = make_scene(rng, with_text=True if qtype == "text" else None,
                               n_objects=int(rng.integers(2, 5)) if qtype == "position" else None)
        qs = questions(rng, scene, extremes)[qtype]
        if qs:
            q, a = qs[int(rng.integers(len(qs)))]
            return scene, q, a
    raise RuntimeError(f"could not draw a {qtype} question in 100 scenes")


# ---------------------------------------------------------------- pixels (transformers' PIL path)

def patchify(frames: np.ndarray) -> np.ndarray:
    """(F, H, W, 3) uint8 -> merge-block-major patches. F == 1 (image): (n, 588) = (C, P, P) columns,
    the consumer duplicates T (equivalently sums the conv kernel over T). F even (video): (n, 1176)."""
    f, hh, ww, c = frames.shape
    gh, gw = hh // 14, ww // 14
    x = frames.transpose(0, 3, 1, 2)                                          # (F, C, H, W)
    if f == 1:
        x = x.reshape(c, gh // 2, 2, 14, gw // 2, 2, 14).transpose(1, 4, 2, 5, 0, 3, 6)
        return np.ascontiguousarray(x).reshape(gh * gw, c * 196)             # (n, 588)
    x = x.reshape(f // 2, 2, c, gh // 2, 2, 14, gw // 2, 2, 14).transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return np.ascontiguousarray(x).reshape(f // 2 * gh * gw, c * 2 * 196)    # (n, 1176)


def normalize(patches_u8: np.ndarray) -> np.ndarray:
    """Exact PIL-path values: float64 rescale -> float32, then (x - mean) / std per channel."""
    n, cols = patches_u8.shape
    x = (patches_u8.astype(np.float64) * (1 / 255)).astype(np.float32).reshape(n, 3, -1)
    return ((x - MEAN[None, :, None]) / STD[None, :, None]).reshape(n, cols)


def to_pixels(scene: Scene, *, min_pixels: int = MIN_PIXELS, max_pixels: int | None = None):
    """Resize like the processor and patchify. Returns (uint8 patches, grid_thw, (rh, rw))."""
    w, h = scene.size
    max_pixels = max_pixels or (VIDEO_MAX_PIXELS if scene.is_video else IMAGE_MAX_PIXELS)
    rh, rw = smart_resize(h, w, min_pixels=min_pixels, max_pixels=max_pixels)
    frames = [np.asarray(f.resize((rw, rh), Image.BICUBIC)) for f in scene.frames]
    if len(frames) > 1 and len(frames) % 2:
        frames.append(frames[-1])
    arr = np.stack(frames)
    t = 1 if len(frames) == 1 else len(frames) // 2
    return patchify(arr), (t, rh // 14, rw // 14), (rh, rw)


# ---------------------------------------------------------------- dense targets for the aux probe

def _cell_mode(lab: np.ndarray, hq: int, wq: int, cw: int, n_ids: int, min_px: int) -> np.ndarray:
    """Most frequent non-zero id per (hq, wq) cell of width cw (rows 28 px); 0 when below min_px."""
    if n_ids == 0:
        return np.zeros((hq, wq), np.int64)
    cells = lab.reshape(hq, 28, wq, cw)
    counts = np.stack([(cells == k).sum(axis=(1, 3)) for k in range(1, n_ids + 1)], -1)  # (hq, wq, K)
    best = counts.argmax(-1)
    return np.where(counts.max(-1) >= min_px, best + 1, 0)


def token_targets(scene: Scene, rhw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Per merged LLM token (t, bh, bw order): int targets (m, 19) and float targets (m, 6).

    ints: shape (0 bg, 1..4 SHAPES, 5 text), colour (0 bg, 1..6), motion (0 none, 1..4), char class under
    the left/right half of the cell, that char's index in the string (1-based), 12 digit classes of the
    object's 0..1000 box (x1,y1,x2,y2 x hundreds/tens/units; -100 where no object), the object's rank by
    centre from the left / right / top / bottom (1 = extreme; 0 where no object).
    floats: object box /1000 (NaN where no object), cell centre (x, y) in 0..1."""
    rh, rw = rhw
    hq, wq = rh // 28, rw // 28
    size = scene.size
    n_obj = len(scene.objects)
    t_frames = list(range(0, len(scene.frames), 2)) if scene.is_video else [0]
    ints, flts = [], []
    cy, cx = np.meshgrid((np.arange(hq) + 0.5) / hq, (np.arange(wq) + 0.5) / wq, indexing="ij")
    chars = None
    if scene.text_label is not None:
        tl = np.asarray(scene.text_label.resize((rw, rh), Image.NEAREST))
        halves = _cell_mode(tl, hq, wq * 2, 14, len(scene.text), 24).reshape(hq, wq, 2)
        cls = np.array([0] + [CHARS.index(c) + 1 for c in scene.text])
        chars = (cls[halves], halves)
    for fi in t_frames:
        lab = np.asarray(scene.obj_labels[fi].resize((rw, rh), Image.NEAREST))
        oid = _cell_mode(lab, hq, wq, 28, n_obj, 60)                          # (hq, wq)
        it = np.zeros((hq, wq, N_AUX_INT), np.int64)
        ft = np.full((hq, wq, N_AUX_FLT), np.nan, np.float32)
        ft[..., 4], ft[..., 5] = cx, cy
        it[..., 7:19] = -100
        cs = np.array([_centre(b) for b in scene.boxes_per_frame[fi]]).reshape(-1, 2)
        xr, yr = np.argsort(np.argsort(cs[:, 0])), np.argsort(np.argsort(cs[:, 1]))   # 0 = left / top
        for k, o in enumerate(scene.objects, start=1):
            sel = oid == k
            if not sel.any():
                continue
            nb = norm_box(scene.boxes_per_frame[fi][k - 1], size)
            it[sel, 0] = SHAPES.index(o.shape) + 1
            it[sel, 1] = COLOR_NAMES.index(o.color) + 1
            if scene.moving == k - 1:
                it[sel, 2] = DIRECTIONS.index(scene.direction) + 1
            it[sel, 7:19] = [v // 10 ** p % 10 for v in nb for p in (2, 1, 0)]
            it[sel, 19:23] = [xr[k - 1] + 1, n_obj - xr[k - 1], yr[k - 1] + 1, n_obj - yr[k - 1]]
            ft[sel, :4] = np.array(nb, np.float32) / 1000
        if chars is not None:
            it[..., 3:5], it[..., 5:7] = chars
            it[(oid == 0) & (chars[1].max(-1) > 0), 0] = 5
        ints.append(it.reshape(-1, N_AUX_INT))
        flts.append(ft.reshape(-1, N_AUX_FLT))
    return np.concatenate(ints), np.concatenate(flts)


def iou(a, b) -> float:
    """Intersection over union of two (x1, y1, x2, y2) boxes."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0
