"""How seamless is ``dream --seamless``? Two designs, measured on the seam of the result.

- ``halo`` (the engine's): the gradient of the image as one tile of a periodic plane: every
  tile's halo wraps around the image's edges (``GradientModel.tiled(wrap=True)``), the octave
  resizes wrap too, and the smaller octaves are rounded to the layer's stride.
- ``circular``: circular padding inside the network: every padded Conv of the model gets an
  explicit ``Pad(mode="wrap")`` in front (built here for the experiment only), compiled as usual;
  the dream is ``halo``'s (wrapped resizes, octaves on the stride) but its gradient is the
  network's own on the image, without the tiler's wrap-around halo.
- ``none``: a plain dream (zero padding, the jitter's roll only).

The seam: tile the result 2x2 and compare the mean |difference| across the wrap-around column
(last -> first) with the mean |difference| between interior neighbouring columns (and rows) at
the same phase of the layer's stride (16 px): ``ratio`` = seam / median of those, ``z`` =
(seam - mean) / std over them. A seamless texture has ratio ~1 and |z| < ~2. Dreams from
``--init grey`` (the photo's own edges would dominate), EfficientNet-Lite0 -> blocks.5.

    .venv/bin/python benchmarks/seamless.py --sizes 256 250 --seeds 3
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from onnxdream.dream.ascent import dream
from onnxdream.dream.controls import init_image
from onnxdream.exporters.graph.builder import GraphBuilder, node_attr
from onnxdream.runtime.gradient import GradientModel
from onnxdream.runtime.opening import resolve_model_path
from onnxdream.settings.options import DreamSettings


def circular(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with every Conv/pool's zero padding replaced by wrap-around padding."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    taken = {o for n in out.graph.node for o in n.output}
    taken |= {i.name for i in out.graph.initializer}
    b = GraphBuilder(prefix="wrap", taken=taken)
    nodes = []
    for n in out.graph.node:
        pads = node_attr(n, "pads")
        if n.op_type in ("Conv", "MaxPool", "AveragePool") and pads and any(pads):
            top, left, bottom, right = pads
            start = len(b.nodes)
            x = b.op("Pad", [n.input[0], b.ints([0, 0, top, left, 0, 0, bottom, right])],
                     mode="wrap")
            nodes.extend(b.nodes[start:])
            n.input[0] = x
            for a in n.attribute:
                if a.name == "pads":
                    del a.ints[:]
                    a.ints.extend([0, 0, 0, 0])
        nodes.append(n)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    out.graph.initializer.extend(b.initializers)
    return out


def seam(x: np.ndarray, stride: int) -> dict[str, float]:
    """Seam ratio and z-score across the wrap-around column and row of an HxWx3 image, against
    the interior boundaries at the same phase of the layer's ``stride`` (a strided network
    leaves a faint stride-periodic pattern: boundaries of one phase differ more than others)."""
    out = {}
    for axis, a in (("x", x), ("y", x.transpose(1, 0, 2))):
        cols = np.abs(np.diff(np.concatenate([a, a[:, :1]], axis=1), axis=1)).mean(axis=(0, 2))
        n = len(cols)
        inner = cols[(n - 1) % stride:n - 1:stride]
        out[f"ratio_{axis}"] = float(cols[-1] / np.median(inner))
        out[f"z_{axis}"] = float((cols[-1] - inner.mean()) / inner.std())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 250])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--layer", default="blocks.5")
    ap.add_argument("--init", default="grey")
    ap.add_argument("--out", default="benchmarks/results/seamless.json")
    args = ap.parse_args()
    path = resolve_model_path("efficientnet-lite0")
    with tempfile.TemporaryDirectory() as tmp:
        wrapped = Path(tmp) / "lite0-circular.onnx"
        onnx.save(circular(onnx.load(str(path))), str(wrapped))
        models = {"none": GradientModel(path, [args.layer], cache=False),
                  "halo": GradientModel(path, [args.layer], cache=False),
                  "circular": GradientModel(wrapped, [args.layer], cache=False)}
        own = models["circular"].gradient
        models["circular"].gradient = lambda *a, wrap=False, **kw: own(*a, **kw)
        # the same network geometry (the receptive-field walk does not read through Pad)
        models["circular"].tile_info = models["halo"].tile_info
        rows = []
        for size in args.sizes:
            for name, gm in models.items():
                stats, seconds = [], []
                for seed in range(args.seeds):
                    s = DreamSettings(init=args.init, size=(size, size), seed=seed,
                                      seamless=name != "none")
                    rgb = init_image(args.init, (size, size), seed)
                    t0 = time.perf_counter()
                    out = dream(gm, rgb, s)
                    seconds.append(time.perf_counter() - t0)
                    stats.append(seam(np.clip(out, 0, 1) * 255, gm.tile_info.stride))
                row = {"size": size, "design": name, "seconds": float(np.median(seconds)),
                       **{k: float(np.mean([st[k] for st in stats])) for k in stats[0]},
                       "max_abs_z": float(max(max(abs(st["z_x"]), abs(st["z_y"]))
                                              for st in stats)),
                       "z_all": [round(st[k], 2) for st in stats for k in ("z_x", "z_y")]}
                rows.append(row)
                print(json.dumps(row), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
