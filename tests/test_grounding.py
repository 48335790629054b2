"""qvl.grounding: parsing box/quad output (Qwen2-VL 0..1000, Qwen2.5-VL resized pixels), pixel mapping, drawing."""
from __future__ import annotations

import pytest
from PIL import Image

from qvl import grounding as G
from qvl.models.qwen2_5_vl import processing as P25
from qvl.models.qwen2_vl import processing as P2

REF = "<|object_ref_start|>{}<|object_ref_end|>"
BOX = "<|box_start|>({},{}),({},{})<|box_end|>"


def test_normal_box():
    text = REF.format("the red circle") + BOX.format(120, 45, 678, 999)
    (b,) = G.parse(text)
    assert b == G.Box("the red circle", (120, 45, 678, 999), "box", True)
    assert G.strip_tags(text) == "the red circle (120,45),(678,999)"


def test_several_boxes_and_refs():
    text = ("There are two: " + REF.format("the cars") + BOX.format(1, 2, 3, 4) + BOX.format(5, 6, 7, 8)
            + " and " + REF.format("a dog") + BOX.format(10, 20, 30, 40) + ".")
    boxes = G.parse(text)
    assert [(b.label, b.coords) for b in boxes] == [
        ("the cars", (1, 2, 3, 4)), ("the cars", (5, 6, 7, 8)), ("a dog", (10, 20, 30, 40))]


def test_missing_ref_is_bare_box():
    (b,) = G.parse("Here: " + BOX.format(100, 200, 300, 400))
    assert b.label is None and b.coords == (100, 200, 300, 400)
    # prose between a ref and a box detaches the box from the ref
    boxes = G.parse(REF.format("the cat") + " is somewhere, maybe " + BOX.format(1, 1, 2, 2))
    assert boxes[0].label is None


def test_malformed_boxes_are_skipped():
    text = (REF.format("a") + "<|box_start|>(12,34)<|box_end|>"            # too few numbers
            + REF.format("b") + "<|box_start|>(x,y),(z,w)<|box_end|>"      # no numbers
            + REF.format("c") + "<|box_start|>( 5 , 6 ),( 7 ,8 )<|box_end|>")  # spaces are fine
    boxes = G.parse(text)
    assert [(b.label, b.coords) for b in boxes] == [("c", (5, 6, 7, 8))]
    assert G.parse("") == [] and G.parse("<|box_end|><|object_ref_end|>") == []


def test_truncated_reply():
    boxes = G.parse(REF.format("the blue square") + "<|box_start|>(100,200),(300,400")
    assert len(boxes) == 1 and boxes[0].coords == (100, 200, 300, 400) and not boxes[0].complete
    assert G.parse(REF.format("the blue square") + "<|box_start|>(100,2") == []
    # a ref whose end tag was lost still labels the box that follows
    (b,) = G.parse("<|object_ref_start|>the star<|box_start|>(1,2),(3,4)<|box_end|>")
    assert b.label == "the star"


def test_coordinates_clamped_and_ordered():
    (b,) = G.parse(REF.format("x") + BOX.format(1200, 50, 300, 99999))
    assert b.coords == (300, 50, 1000, 1000)
    (b,) = G.parse("<|box_start|>(-5,10),(20,30)<|box_end|>")
    assert b.coords == (0, 10, 20, 30)


def test_quad_and_plain_text_fallback():
    (q,) = G.parse(REF.format("SALE") + "<|quad_start|>(10,10),(90,12),(88,40),(9,38)<|quad_end|>")
    assert q.kind == "quad" and q.label == "SALE" and q.points[2] == (88, 40)
    # decoded with skip_special_tokens=True: the tags are gone, the pairs remain
    (b,) = G.parse("the red circle(120,45),(678,999)")
    assert b.coords == (120, 45, 678, 999) and b.label is None


def test_pixel_mapping_non_square_image():
    b = G.Box("o", (250, 500, 750, 1000))
    assert b.to_pixels(640, 200) == (160, 100, 480, 200)
    assert b.to_pixels(200, 640) == (50, 320, 150, 640)
    js = G.to_json([b], (640, 200))
    assert js == [{"label": "o", "kind": "box", "coords": [250, 500, 750, 1000], "complete": True,
                   "pixels": [160, 100, 480, 200]}]


def test_draw_writes_png(tmp_path):
    img = Image.new("RGB", (320, 160), (250, 250, 250))
    boxes = G.parse(REF.format("the red circle") + BOX.format(100, 100, 500, 900)
                    + "<|quad_start|>(600,100),(900,100),(900,500),(600,500)<|quad_end|>")
    out = tmp_path / "boxes.png"
    drawn = G.draw(img, boxes, out)
    assert out.exists() and Image.open(out).size == (320, 160)
    assert img.getpixel((32, 80)) == (250, 250, 250)            # the input is not modified
    x1, y1, x2, y2 = boxes[0].to_pixels(320, 160)
    assert drawn.getpixel((x1, (y1 + y2) // 2)) != (250, 250, 250)  # left edge of the box is outlined


# ------------------------------------------------------------- resized-pixel coordinates (Qwen2.5-VL)

def test_resized_pixel_mode_keeps_coordinates():
    text = REF.format("car") + BOX.format(1200, 50, 300, 99999)
    (b,) = G.parse(text, coordinates="resized_pixels")
    assert b.coords == (300, 50, 1200, 99999)                    # no 0..1000 clamp
    (b,) = G.parse("<|box_start|>(-5,10),(2000,30)<|box_end|>", coordinates="resized_pixels")
    assert b.coords == (0, 10, 2000, 30)                         # negatives still become 0
    (b,) = G.parse("a car (1500,20),(1800,640)", coordinates="resized_pixels")   # plain-text fallback
    assert b.coords == (1500, 20, 1800, 640)
    assert G.parse(text) == [G.Box("car", (300, 50, 1000, 1000))]  # default: Qwen2-VL's rule
    with pytest.raises(ValueError, match="coordinates='pixels'"):
        G.parse(text, coordinates="pixels")


def test_resized_pixel_mapping_with_family_rule():
    assert P25.BOX_COORDINATES == "resized_pixels" and P2.BOX_COORDINATES == "relative_1000"
    # original 1000 x 600 (h, w), resized to 980 x 588 for the tower: x * 600/588, y * 1000/980
    assert P25.box_to_original((294, 490, 588, 980), (1000, 600), (980, 588)) == (300, 500, 600, 1000)
    text = REF.format("o") + BOX.format(294, 490, 588, 980)
    boxes = G.parse(text, coordinates=P25.BOX_COORDINATES)
    to_orig = G.pixel_mapper(P25.box_to_original, original_size=(1000, 600), resized_size=(980, 588))
    assert G.to_json(boxes, to_original=to_orig) == [
        {"label": "o", "kind": "box", "coords": [294, 490, 588, 980], "complete": True,
         "pixels": [300, 500, 600, 1000]}]
    # Qwen2-VL's rule through the same door equals the default size= path
    rel = G.parse(REF.format("o") + BOX.format(250, 500, 750, 1000))
    to_rel = G.pixel_mapper(P2.box_to_original, original_size=(200, 640))
    assert G.to_json(rel, to_original=to_rel) == G.to_json(rel, (640, 200))
    with pytest.raises(ValueError, match="resized_size"):
        P25.box_to_original((1, 2, 3, 4), (10, 10))


def test_draw_with_resized_pixel_boxes(tmp_path):
    img = Image.new("RGB", (300, 150), (250, 250, 250))         # original (h, w) = (150, 300)
    (b,) = G.parse(REF.format("r") + BOX.format(56, 28, 224, 112), coordinates="resized_pixels")
    to_orig = G.pixel_mapper(P25.box_to_original, original_size=(150, 300), resized_size=(140, 280))
    drawn = G.draw(img, [b], tmp_path / "r.png", to_original=to_orig)
    x1, y1, x2, y2 = to_orig(b.coords)
    assert (x1, y1, x2, y2) == (60, 30, 240, 120)
    assert drawn.getpixel((x1, (y1 + y2) // 2)) != (250, 250, 250)
    assert drawn.getpixel((x1 - 8, (y1 + y2) // 2)) == (250, 250, 250)   # not drawn at the 0..1000 place
    assert (tmp_path / "r.png").exists()
