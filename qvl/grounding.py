"""Grounding output of the Qwen-VL families: parse boxes/quads from a reply, map them to pixels, draw them.

The models write a referred object as
    <|object_ref_start|>the red circle<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>
(x right, y down); one ref may be followed by several boxes, a box may come without a ref ("bare"), and
OCR-style output uses
    <|quad_start|>(x1,y1),(x2,y2),(x3,y3),(x4,y4)<|quad_end|>.
When a reply was decoded with special tokens skipped, only `(x1,y1),(x2,y2)` remains in plain text; `parse`
then falls back to those pairs.

What the numbers mean is the family's (its `processing.BOX_COORDINATES` and `box_to_original`):
  "relative_1000"   Qwen2-VL: 0..1000 fractions of the image (resizing does not change them);
  "resized_pixels"  Qwen2.5-VL: absolute pixels of the image as resized for the vision tower.

Contract:
  * `parse(text, coordinates="relative_1000") -> list[Box]` never raises on model output: a box with too
    few numbers is skipped, a missing end tag (truncated reply) is tolerated, negative coordinates become
    0 (and in "relative_1000" mode values above 1000 become 1000), box corners are ordered so x1 <= x2 and
    y1 <= y2. Other modes keep the coordinates as written.
  * `Box.to_pixels(width, height)` maps 0..1000 to pixels of the *original* image (relative mode only).
  * `pixel_mapper(box_to_original, original_size, resized_size)` binds a family's rule to one image: a
    callable coords -> original pixels, which `to_json` and `draw` take as `to_original=`;
    `read_boxes(text, processing, original_size, resized_size)` is parse + pixel_mapper by the family's
    processing module (what the CLI and the server call).
  * `to_json(boxes, size=None, *, to_original=None)` is the plain-dict form used by the CLI's `--json` and
    the server's extra field; `draw(image, boxes, out=None, *, to_original=None)` returns a copy of the
    image with labelled outlines (and saves it). Without `to_original` both use the 0..1000 rule.
  * `strip_tags(text)` gives the reply as a person reads it (tags removed, boxes kept as text).
It knows nothing about models, tokenizers or the engine.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from PIL import Image, ImageDraw, ImageFont

REF_START, REF_END = "<|object_ref_start|>", "<|object_ref_end|>"
BOX_START, BOX_END = "<|box_start|>", "<|box_end|>"
QUAD_START, QUAD_END = "<|quad_start|>", "<|quad_end|>"
_TAG = re.compile(r"<\|(object_ref_start|object_ref_end|box_start|box_end|quad_start|quad_end)\|>")
_ANY_SPECIAL = re.compile(r"<\|[a-z_]+\|>")
_NUM = re.compile(r"-?\d+(?:\.\d+)?")
_PLAIN_BOX = re.compile(r"\(\s*(-?\d+)\s*,\s*(-?\d+)\s*\)\s*,\s*\(\s*(-?\d+)\s*,\s*(-?\d+)\s*\)")
SCALE = 1000
RELATIVE, RESIZED_PIXELS = "relative_1000", "resized_pixels"
COORDINATE_MODES = (RELATIVE, RESIZED_PIXELS)
PALETTE = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (128, 128, 0))


@dataclass(frozen=True)
class Box:
    """One parsed box or quad. coords are ints in the reply's coordinate mode (0..1000 for Qwen2-VL):
    (x1, y1, x2, y2) or 4 (x, y) corners flattened."""
    label: str | None
    coords: tuple[int, ...]
    kind: str = "box"            # "box" | "quad"
    complete: bool = True        # False when the closing tag was missing (truncated reply)

    @property
    def points(self) -> list[tuple[int, int]]:
        c = self.coords
        return [(c[i], c[i + 1]) for i in range(0, len(c), 2)]

    def to_pixels(self, width: int, height: int) -> tuple[int, ...]:
        """0..1000 coordinates (relative mode) in pixels of an image of the given original size (rounded)."""
        if width <= 0 or height <= 0:
            raise ValueError(f"image size must be positive, got width={width}, height={height}")
        return tuple(round(v * (width if i % 2 == 0 else height) / SCALE) for i, v in enumerate(self.coords))


def _clamp(v: float, coordinates: str) -> int:
    v = max(0, round(v))
    return int(min(SCALE, v)) if coordinates == RELATIVE else int(v)


def _make(label, nums, kind, complete, coordinates: str) -> Box | None:
    need = 4 if kind == "box" else 8
    if len(nums) < need:
        return None
    c = [_clamp(float(x), coordinates) for x in nums[:need]]
    if kind == "box":
        c = [min(c[0], c[2]), min(c[1], c[3]), max(c[0], c[2]), max(c[1], c[3])]
    label = label.strip() if label else None
    return Box(label or None, tuple(c), kind, complete)


def parse(text: str, coordinates: str = RELATIVE) -> list[Box]:
    """Every box and quad in a reply, in order. Tolerant: see the module docstring. `coordinates` is the
    family's `processing.BOX_COORDINATES`."""
    if coordinates not in COORDINATE_MODES:
        raise ValueError(f"coordinates={coordinates!r}; use one of {list(COORDINATE_MODES)}")
    boxes: list[Box] = []
    tags = list(_TAG.finditer(text))
    if not any(m.group(1) in ("box_start", "quad_start") for m in tags):
        return _plain(text, coordinates)
    label: str | None = None
    last_end = 0                       # end of the ref or box that the current label belongs to
    for i, m in enumerate(tags):
        kind = m.group(1)
        nxt = tags[i + 1] if i + 1 < len(tags) else None
        body = text[m.end():nxt.start() if nxt else len(text)]
        if kind == "object_ref_start":
            closed = nxt is not None and nxt.group(1) == "object_ref_end"
            label, last_end = body, (nxt.end() if closed else m.end() + len(body))
        elif kind in ("box_start", "quad_start"):
            if _ANY_SPECIAL.sub("", text[last_end:m.start()]).strip(" ,;\n\t"):
                label = None           # prose between the ref and this box: the box is bare
            closer = "box_end" if kind == "box_start" else "quad_end"
            complete = nxt is not None and nxt.group(1) == closer
            b = _make(label, _NUM.findall(body), "box" if kind == "box_start" else "quad", complete, coordinates)
            if b is not None:
                boxes.append(b)
            last_end = nxt.end() if complete else m.end() + len(body)
    return boxes


def _plain(text: str, coordinates: str) -> list[Box]:
    return [b for m in _PLAIN_BOX.finditer(text)
            if (b := _make(None, m.groups(), "box", True, coordinates)) is not None]


def strip_tags(text: str) -> str:
    """The reply without special tokens: 'the red circle (12,34),(56,78)'."""
    text = text.replace(REF_END + BOX_START, " ").replace(REF_END + QUAD_START, " ")
    return re.sub(r"\s{2,}", " ", _ANY_SPECIAL.sub("", text)).strip()


ToOriginal = Callable[[Sequence[int]], Sequence[int]]


def pixel_mapper(box_to_original: Callable, original_size: tuple[int, int],
                 resized_size: tuple[int, int] | None = None) -> ToOriginal:
    """coords -> pixels of one image by a family's rule, `box_to_original(coords, original_size,
    resized_size)`; both sizes are (height, width), resized_size as fed to the vision tower."""
    original_size, resized_size = tuple(original_size), resized_size and tuple(resized_size)
    return lambda coords: tuple(box_to_original(coords, original_size, resized_size))


def read_boxes(text: str, processing, original_size: tuple[int, int] | None = None,
               resized_size: tuple[int, int] | None = None) -> tuple[list[Box], ToOriginal | None]:
    """The boxes of a reply by a family's rule, and the mapper to the original image's pixels.

    `processing` is the family's processing module (its `BOX_COORDINATES` and `box_to_original`); sizes
    are (height, width) of the image the reply is about, None when there is none (then no mapper)."""
    boxes = parse(text, processing.BOX_COORDINATES)
    if original_size is None:
        return boxes, None
    return boxes, pixel_mapper(processing.box_to_original, original_size, resized_size)


def to_json(boxes: list[Box], size: tuple[int, int] | None = None, *,
            to_original: ToOriginal | None = None) -> list[dict]:
    """[{label, kind, coords (as the model wrote them), complete, pixels}]: pixels by `to_original` when
    given (see pixel_mapper), else by the 0..1000 rule when size=(width, height) is given, else absent."""
    out = []
    for b in boxes:
        d = {"label": b.label, "kind": b.kind, "coords": list(b.coords), "complete": b.complete}
        if to_original is not None:
            d["pixels"] = [int(v) for v in to_original(b.coords)]
        elif size is not None:
            d["pixels"] = list(b.to_pixels(*size))
        out.append(d)
    return out


def draw(image: Image.Image | str | Path, boxes: list[Box], out: str | Path | None = None,
         *, line_width: int | None = None, to_original: ToOriginal | None = None) -> Image.Image:
    """A copy of the image with each box/quad outlined and labelled; saved to `out` when given. Box pixels
    come from `to_original` (see pixel_mapper) or, by default, the 0..1000 rule on the image's size."""
    img = (Image.open(image) if isinstance(image, (str, Path)) else image).convert("RGB")
    w, h = img.size
    lw = line_width or max(2, min(w, h) // 150)
    font = ImageFont.load_default(size=max(12, min(w, h) // 28))
    d = ImageDraw.Draw(img)
    for k, b in enumerate(boxes):
        color = PALETTE[k % len(PALETTE)]
        px = tuple(to_original(b.coords)) if to_original is not None else b.to_pixels(w, h)
        if b.kind == "box":
            d.rectangle(px, outline=color, width=lw)
        else:
            pts = [(px[i], px[i + 1]) for i in range(0, 8, 2)]
            d.line(pts + pts[:1], fill=color, width=lw)
        if b.label:
            tx, ty = px[0], px[1]
            bb = d.textbbox((tx, ty), b.label, font=font)
            th = bb[3] - bb[1] + 4
            ty = ty - th if ty - th >= 0 else ty + lw
            bb = d.textbbox((tx + 2, ty), b.label, font=font)
            d.rectangle((bb[0] - 2, bb[1] - 2, bb[2] + 2, bb[3] + 2), fill=color)
            d.text((tx + 2, ty), b.label, fill=(255, 255, 255), font=font)
    if out is not None:
        img.save(out)
    return img
