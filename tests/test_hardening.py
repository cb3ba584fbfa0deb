"""Issue 15 without a server: finite weights and options, non-finite dreams stop, hostile model
files, the compiled-graph cache's disk budget and LRU, temp files of killed writes, failed
compiles, and the job queue's admission and Retry-After. (The HTTP side: test_server_hardening.)
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from conftest import photo, tiny_classifier

# ---------------------------------------------------------------------------------------------
# Models


def overflowing_model(path: Path) -> Path:
    """tiny_classifier with its conv weights scaled by 1e30: ``l2`` of layer ``act`` is ~1e60,
    which overflows float32 (the objective is inf, the gradient inf/NaN)."""
    model = tiny_classifier()
    for init in model.graph.initializer:
        if init.name == "w":
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 1e30, "w"))
    onnx.save(model, str(path))
    return path


def huge_initializer_model(path: Path) -> Path:
    """An ONNX file whose Conv weight declares 10^12 values and stores none (99 bytes)."""
    w = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[1_000_000, 1_000_000, 1, 1])
    graph = helper.make_graph(
        [helper.make_node("Conv", ["image", "w"], ["y"], name="conv")], "huge",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, None, None])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


def _cli(*args: str):
    from onnxdream.cli import app

    result = CliRunner().invoke(app, list(args))
    out = result.output + (getattr(result, "stderr", "") or "")
    return result.exit_code, out


# ---------------------------------------------------------------------------------------------
# Finite weights and options (issue 15, finding 5)


def test_huge_or_non_finite_weights_and_options_are_refused(model_home, tmp_path):
    from onnxdream.errors import LayerError, SettingsError
    from onnxdream.exporters.graph import mean
    from onnxdream.gradient import GradientModel
    from onnxdream.settings import DreamSettings

    out = tmp_path / "out.png"
    image = str(photo("chelsea.png"))
    # 1e39 is a finite double but inf in float32: it used to give a black image and exit 0
    for spec in ("blocks.5:1e39", "blocks.5:-2e6", "blocks.5:inf", "blocks.5:nan"):
        code, text = _cli("dream", image, "-o", str(out), "--layer", spec, "--steps", "1")
        assert code == 2, text
        assert "layer weight in" in text and "between -1e+06 and 1e+06" in text, text
        assert "Traceback" not in text
    code, text = _cli("dream", image, "-o", str(out), "--max-loss", "nan", "--steps", "1")
    assert code == 2 and "--max-loss must be a finite number" in text, text
    code, text = _cli("dream", image, "-o", str(out), "--max-loss", "inf", "--steps", "1")
    assert code == 2 and "--max-loss must be a finite number" in text, text
    assert not out.exists()

    with pytest.raises(SettingsError, match="max_loss must be a finite number"):
        DreamSettings(max_loss=float("nan")).validate()
    # the Python API: an Objective built by hand is checked too
    with pytest.raises(LayerError, match="weight of layer 'blocks.5' is 1e\\+39") as info:
        GradientModel("efficientnet-lite0", mean("blocks.5") * 1e39)
    assert info.value.field == "layers"
    gm = GradientModel("efficientnet-lite0", ["blocks.5:2", "blocks.9"])
    with pytest.raises(LayerError, match="finite number"):
        gm.params_for(mean("blocks.5") * 1e300 + mean("blocks.9"))


def test_a_non_finite_dream_stops_with_a_clear_error(model_home, tmp_path):
    """A model whose layer overflows float32: exit 2 and one line, no black image written."""
    from onnxdream.ascent import dream
    from onnxdream.errors import NonFiniteError
    from onnxdream.gradient import GradientModel
    from onnxdream.settings import DreamSettings

    model = overflowing_model(tmp_path / "overflow.onnx")
    out = tmp_path / "dream.png"
    code, text = _cli("dream", str(photo("chelsea.png")), "-o", str(out), "--model", str(model),
                      "--layer", "act", "--objective", "l2", "--steps", "2", "--octaves", "1")
    assert code == 2, text
    assert "stopped being a finite number at step 1" in text and "Traceback" not in text, text
    assert not out.exists()

    # the same guard for every normalisation, and for weights passed past params_for
    rgb = np.random.default_rng(0).random((40, 48, 3), dtype=np.float32)
    gm = GradientModel(model, ["act"], "l2")
    for how in ("mean-abs", "std", "lapnorm"):
        with pytest.raises(NonFiniteError, match="objective"):
            dream(gm, rgb, DreamSettings(octaves=1, steps=2, normalize=how, seed=1))
    gm = GradientModel(tiny_path(tmp_path), ["act"])
    inf = {"weights": np.array([np.inf], np.float32)}
    with pytest.raises(NonFiniteError):
        dream(gm, rgb, DreamSettings(octaves=1, steps=2, seed=1), params=inf)
    # ... and a finite weighting dreams normally
    ok = dream(gm, rgb, DreamSettings(octaves=1, steps=2, seed=1))
    assert np.isfinite(ok).all() and np.abs(ok - rgb).mean() > 0


def tiny_path(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.onnx"
    if not path.exists():
        onnx.save(tiny_classifier(), str(path))
    return path


# ---------------------------------------------------------------------------------------------
# A hostile model file (issue 15, finding 6)


def test_a_huge_declared_initializer_is_a_one_line_error(model_home, tmp_path):
    from onnxdream.errors import ModelError
    from onnxdream.exporters.graph import load_model

    path = huge_initializer_model(tmp_path / "huge.onnx")
    assert path.stat().st_size < 200
    with pytest.raises(ModelError, match="declares 1,000,000,000,000 values .* holds 0"):
        load_model(path)
    for args in (["dream", str(photo("chelsea.png")), "-o", str(tmp_path / "o.png"),
                  "--model", str(path), "--layer", "y", "--steps", "1"],
                 ["layers", str(path)]):
        code, text = _cli(*args)
        assert code == 2, text
        assert "declares 1,000,000,000,000 values" in text and "Traceback" not in text, text


# ---------------------------------------------------------------------------------------------
# The compiled-graph cache: weights are not part of it, a disk budget, LRU (issue 15, finding 1)


@pytest.fixture
def compiles(monkeypatch):
    """Counts gradient compiles (onnxdream.gradient.compile_gradient calls)."""
    import onnxdream.gradient as gradient

    calls = []
    real = gradient.compile_gradient

    def counting(*args, **kwargs):
        calls.append(args[1].describe() if len(args) > 1 else "?")
        return real(*args, **kwargs)

    monkeypatch.setattr(gradient, "compile_gradient", counting)
    return calls


def _graphs(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.suffix == ".onnx") if directory.exists() \
        else []


def test_the_disk_budget_evicts_least_recently_used_graphs(model_home, tmp_path, compiles):
    from onnxdream.exporters.graph.compiler import compile_gradient
    from onnxdream.exporters.graph.objective import Objective
    from onnxdream.gradient import GradientModel
    from onnxdream.graph_cache import CompiledCache

    model = tiny_path(tmp_path)
    sizes = {(layer, kind): compile_gradient(str(model), Objective.build([layer], kind)).ByteSize()
             for layer, kind in [("conv", "mean"), ("act", "mean"), ("conv", "l2"),
                                 ("act", "l2"), ("act", "channel:1")]}
    big = sorted(sizes.values())
    budget = big[-1] + big[-2] + 100  # any two graphs fit, no three
    assert budget < sum(big[:3])
    directory = tmp_path / "compiled"
    cache = CompiledCache(directory, budget_mb=budget / 2**20)

    def graph(layer, objective="mean"):
        gm = GradientModel(model, [layer], objective, cache=cache)
        return (Path(gm._graph) if isinstance(gm._graph, str) else None), gm

    a, gm_a = graph("conv")
    b, gm_b = graph("act")
    assert a.exists() and b.exists()
    old = time.time() - 100
    os.utime(a, (old, old))
    os.utime(b, (old - 10, old - 10))  # b is the least recently used ...
    del gm_a, gm_b  # ... and no live model holds either
    again = graph("conv")[0]  # a hit touches a: now b is even older
    assert again == a and len(compiles) == 2 and a.stat().st_mtime > old
    c, gm_c = graph("conv", objective="l2")
    assert c.exists() and a.exists() and not b.exists(), "b (least recently used) goes first"
    assert cache.usage() <= cache.budget

    # a graph a live model uses is never evicted: then the new one runs from memory
    d, gm_d = graph("act", objective="l2")
    assert d is not None and d.exists() and not a.exists()  # a was free, so it went
    assert c.exists(), "c is in use by gm_c"
    assert cache.usage() <= cache.budget
    e, gm_e = graph("act", objective="channel:1")  # c and d in use: e cannot be written
    assert e is None and isinstance(gm_e._graph, bytes) and c.exists() and d.exists()
    assert cache.usage() <= cache.budget
    obj, grad = gm_e(np.zeros((1, 3, 16, 16), np.float32))  # and it runs from memory
    assert grad.shape == (1, 3, 16, 16)
    # a graph bigger than the whole budget is never written
    tiny = CompiledCache(tmp_path / "tiny", budget_mb=big[0] / 4 / 2**20)
    gm = GradientModel(model, ["conv"], cache=tiny)
    assert isinstance(gm._graph, bytes) and _graphs(tmp_path / "tiny") == []


# ---------------------------------------------------------------------------------------------
# Nothing half-written stays behind (issue 15, finding 6)


def test_a_failed_compile_or_write_leaves_nothing(model_home, tmp_path, monkeypatch):
    import onnxdream.gradient as gradient
    from onnxdream.errors import ModelError, UnsupportedOpError
    from onnxdream.gradient import GradientModel
    from onnxdream.graph_cache import CompiledCache

    model = tiny_path(tmp_path)
    directory = tmp_path / "compiled"
    cache = CompiledCache(directory)

    def no_rule(*args, **kwargs):
        raise UnsupportedOpError("no gradient rule for op 'Banana'")

    with monkeypatch.context() as m:
        m.setattr(gradient, "compile_gradient", no_rule)
        with pytest.raises(UnsupportedOpError):
            GradientModel(model, ["act"], cache=cache)
    assert not directory.exists() or list(directory.iterdir()) == []

    # the disk fills up half-way through writing the graph: nothing is left, the model works
    real_save = onnx.save

    def disk_full(proto, path, *args, **kwargs):
        Path(path).write_bytes(b"half a graph")
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(onnx, "save", disk_full)
        gm = GradientModel(model, ["act"], cache=cache)
    assert isinstance(gm._graph, bytes) and list(directory.iterdir()) == []
    assert onnx.save is real_save

    # a freshly compiled graph that no session accepts is removed, not kept for next time
    def refuse(*args, **kwargs):
        raise ModelError("onnxruntime cannot load the graph")

    with monkeypatch.context() as m:
        m.setattr(gradient, "create_session", refuse)
        with pytest.raises(ModelError, match="cannot load"):
            GradientModel(model, ["act"], cache=cache)
    assert list(directory.iterdir()) == []
