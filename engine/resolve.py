"""The resolver: a dream's settings + the image size + the model → the concrete values it runs with.

:class:`~onnxdream.settings.DreamSettings` says what the user asked for; some of it only becomes
a number once the image and the model are known: the octave sizes (and so how many octaves fit),
the tile size, the jitter in pixels, the step size. :func:`resolve` decides those in one place,
and its result, :class:`ResolvedSettings`, is what the ascent runs, what the PNG provenance
records (:meth:`ResolvedSettings.to_metadata`) and what batch/video key their work on
(:meth:`ResolvedSettings.digest`).

Today it reproduces the fixed rules: octaves shrink by ``octave_scale`` from the image size down
to :data:`~onnxdream.settings.MIN_OCTAVE_SIDE`, tiles are ``tile_size`` as given, jitter and
step size as given. The model is already an input so that ``octaves="auto"`` (from the model's
native size) and a memory budget for the tile size can be decided here.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Protocol

from onnxdream.settings import DEFAULT_STEP_SIZE, DreamSettings, octave_sizes

__all__ = ["ModelGeometry", "ResolvedSettings", "resolve", "step_size_for"]


class ModelGeometry(Protocol):
    """What the resolver needs to know about a model (``contract.ModelInfo`` provides it)."""

    native_size: tuple[int, int]  # (height, width) the model was trained at
    dynamic_hw: bool  # whether its input accepts any height and width
    # (optional) step_size: float | None, the model's recommended step size


@dataclass(frozen=True)
class ResolvedSettings:
    """A dream's settings made concrete for one image size and model.

    ``octave_sizes`` run from the largest (the image, ``(height, width)``) down; the ascent
    works through them smallest first. The ascent reads ``tile_size``, ``jitter``,
    ``step_size`` and ``normalize`` from here (never from the settings directly).
    """

    settings: DreamSettings
    height: int
    width: int
    octave_sizes: tuple[tuple[int, int], ...]
    tile_size: int
    jitter: int
    step_size: float

    # the settings that need no resolving, for the ascent's convenience
    @property
    def octaves(self) -> int:
        """How many octaves run (fewer than asked when the image is small)."""
        return len(self.octave_sizes)

    @property
    def steps(self) -> int:
        return self.settings.steps

    @property
    def normalize(self) -> str:
        return self.settings.normalize

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
                "tile_size": self.tile_size, "jitter": self.jitter, "step_size": self.step_size}

    def to_metadata(self) -> dict[str, str]:
        """Provenance keys for the resolved values (the requested ones are recorded apart)."""
        return {"onnxdream:resolved": json.dumps(self.values(), sort_keys=True)}

    def digest(self) -> str:
        """A hex SHA-256 of everything that decides the result: the settings (seed included),
        the image size and the resolved values. Equal digests, equal dreams of the same input
        with the same model file (batch/video mix in the model file's identity themselves)."""
        settings = asdict(self.settings)
        settings["layers"] = list(settings["layers"])
        blob = json.dumps({"settings": settings, "size": [self.height, self.width],
                           "resolved": self.values()}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def step_size_for(settings: DreamSettings, model: ModelGeometry | None = None) -> float:
    """The step size a dream runs with: the settings', else the model's recommendation
    (``onnxdream.step_size`` in its metadata, see the contract), else ``DEFAULT_STEP_SIZE``."""
    if settings.step_size is not None:
        return float(settings.step_size)
    recommended = getattr(model, "step_size", None)
    return float(recommended) if recommended is not None else DEFAULT_STEP_SIZE


def resolve(settings: DreamSettings, height: int, width: int,
            model: ModelGeometry | None = None) -> ResolvedSettings:
    """The concrete values for dreaming an image of ``height`` x ``width`` with ``model``.

    Validates ``settings`` first (SettingsError). ``model`` may be None where it is not known
    (then nothing that depends on it can be decided from it).
    """
    settings.validate()
    sizes = octave_sizes(int(height), int(width), settings.octaves, settings.octave_scale)
    return ResolvedSettings(settings=settings, height=int(height), width=int(width),
                            octave_sizes=tuple(sizes), tile_size=settings.tile_size,
                            jitter=settings.jitter, step_size=step_size_for(settings, model))
