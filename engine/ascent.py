"""The DeepDream ascent: octaves with detail re-injection, jitter, tiles, normalised steps.

One step, in RGB pixel space scaled to [0,1] (DESIGN.md):
``x ← clip(x + step_size · g / (mean|g| + 1e-8), 0, 1)``, g the gradient over the whole image.
Jitter is a random circular shift of up to ``jitter`` pixels, undone after the step. Octaves
follow the Caffe notebook: shrink by ``octave_scale`` per octave, ascend from the smallest,
enlarge and re-inject the detail that shrinking lost.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from onnxdream.errors import OnnxDreamError
from onnxdream.gradient import GradientModel
from onnxdream.imageio import resize
from onnxdream.normalize import NORMALIZERS, normalize
from onnxdream.settings import describe, random_seed, require

MIN_OCTAVE_SIDE = 32


@dataclass(frozen=True)
class DreamSettings:
    octaves: int = 4
    octave_scale: float = 1.4
    steps: int = 10
    step_size: float = 0.01
    jitter: int = 32
    tile_size: int = 512
    seed: int | None = None
    normalize: str = "mean-abs"
    max_loss: float | None = None

    def validate(self) -> "DreamSettings":
        checks = [
            (1 <= self.octaves <= 12, "--octaves must be between 1 and 12"),
            (1.0 < self.octave_scale <= 4.0, "--octave-scale must be > 1 and <= 4"),
            (1 <= self.steps <= 10_000, "--steps must be between 1 and 10000"),
            (0.0 < self.step_size <= 10.0, "--step-size must be > 0 and <= 10"),
            (0 <= self.jitter <= 4096, "--jitter must be between 0 and 4096 pixels"),
            (self.tile_size == 0 or 64 <= self.tile_size <= 8192,
             "--tile-size must be 0 (no tiles) or between 64 and 8192 pixels"),
            (self.normalize in NORMALIZERS,
             f"--normalize must be one of {', '.join(NORMALIZERS)}"),
            (self.seed is None or 0 <= self.seed < 2**32, "--seed must be between 0 and 2^32-1"),
        ]
        require(checks)
        return self

    def with_seed(self) -> "DreamSettings":
        """A copy whose seed is fixed (drawn at random when none was given)."""
        if self.seed is not None:
            return self
        return replace(self, seed=random_seed())


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


def octave_sizes(h: int, w: int, octaves: int, scale: float) -> list[tuple[int, int]]:
    """Image sizes from the largest (the input) down; stops before a side gets too small."""
    sizes = [(h, w)]
    for _ in range(octaves - 1):
        nh, nw = round(sizes[-1][0] / scale), round(sizes[-1][1] / scale)
        if min(nh, nw) < MIN_OCTAVE_SIDE:
            break
        sizes.append((nh, nw))
    return sizes


def _resize_chw(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if x.shape[1:] == tuple(size):
        return x
    return np.ascontiguousarray(resize(np.moveaxis(x, 0, -1), size).transpose(2, 0, 1))


def ascend(gm: GradientModel, img: np.ndarray, settings: DreamSettings, rng: np.random.Generator,
           steps: int, on_step: Callable[[int, float], bool | None] | None = None) -> np.ndarray:
    """``steps`` ascent steps on img ([3,H,W] float32 in [0,1]), in place; returns img.

    One gradient buffer is reused across steps; jitter rolls the network's view, not the image.
    """
    _, h, w = img.shape
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


def dream(gm: GradientModel, rgb: np.ndarray, settings: DreamSettings = DreamSettings(),
          progress: ProgressFn | None = None) -> np.ndarray:
    """DeepDream ``rgb`` (float32 HxWx3 in [0,1]); returns the dreamed image, same size.

    The result is an HxWx3 view of a [3,H,W] array (``np.ascontiguousarray`` it if needed).

    Pass a settings with a seed for a reproducible result (``settings.with_seed()``).
    """
    settings.validate()
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise OnnxDreamError(f"expected an RGB image of shape HxWx3, got {rgb.shape}")
    rng = np.random.default_rng(settings.seed)
    base = np.ascontiguousarray(rgb.transpose(2, 0, 1), dtype=np.float32)
    if base is rgb or np.shares_memory(base, rgb):
        base = base.copy()
    sizes = octave_sizes(base.shape[1], base.shape[2], settings.octaves, settings.octave_scale)
    total = len(sizes) * settings.steps
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
                progress(Progress(octave, len(sizes), i + 1, settings.steps, done, total, obj, size))
            if settings.max_loss is not None and obj > settings.max_loss:
                stop = True
            return stop

        if not stop:
            img = ascend(gm, img, settings, rng, settings.steps, on_step)
        if not last:
            detail = img - octave_base
    return img.transpose(1, 2, 0)  # a view: HxWx3, no full-size copy


def steps_total(h: int, w: int, settings: DreamSettings) -> int:
    return len(octave_sizes(h, w, settings.octaves, settings.octave_scale)) * settings.steps


__all__ = ["DreamSettings", "Progress", "ascend", "describe", "dream", "octave_sizes",
           "steps_total"]
