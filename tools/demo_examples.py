"""The bundled example media (examples/), drawn with tools/demo_data.py's shapes and font.

    python tools/demo_examples.py            # rewrites examples/shapes.png, number.png, wide.png, moving.mp4

Hand-placed, not random: README commands and tests ask fixed questions about them ("What color is the
circle?" -> red on shapes.png; "Which way does the red circle move?" -> right on moving.mp4).
"""
from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo_data import COLORS, Obj, Scene, _draw_shape, _font  # noqa: E402


def compose_scene(size: tuple[int, int], shapes: list[tuple], text: tuple | None = None,
                  bg=(246, 244, 238)) -> Scene:
    """shapes: (shape, colour, x, y, s) with the shape inside (x, y, x+s, y+s); text: (string, x, y, size)."""
    w, h = size
    img, lab = Image.new("RGB", (w, h), bg), Image.new("L", (w, h), 0)
    d, dl = ImageDraw.Draw(img), ImageDraw.Draw(lab)
    objects = [Obj(sh, c, _draw_shape((d, dl), (COLORS[c], k + 1), sh, x, y, s))
               for k, (sh, c, x, y, s) in enumerate(shapes)]
    if text:
        string, x, y, fs = text
        d.text((x, y), string, font=_font(fs), fill=(30, 30, 30))
    return Scene([img], objects, [lab], text=text[0] if text else None,
                 boxes_per_frame=[[o.box for o in objects]])


def compose_video(size: tuple[int, int], shape: str, color: str, s: float, start: tuple, end: tuple,
                  n_frames: int, bg=(246, 244, 238), static: list[tuple] = ()) -> list[Image.Image]:
    """Frames of one shape moving in a straight line from start to end (top-left corners) over statics."""
    frames = []
    for k in range(n_frames):
        f = k / (n_frames - 1)
        x, y = start[0] + (end[0] - start[0]) * f, start[1] + (end[1] - start[1]) * f
        sc = compose_scene(size, [*static, (shape, color, x, y, s)], bg=bg)
        frames.append(sc.frames[0])
    return frames


def write_examples(out) -> None:
    """examples/: shapes.png (the README's first command), number.png, wide.png, moving.mp4 (8 frames, 4 fps)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    compose_scene((480, 320), [("circle", "red", 40, 90, 120), ("square", "blue", 200, 40, 100),
                               ("triangle", "green", 330, 170, 120)]).frames[0].save(out / "shapes.png")
    compose_scene((400, 300), [("star", "orange", 250, 150, 110)], text=("2024", 30, 40, 64)
                  ).frames[0].save(out / "number.png")
    compose_scene((640, 220), [("square", "purple", 30, 40, 120), ("circle", "yellow", 220, 70, 110),
                               ("star", "blue", 380, 30, 130), ("triangle", "red", 530, 100, 90)]
                  ).frames[0].save(out / "wide.png")
    import av
    frames = compose_video((320, 240), "circle", "red", 70, (20, 90), (230, 90), 8,
                           static=[("square", "blue", 140, 170, 50)])
    with av.open(str(out / "moving.mp4"), "w") as box:
        st = box.add_stream("libx264", rate=4)
        st.width, st.height, st.pix_fmt = 320, 240, "yuv420p"
        st.options = {"crf": "12"}
        for fr in frames:
            for pkt in st.encode(av.VideoFrame.from_image(fr)):
                box.mux(pkt)
        for pkt in st.encode():
            box.mux(pkt)


if __name__ == "__main__":
    write_examples(Path(__file__).resolve().parent.parent / "examples")
