"""The DeepDream ascent: octaves with detail re-injection, jitter, tiles, normalised steps.

One step, in RGB pixel space scaled to [0,1] (DESIGN.md):
``x ← clip(x + step_size · g / (mean|g| + 1e-8), 0, 1)``, g the gradient over the whole image.
Jitter is a random circular shift of up to ``jitter`` pixels, undone after the step. Octaves
follow the Caffe notebook: shrink by ``octave_scale`` per octave, ascend from the smallest,
enlarge and re-inject the detail that shrinking lost.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from onnxdream.errors import OnnxDreamError
from onnxdream.gradient import GradientModel
from onnxdream.imageio import resize
from onnxdream.normalize import normalize
from onnxdream.resolve import ResolvedSettings, resolve
from onnxdream.settings import DreamSettings, describe, octave_sizes


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


def _resize_chw(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if x.shape[1:] == tuple(size):
        return x
    return np.ascontiguousarray(resize(np.moveaxis(x, 0, -1), size).transpose(2, 0, 1))


def ascend(gm: GradientModel, img: np.ndarray, settings: ResolvedSettings | DreamSettings,
           rng: np.random.Generator, steps: int,
           on_step: Callable[[int, float], bool | None] | None = None) -> np.ndarray:
    """``steps`` ascent steps on img ([3,H,W] float32 in [0,1]), in place; returns img.

    Reads ``tile_size``, ``jitter``, ``step_size`` and ``normalize`` from ``settings`` (resolved
    values; a DreamSettings is resolved here for img's size and ``gm``'s model). One gradient
    buffer is reused across steps; jitter rolls the network's view, not the image.
    """
    _, h, w = img.shape
    if isinstance(settings, DreamSettings):  # e.g. its step size may be the model's
        settings = resolve(settings, h, w, getattr(gm, "info", None))
    fits = settings.tile_size <= 0 or (h <= settings.tile_size and w <= settings.tile_size)
    if gm.session.device == "cuda" and fits and settings.normalize == "mean-abs":
        # keep the image on the GPU: the whole step runs as one graph with IO binding
        def shifts():
            while True:
                if settings.jitter:
                    yield tuple(int(v) for v in rng.integers(-settings.jitter,
                                                             settings.jitter + 1, 2))
                else:
                    yield 0, 0

        img[...] = gm.device_ascent().run(img, steps, settings.step_size, shifts(), on_step)
        return img
    grad = np.empty_like(img)
    for i in range(steps):
        if settings.jitter:
            oy, ox = (int(v) for v in rng.integers(-settings.jitter, settings.jitter + 1, 2))
        else:
            oy = ox = 0
        obj, g = gm.gradient(img, settings.tile_size, (oy, ox), out=grad)
        if settings.normalize == "mean-abs":
            g *= settings.step_size / (mean_abs(g) + 1e-8)
        else:
            g = normalize(g, settings.normalize) * settings.step_size
        img += g
        np.clip(img, 0.0, 1.0, out=img)
        if on_step is not None and on_step(i, obj):
            break
    return img


def mean_abs(a: np.ndarray, chunk: int = 1 << 20) -> float:
    """mean(|a|) without a full-size temporary."""
    flat = a.reshape(-1)
    total = 0.0
    for i in range(0, flat.size, chunk):
        total += float(np.abs(flat[i:i + chunk]).sum(dtype=np.float64))
    return total / max(flat.size, 1)


def dream(gm: GradientModel, rgb: np.ndarray,
          settings: DreamSettings | ResolvedSettings = DreamSettings(),
          progress: ProgressFn | None = None) -> np.ndarray:
    """DeepDream ``rgb`` (float32 HxWx3 in [0,1]); returns the dreamed image, same size.

    ``settings``: a DreamSettings (resolved here for this image and ``gm``'s model), or the
    ResolvedSettings of ``resolve(settings, H, W, gm.info)`` (what the CLI and the server pass,
    having recorded it). ``gm`` decides the objective; the settings' model and layers are not
    read here. The result is an HxWx3 view of a [3,H,W] array (``np.ascontiguousarray`` it if
    needed).

    Pass a settings with a seed for a reproducible result (``settings.with_seed()``).
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise OnnxDreamError(f"expected an RGB image of shape HxWx3, got {rgb.shape}")
    if isinstance(settings, ResolvedSettings):
        if (settings.height, settings.width) != rgb.shape[:2]:
            raise OnnxDreamError(f"the settings were resolved for {settings.width}x"
                                 f"{settings.height} pixels, the image is "
                                 f"{rgb.shape[1]}x{rgb.shape[0]}")
        resolved = settings
    else:
        resolved = resolve(settings, rgb.shape[0], rgb.shape[1], getattr(gm, "info", None))
    rng = np.random.default_rng(resolved.seed)
    base = np.ascontiguousarray(rgb.transpose(2, 0, 1), dtype=np.float32)
    if base is rgb or np.shares_memory(base, rgb):
        base = base.copy()
    sizes = list(resolved.octave_sizes)
    steps = resolved.steps
    total = resolved.steps_total
    done = 0
    stop = False
    detail = None
    img = base
    for octave, size in enumerate(reversed(sizes), start=1):
        last = octave == len(sizes)
        octave_base = _resize_chw(base, size)
        if detail is None:
            # the last (full-size) octave may work on base itself: nothing needs it afterwards
            img = octave_base if last else octave_base.copy()
        else:
            img = octave_base + _resize_chw(detail, size)
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
            img = ascend(gm, img, resolved, rng, steps, on_step)
        if not last:
            detail = img - octave_base
    return img.transpose(1, 2, 0)  # a view: HxWx3, no full-size copy


def steps_total(h: int, w: int, settings: DreamSettings) -> int:
    """Ascent steps of a dream of an h x w image (``resolve(...).steps_total``)."""
    return resolve(settings, h, w).steps_total


# DreamSettings, describe and octave_sizes live in onnxdream.settings; re-exported here
__all__ = ["DreamSettings", "Progress", "ResolvedSettings", "ascend", "describe", "dream",
           "octave_sizes", "resolve", "steps_total"]
