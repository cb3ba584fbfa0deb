"""Optical flow, warping, occlusion masks and the temporal-coherence blend on synthetic motion."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("cv2")

import videoclip  # noqa: E402
from onnxdream.core.errors import OnnxDreamError  # noqa: E402
from onnxdream.video.flow import (  # noqa: E402
    FlowEstimator,
    coherent_input,
    consistency_mask,
    temporal_error,
    warp,
)

H, W = 120, 160


def moved(dx: float, dy: float) -> tuple[np.ndarray, np.ndarray]:
    big = videoclip.texture(H + 40, W + 40, seed=5, scale=1.5)
    a = big[20:20 + H, 20:20 + W]
    # b(x) = a(x - d): sample the big texture at the shifted window (bilinear for fractions)
    import cv2

    gx, gy = np.meshgrid(np.arange(W, dtype=np.float32) + 20 - dx,
                         np.arange(H, dtype=np.float32) + 20 - dy)
    b = cv2.remap(big, gx, gy, cv2.INTER_LINEAR)
    return a, b


@pytest.mark.parametrize("dx,dy", [(3, 0), (-2, 2), (1.5, -0.5), (6, 4)])
def test_flow_recovers_a_known_shift(dx, dy):
    a, b = moved(dx, dy)
    flow = FlowEstimator()(a, b)  # a(x) ≈ b(x + d)
    inner = flow[10:-10, 10:-10]
    assert np.abs(np.median(inner[..., 0]) - dx) < 0.1
    assert np.abs(np.median(inner[..., 1]) - dy) < 0.1
    assert np.abs(inner - (dx, dy)).mean() < 0.25


def test_warp_reconstructs():
    a, b = moved(4, -3)
    flow = FlowEstimator()(a, b)
    back = warp(b, flow)
    inner = np.s_[10:-10, 10:-10]
    assert np.abs(back[inner] - a[inner]).mean() < 0.01  # [0,1] scale
    assert np.abs(b[inner] - a[inner]).mean() > 0.1  # (it did move)


def test_warp_exact_for_integer_flow():
    img = np.random.default_rng(0).random((20, 30, 3), dtype=np.float32)
    flow = np.zeros((20, 30, 2), np.float32)
    flow[..., 0] = 2
    out = warp(img, flow)
    np.testing.assert_array_equal(out[:, :-2], img[:, 2:])
    np.testing.assert_array_equal(out[:, -2:], img[:, -1:].repeat(2, axis=1))  # replicated


def test_occluding_object_is_masked():
    """A textured square moves 6 px right over a static background: the strip it uncovers and
    the strip it now covers are untrusted; the background and the square's interior are."""
    bg = videoclip.texture(H, W, seed=7)
    fg = videoclip.texture(H, W, seed=8, scale=2.0)
    prev, cur = bg.copy(), bg.copy()
    prev[40:80, 50:90] = fg[40:80, 50:90]
    cur[40:80, 56:96] = fg[40:80, 50:90]
    backward, forward = FlowEstimator().both(cur, prev)
    mask = consistency_mask(backward, forward)
    assert mask[5:35].mean() > 0.95 and mask[85:].mean() > 0.95  # background above/below
    assert mask[48:72, 64:88].mean() > 0.9  # the square's interior moves consistently
    assert mask[45:75, 50:56].mean() < 0.5  # uncovered: frame t-1 showed the square there
    # the flow inside the square says "came from 6 px left"
    assert np.median(backward[48:72, 64:88, 0]) == pytest.approx(-6, abs=0.3)


def test_mask_marks_pixels_entering_the_view():
    a, b = moved(5, 0)  # b = a moved right: b's left 5 columns came from outside a
    backward, forward = FlowEstimator().both(b, a)
    mask = consistency_mask(backward, forward)
    assert mask[:, :4].mean() < 0.2 and mask[:, 20:-20].mean() > 0.95


def test_coherent_input_formulas():
    rng = np.random.default_rng(1)
    cur, prev, dreamed = (rng.random((H, W, 3), dtype=np.float32) for _ in range(3))
    np.testing.assert_array_equal(coherent_input(cur, None, None, 0.6), cur)
    np.testing.assert_array_equal(coherent_input(cur, prev, dreamed, 0.0), cur)
    plain = coherent_input(cur, prev, dreamed, 0.6)  # DeepDreamVideo's plain blending
    np.testing.assert_allclose(plain, np.clip(0.4 * cur + 0.6 * dreamed, 0, 1), atol=1e-6)
    # with flow on a static scene, the detail is carried over unmoved
    zero = np.zeros((H, W, 2), np.float32)
    detail = 0.1 * (dreamed - 0.5)
    out = coherent_input(cur, cur, np.clip(cur + detail, 0, 1), 0.5, flows=(zero, zero))
    np.testing.assert_allclose(out, np.clip(cur + 0.5 * (np.clip(cur + detail, 0, 1) - cur),
                                            0, 1), atol=1e-6)
    with pytest.raises(OnnxDreamError, match="blend"):
        coherent_input(cur, prev, dreamed, 1.5)


def test_detail_moves_with_the_content():
    a, b = moved(4, 0)
    detail = np.zeros_like(a)
    detail[50:60, 70:80] = 0.2  # a patch of dream on frame a
    out = coherent_input(b, a, np.clip(a + detail, 0, 1), 1.0, flow=FlowEstimator())
    gain = (out - b).mean(axis=2)
    assert gain[52:58, 76:82].mean() > 0.15  # now 4 px to the right
    assert np.abs(gain[52:58, 66:72]).mean() < 0.03


def test_temporal_error_on_the_clip():
    frames = videoclip.frames(6)
    est = FlowEstimator()
    assert temporal_error(frames, frames, est) < 0.02  # the input agrees with its own flow
    noise = [np.clip(f / 255.0 + np.random.default_rng(i).normal(0, 0.1, f.shape), 0, 1)
             for i, f in enumerate(frames)]
    assert temporal_error(noise, frames, est) > 0.08
