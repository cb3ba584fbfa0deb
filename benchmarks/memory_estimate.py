"""The memory estimate against the real peak: each dream runs in a child process whose peak RSS
(``VmHWM``) is compared with the resolver's estimate (``onnxdream.settings.memory``).

    python benchmarks/memory_estimate.py efficientnet-lite0 googlenet.onnx resnet18.onnx \\
        --sizes 512 1024 2048 --tile 0 --steps 2

Exported models come from ``onnxdream export torchvision NAME --weights none -o NAME.onnx``
(random weights have the same activation sizes). Each row: the model, the image side, the tile
the resolver chose (0: none), the estimate and the measured peak in MB, and the error
(estimate / measured - 1: positive means the estimate is safe). Set ONNXDREAM_THREADS=1 for
figures comparable with benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, sys
import numpy as np
from onnxdream.dream.ascent import dream
from onnxdream.runtime.gradient import GradientModel
from onnxdream.settings.resolve import resolve
from onnxdream.settings.options import DreamSettings

def kb(key):
    for line in open('/proc/self/status'):
        if line.startswith(key + ':'):
            return int(line.split()[1]) * 1024

model, size, tile, steps, octaves, budget = sys.argv[1:7]
gm = GradientModel(model)
rgb = np.random.default_rng(0).random((int(size), int(size), 3), dtype=np.float32)
settings = DreamSettings(model=model, tile_size=int(tile), steps=int(steps), seed=1,
                         octaves=int(octaves) if octaves.isdigit() else octaves)
r = resolve(settings, rgb.shape[0], rgb.shape[1], gm.info, memory=gm.memory,
            budget_mb=int(budget))
dream(gm, rgb, r)
print(json.dumps({"estimate": r.memory.total, "run": r.memory.run, "images": r.memory.images,
                  "fixed": r.memory.fixed, "tile": r.tile_size, "peak": kb('VmHWM')}))
"""


def measure(model: str, size: int, tile: int, steps: int, octaves: str, budget: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, model, str(size), str(tile), str(steps),
                          octaves, str(budget)], capture_output=True, text=True, timeout=3600)
    if out.returncode:
        raise SystemExit(f"{model} at {size}: {out.stderr.strip().splitlines()[-1]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048])
    ap.add_argument("--tile", type=int, default=0, help="tile_size (0: as large as fits)")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--octaves", default="1")
    ap.add_argument("--budget", type=int, default=100_000, help="MB")
    args = ap.parse_args()
    mb = 1 << 20
    print("| model | size | tile | estimate MB | peak RSS MB | error |")
    print("|---|---|---|---|---|---|")
    for model in args.models:
        for size in args.sizes:
            r = measure(model, size, args.tile, args.steps, args.octaves, args.budget)
            err = r["estimate"] / r["peak"] - 1
            print(f"| {model} | {size} | {r['tile']} | {r['estimate'] / mb:.0f} | "
                  f"{r['peak'] / mb:.0f} | {err:+.0%} |", flush=True)


if __name__ == "__main__":
    main()
