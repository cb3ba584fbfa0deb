"""Shared fixtures: the real test photos, and a private model home for the whole session.

Under ``CI=true`` (or ``CI=1``) a skipped test fails, showing why it skipped: in CI a missing
dependency or browser is a broken set-up, not a pass. Deselection (``-m 'not slow'``, ``-k``) is
not skipping and is unaffected, and so is xfail. A skip that is right even in CI, because it
depends on the machine (no GPU here, a GPU there), says so with :func:`skip_ok` or
``@pytest.mark.skip_ok``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import NoReturn

import pytest

SKIP_OK = "skip_ok: "  # the reason prefix of a skip that is fine in CI too (see skip_ok)


def skip_ok(reason: str, *, allow_module_level: bool = False) -> NoReturn:
    """``pytest.skip`` for a reason that depends on the machine, so it is not a failure in CI."""
    __tracebackhide__ = True  # the skip is reported at the caller's line
    pytest.skip(SKIP_OK + reason, allow_module_level=allow_module_level)


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1")


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "skip_ok: this test's skips depend on the machine and are fine under CI=true")


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    return reason.removeprefix("Skipped: ")


def _fail_skip_in_ci(report, node) -> None:
    """Turn a skipped ``report`` into a failure under CI, unless the skip is allowed."""
    if not (report.skipped and in_ci()) or hasattr(report, "wasxfail"):
        return
    reason = _skip_reason(report)
    if reason.startswith(SKIP_OK) or node.get_closest_marker("skip_ok") is not None:
        return
    report.outcome = "failed"
    report.longrepr = (
        f"skipped under CI={os.environ['CI']}: {reason} (in CI a skip fails: install what the test "
        "needs, or mark a skip that depends on the machine with skip_ok)")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    report = yield
    _fail_skip_in_ci(report, item)
    return report


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_make_collect_report(collector):
    """Module-level skips (``pytest.skip(..., allow_module_level=True)``, ``importorskip``)."""
    report = yield
    _fail_skip_in_ci(report, collector)
    return report


REPO = Path(__file__).resolve().parents[1]
# CI clones the repository with shared/ beside it; examples/ holds a copy of chelsea.png
IMAGE_DIRS = [REPO.parent / "shared" / "images", REPO / "examples"]


def photo(name: str) -> Path:
    for d in IMAGE_DIRS:
        if (d / name).exists():
            return d / name
    pytest.skip(f"test photo {name} not found in {', '.join(map(str, IMAGE_DIRS))}")


@pytest.fixture(scope="session")
def model_home(tmp_path_factory) -> Path:
    """One ONNXDREAM_HOME for the session, so zoo models are built once and never in ~/.cache."""
    home = tmp_path_factory.mktemp("onnxdream-home")
    old = os.environ.get("ONNXDREAM_HOME")
    os.environ["ONNXDREAM_HOME"] = str(home)
    yield home
    if old is None:
        os.environ.pop("ONNXDREAM_HOME", None)
    else:
        os.environ["ONNXDREAM_HOME"] = old


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
