"""Small random transforms applied before the network, each with the exact adjoint of its output.

Lucid's vocabulary (``lucid.optvis.transform``): ``pad``, ``jitter``, ``random_scale``,
``random_rotate``, ``compose`` and ``standard_transforms``. Asking that a visualisation still
excite the network after being shifted, scaled and rotated a little keeps high-frequency
adversarial patterns from growing, so the result looks more like an image and transfers to
other networks.

A transform is a callable ``t(x, rng) -> (y, backward)``: ``x`` is a batch ``[N,3,H,W]``, ``y``
the transformed batch (its size may differ), and ``backward(gy)`` maps a gradient with respect to
``y`` back to one with respect to ``x`` (the adjoint; exact, including bilinear sampling). One
random draw serves the whole batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

Backward = Callable[[np.ndarray], np.ndarray]
Transform = Callable[[np.ndarray, np.random.Generator], tuple[np.ndarray, Backward]]


def _identity(g: np.ndarray) -> np.ndarray:
    return g


def pad(w: int, value: float = 0.5) -> Transform:
    """Pad ``w`` pixels of constant ``value`` (grey) on each side; the adjoint crops."""

    def t(x: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, Backward]:
        if w <= 0:
            return x, _identity
        y = np.pad(x, ((0, 0), (0, 0), (w, w), (w, w)), constant_values=value)
        return y, lambda g: np.ascontiguousarray(g[:, :, w:-w, w:-w])

    return t


def jitter(d: int) -> Transform:
    """A random crop that is ``d`` pixels smaller (Lucid's jitter); the adjoint pads zeros."""

    def t(x: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, Backward]:
        n, c, h, w = x.shape
        if d <= 0 or d >= min(h, w):
            return x, _identity
        oy, ox = int(rng.integers(0, d + 1)), int(rng.integers(0, d + 1))
        y = np.ascontiguousarray(x[:, :, oy:oy + h - d, ox:ox + w - d])

        def back(g: np.ndarray) -> np.ndarray:
            out = np.zeros((n, c, h, w), g.dtype)
            out[:, :, oy:oy + h - d, ox:ox + w - d] = g
            return out

        return y, back

    return t


class Warp:
    """Bilinear sampling of [N,C,H,W] at fixed source coordinates, and its exact adjoint.

    ``sy``, ``sx`` (shape [Ho,Wo]) are source positions in pixels (pixel centres at integers);
    positions outside the image take the nearest edge pixel.
    """

    def __init__(self, sy: np.ndarray, sx: np.ndarray, in_hw: tuple[int, int]):
        h, w = in_hw
        self.in_hw = in_hw
        self.out_hw = sy.shape
        sy = np.clip(sy, 0.0, h - 1.0)
        sx = np.clip(sx, 0.0, w - 1.0)
        y0 = np.minimum(np.floor(sy).astype(np.int64), h - 1)
        x0 = np.minimum(np.floor(sx).astype(np.int64), w - 1)
        y1 = np.minimum(y0 + 1, h - 1)
        x1 = np.minimum(x0 + 1, w - 1)
        wy = (sy - y0).astype(np.float32)
        wx = (sx - x0).astype(np.float32)
        self.idx = np.stack([(y0 * w + x0), (y0 * w + x1), (y1 * w + x0), (y1 * w + x1)]
                            ).reshape(4, -1)
        self.wts = np.stack([(1 - wy) * (1 - wx), (1 - wy) * wx, wy * (1 - wx), wy * wx]
                            ).reshape(4, -1)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        n, c = x.shape[:2]
        flat = x.reshape(n * c, -1)
        out = np.zeros((n * c, self.idx.shape[1]), np.float32)
        for k in range(4):
            out += flat[:, self.idx[k]] * self.wts[k]
        return out.reshape(n, c, *self.out_hw)

    def adjoint(self, g: np.ndarray) -> np.ndarray:
        n, c = g.shape[:2]
        rows = n * c
        size = self.in_hw[0] * self.in_hw[1]
        gf = g.reshape(rows, 1, -1) * self.wts[None]  # [rows, 4, P]
        where = (self.idx[None] + (np.arange(rows) * size)[:, None, None])
        out = np.bincount(where.ravel(), weights=gf.ravel(), minlength=rows * size)
        return out.reshape(n, c, *self.in_hw).astype(np.float32)


def affine_warp(in_hw: tuple[int, int], out_hw: tuple[int, int], scale: float = 1.0,
                angle_deg: float = 0.0) -> Warp:
    """Scale by ``scale`` and rotate by ``angle_deg`` about the centre, bilinear."""
    h, w = in_hw
    ho, wo = out_hw
    a = math.radians(angle_deg)
    cos, sin = math.cos(a), math.sin(a)
    yy, xx = np.meshgrid(np.arange(ho, dtype=np.float64), np.arange(wo, dtype=np.float64),
                         indexing="ij")
    # output → centred, undo the rotation, undo the scale, → input pixels
    u, v = yy - (ho - 1) / 2.0, xx - (wo - 1) / 2.0
    ur, vr = cos * u - sin * v, sin * u + cos * v
    return Warp(ur / scale + (h - 1) / 2.0, vr / scale + (w - 1) / 2.0, in_hw)


def random_scale(scales: Sequence[float]) -> Transform:
    """Resize by a factor drawn from ``scales`` (bilinear; the output size changes)."""

    def t(x: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, Backward]:
        s = float(scales[int(rng.integers(0, len(scales)))])
        h, w = x.shape[2:]
        out = (max(1, round(h * s)), max(1, round(w * s)))
        if s == 1.0:
            return x, _identity
        warp = affine_warp((h, w), out, scale=out[0] / h)
        return warp(x), warp.adjoint

    return t


def random_rotate(angles: Sequence[float]) -> Transform:
    """Rotate about the centre by an angle in degrees drawn from ``angles`` (bilinear)."""

    def t(x: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, Backward]:
        a = float(angles[int(rng.integers(0, len(angles)))])
        if a == 0.0:
            return x, _identity
        h, w = x.shape[2:]
        warp = affine_warp((h, w), (h, w), angle_deg=a)
        return warp(x), warp.adjoint

    return t


def random_scale_rotate(scales: Sequence[float], angles: Sequence[float]) -> Transform:
    """``random_scale`` then ``random_rotate`` as one bilinear resampling (faster, less blur)."""

    def t(x: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, Backward]:
        s = float(scales[int(rng.integers(0, len(scales)))])
        a = float(angles[int(rng.integers(0, len(angles)))])
        h, w = x.shape[2:]
        out = (max(1, round(h * s)), max(1, round(w * s)))
        if s == 1.0 and a == 0.0:
            return x, _identity
        warp = affine_warp((h, w), out, scale=out[0] / h, angle_deg=a)
        return warp(x), warp.adjoint

    return t


def compose(transforms: Sequence[Transform]) -> Transform:
    """Apply ``transforms`` in order; the backward runs through them in reverse."""

    def t(x: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, Backward]:
        backs = []
        for f in transforms:
            x, b = f(x, rng)
            backs.append(b)

        def back(g: np.ndarray) -> np.ndarray:
            for b in reversed(backs):
                g = b(g)
            return g

        return x, back

    return t


def standard_transforms(scale: float = 1.0) -> list[Transform]:
    """Lucid's ``standard_transforms``: pad 12, jitter 8, scale ±10 %, rotate ±10°, jitter 4.

    Scale and rotation are drawn as Lucid draws them (scales ``1 + (i-5)/50``, angles -10..10
    with 0 five times more likely) and applied in one resampling. ``scale`` stretches the pixel
    amounts for images larger or smaller than 224 pixels.
    """
    def px(n: int) -> int:
        return max(1, round(n * scale))

    return [
        pad(px(12), 0.5),
        jitter(px(8)),
        random_scale_rotate([1 + (i - 5) / 50.0 for i in range(11)],
                            list(range(-10, 11)) + 5 * [0]),
        jitter(px(4)),
    ]


TRANSFORMS: dict[str, Callable[[float], list[Transform]]] = {
    "standard": standard_transforms,
    "none": lambda scale=1.0: [],
}
