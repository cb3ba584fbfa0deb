"""The gradient floor (``grad_floor``, ``--grad-floor``): the normaliser divides by
max(size, F) instead of size + 1e-8 — keras.io's Deep Dream normaliser — in the numpy loop, the
normalisers and the on-device step graph alike."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from helpers import photo
from onnxdream.dream.ascent import DreamSettings, ascend
from onnxdream.dream.normalize import divisor, normalize
from onnxdream.media.imageio import load_image, resize
from onnxdream.runtime.device_loop import DeviceAscent
from onnxdream.runtime.gradient import GradientModel


def test_divisor_and_normalizers():
    assert divisor(0.5) == 0.5 + 1e-8 and divisor(0.0) == 1e-8
    assert divisor(0.5, 1e-6) == 0.5 and divisor(1e-9, 1e-6) == 1e-6
    rng = np.random.default_rng(0)
    g = rng.standard_normal((3, 20, 24)).astype(np.float32)
    for scale in (1.0, 1e-9):  # the floor matters only for a tiny gradient
        gs = g * np.float32(scale)
        m = float(np.abs(gs).mean())
        np.testing.assert_allclose(normalize(gs, "mean-abs", 1e-6), gs / max(m, 1e-6), rtol=1e-6)
        np.testing.assert_allclose(normalize(gs, "mean-abs"), gs / (m + 1e-8), rtol=1e-6)
        np.testing.assert_allclose(normalize(gs, "std", 1e-6), gs / max(float(gs.std()), 1e-6),
                                   rtol=1e-6)
    tiny = g * np.float32(1e-9)
    m = float(np.abs(tiny).mean())  # ~0.8e-9: a floor of 1e-6 keeps the step ~1000x smaller
    assert np.abs(normalize(tiny, "mean-abs", 1e-6)).mean() == pytest.approx(m / 1e-6, rel=1e-5)
    assert np.abs(normalize(tiny, "mean-abs")).mean() == pytest.approx(m / (m + 1e-8), rel=1e-5)
    # lapnorm: the floor bounds each band's RMS instead of its 1e-10
    assert np.abs(normalize(tiny, "lapnorm", 1e-6)).max() < 1e-2
    assert np.abs(normalize(tiny, "lapnorm")).max() > 0.5


@pytest.fixture(scope="module")
def gm(model_home):
    return GradientModel("efficientnet-lite0", ["blocks.5"], cache=False)


def _image():
    img = resize(load_image(photo("chelsea.png")).rgb, (67, 81)).clip(0, 1)
    return np.ascontiguousarray(img.transpose(2, 0, 1), dtype=np.float32)


def _shifts():
    while True:
        yield 0, 0


def test_a_floored_step_is_step_size_times_g_over_the_floor(gm):
    img = _image()
    _, g = gm.gradient(img.copy(), 0, (0, 0))
    m = float(np.abs(g).astype(np.float64).mean())
    for floor in (m / 10, m * 10):  # below mean|g|: as without; above: g / floor
        got = ascend(gm, img.copy(), DreamSettings(steps=1, step_size=0.01, jitter=0,
                                                   tile_size=0, grad_floor=floor),
                     np.random.default_rng(0), 1)
        want = np.clip(img + 0.01 * g / max(m, floor), 0, 1)
        np.testing.assert_allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("static", [False, True])
def test_the_step_graph_takes_the_floor(gm, static):
    graph = gm._graph
    proto = onnx.load_from_string(graph) if isinstance(graph, bytes) else onnx.load(graph)
    device = DeviceAscent(proto, device="cpu", static_shapes=static)
    img = _image()
    _, g = gm.gradient(img.copy(), 0, (0, 0))
    m = float(np.abs(g).astype(np.float64).mean())
    # one step: later ones part ways through ReLU6 near-ties (see test_device_loop.py)
    for floor in (None, m / 10, m * 10):
        want = ascend(gm, img.copy(), DreamSettings(steps=1, step_size=0.01, jitter=0,
                                                    tile_size=0, grad_floor=floor),
                      np.random.default_rng(0), 1)
        got = device.run(img.copy(), 1, 0.01, _shifts(), grad_floor=floor)
        assert np.abs(got - want).max() < 1e-6, floor
    # the floor is an input with a default: a caller that leaves it out gets mean|g| + 1e-8
    first = device.run(img.copy(), 1, 0.01, _shifts())
    np.testing.assert_allclose(first, np.clip(img + 0.01 * g / (m + 1e-8), 0, 1), atol=1e-5)
