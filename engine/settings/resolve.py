"""The resolver: a dream's settings + the image size + the model → the concrete values it runs with.

:class:`~onnxdream.settings.options.DreamSettings` says what the user asked for; some of it only
becomes a number once the image and the model are known. :func:`resolve` decides those in one place,
and its result, :class:`ResolvedSettings`, is what the ascent runs, what the PNG provenance
records (:func:`onnxdream.settings.provenance.resolved_metadata`,
:meth:`ResolvedSettings.concrete`) and what batch/video key their work on
(:meth:`ResolvedSettings.digest`).

The rules (the model's native size and fixed/dynamic H/W come from the model contract,
:class:`~onnxdream.exporters.graph.contract.ModelInfo`):

- **Octaves.** A network's features have a fixed size in pixels, so what matters is how far the
  smallest octave is from the size the network was trained at. ``octaves="auto"`` (the default)
  takes as many octaves as bring the smallest one down to the native size: the smallest has its
  shorter side (relative to the native size) in ``(native / octave_scale, native]``, so with a
  224-px model and octave_scale 1.4 a 512-px photo gets 4 octaves, 2048 px 8 and 4096 px 10;
  at least 3 (:data:`MIN_AUTO_OCTAVES`), at most 12 (:func:`auto_octaves`). ``octaves=N`` is
  taken as given. Either way no octave is smaller than
  :data:`~onnxdream.settings.options.MIN_OCTAVE_SIDE`.
- **Fixed-size models** (``dynamic_hw`` false) run only at their native size: every octave
  stays at or above it on both sides (``auto`` then stops one octave earlier than for a dynamic
  model), and the gradient is taken in tiles of exactly the native size (the last row and
  column of tiles shift inward). A photo smaller than the native size on either side is dreamed
  at the smallest size that covers it (same aspect) and scaled back: the network cannot see a
  smaller image, and refusing would make every thumbnail unusable with such a model.
- **Tiles and memory.** ``tile_size`` is the largest tile side wanted (``0``: as large as
  fits); the tile actually used is the largest, up to that, whose estimated peak memory (see
  :mod:`onnxdream.settings.memory`) fits the budget. When nothing fits, :class:`MemoryBudgetError`.
- **Jitter** and **step size** are in the octave's own pixels and per-pixel units, which is the
  scale the network sees at every octave, so they do not scale with the image (measured with
  them fixed: the change at a 256-px view is 1.0-1.31x the 512-px dream's from 256 to 4096 px,
  where 4 fixed octaves gave 0.65x at 2048 px; benchmarks/README.md).
  A step size of None is the model's recommendation (:func:`step_size_for`).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, replace
from typing import Protocol

from onnxdream.settings.memory import (
    MB,
    MemoryBudgetError,
    MemoryEstimate,
    MemoryProfile,
    default_budget_mb,
    estimate,
)
from onnxdream.settings.options import (
    ASCENT_FIELDS,
    AUTO,
    DEFAULT_STEP_SIZE,
    MAX_OCTAVES,
    DreamSettings,
    octave_sizes,
)

__all__ = ["BATCH_PIXELS", "MIN_AUTO_OCTAVES", "MIN_TILE", "MemoryBudgetError", "ModelGeometry",
           "ResolvedSettings", "auto_octaves", "resolve", "step_size_for"]

#: The fewest octaves "auto" takes for a dynamic model (where the image is large enough):
#: measured on a 256-px photo, 2 octaves change it 0.82x as much as a 512-px photo's 4; 3, 1.0x.
MIN_AUTO_OCTAVES = 3
#: The default native size when no model is known (the contract's default).
DEFAULT_NATIVE = (224, 224)
#: Tiles of one shape run in batches of up to this many pixels (fewer when memory is short).
BATCH_PIXELS = 512 * 512
#: The smallest tile side the memory budget may shrink a tile to (dynamic models), and the
#: largest tile (``tile_size``'s own range, so that a resolved tile is a valid ``--tile-size``).
MIN_TILE = 64
MAX_TILE = 8192
#: Tile sides are tried in multiples of this.
TILE_GRAIN = 32


class ModelGeometry(Protocol):
    """What the resolver needs to know about a model (``contract.ModelInfo`` provides it)."""

    native_size: tuple[int, int]  # (height, width) the model was trained at
    dynamic_hw: bool  # whether its input accepts any height and width
    # (optional) step_size: float | None, the model's recommended step size


@dataclass(frozen=True)
class ResolvedSettings:
    """A dream's settings made concrete for one image size and model.

    ``octave_sizes`` run from the largest down; the ascent works through them smallest first.
    The largest is the image's own size, except for a fixed-size model and a photo smaller
    than its native size (:attr:`work_size`). ``tile`` is the tile (h, w) the gradient is taken
    in, ``(0, 0)`` for none (each octave in one run); ``batch_pixels`` bounds a batch of tiles.
    The ascent reads ``tile``, ``jitter``, ``step_size``, ``normalize`` and ``grad_floor`` from
    here (never from the settings directly).
    """

    settings: DreamSettings
    height: int
    width: int
    octave_sizes: tuple[tuple[int, int], ...]
    tile: tuple[int, int]
    jitter: int
    step_size: float
    batch_pixels: int = BATCH_PIXELS
    memory: MemoryEstimate | None = None  # the estimate the tile was chosen with

    # the settings that need no resolving, for the ascent's convenience
    @property
    def octaves(self) -> int:
        """How many octaves run (fewer than asked when the image is small)."""
        return len(self.octave_sizes)

    @property
    def work_size(self) -> tuple[int, int]:
        """The size the last octave is dreamed at (the image's, unless it had to grow)."""
        return self.octave_sizes[0]

    @property
    def tile_size(self) -> int:
        """The tile's larger side; 0 when the gradient runs untiled."""
        return max(self.tile)

    @property
    def steps(self) -> int:
        return self.settings.steps

    @property
    def normalize(self) -> str:
        return self.settings.normalize

    @property
    def grad_floor(self) -> float | None:
        return self.settings.grad_floor

    @property
    def max_loss(self) -> float | None:
        return self.settings.max_loss

    @property
    def seed(self) -> int | None:
        return self.settings.seed

    @property
    def steps_total(self) -> int:
        """Ascent steps over all octaves (for progress bars and step limits)."""
        return self.octaves * self.settings.steps

    def values(self) -> dict:
        """The resolved values, as plain data."""
        return {"octaves": self.octaves, "octave_sizes": [list(s) for s in self.octave_sizes],
                "tile_size": self.tile_size, "tile": list(self.tile),
                "batch_pixels": self.batch_pixels, "jitter": self.jitter,
                "step_size": self.step_size}

    def requested(self) -> dict:
        """The ascent settings as asked for (``octaves: "auto"``, ``tile_size: 0``, …)."""
        return {k: getattr(self.settings, k) for k in ASCENT_FIELDS}

    def concrete(self) -> DreamSettings:
        """The settings with the resolved values in place of "auto" and the budget's tile: its
        ``to_argv()`` makes the same dream of the same image even where the rules or the
        memory differ."""
        tile = self.tile_size if self.tile_size else self.settings.tile_size
        return replace(self.settings, octaves=self.octaves, tile_size=tile,
                       jitter=self.jitter, step_size=self.step_size)

    def digest(self) -> str:
        """A hex SHA-256 of everything that decides the result: the settings (seed included),
        the image size and the resolved values. Equal digests, equal dreams of the same input
        with the same model file (batch/video mix in the model file's identity themselves)."""
        settings = asdict(self.settings)
        settings["layers"] = list(settings["layers"])
        blob = json.dumps({"settings": settings, "size": [self.height, self.width],
                           "resolved": self.values()}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()


# -- the rules ----------------------------------------------------------------------------------


def auto_octaves(height: int, width: int, native: tuple[int, int], scale: float, *,
                 fixed: bool = False) -> int:
    """How many octaves ``octaves="auto"`` takes for an image of ``height`` x ``width``.

    With ``r`` how many times the image is larger than the native size (the smaller of the two
    sides' ratios): ``1 + ceil(log_scale r)``, so that the smallest octave is at most native and
    more than native / scale, and at least :data:`MIN_AUTO_OCTAVES` (a small photo then still
    gets a visible dream). A fixed-size model gets ``1 + floor(log_scale r)``: no octave below
    native. At most :data:`~onnxdream.settings.options.MAX_OCTAVES`.
    """
    r = min(height / native[0], width / native[1])
    x = math.log(r) / math.log(scale) if r > 1.0 else 0.0
    if fixed:
        return max(1, min(MAX_OCTAVES, 1 + math.floor(x + 1e-9)))
    return max(MIN_AUTO_OCTAVES, min(MAX_OCTAVES, 1 + math.ceil(x - 1e-9)))


def step_size_for(settings: DreamSettings, model: ModelGeometry | None = None) -> float:
    """The step size a dream runs with: the settings', else the model's recommendation
    (``onnxdream.step_size`` in its metadata, see the contract), else ``DEFAULT_STEP_SIZE``."""
    if settings.step_size is not None:
        return float(settings.step_size)
    recommended = getattr(model, "step_size", None)
    return float(recommended) if recommended is not None else DEFAULT_STEP_SIZE


def _work_size(height: int, width: int, native: tuple[int, int], fixed: bool) -> tuple[int, int]:
    """The size to dream at: the image's, grown to cover the native size of a fixed model."""
    if not fixed or (height >= native[0] and width >= native[1]):
        return height, width
    s = max(native[0] / height, native[1] / width)
    return max(native[0], math.ceil(height * s - 1e-6)), max(native[1], math.ceil(width * s - 1e-6))


def _octave_sizes(settings: DreamSettings, work: tuple[int, int], native: tuple[int, int],
                  fixed: bool) -> list[tuple[int, int]]:
    h, w = work
    if settings.octaves == AUTO:
        n = auto_octaves(h, w, native, settings.octave_scale, fixed=fixed)
    else:
        n = int(settings.octaves)
    sizes = octave_sizes(h, w, n, settings.octave_scale)
    if fixed:  # no octave below the native size (the first always covers it)
        sizes = [sizes[0]] + [s for s in sizes[1:] if s[0] >= native[0] and s[1] >= native[1]]
    return sizes


def _run_pixels(tile: tuple[int, int], work: tuple[int, int], batch: int) -> int:
    """Pixels of the largest run: the whole image untiled, else a batch of tiles."""
    if tile == (0, 0):
        return work[0] * work[1]
    px = tile[0] * tile[1]
    return max(px, batch // px * px)


def _candidates(settings: DreamSettings, work: tuple[int, int], native: tuple[int, int],
                fixed: bool) -> list[tuple[int, int]]:
    """The tiles to try, largest first; ``(0, 0)`` is none (the whole image in one run)."""
    h, w = work
    if fixed:
        return [(0, 0)] if (h, w) == tuple(native) else [tuple(native)]
    longest = max(h, w)
    want = settings.tile_size or longest  # 0: as large as fits
    out = [(0, 0)] if want >= longest else []
    top = min(want, longest - 1, MAX_TILE)
    sides = [top] + list(range(top // TILE_GRAIN * TILE_GRAIN, MIN_TILE - 1, -TILE_GRAIN))
    for s in sides:
        if s >= MIN_TILE and (min(s, h), min(s, w)) not in out:
            out.append((min(s, h), min(s, w)))
    return out or [(0, 0)]


def _choose_tile(settings: DreamSettings, work: tuple[int, int], native: tuple[int, int],
                 fixed: bool, memory: MemoryProfile | None, budget: int | None
                 ) -> tuple[tuple[int, int], int, MemoryEstimate | None]:
    """(tile, batch pixels, estimate): the largest tile whose estimate fits the budget."""
    candidates = _candidates(settings, work, native, fixed)
    if memory is None:
        return candidates[0], BATCH_PIXELS, None
    best = None
    for tile in candidates:
        for batch in (BATCH_PIXELS, 1):  # a batch of tiles, else one tile a run
            est = estimate(memory, work, _run_pixels(tile, work, batch), budget,
                           tiled=tile != (0, 0))
            if best is None or est.total < best[1].total:
                best = (tile, est)
            if est.fits:
                return tile, max(batch, tile[0] * tile[1]), est
    tile, smallest = best
    h, w = work
    if tile == (0, 0):
        how = "in one run"
    elif fixed:
        how = f"in {tile[1]}x{tile[0]}-pixel tiles (the model's fixed input size)"
    else:
        how = f"even in {tile[1]}x{tile[0]}-pixel tiles"
    raise MemoryBudgetError(
        f"a {w}x{h} dream with {settings.model} needs about {smallest.describe()} {how}, "
        f"more than the memory budget of {budget // MB} MB", needed=smallest.total,
        budget=budget)


def resolve(settings: DreamSettings, height: int, width: int,
            model: ModelGeometry | None = None, *, memory: MemoryProfile | None = None,
            budget_mb: int | None = None) -> ResolvedSettings:
    """The concrete values for dreaming an image of ``height`` x ``width`` with ``model``.

    Validates ``settings`` first (SettingsError). ``model`` may be None where it is not known
    (then the contract's default native size, any H/W). ``memory`` is the compiled graph's
    :class:`~onnxdream.settings.memory.MemoryProfile` (``GradientModel.memory``): with it the tile
    is the largest that fits ``budget_mb`` (default
    :func:`~onnxdream.settings.memory.default_budget_mb`), and
    :class:`~onnxdream.settings.memory.MemoryBudgetError` says why when none does; without it the
    tile is ``tile_size`` as given (0: untiled).
    """
    settings.validate()
    height, width = int(height), int(width)
    native = tuple(getattr(model, "native_size", None) or DEFAULT_NATIVE)
    fixed = model is not None and not getattr(model, "dynamic_hw", True)
    work = _work_size(height, width, native, fixed)
    sizes = _octave_sizes(settings, work, native, fixed)
    budget = None
    if memory is not None:
        budget = int((budget_mb if budget_mb is not None else default_budget_mb()) * MB)
    tile, batch, est = _choose_tile(settings, work, native, fixed, memory, budget)
    return ResolvedSettings(settings=settings, height=height, width=width,
                            octave_sizes=tuple(sizes), tile=tile, jitter=settings.jitter,
                            step_size=step_size_for(settings, model), batch_pixels=batch,
                            memory=est)
