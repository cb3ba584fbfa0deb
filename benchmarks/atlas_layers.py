"""How strongly each layer of the zoo models dreams: the measurement behind the recommended
layers and step sizes (models/registry.py) and the depth rule for exported models.

For each zoo model, each feature layer and each test photo (chelsea, coffee, astronaut, rocket,
resized to SIZE px on the long side), dream with the default settings at a fixed seed and
measure the *visible change*: the mean absolute difference between the dream and the photo when
both are viewed at 256 px on the long side (what a viewer sees; fine noise that averages out at
that view does not count) and the same at 128 px (coarse structure: what survives in a
thumbnail). Writes a contact sheet per model (rows: photos, columns:
layers) to look at, and prints one row per layer: the change per photo, the means and the time.

    python benchmarks/atlas_layers.py [--size 448] [--out /tmp/atlas-bench] [--models lite0,...]
                                      [--step-sizes 0.006] [--layers blocks.5,...]

Results (and what was chosen from them) are in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from onnxdream.dream.ascent import dream
from onnxdream.dream.atlas import feature_layers
from onnxdream.dream.visualize import grid
from onnxdream.media.imageio import load_image, resize
from onnxdream.media.imagewrite import save_image
from onnxdream.runtime.gradient import GradientModel
from onnxdream.runtime.opening import resolve_model_path
from onnxdream.settings.options import DreamSettings

REPO = Path(__file__).resolve().parents[1]
PHOTOS = ["chelsea.png", "coffee.png", "astronaut.png", "rocket.jpg"]


def photo(name: str) -> Path:
    """A test photo from examples/ (sources and licences in examples/README.md)."""
    path = REPO / "examples" / name
    if not path.is_file():
        raise SystemExit(f"test photo {name} is not in {path.parent}")
    return path


def fit(rgb: np.ndarray, side: int) -> np.ndarray:
    h, w = rgb.shape[:2]
    s = side / max(h, w)
    return np.clip(resize(rgb, (round(h * s), round(w * s))), 0, 1)


def change(a: np.ndarray, b: np.ndarray, view: int = 256) -> float:
    return float(np.abs(fit(a, view) - fit(b, view)).mean())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=448)
    ap.add_argument("--out", type=Path, default=Path("/tmp/atlas-bench"))
    ap.add_argument("--models", default="efficientnet-lite0,efficientnet-lite1,efficientnet-lite2")
    ap.add_argument("--layers", default="")
    ap.add_argument("--step-sizes", default="0.006")
    ap.add_argument("--steps", type=int, default=DreamSettings.steps)
    ap.add_argument("--octaves", type=int, default=DreamSettings.octaves)
    ap.add_argument("--sheet", type=int, default=112, help="cell size of the contact sheet")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    photos = {Path(p).stem: fit(load_image(photo(p)).rgb, args.size) for p in PHOTOS}
    for model in args.models.split(","):
        layers = args.layers.split(",") if args.layers else feature_layers(
            resolve_model_path(model))
        for step_size in (float(s) for s in args.step_sizes.split(",")):
            sheet, captions = [], []
            print(f"\n{model}  step {step_size}  {args.size}px  (change at a 256-px view)")
            print(f"{'layer':10s} " + " ".join(f"{n:>9s}" for n in photos)
                  + "   mean256  mean128  s/dream")
            for layer in layers:
                settings = DreamSettings(model=model, layers=(layer,), step_size=step_size,
                                         steps=args.steps, octaves=args.octaves, seed=0)
                gm = GradientModel.from_settings(settings)
                row, coarse, t0 = [], [], time.perf_counter()
                for rgb in photos.values():
                    out = np.ascontiguousarray(dream(gm, rgb, replace(settings)))
                    row.append(change(out, rgb))
                    coarse.append(change(out, rgb, 128))
                    sheet.append(fit(out, args.sheet))
                    captions.append(f"{layer} {row[-1]:.3f}")
                dt = (time.perf_counter() - t0) / len(photos)
                print(f"{layer:10s} " + " ".join(f"{v:9.4f}" for v in row)
                      + f"  {np.mean(row):8.4f} {np.mean(coarse):8.4f}  {dt:7.2f}", flush=True)
            # columns: layers; rows: photos
            n = len(photos)
            order = [li * n + pi for pi in range(n) for li in range(len(layers))]
            h = max(i.shape[0] for i in sheet)
            w = max(i.shape[1] for i in sheet)
            padded = [np.pad(i, ((0, h - i.shape[0]), (0, w - i.shape[1]), (0, 0)),
                             constant_values=1.0) for i in sheet]
            img = grid([padded[k] for k in order], [captions[k] for k in order],
                       columns=len(layers))
            path = args.out / f"{model}-{step_size:g}-{args.size}.png"
            save_image(path, img)
            print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
