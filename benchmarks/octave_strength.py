"""How strongly the defaults dream at each photo size (issue 18): the same photo, resized to each
size, dreamed with the default settings (``octaves="auto"``), and the mean absolute change
measured after scaling the photo and the dream down to 256 px.

    python benchmarks/octave_strength.py PHOTO --sizes 512 1024 2048 4096 [--octaves 4]

Prints one row per size: the octaves used, the change, its ratio to the first size's, seconds.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from onnxdream.dream.ascent import dream
from onnxdream.media.imageio import load_image, resize
from onnxdream.runtime.gradient import GradientModel
from onnxdream.settings.options import DreamSettings
from onnxdream.settings.resolve import resolve


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("photo")
    ap.add_argument("--model", default=DreamSettings.model)
    ap.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    ap.add_argument("--octaves", default="auto")
    ap.add_argument("--steps", type=int, default=DreamSettings.steps)
    ap.add_argument("--view", type=int, default=256)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    gm = GradientModel(args.model)
    rgb = load_image(args.photo).rgb
    first = None
    print("| size | octaves | change at view | ratio | seconds |")
    print("|---|---|---|---|---|")
    for side in args.sizes:
        h = round(side * rgb.shape[0] / max(rgb.shape[:2]))
        w = round(side * rgb.shape[1] / max(rgb.shape[:2]))
        img = resize(rgb, (h, w))
        settings = DreamSettings(model=args.model, octaves=args.octaves, steps=args.steps,
                                 seed=args.seed)
        r = resolve(settings, h, w, gm.info, memory=gm.memory)
        t0 = time.perf_counter()
        out = np.ascontiguousarray(dream(gm, img, r))
        seconds = time.perf_counter() - t0
        view = (round(args.view * h / max(h, w)), round(args.view * w / max(h, w)))
        change = float(np.abs(resize(out, view) - resize(img, view)).mean())
        first = first or change
        print(f"| {side} | {r.octaves} | {change:.4f} | {change / first:.2f} | {seconds:.0f} |",
              flush=True)


if __name__ == "__main__":
    main()
