"""Gradient normalisations for the ascent step: mean-abs (default), std, Laplacian pyramid.

``lapnorm`` follows the TensorFlow DeepDream notebook: split the gradient into a 4-level
Laplacian pyramid with the 5x5 binomial kernel, scale each level to unit RMS, merge. It evens
out the frequencies so that low-frequency structure grows as fast as fine texture.
"""

from __future__ import annotations

import numpy as np

from onnxdream.errors import OnnxDreamError

NORMALIZERS = ("mean-abs", "std", "lapnorm")
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
    """Laplacian-pyramid normalisation of g ([C,H,W] or [H,W])."""
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


def normalize(g: np.ndarray, how: str = "mean-abs") -> np.ndarray:
    if how == "mean-abs":
        return g / (np.abs(g).mean() + 1e-8)
    if how == "std":
        return g / (g.std() + 1e-8)
    if how == "lapnorm":
        return lap_normalize(g)
    raise OnnxDreamError(f"unknown normalisation '{how}': use one of {', '.join(NORMALIZERS)}")
