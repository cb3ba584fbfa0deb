"""The on-device step graph (used on CUDA with IO binding) equals the numpy ascent loop.

There is no GPU here: the same graph runs on the CPU provider with CPU-resident OrtValues, which
exercises the graph, the roll/unroll arithmetic and the IO-binding loop.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from conftest import photo
from onnxdream.ascent import DreamSettings, ascend
from onnxdream.device_loop import DeviceAscent, step_graph
from onnxdream.gradient import GradientModel
from onnxdream.imageio import load_image, resize


@pytest.fixture(scope="module")
def gm(model_home):
    return GradientModel("efficientnet-lite0", ["blocks.5"], cache=False)


def test_step_graph_is_standard_onnx(gm):
    proto = onnx.load_from_string(gm._graph) if isinstance(gm._graph, bytes) else onnx.load(gm._graph)
    step = step_graph(proto)
    onnx.checker.check_model(step, full_check=True)
    assert {n.domain for n in step.graph.node} <= {""}
    assert [i.name for i in step.graph.input] == ["x", "shift", "step_size"]
    assert [o.name for o in step.graph.output] == ["objective", "image_out"]


def _device(gm):
    graph = gm._graph
    return DeviceAscent(onnx.load_from_string(graph) if isinstance(graph, bytes)
                        else onnx.load(graph), device="cpu")


def _image():
    img = resize(load_image(photo("chelsea.png")).rgb, (97, 131)).clip(0, 1)
    return np.ascontiguousarray(img.transpose(2, 0, 1), dtype=np.float32)


def _shifts(rng, jitter):
    while True:
        yield tuple(int(v) for v in rng.integers(-jitter, jitter + 1, 2)) if jitter else (0, 0)


def test_device_steps_equal_the_numpy_loop(gm):
    img = _image()
    settings = DreamSettings(octaves=1, steps=4, step_size=0.01, jitter=0)
    expected = ascend(gm, img.copy(), settings, np.random.default_rng(5), 4)
    objectives = []
    got = _device(gm).run(img.copy(), 4, 0.01, _shifts(None, 0),
                          lambda i, o: objectives.append(o))
    assert got.shape == img.shape
    assert np.abs(got - expected).max() < 1e-4
    assert objectives == sorted(objectives) and len(objectives) == 4  # the ascent ascends


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_jittered_step_rolls_and_unrolls_like_numpy(gm, seed):
    """One step with a random shift (later steps part ways through ReLU6 near-ties, see
    test_dream.py's PyTorch comparison)."""
    img = _image()
    settings = DreamSettings(octaves=1, steps=1, step_size=0.01, jitter=40)
    expected = ascend(gm, img.copy(), settings, np.random.default_rng(seed), 1)
    got = _device(gm).run(img.copy(), 1, 0.01, _shifts(np.random.default_rng(seed), 40))
    assert np.abs(got - expected).max() < 1e-5


def test_cuda_sessions_take_the_device_loop(gm, monkeypatch):
    """On CUDA, ascend() hands untiled mean-abs steps to the step graph (IO binding)."""
    import dataclasses

    calls = []

    class Fake:
        def run(self, img, steps, step_size, shifts, on_step):
            calls.append((img.shape, steps, step_size, next(shifts)))
            return img + 1

    monkeypatch.setattr(gm, "session", dataclasses.replace(gm.session, device="cuda"))
    monkeypatch.setattr(gm, "device_ascent", lambda: Fake())
    img = _image()
    out = ascend(gm, img.copy(), DreamSettings(steps=3, jitter=0), np.random.default_rng(0), 3)
    assert calls == [((3, 97, 131), 3, 0.01, (0, 0))]
    assert np.allclose(out, img + 1)
    # big images are tiled on the host instead
    calls.clear()
    ascend(gm, img.copy(), DreamSettings(steps=1, tile_size=64), np.random.default_rng(0), 1)
    assert calls == []
