"""The on-device step graph (used on CUDA with IO binding) equals the numpy ascent loop.

There is no GPU here: the same graph runs on the CPU provider with CPU-resident OrtValues, which
exercises the graph, the roll/unroll arithmetic and the IO-binding loop.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from helpers import photo
from onnxdream.dream.ascent import DreamSettings, ascend
from onnxdream.exporters.graph.step import step_graph
from onnxdream.media.imageio import load_image, resize
from onnxdream.runtime.device_loop import DeviceAscent
from onnxdream.runtime.gradient import GradientModel


@pytest.fixture(scope="module")
def gm(model_home):
    return GradientModel("efficientnet-lite0", ["blocks.5"], cache=False)


def test_step_graph_is_standard_onnx(gm):
    proto = (onnx.load_from_string(gm._graph) if isinstance(gm._graph, bytes)
             else onnx.load(gm._graph))
    step = step_graph(proto)
    onnx.checker.check_model(step, full_check=True)
    assert {n.domain for n in step.graph.node} <= {""}
    # the step's own inputs, the gradient graph's objective parameters (passed through), then
    # the step's per-pixel scale
    assert [i.name for i in step.graph.input] == ["x", "shift", "step_size", "grad_floor",
                                                  "weights", "mask", "step_mask"]
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
    dream/test_dream.py's PyTorch comparison)."""
    img = _image()
    settings = DreamSettings(octaves=1, steps=1, step_size=0.01, jitter=40)
    expected = ascend(gm, img.copy(), settings, np.random.default_rng(seed), 1)
    got = _device(gm).run(img.copy(), 1, 0.01, _shifts(np.random.default_rng(seed), 40))
    assert np.abs(got - expected).max() < 1e-5


def test_cuda_sessions_take_the_device_loop(gm, monkeypatch):
    """On CUDA, ascend() hands untiled mean-abs steps to the step graph (IO binding)."""
    import dataclasses

    calls, floors = [], []

    class Fake:
        def run(self, img, steps, step_size, shifts, on_step, params=None, grad_floor=None):
            floors.append(grad_floor)
            calls.append((img.shape, steps, step_size, next(shifts)))
            return img + 1

    monkeypatch.setattr(gm, "session", dataclasses.replace(gm.session, device="cuda"))
    monkeypatch.setattr(gm, "device_ascent", lambda: Fake())
    img = _image()
    out = ascend(gm, img.copy(), DreamSettings(steps=3, step_size=0.01, jitter=0),
                 np.random.default_rng(0), 3)
    assert calls == [((3, 97, 131), 3, 0.01, (0, 0))]
    assert np.allclose(out, img + 1)
    ascend(gm, img.copy(), DreamSettings(steps=1, grad_floor=2e-6), np.random.default_rng(0), 1)
    assert floors == [None, 2e-6]
    # big images are tiled on the host instead
    calls.clear()
    ascend(gm, img.copy(), DreamSettings(steps=1, tile_size=64), np.random.default_rng(0), 1)
    assert calls == []


# -- per-shape sessions and CUDA graphs ---------------------------------------------------------
from onnxdream.exporters.graph.step import STATIC_INPUTS, static_step_graph  # noqa: E402
from onnxdream.runtime import device_loop  # noqa: E402
from onnxdream.runtime.device_loop import STATIC_CACHE, StaticSteps, roll_indices  # noqa: E402


def _proto(gm):
    graph = gm._graph
    return onnx.load_from_string(graph) if isinstance(graph, bytes) else onnx.load(graph)


@pytest.mark.parametrize("size,shift", [(7, 3), (7, -2), (5, 0), (6, 11)])
def test_roll_indices_are_np_roll(size, shift):
    v = np.arange(size) * 10
    take, back = roll_indices(size, shift)
    assert np.array_equal(v[take], np.roll(v, shift))
    assert np.array_equal(v[take][back], v)


def test_static_step_graph_is_standard_onnx_with_a_fixed_shape(gm):
    step = static_step_graph(_proto(gm), (1, 3, 97, 131))
    onnx.checker.check_model(step, full_check=True)
    assert {n.domain for n in step.graph.node} <= {""}
    assert [i.name for i in step.graph.input] == list(STATIC_INPUTS) + ["weights", "mask",
                                                                      "step_mask"]
    dims = [d.dim_value for d in step.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 3, 97, 131]
    assert not any(n.op_type == "Slice" and n.output[0].startswith("step/")
                   for n in step.graph.node)  # the roll is data (Gather), not kernel parameters


@pytest.mark.parametrize("steps", [1, 3])
def test_static_steps_equal_the_numpy_loop(gm, steps):
    """The per-shape runner (CPU provider here): Gather roll, buffers bound once, ping-pong."""
    img = _image()
    seed = 7
    settings = DreamSettings(octaves=1, steps=steps, step_size=0.01, jitter=30)
    expected = ascend(gm, img.copy(), settings, np.random.default_rng(seed), steps)
    runner = StaticSteps(_proto(gm), (1, *img.shape), "cpu")
    objectives = []
    got = runner.run(img.copy(), steps, 0.01, _shifts(np.random.default_rng(seed), 30),
                     lambda i, o: objectives.append(o))
    assert len(objectives) == steps
    if steps == 1:
        assert np.abs(got - expected).max() < 1e-5
    else:
        # after the first step, float32 rounding (6e-8 here) meets Lite0's ReLU6 ceilings: a
        # unit that flips moves the next gradient by ~1e-3 of its maximum (see test_dream's
        # torch comparison), so the loops part by up to 1e-2 in a few pixels; the dynamic step
        # graph does the same arithmetic as the static one and must agree exactly
        dynamic = DeviceAscent(_proto(gm), device="cpu", static_shapes=False).run(
            img.copy(), steps, 0.01, _shifts(np.random.default_rng(seed), 30))
        assert np.abs(got - dynamic).max() < 1e-6
        assert np.abs(got - expected).mean() < 1e-4 and np.abs(got - expected).max() < 0.05
    # a second image through the same runner starts from its own pixels
    again = runner.run(img.copy(), 1, 0.01, _shifts(np.random.default_rng(seed), 30))
    first = ascend(gm, img.copy(), DreamSettings(octaves=1, steps=1, step_size=0.01, jitter=30),
                   np.random.default_rng(seed), 1)
    assert np.abs(again - first).max() < 1e-5


def test_device_ascent_keeps_a_few_shapes(gm):
    dev = DeviceAscent(_proto(gm), device="cpu", static_shapes=True)
    assert dev.cuda_graph is False  # never on the CPU provider
    img = _image()
    for k in range(STATIC_CACHE + 1):
        small = np.ascontiguousarray(img[:, : 64 + k, : 64 + k])
        out = dev.run(small, 1, 0.01, _shifts(None, 0))
        assert out.shape == small.shape
    # keyed by shape and the parameters' names and shapes
    assert len(dev._static) == STATIC_CACHE and (1, 3, 64, 64) not in {k[0] for k in dev._static}
    assert dev.static_shapes and dev.fallback_reason is None


def test_static_failure_falls_back_to_the_dynamic_graph(gm, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no CUDA graph for you")

    monkeypatch.setattr(device_loop, "StaticSteps", broken)
    dev = DeviceAscent(_proto(gm), device="cpu", static_shapes=True)
    img = _image()
    with pytest.warns(RuntimeWarning, match="per-shape session failed .*no CUDA graph"):
        got = dev.run(img.copy(), 1, 0.01, _shifts(np.random.default_rng(3), 20))
    expected = ascend(gm, img.copy(), DreamSettings(octaves=1, steps=1, step_size=0.01, jitter=20),
                      np.random.default_rng(3), 1)
    assert np.abs(got - expected).max() < 1e-5  # the same jitter, drawn once
    assert dev.static_shapes is False and "no CUDA graph" in dev.fallback_reason


def test_cuda_runner_asks_for_a_cuda_graph(gm, monkeypatch):
    """There is no GPU here: check what a CUDA runner asks onnxruntime for."""
    seen = {}

    class Stop(Exception):
        pass

    def fake_session(model, device, threads=None, **kw):
        seen.update(device=device, **kw)
        seen["shape"] = [d.dim_value for d in onnx.load_from_string(
            model.SerializeToString()).graph.input[0].type.tensor_type.shape.dim]
        raise Stop

    monkeypatch.setattr(device_loop, "create_session", fake_session)
    with pytest.raises(Stop):
        StaticSteps(_proto(gm), (1, 3, 64, 80), "cuda", cuda_graph=True)
    assert seen["device"] == "cuda" and seen["cuda_options"] == {"enable_cuda_graph": "1"}
    assert seen["shape"] == [1, 3, 64, 80]


@pytest.mark.parametrize("value,on", [("", True), ("1", True), ("0", False), ("off", False),
                                      ("false", False)])
def test_cuda_graph_switch(monkeypatch, value, on):
    monkeypatch.setenv(device_loop.CUDA_GRAPH_ENV, value)
    assert device_loop.cuda_graph_enabled() is on


def test_static_runner_is_shared_safely_between_threads(gm):
    """The server's workers share a model: same-shape dreams take turns on the bound buffers."""
    from concurrent.futures import ThreadPoolExecutor

    dev = DeviceAscent(_proto(gm), device="cpu", static_shapes=True)
    img = _image()
    alone = dev.run(img.copy(), 2, 0.01, _shifts(np.random.default_rng(9), 10))
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda k: dev.run(img.copy() * (1 - 0.1 * (k % 2)), 2, 0.01,
                                               _shifts(np.random.default_rng(9), 10)), range(6)))
    dimmed = dev.run(img.copy() * 0.9, 2, 0.01, _shifts(np.random.default_rng(9), 10))
    for k, out in enumerate(outs):
        assert np.array_equal(out, alone if k % 2 == 0 else dimmed)
