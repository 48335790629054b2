"""Does the demo checkpoint's vision tower tell the text model where objects are?

    python tools/demo_position_probe.py [--model qvl/demo] [--scenes 500]

Runs the vision tower (through qvl) on held-out scenes with 2-4 shapes. It then fits a ridge regression
from the merger output of each LLM image token to the x centre of the object under it (0..1 of the
width), on the first 80% of the scenes, and reports R² and mean absolute error on the rest. The same
is done for the token's own cell centre. A high R² means x is linearly available in the features the
text model attends to, so a relative-position failure lies in the text model.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import demo_data as D  # noqa: E402


def ridge_r2(x: np.ndarray, y: np.ndarray, train: np.ndarray, lam: float = 1.0) -> tuple[float, float]:
    """(R², MAE) on ~train of a ridge fit on train; x (n, d), y (n,)."""
    a = np.c_[x, np.ones(len(x))]
    w = np.linalg.solve(a[train].T @ a[train] + lam * np.eye(a.shape[1]), a[train].T @ y[train])
    pred, true = a[~train] @ w, y[~train]
    return 1 - ((pred - true) ** 2).sum() / ((true - true.mean()) ** 2).sum(), float(np.abs(pred - true).mean())


def main() -> None:
    from qvl import LLM, process_image

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(Path(__file__).resolve().parent.parent / "qvl" / "demo"))
    ap.add_argument("--scenes", type=int, default=500)
    ap.add_argument("--seed", type=int, default=5)
    args = ap.parse_args()
    model = LLM(args.model, dtype="float32", device="cpu").engine.model
    rng = np.random.default_rng(args.seed)
    feats, obj_x, cell_x, scene_id = [], [], [], []
    for i in range(args.scenes):
        scene = D.make_scene(rng, n_objects=int(rng.integers(2, 5)), with_text=False)
        vi = process_image(scene.frames[0], max_pixels=D.IMAGE_MAX_PIXELS)
        with torch.inference_mode():
            f = model.visual(vi.pixel_values, torch.tensor([vi.grid_thw])).float().numpy()   # (m, H)
        _, flt = D.token_targets(scene, (vi.grid_thw[1] * 14, vi.grid_thw[2] * 14))          # (m, 6)
        feats.append(f)
        obj_x.append((flt[:, 0] + flt[:, 2]) / 2)          # NaN where no object
        cell_x.append(flt[:, 4])
        scene_id.append(np.full(len(f), i))
    x, ox, cx, sid = map(np.concatenate, (feats, obj_x, cell_x, scene_id))
    train = sid < int(0.8 * args.scenes)
    on_obj = ~np.isnan(ox)
    r2, mae = ridge_r2(x[on_obj], ox[on_obj], train[on_obj])
    print(f"{args.scenes} scenes, {len(x)} image tokens, {on_obj.sum()} on objects (last 20% of scenes held out)")
    print(f"object centre x from an object token's features: R2 {r2:.3f}, MAE {mae:.3f} of the width")
    r2, mae = ridge_r2(x, cx, train)
    print(f"the token's own cell centre x, every token:       R2 {r2:.3f}, MAE {mae:.3f} of the width")


if __name__ == "__main__":
    main()
