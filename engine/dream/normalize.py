"""Gradient normalisations for the ascent step: mean-abs (default), std, Laplacian pyramid.

Each divides the gradient by a size (mean |g|, its standard deviation, each pyramid band's RMS).
The *floor* keeps that divisor away from zero: by default onnxdream adds a tiny epsilon
(``g / (mean|g| + 1e-8)``, as the Caffe and TF notebooks do); with ``grad_floor=F`` the divisor
is ``max(size, F)`` instead, as keras.io's Deep Dream example does with ``F = 1e-6``
(``--grad-floor``; the ``keras-io`` preset sets it). A floor differs from the epsilon only where
the gradient is almost zero: there it keeps the step small instead of blowing noise up to a full
step.

``lapnorm`` follows the TensorFlow DeepDream notebook: split the gradient into a 4-level
Laplacian pyramid with the 5x5 binomial kernel, scale each level to unit RMS, merge. It evens
out the frequencies so that low-frequency structure grows as fast as fine texture.
"""

from __future__ import annotations

import numpy as np

from onnxdream.core.errors import OnnxDreamError
from onnxdream.settings.choices import NORMALIZERS

_K = np.array([1, 4, 6, 4, 1], np.float32) / 16.0


def _blur(x: np.ndarray, axis: int) -> np.ndarray:
    """5-tap binomial filter along one axis, zero padding (TF 'SAME')."""
    pad = [(0, 0)] * x.ndim
    pad[axis] = (2, 2)
    p = np.pad(x, pad)
    n = x.shape[axis]
    return sum(_K[i] * np.take(p, np.arange(i, i + n), axis=axis) for i in range(5))


def _down(x: np.ndarray) -> np.ndarray:
    return _blur(_blur(x, -1), -2)[..., ::2, ::2]


def _up(x: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    out = np.zeros(x.shape[:-2] + shape, x.dtype)
    out[..., ::2, ::2] = x
    return _blur(_blur(out, -1), -2) * 4.0


def lap_normalize(g: np.ndarray, levels: int = 4, eps: float = 1e-10) -> np.ndarray:
    """Laplacian-pyramid normalisation of g ([C,H,W] or [H,W]); each band's RMS divides it, but
    never less than ``eps``."""
    bands = []
    cur = g.astype(np.float32)
    for _ in range(levels):
        if min(cur.shape[-2:]) < 2:
            break
        lo = _down(cur)
        bands.append(cur - _up(lo, cur.shape[-2:]))
        cur = lo
    out = cur / max(float(np.sqrt(np.mean(cur * cur))), eps)
    for hi in reversed(bands):
        out = _up(out, hi.shape[-2:]) + hi / max(float(np.sqrt(np.mean(hi * hi))), eps)
    return out


#: What the default (no floor) adds to the mean-abs and std divisors.
EPSILON = 1e-8


def divisor(size: float, grad_floor: float | None = None) -> float:
    """The normaliser's divisor for a gradient of ``size`` (mean |g| or std): ``size + 1e-8``
    without a floor, ``max(size, grad_floor)`` with one."""
    if grad_floor is None:
        return size + EPSILON
    return max(size, grad_floor)


def normalize(g: np.ndarray, how: str = "mean-abs", grad_floor: float | None = None
              ) -> np.ndarray:
    """``g`` divided by its size as ``how`` measures it; ``grad_floor`` (None: the default
    epsilon) bounds the divisor from below (see the module docstring)."""
    if how == "mean-abs":
        return g / divisor(float(np.abs(g).mean()), grad_floor)
    if how == "std":
        return g / divisor(float(g.std()), grad_floor)
    if how == "lapnorm":
        return lap_normalize(g) if grad_floor is None else lap_normalize(g, eps=grad_floor)
    raise OnnxDreamError(f"unknown normalisation '{how}': use one of {', '.join(NORMALIZERS)}")
