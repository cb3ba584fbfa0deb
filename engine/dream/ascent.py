"""The DeepDream ascent: octaves with detail re-injection, jitter, tiles, normalised steps.

One step, in RGB pixel space scaled to [0,1] (DESIGN.md):
``x ← clip(x + step_size · g / (mean|g| + 1e-8), 0, 1)``, g the gradient over the whole image
(with ``grad_floor`` F: ``g / max(mean|g|, F)``; other normalisations:
:mod:`onnxdream.dream.normalize`). Jitter is a random circular shift of up to ``jitter`` pixels,
undone after the step. Octaves follow the Caffe notebook: shrink by ``octave_scale`` per octave,
ascend from the smallest, enlarge and re-inject the detail that shrinking lost.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from onnxdream.core.errors import NonFiniteError, OnnxDreamError
from onnxdream.dream.normalize import divisor, normalize
from onnxdream.exporters.graph.contract import STEP_MASK, is_spatial
from onnxdream.media.imageio import resize
from onnxdream.runtime.gradient import GradientModel
from onnxdream.settings.options import DreamSettings, describe, octave_sizes
from onnxdream.settings.resolve import ResolvedSettings, resolve


@dataclass(frozen=True)
class Progress:
    octave: int  # 1-based
    octaves: int
    step: int  # 1-based within the octave
    steps: int
    done: int  # steps done in total
    total: int
    objective: float
    size: tuple[int, int]


ProgressFn = Callable[[Progress], None]


def _resize_chw(x: np.ndarray, size: tuple[int, int], wrap: bool = False,
                resample: str = "bicubic") -> np.ndarray:
    """[C,H,W] resized to ``size``; ``wrap``: as a tile of a periodic plane (the filter reads
    the wrapped-around pixels at the edges, so a seamless image stays seamless)."""
    if x.shape[1:] == tuple(size):
        return x
    if not wrap:
        return np.ascontiguousarray(resize(np.moveaxis(x, 0, -1), size, resample=resample)
                                    .transpose(2, 0, 1))
    (h, w), (nh, nw) = x.shape[1:], size
    py, px = -(-4 * h // nh), -(-4 * w // nw)  # the filter's reach, in source pixels
    padded = np.moveaxis(np.pad(x, ((0, 0), (py, py), (px, px)), mode="wrap"), 0, -1)
    out = resize(padded, size, resample=resample, box=(px, py, px + w, py + h))
    return np.ascontiguousarray(out.transpose(2, 0, 1))


def params_at(params: Mapping[str, np.ndarray], size: tuple[int, int], wrap: bool = False
              ) -> dict[str, np.ndarray]:
    """The objective parameters for an octave of ``size``: spatial ones given at another
    resolution (region masks, the step mask) resized to it (bilinear, antialiased when
    shrinking); broadcast ones (``[..., 1, 1]``) and the rest as they are."""
    out = {}
    for k, v in params.items():
        if is_spatial(k) and v.shape[-2:] != (1, 1) and v.shape[-2:] != tuple(size):
            planes = v.reshape(-1, *v.shape[-2:])
            v = np.clip(_resize_chw(planes, size, wrap, "bilinear"), 0.0, 1.0).reshape(
                *v.shape[:-2], *size)
        out[k] = v
    return out


def ascend(gm: GradientModel, img: np.ndarray, settings: ResolvedSettings | DreamSettings,
           rng: np.random.Generator, steps: int,
           on_step: Callable[[int, float], bool | None] | None = None,
           params: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
    """``steps`` ascent steps on img ([3,H,W] float32 in [0,1]), in place; returns img.

    Reads the tile, ``jitter``, ``step_size``, ``normalize`` and ``grad_floor`` from ``settings``
    (resolved values; a DreamSettings is resolved here for img's size and ``gm``'s model), and
    ``seamless`` (the image is a tile of a periodic plane: see ``GradientModel.gradient``'s
    ``wrap``). One gradient buffer is reused across steps; jitter rolls the network's view, not the
    image. ``params``: the objective parameters at img's size (default ``gm.params``; see
    :meth:`GradientModel.params_for`), and ``step_mask`` ([1, 1, H, W], the per-pixel scale of each
    step: 0 keeps a pixel). A non-finite objective or gradient stops the ascent with
    :class:`NonFiniteError`.
    """
    _, h, w = img.shape
    if isinstance(settings, DreamSettings):  # e.g. its step size may be the model's
        settings = resolve(settings, h, w, getattr(gm, "info", None))
    tile, batch, step_size = settings.tile, settings.batch_pixels, settings.step_size
    floor = settings.grad_floor
    params = dict(gm.params if params is None else params)
    step_mask = params.pop(STEP_MASK, None)
    wrap = bool(settings.settings.seamless)
    fits = tile[0] <= 0 or (h <= tile[0] and w <= tile[1])
    fits = fits and (gm.info.dynamic_hw or (h, w) == tuple(gm.info.native_size))
    if gm.session.device == "cuda" and fits and settings.normalize == "mean-abs" and not wrap:
        # keep the image on the GPU: the whole step runs as one graph with IO binding
        def shifts():
            while True:
                if settings.jitter:
                    yield tuple(int(v) for v in rng.integers(-settings.jitter,
                                                             settings.jitter + 1, 2))
                else:
                    yield 0, 0

        def checked(i: int, obj: float) -> bool | None:
            _check_finite(obj, 0.0, i)
            return on_step(i, obj) if on_step is not None else None

        if step_mask is not None:
            params[STEP_MASK] = step_mask
        out = gm.device_ascent().run(img, steps, step_size, shifts(), checked, params=params,
                                     grad_floor=floor)
        with np.errstate(invalid="ignore", over="ignore"):
            total = float(out.sum(dtype=np.float64))
        if not math.isfinite(total):  # a non-finite step leaves NaN pixels
            raise NonFiniteError(NON_FINITE.format(what="image", step=steps))
        img[...] = out
        return img
    grad = np.empty_like(img)
    for i in range(steps):
        if settings.jitter:
            oy, ox = (int(v) for v in rng.integers(-settings.jitter, settings.jitter + 1, 2))
        else:
            oy = ox = 0
        obj, g = gm.gradient(img, tile, (oy, ox), out=grad, params=params,
                             batch_pixels=batch, wrap=wrap)
        if settings.normalize == "mean-abs":
            scale = mean_abs(g) if step_mask is None else masked_mean_abs(g, step_mask[0])
            _check_finite(obj, scale, i)
            g *= step_size / divisor(scale, floor)
        else:
            with np.errstate(invalid="ignore", over="ignore"):  # inf - inf: NaN, reported
                total = float(g.sum(dtype=np.float64))
            _check_finite(obj, total, i)
            g = normalize(g, settings.normalize, floor) * step_size
        if step_mask is not None:
            g *= step_mask[0]
        img += g
        np.clip(img, 0.0, 1.0, out=img)
        if on_step is not None and on_step(i, obj):
            break
    return img


NON_FINITE = ("the dream's {what} stopped being a finite number at step {step} (float32 "
              "overflow: the layer weights are too large, or the model's activations overflow "
              "at this layer); use smaller layer weights or another layer")


def _check_finite(objective: float, gradient_summary: float, step: int) -> None:
    """NonFiniteError when the objective or a summary of the gradient (a sum or mean over it:
    NaN or inf when any element is) is not finite: a step would write NaN (black) pixels."""
    if not math.isfinite(objective):
        raise NonFiniteError(NON_FINITE.format(what="objective", step=step + 1))
    if not math.isfinite(gradient_summary):
        raise NonFiniteError(NON_FINITE.format(what="gradient", step=step + 1))


def mean_abs(a: np.ndarray, chunk: int = 1 << 20) -> float:
    """mean(|a|) without a full-size temporary."""
    flat = a.reshape(-1)
    total = 0.0
    with np.errstate(invalid="ignore", over="ignore"):  # NaN/inf are the caller's to report
        for i in range(0, flat.size, chunk):
            total += float(np.abs(flat[i:i + chunk]).sum(dtype=np.float64))
    return total / max(flat.size, 1)


def seamless_size(size: tuple[int, int], stride: int) -> tuple[int, int]:
    """``size`` rounded to multiples of the layer's ``stride``: a periodic image of that size
    meets the strided network's sampling grid the same way at its wrap-around edges as
    everywhere else (else the grid skips a phase there and a faint seam shows; see
    benchmarks/seamless.py)."""
    return tuple(max(stride, round(v / stride) * stride) for v in size)


def masked_mean_abs(a: np.ndarray, mask: np.ndarray) -> float:
    """mean(|a| * mask) / mean(mask): the mean |a| where the mask dreams, so a masked region
    takes steps as long as an unmasked dream's (the step graph computes the same)."""
    weight = float(np.mean(mask, dtype=np.float64))  # broadcast over channels: the same mean
    return float((np.abs(a) * mask).mean(dtype=np.float64)) / max(weight, 1e-12)


def dream(gm: GradientModel, rgb: np.ndarray,
          settings: DreamSettings | ResolvedSettings | None = None,
          progress: ProgressFn | None = None,
          params: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
    """DeepDream ``rgb`` (float32 HxWx3 in [0,1]); returns the dreamed image, same size.

    ``settings``: a DreamSettings (resolved here for this image and ``gm``'s model, with the
    default memory budget), or the ResolvedSettings of ``resolve(settings, H, W, gm.info,
    memory=gm.memory)`` (what the CLI and the server pass, having recorded it). A photo
    smaller than a fixed-size model's native size is dreamed at the resolved work size and
    scaled back. ``gm`` decides the objective; the settings' model and layers are not
    read here. The result is an HxWx3 view of a [3,H,W] array (``np.ascontiguousarray`` it if
    needed).

    Pass a settings with a seed for a reproducible result (``settings.with_seed()``).

    ``params``: the objective parameters of this dream (default ``gm.params``) at the image's
    resolution, e.g. another weighting of ``gm``'s terms from
    :meth:`GradientModel.params_for` (so one shared model serves every weighting unchanged) or
    :meth:`onnxdream.dream.controls.Controls.params` (a guide's features, region masks, the
    ``step_mask``); spatial ones are resized for each octave. Where the step mask is 0 the
    result keeps the photo's pixels exactly. The settings' ``keep_colors`` puts the photo's
    chroma back at the end, ``seamless`` makes the dream tile (its patterns wrap; its smaller
    octaves are then rounded to the layer's stride, see :func:`seamless_size`). A non-finite
    objective or gradient stops the dream with :class:`~onnxdream.core.errors.NonFiniteError` (never
    a black image).
    """
    if settings is None:
        settings = DreamSettings()
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise OnnxDreamError(f"expected an RGB image of shape HxWx3, got {rgb.shape}")
    if isinstance(settings, ResolvedSettings):
        if (settings.height, settings.width) != rgb.shape[:2]:
            raise OnnxDreamError(f"the settings were resolved for {settings.width}x"
                                 f"{settings.height} pixels, the image is "
                                 f"{rgb.shape[1]}x{rgb.shape[0]}")
        resolved = settings
    else:
        resolved = resolve(settings, rgb.shape[0], rgb.shape[1], getattr(gm, "info", None),
                           memory=getattr(gm, "memory", None))
    rng = np.random.default_rng(resolved.seed)
    base = np.ascontiguousarray(rgb.transpose(2, 0, 1), dtype=np.float32)
    if base is rgb or np.shares_memory(base, rgb):
        base = base.copy()
    grown = resolved.work_size != rgb.shape[:2]
    if grown:  # a fixed-size model and a smaller photo: dream at its native size
        base = _resize_chw(base, resolved.work_size)
    sizes = list(resolved.octave_sizes)
    given = gm.params if params is None else params
    wrap = bool(resolved.settings.seamless)
    if wrap:  # smaller octaves on the layer's grid, so that the network's sampling grid wraps
        sizes[1:] = [seamless_size(size, gm.tile_info.stride) for size in sizes[1:]]
    steps = resolved.steps
    total = resolved.steps_total
    done = 0
    stop = False
    detail = None
    img = base
    for octave, size in enumerate(reversed(sizes), start=1):
        last = octave == len(sizes)
        octave_base = _resize_chw(base, size, wrap)
        octave_params = params_at(given, size, wrap)
        keep = octave_params.get(STEP_MASK)
        if detail is None:
            # the last (full-size) octave may work on base itself: nothing needs it afterwards
            img = octave_base if last and not resolved.settings.keep_colors else \
                octave_base.copy()
        else:
            img = _resize_chw(detail, size, wrap)
            if keep is not None:  # the enlarged detail must not bleed into kept pixels
                img *= keep[0] > 0
            img += octave_base
            np.clip(img, 0.0, 1.0, out=img)
            detail = None

        def on_step(i: int, obj: float, octave=octave, size=size) -> bool:
            nonlocal done, stop
            done += 1
            if progress is not None:
                progress(Progress(octave, len(sizes), i + 1, steps, done, total, obj, size))
            if resolved.max_loss is not None and obj > resolved.max_loss:
                stop = True
            return stop

        if not stop:
            img = ascend(gm, img, resolved, rng, steps, on_step, octave_params)
        if not last:
            detail = img - octave_base
    if resolved.settings.keep_colors:
        from onnxdream.dream.controls import keep_colors

        img = keep_colors(img, base)
    if grown:
        img = _resize_chw(img, rgb.shape[:2])
        np.clip(img, 0.0, 1.0, out=img)
    return img.transpose(1, 2, 0)  # a view: HxWx3, no full-size copy


def steps_total(h: int, w: int, settings: DreamSettings) -> int:
    """Ascent steps of a dream of an h x w image (``resolve(...).steps_total``)."""
    return resolve(settings, h, w).steps_total


# DreamSettings, describe and octave_sizes live in onnxdream.settings.options; re-exported here
__all__ = ["DreamSettings", "Progress", "ResolvedSettings", "ascend", "describe", "dream",
           "octave_sizes", "resolve", "steps_total"]
