"""Image parameterisations for feature visualisation, with their gradients in numpy.

Lucid's vocabulary (Olah et al. 2017, "Feature Visualization"; Mordvintsev et al. 2018,
"Differentiable Image Parameterizations"): the optimiser does not move pixels but the parameters
of an image, and the choice of parameters is a prior.

- :class:`PixelParam`: the pixels themselves (before colour decorrelation and squashing).
- :class:`FFTParam`: the image's real 2-D Fourier spectrum, scaled by ``1/f`` so that every
  frequency band starts with equal energy and moves at the same rate (natural images have a
  ``1/f`` amplitude spectrum). ``image = irfft2(spectrum * scale, norm="ortho") / 4``.
- colour decorrelation: the three channels a parameterisation produces are mixed by the square
  root of ImageNet's colour covariance (Lucid's ``color_correlation_svd_sqrt``), so each
  parameter channel moves along a principal colour direction.
- squashing into [0, 1]: a sigmoid (Lucid's default) or a clip.

:class:`ImageParam` chains them: ``rgb = valid(decorrelate(spatial()))``. ``image()`` gives the
RGB batch ``[N,3,H,W]`` in [0,1]; ``backward(g)`` maps d objective / d rgb to the gradients of the
parameters (the exact adjoint of every stage). ``resized(h, w)`` continues the optimisation at
another size (the octaves of :mod:`onnxdream.dream.visualize`).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from onnxdream.core.errors import OnnxDreamError
from onnxdream.media.imageio import resize
from onnxdream.settings.choices import PARAMS

#: Square root of ImageNet's colour covariance (Lucid, ``lucid/optvis/param/color.py``).
COLOR_CORRELATION_SVD_SQRT = np.asarray([[0.26, 0.09, 0.02],
                                         [0.27, 0.00, -0.05],
                                         [0.27, -0.09, 0.03]], np.float32)
_COLOR = COLOR_CORRELATION_SVD_SQRT / np.max(np.linalg.norm(COLOR_CORRELATION_SVD_SQRT, axis=0))
#: ImageNet's mean colour, the centre of the clip parameterisation (Lucid's ``color_mean``).
COLOR_MEAN = np.asarray([0.48, 0.46, 0.41], np.float32)


class Spatial(Protocol):
    """The spatial part of a parameterisation: parameters → a real [N,3,H,W] array."""

    params: list[np.ndarray]
    shape: tuple[int, int, int, int]

    def forward(self) -> np.ndarray: ...

    def backward(self, g: np.ndarray) -> list[np.ndarray]: ...

    def resized(self, h: int, w: int) -> Spatial: ...


class PixelParam:
    """Pixels as parameters (before colour mixing and squashing)."""

    def __init__(self, t: np.ndarray):
        self.params = [np.ascontiguousarray(t, dtype=np.float32)]

    @classmethod
    def random(cls, shape: tuple[int, int, int, int], rng: np.random.Generator,
               sd: float = 0.01) -> PixelParam:
        return cls(sd * rng.standard_normal(shape, dtype=np.float32))

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return tuple(self.params[0].shape)  # type: ignore[return-value]

    def forward(self) -> np.ndarray:
        return self.params[0]

    def backward(self, g: np.ndarray) -> list[np.ndarray]:
        return [g]

    def resized(self, h: int, w: int) -> PixelParam:
        t = self.params[0]
        out = np.stack([resize(img.transpose(1, 2, 0), (h, w), resample="bilinear")
                        .transpose(2, 0, 1) for img in t])
        return PixelParam(out)


def rfft2_freqs(h: int, w: int) -> np.ndarray:
    """|frequency| in cycles per pixel of each coefficient of an h x w real FFT."""
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    return np.sqrt(fx * fx + fy * fy)


class FFTParam:
    """A real 2-D spectrum with 1/f scaling: ``irfft2(spectrum * scale, norm="ortho") / 4``.

    The parameter is ``[N,3,H,W//2+1,2]`` (real and imaginary parts). ``decay_power`` is the
    exponent of the ``1/f`` prior (1: Lucid's default; 0: white).
    """

    MAGIC = 4.0  # Lucid divides the image by 4 so that sd=0.01 starts near grey

    def __init__(self, spectrum: np.ndarray, h: int, w: int, decay_power: float = 1.0):
        self.params = [np.ascontiguousarray(spectrum, dtype=np.float32)]
        self.h, self.w, self.decay_power = h, w, float(decay_power)
        freqs = rfft2_freqs(h, w)
        self.scale = (1.0 / np.maximum(freqs, 1.0 / max(h, w)) ** self.decay_power
                      ).astype(np.float32)
        # the adjoint of irfft along the last axis counts the coefficients that stand for a
        # conjugate pair twice: all but the DC column and (for even widths) the Nyquist column
        mult = np.full(w // 2 + 1, 2.0, np.float32)
        mult[0] = 1.0
        if w % 2 == 0:
            mult[-1] = 1.0
        self._gscale = (mult * self.scale / self.MAGIC).astype(np.float32)

    @classmethod
    def random(cls, shape: tuple[int, int, int, int], rng: np.random.Generator,
               sd: float = 0.01, decay_power: float = 1.0) -> FFTParam:
        n, c, h, w = shape
        spec = sd * rng.standard_normal((n, c, h, w // 2 + 1, 2), dtype=np.float32)
        return cls(spec, h, w, decay_power)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.params[0].shape[0], self.params[0].shape[1], self.h, self.w)

    def forward(self) -> np.ndarray:
        spec = self.params[0].view(np.complex64)[..., 0] * self.scale
        img = np.fft.irfft2(spec, s=(self.h, self.w), norm="ortho")
        img *= np.float32(1.0 / self.MAGIC)
        return img.astype(np.float32, copy=False)

    def backward(self, g: np.ndarray) -> list[np.ndarray]:
        # adjoint of irfft2(ortho) as a real-linear map of (Re, Im): rfft2(ortho) with the
        # columns that stand for a conjugate pair doubled (checked against torch autograd)
        f = np.fft.rfft2(g.astype(np.float32, copy=False), norm="ortho")
        f *= self._gscale
        return [np.ascontiguousarray(f.astype(np.complex64, copy=False)[..., None]
                                     .view(np.float32))]

    def resized(self, h: int, w: int) -> FFTParam:
        """The same image, band-limited, at h x w: the spectrum embedded in a larger one."""
        old = self.params[0]
        n, c = old.shape[:2]
        new = np.zeros((n, c, h, w // 2 + 1, 2), np.float32)
        new_scale = FFTParam(new, h, w, self.decay_power).scale
        hy = min(self.h, h)
        wx = min(self.w // 2 + 1, w // 2 + 1)
        # rows: non-negative frequencies first, negative ones at the end
        pos = (hy + 1) // 2
        neg = hy - pos
        rows_old = list(range(pos)) + list(range(self.h - neg, self.h))
        rows_new = list(range(pos)) + list(range(h - neg, h))
        gain = np.sqrt(h * w / (self.h * self.w))  # ortho norm: keep the pixel amplitude
        for ro, rn in zip(rows_old, rows_new):
            ratio = self.scale[ro, :wx] / new_scale[rn, :wx] * gain
            new[:, :, rn, :wx, :] = old[:, :, ro, :wx, :] * ratio[None, None, :, None]
        return FFTParam(new, h, w, self.decay_power)


def decorrelate(t: np.ndarray) -> np.ndarray:
    """Mix channels [N,3,H,W] by the normalised colour-correlation square root."""
    n, c, h, w = t.shape
    return np.matmul(_COLOR, t.reshape(n, c, h * w)).reshape(n, c, h, w)


def decorrelate_backward(g: np.ndarray) -> np.ndarray:
    n, c, h, w = g.shape
    return np.matmul(_COLOR.T, g.reshape(n, c, h * w)).reshape(n, c, h, w)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return (0.5 * (np.tanh(0.5 * x) + 1.0)).astype(np.float32)


class ImageParam:
    """``rgb = valid(decorrelate(spatial()))``: an RGB batch [N,3,H,W] in [0,1] from parameters.

    ``valid`` is ``"sigmoid"`` (Lucid's default) or ``"clip"`` (the colour mean added, then
    clipped to [0,1]; the gradient passes where the value is inside).
    """

    def __init__(self, spatial: Spatial, decorrelate: bool = True, valid: str = "sigmoid"):
        if valid not in ("sigmoid", "clip"):
            raise OnnxDreamError(f"unknown squashing '{valid}': use sigmoid or clip")
        self.spatial = spatial
        self.decorrelate = decorrelate
        self.valid = valid
        self._rgb: np.ndarray | None = None
        self._pre: np.ndarray | None = None

    @property
    def params(self) -> list[np.ndarray]:
        return self.spatial.params

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return self.spatial.shape

    def image(self) -> np.ndarray:
        t = self.spatial.forward()
        if self.decorrelate:
            t = decorrelate(t)
        if self.valid == "sigmoid":
            rgb = _sigmoid(t)
        else:
            t = t + (COLOR_MEAN[None, :, None, None] if self.decorrelate else 0.5)
            rgb = np.clip(t, 0.0, 1.0)
        self._pre, self._rgb = t, rgb
        return np.ascontiguousarray(rgb, dtype=np.float32)

    def backward(self, g: np.ndarray) -> list[np.ndarray]:
        """d objective / d rgb (for the last ``image()``) → d objective / d parameters."""
        if self._rgb is None or self._pre is None:
            raise OnnxDreamError("ImageParam.backward needs a call to image() first")
        if self.valid == "sigmoid":
            g = g * self._rgb * (1.0 - self._rgb)
        else:
            g = np.where((self._pre > 0.0) & (self._pre < 1.0), g, 0.0)
        if self.decorrelate:
            g = decorrelate_backward(g)
        return self.spatial.backward(np.asarray(g, np.float32))

    def resized(self, h: int, w: int) -> ImageParam:
        return ImageParam(self.spatial.resized(h, w), self.decorrelate, self.valid)


def image(shape: tuple[int, int, int, int], rng: np.random.Generator, param: str = "fft",
          decorrelate: bool = True, valid: str = "sigmoid", sd: float = 0.01,
          decay_power: float = 1.0) -> ImageParam:
    """Lucid's ``param.image``: a random parameterised RGB batch of ``shape`` [N,3,H,W]."""
    if param == "fft":
        spatial: Spatial = FFTParam.random(shape, rng, sd, decay_power)
    elif param == "pixel":
        spatial = PixelParam.random(shape, rng, sd)
    else:
        raise OnnxDreamError(f"unknown parameterisation '{param}': use one of {', '.join(PARAMS)}")
    return ImageParam(spatial, decorrelate, valid)
