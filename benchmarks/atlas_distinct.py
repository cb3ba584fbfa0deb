"""How different the dreams of a model's layers are from each other: the other half of choosing
its recommended layers (benchmarks/atlas_layers.py measures how strong each is).

Dreams one photo's centre square at each layer (``onnxdream.dream.atlas.dream_atlas``: same settings
and seed for every cell) and prints the mean absolute difference between every two cells (0:
the same picture). Layers of one stage dream alike; a recommended set takes one per look.

    python benchmarks/atlas_distinct.py --model efficientnet-lite0 \\
        --layers blocks.3,blocks.4,blocks.5,blocks.7 [--photo chelsea.png] [--cell 224] [-o x.png]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from onnxdream.dream.atlas import dream_atlas, start_image
from onnxdream.dream.visualize import grid
from onnxdream.media.imagewrite import save_image
from onnxdream.settings.options import DreamSettings

REPO = Path(__file__).resolve().parents[1]


def photo(name: str) -> Path:
    """A test photo from examples/ (sources and licences in examples/README.md)."""
    path = REPO / "examples" / name
    if not path.is_file():
        raise SystemExit(f"test photo {name} is not in {path.parent}")
    return path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="efficientnet-lite0")
    ap.add_argument("--layers", required=True)
    ap.add_argument("--photo", default="chelsea.png")
    ap.add_argument("--cell", type=int, default=224)
    ap.add_argument("--step-size", type=float, default=None)
    ap.add_argument("-o", "--output", type=Path, default=None)
    args = ap.parse_args()
    layers = args.layers.split(",")
    start = start_image(photo(args.photo), "photo", args.cell)
    settings = DreamSettings(model=args.model, step_size=args.step_size, seed=0)
    cells = dream_atlas(args.model, start, layers, settings)
    width = max(len(n) for n in layers)
    print(f"{args.model} on {args.photo} ({args.cell}px): mean |difference| between cells")
    print(" " * width + " " + " ".join(f"{n:>{width}s}" for n in layers)
          + "  vs photo  nearest")
    for i, a in enumerate(cells):
        row = [float(np.abs(a - b).mean()) for b in cells]
        nearest = min(v for j, v in enumerate(row) if j != i) if len(cells) > 1 else 0.0
        print(f"{layers[i]:{width}s} " + " ".join(f"{v:{width}.3f}" for v in row)
              + f"  {np.abs(a - start).mean():8.3f}  {nearest:7.3f}")
    if args.output:
        save_image(args.output, grid(cells, layers, columns=min(len(cells), 6)))


if __name__ == "__main__":
    main()
