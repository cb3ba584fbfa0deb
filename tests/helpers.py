"""What many tests share: the test photos, the CLI in a subprocess, tiny ONNX classifiers.

Importable by name from every folder below tests/ (pyproject.toml's pytest ``pythonpath``), like
the other helper modules here (gradcheck, chromium, serverproc, raycluster, videoclip, ...);
fixtures live in the conftest.py files.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from skiprule import skip_ok  # noqa: F401 - re-exported: a skip that is fine under CI=true

REPO = Path(__file__).resolve().parents[1]
# the test photos, committed with their sources and licences in examples/README.md
PHOTOS = REPO / "examples"
DATA = REPO / "tests" / "data"  # foreign ONNX models and their references (tests/data/README.md)
# onnxruntime-web's files for the in-browser tests: `make test` fetches them (npm pack)
ORT_DIR = Path(os.environ.get("ONNXDREAM_ORT_DIR")
               or REPO / ".cache" / "onnxruntime-web" / "package")


def have_ort_web() -> bool:
    return any((d / "ort.wasm.min.mjs").is_file() for d in (ORT_DIR / "dist", ORT_DIR))


def photo(name: str) -> Path:
    """A test photo from examples/ (chelsea.png, coffee.png, rocket.jpg, astronaut.png)."""
    path = PHOTOS / name
    if not path.is_file():
        raise FileNotFoundError(f"test photo {name} is not in {PHOTOS}")
    return path


NO_FRAMEWORKS = (
    "import sys\n"
    "for m in ('torch', 'torchvision', 'tensorflow', 'keras', 'jax'):\n"
    "    sys.modules[m] = None  # importing any of them now fails\n"
    "from onnxdream.cli.main import main\n"
    "sys.argv = ['onnxdream'] + sys.argv[1:]\n"
    "main()\n"
)


def run_cli(*args: str, home: Path, frameworks: bool = False, check: bool = True,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run the onnxdream CLI in a subprocess; without deep learning frameworks by default."""
    env = {**os.environ, "ONNXDREAM_HOME": str(home), "COLUMNS": "120"}
    cmd = [sys.executable, "-m", "onnxdream.cli", *args] if frameworks else [
        sys.executable, "-c", NO_FRAMEWORKS, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"onnxdream {' '.join(args)} failed ({proc.returncode}):\n"
                             f"{proc.stdout}\n{proc.stderr}")
    return proc


def tiny_classifier(op: str = "Relu", extra_domain: str | None = None):
    """image → Conv (``conv``) → <op> (``act``) → GlobalAveragePool → logits, no metadata."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "w")
    fc = numpy_helper.from_array(rng.normal(size=(4, 5)).astype(np.float32), "fc")
    nodes = [helper.make_node("Conv", ["image", "w"], ["conv"], pads=[1, 1, 1, 1], name="conv0"),
             helper.make_node(op, ["conv"], ["act"], name="act0",
                              **({"domain": extra_domain} if extra_domain else {})),
             helper.make_node("GlobalAveragePool", ["act"], ["gap"]),
             helper.make_node("Flatten", ["gap"], ["flat"]),
             helper.make_node("MatMul", ["flat", "fc"], ["logits"])]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("image", onnx.TensorProto.FLOAT,
                                       ["batch", 3, "height", "width"])],
        [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["batch", 5])], [w, fc])
    opsets = [helper.make_opsetid("", 18)] + (
        [helper.make_opsetid(extra_domain, 1)] if extra_domain else [])
    return helper.make_model(graph, opset_imports=opsets)


def overflowing_model(path: Path) -> Path:
    """tiny_classifier with its conv weights scaled by 1e30: ``l2`` of layer ``act`` is ~1e60,
    which overflows float32 (the objective is inf, the gradient inf/NaN)."""
    import onnx
    from onnx import numpy_helper

    model = tiny_classifier()
    for init in model.graph.initializer:
        if init.name == "w":
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 1e30, "w"))
    onnx.save(model, str(path))
    return path
