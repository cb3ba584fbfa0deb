"""What a dream is, and the only place its defaults live.

:class:`DreamSettings` is one frozen value that fully describes a dream: *what* to amplify (the
model, its layers with their weights, the objective, pre-ReLU, the border, the preset they came
from) and *how* (octaves, steps, step size, jitter, tiles, normalisation, stop rule, seed). The
CLI, the server, presets, the Python API — and batch/video jobs — all build this value, so one
default per setting, one validation, one reproducible command line (:meth:`to_argv`) and one
settings hash (via :func:`onnxdream.settings.resolve.resolve`). :class:`VisualizeSettings` is the
same for ``onnxdream visualize``.

Validation raises :class:`~onnxdream.core.errors.SettingsError` naming the *field* (``step_size``);
the CLI shows it as ``--step-size``, the server as the form field ``step_size``.

What depends on the image and the model (``octaves="auto"``, the octave sizes actually used,
the tile size under the memory budget, the step size when None) is not decided here but by
:func:`onnxdream.settings.resolve.resolve`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import numpy as np

from onnxdream.core.errors import SettingsError
from onnxdream.models.registry import DEFAULT_MODEL
from onnxdream.settings.choices import (
    INITS,
    NORMALIZERS,
    PARAMS,
    TRANSFORM_SETS,
    parse_size,
)

__all__ = ["ASCENT_FIELDS", "AUTO", "CONTROL_FIELDS", "DEFAULT_STEP_SIZE", "DreamSettings",
           "MAX_OCTAVES", "MIN_OCTAVE_SIDE", "OBJECTIVE_FIELDS", "VISUALIZE_NORMALIZERS",
           "VisualizeSettings", "describe", "octave_sizes", "random_seed", "require"]

#: The smallest side an octave may have, in pixels (smaller octaves are dropped).
MIN_OCTAVE_SIDE = 32
#: The most octaves a dream may have (``"auto"`` stops here too).
MAX_OCTAVES = 12
#: A value the resolver decides from the image and the model (``octaves``).
AUTO = "auto"

#: The step size of a dream whose settings and model name none (``DreamSettings.step_size`` is
#: None: the model's recommended step size, else this; see ``resolve.step_size_for``).
DEFAULT_STEP_SIZE = 0.006

#: DreamSettings fields that say what to amplify (a model's gradient graph depends on these).
OBJECTIVE_FIELDS = ("model", "layers", "objective", "pre_relu", "border", "preset")
#: DreamSettings fields of the ascent itself (a preset may set these; the seed is separate).
ASCENT_FIELDS = ("octaves", "octave_scale", "steps", "step_size", "jitter", "tile_size",
                 "normalize", "grad_floor", "max_loss")
#: DreamSettings fields of the creative controls (see onnxdream.dream.controls).
CONTROL_FIELDS = ("guide", "mask", "mask_layers", "feather", "keep_colors", "init", "size",
                  "seamless")

#: Gradient normalisations of ``visualize`` (the dream's are
# ``onnxdream.dream.normalize.NORMALIZERS``).
VISUALIZE_NORMALIZERS = ("none", "lapnorm")


def require(checks: Iterable[tuple[bool, str, str]]) -> None:
    """Raise SettingsError(field, reason) for the first ``(ok, field, reason)`` that fails."""
    for ok, field, reason in checks:
        if not ok:
            raise SettingsError(field, reason)


def random_seed() -> int:
    """A fresh seed in [0, 2^32), recorded so that the run can be reproduced."""
    return int(np.random.SeedSequence().generate_state(1)[0])


def describe(settings, names: Iterable[str] | None = None) -> dict[str, str]:
    """A settings dataclass (or the fields ``names`` of it) as strings, for metadata (None → "")."""
    values = asdict(settings)
    keys = list(values) if names is None else list(names)
    return {k: ("" if values[k] is None else str(values[k])) for k in keys}


def octave_sizes(h: int, w: int, octaves: int, scale: float,
                 min_side: int = MIN_OCTAVE_SIDE) -> list[tuple[int, int]]:
    """Image sizes from the largest (the input) down, each ``scale`` times smaller; stops
    before a side would be smaller than ``min_side``. The one octave rule of dream and
    visualize."""
    sizes = [(h, w)]
    for _ in range(octaves - 1):
        nh, nw = round(sizes[-1][0] / scale), round(sizes[-1][1] / scale)
        if min(nh, nw) < min_side:
            break
        sizes.append((nh, nw))
    return sizes


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


# -- dream ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DreamSettings:
    """One dream, fully described. Defaults here are THE defaults (CLI, server, presets, API).

    ``layers`` are ``NAME`` or ``NAME:WEIGHT`` specs; empty means the model's recommended
    layer(s). ``step_size`` None means the model's recommended step size, else
    :data:`DEFAULT_STEP_SIZE` (decided by :func:`onnxdream.settings.resolve.resolve`). ``preset``
    records the recipe the values came from (see :func:`onnxdream.settings.build.from_options`).

    The creative controls (:mod:`onnxdream.dream.controls`): ``guide`` an image file the dream's
    features move toward (the objective is then ``guide``); ``mask`` an image file, white where
    to dream, black where to keep the photo, grey for part, its edges feathered inward by
    ``feather`` pixels; ``mask_layers`` one image file per layer saying where it dreams (one
    file for two layers: white the first, black the second); ``keep_colors`` the dream changes
    luminance only; ``init`` ``"noise"`` or ``"grey"`` to dream without a photo, ``size``
    (width, height) its size; ``seamless`` a tileable result.
    """

    # what to amplify
    model: str = DEFAULT_MODEL
    layers: tuple[str, ...] = ()
    objective: str = "mean"
    pre_relu: bool = False
    border: int = 0
    preset: str | None = None
    # how
    octaves: int | str = AUTO  # "auto": from the image and the model's native size (resolve)
    octave_scale: float = 1.4
    steps: int = 10
    step_size: float | None = None  # None: the model's recommendation, else 0.006
    jitter: int = 32
    tile_size: int = 1024  # the largest tile side; the memory budget may shrink it (resolve)
    seed: int | None = None
    normalize: str = "mean-abs"
    #: None: the normaliser divides by size + 1e-8; F: by max(size, F) (onnxdream.dream.normalize)
    grad_floor: float | None = None
    max_loss: float | None = None
    # creative controls
    guide: str | None = None
    mask: str | None = None
    mask_layers: tuple[str, ...] = ()
    feather: int = 8
    keep_colors: bool = False
    init: str | None = None
    size: tuple[int, int] | None = None
    seamless: bool = False

    def __post_init__(self):
        if isinstance(self.octaves, str):  # "auto", or a number from a form or a flag
            text = self.octaves.strip().lower()
            object.__setattr__(self, "octaves", int(text) if text.isdigit() else text)
        for name in ("layers", "mask_layers"):
            value = getattr(self, name)
            if isinstance(value, str):
                object.__setattr__(self, name, (value,))
            elif not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(value))
        if isinstance(self.size, str):
            object.__setattr__(self, "size", parse_size(self.size))
        elif self.size is not None and not isinstance(self.size, tuple):
            object.__setattr__(self, "size", tuple(self.size))
        if self.guide and self.objective == "mean":  # a guided dream's objective is the guide
            object.__setattr__(self, "objective", "guide")

    def validate(self) -> DreamSettings:
        """This value, if every field is in range; SettingsError naming the first that is not."""
        require([
            (isinstance(self.model, str) and bool(self.model.strip()), "model",
             "must name a zoo model or a dreamable .onnx file"),
            (all(isinstance(s, str) and s.strip() for s in self.layers), "layers",
             "must be layer names (NAME or NAME:WEIGHT), none empty"),
            (isinstance(self.objective, str) and bool(self.objective.strip()), "objective",
             "must be mean, l2, channel:K, neuron:K or class:K"),
            (_is_int(self.border) and self.border >= 0, "border",
             "must be an integer >= 0"),
            (self.octaves == AUTO or (_is_int(self.octaves) and 1 <= self.octaves <= MAX_OCTAVES),
             "octaves", f"must be auto or between 1 and {MAX_OCTAVES}"),
            (_is_number(self.octave_scale) and 1.0 < self.octave_scale <= 4.0, "octave_scale",
             "must be > 1 and <= 4"),
            (_is_int(self.steps) and 1 <= self.steps <= 10_000, "steps",
             "must be between 1 and 10000"),
            (self.step_size is None or (_is_number(self.step_size)
                                        and 0.0 < self.step_size <= 10.0), "step_size",
             "must be > 0 and <= 10"),
            (_is_int(self.jitter) and 0 <= self.jitter <= 4096, "jitter",
             "must be between 0 and 4096 pixels"),
            (_is_int(self.tile_size) and (self.tile_size == 0 or 64 <= self.tile_size <= 8192),
             "tile_size", "must be 0 (as large as memory allows) or between 64 and 8192 pixels"),
            (self.normalize in NORMALIZERS, "normalize",
             f"must be one of {', '.join(NORMALIZERS)}"),
            (self.grad_floor is None or (_is_number(self.grad_floor)
                                         and math.isfinite(self.grad_floor)
                                         and self.grad_floor > 0.0), "grad_floor",
             "must be a finite number > 0"),
            (self.max_loss is None or (_is_number(self.max_loss)
                                       and math.isfinite(self.max_loss)), "max_loss",
             "must be a finite number"),
            (self.seed is None or (_is_int(self.seed) and 0 <= self.seed < 2**32), "seed",
             "must be between 0 and 2^32-1"),
        ])
        self._validate_controls()
        return self

    def _validate_controls(self) -> None:
        guided = self.objective.strip() == "guide"
        require([
            (self.guide is None or (isinstance(self.guide, str) and bool(self.guide.strip())),
             "guide", "must name an image file"),
            (not guided or bool(self.guide), "guide",
             "is needed: the objective guide dreams toward an image"),
            (not self.guide or guided, "objective",
             "must be guide (or left out) in a guided dream"),
            (self.mask is None or (isinstance(self.mask, str) and bool(self.mask.strip())),
             "mask", "must name an image file"),
            (all(isinstance(m, str) and m.strip() for m in self.mask_layers), "mask_layers",
             "must name image files"),
            (len(self.mask_layers) <= 16, "mask_layers", "takes at most 16 masks"),
            (_is_int(self.feather) and 0 <= self.feather <= 1024, "feather",
             "must be between 0 and 1024 pixels"),
            (isinstance(self.keep_colors, bool), "keep_colors", "must be true or false"),
            (isinstance(self.seamless, bool), "seamless", "must be true or false"),
            (self.init is None or self.init in INITS, "init",
             f"must be {' or '.join(INITS)} (or a photo)"),
            (self.size is None or (len(self.size) == 2 and all(
                _is_int(v) and 32 <= v <= 8192 for v in self.size)), "size",
             "must be WIDTHxHEIGHT, each between 32 and 8192 pixels"),
            (self.size is None or self.init is not None, "size",
             "applies to a dream from noise or grey (init); a photo has its own size"),
        ])

    def with_seed(self) -> DreamSettings:
        """A copy whose seed is fixed (drawn at random when none was given)."""
        if self.seed is not None:
            return self
        return replace(self, seed=random_seed())

    def gradient_key(self) -> tuple:
        """What the compiled gradient graph depends on: (model, layers, objective, pre_relu,
        border). Two dreams with the same key share one GradientModel."""
        return (self.model, tuple(self.layers), self.objective, bool(self.pre_relu),
                int(self.border))

    def to_argv(self, image: str = "IMAGE", output: str | None = None) -> list[str]:
        """The ``onnxdream dream`` command line (without ``onnxdream``) that makes this dream.

        Every value is spelled out (no preset), so the command reproduces the dream even when
        defaults change. Give concrete ``layers`` and ``step_size`` (not the model's
        recommendations) for a command that does not depend on the model's metadata either, and
        concrete octaves and tile size (``ResolvedSettings.concrete()``) for one that does not
        depend on the resolver's rules or the machine's memory.
        """
        argv = ["dream"] + ([str(image)] if self.init is None else [])
        argv += ["-o", str(output)] if output is not None else []
        argv += ["--model", self.model]
        argv += [a for spec in self.layers for a in ("--layer", spec)]
        argv += ["--objective", self.objective, "--octaves", str(self.octaves),
                 "--octave-scale", str(self.octave_scale), "--steps", str(self.steps)]
        argv += ["--step-size", str(self.step_size)] if self.step_size is not None else []
        argv += ["--jitter", str(self.jitter), "--tile-size", str(self.tile_size),
                 "--normalize", self.normalize]
        argv += ["--seed", str(self.seed)] if self.seed is not None else []
        argv += ["--pre-relu"] if self.pre_relu else []
        argv += ["--border", str(self.border)] if self.border else []
        argv += ["--grad-floor", str(self.grad_floor)] if self.grad_floor is not None else []
        argv += ["--max-loss", str(self.max_loss)] if self.max_loss is not None else []
        return argv + self.control_argv()

    def control_argv(self) -> list[str]:
        """The creative controls' part of :meth:`to_argv` (empty when none is used)."""
        argv = ["--guide", self.guide] if self.guide else []
        argv += ["--mask", self.mask] if self.mask else []
        argv += [a for m in self.mask_layers for a in ("--mask-layers", m)]
        if (self.mask or self.mask_layers) and self.feather != DreamSettings.feather:
            argv += ["--feather", str(self.feather)]
        argv += ["--keep-colors"] if self.keep_colors else []
        if self.init is not None:
            argv += ["--init", self.init]
            argv += ["--size", f"{self.size[0]}x{self.size[1]}"] if self.size else []
        argv += ["--seamless"] if self.seamless else []
        return argv

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))



# -- visualize --------------------------------------------------------------------------------


@dataclass(frozen=True)
class VisualizeSettings:
    """How ``visualize`` renders (the model and the targets are given beside it)."""

    size: int = 224
    steps: int = 128
    lr: float = 0.05
    param: str = "fft"
    decorrelate: bool = True
    transforms: str = "standard"
    octaves: int = 2
    octave_scale: float = 1.4
    tv: float = 0.0
    normalize: str = "none"
    pre_relu: bool = True
    seed: int | None = None

    def validate(self) -> VisualizeSettings:
        require([
            (_is_int(self.size) and 32 <= self.size <= 2048, "size",
             "must be between 32 and 2048 pixels"),
            (_is_int(self.steps) and 1 <= self.steps <= 100_000, "steps",
             "must be between 1 and 100000"),
            (_is_number(self.lr) and 0.0 < self.lr <= 10.0, "lr", "must be > 0 and <= 10"),
            (self.param in PARAMS, "param", f"must be one of {', '.join(PARAMS)}"),
            (self.transforms in TRANSFORM_SETS, "transforms",
             f"must be one of {', '.join(TRANSFORM_SETS)}"),
            (_is_int(self.octaves) and 1 <= self.octaves <= 8, "octaves",
             "must be between 1 and 8"),
            (_is_number(self.octave_scale) and 1.0 < self.octave_scale <= 4.0, "octave_scale",
             "must be > 1 and <= 4"),
            (_is_number(self.tv) and self.tv >= 0.0 and math.isfinite(self.tv), "tv",
             "must be a number >= 0"),
            (self.normalize in VISUALIZE_NORMALIZERS, "normalize",
             f"must be one of {', '.join(VISUALIZE_NORMALIZERS)}"),
            (self.seed is None or (_is_int(self.seed) and 0 <= self.seed < 2**32), "seed",
             "must be between 0 and 2^32-1"),
        ])
        return self

    def with_seed(self) -> VisualizeSettings:
        if self.seed is not None:
            return self
        return replace(self, seed=random_seed())

    def octave_sizes(self) -> list[int]:
        """Sizes from the smallest up; the last is ``size``."""
        return [h for h, _ in reversed(octave_sizes(self.size, self.size, self.octaves,
                                                    self.octave_scale))]

    def octave_steps(self) -> list[int]:
        """Steps per octave: equal shares of ``steps``, the remainder to the last."""
        n = len(self.octave_sizes())
        base = self.steps // n
        return [base] * (n - 1) + [self.steps - base * (n - 1)]

    def to_argv(self, *, model: str, targets: Iterable[Any] = (), output: str | None = None,
                grid: bool = False) -> list[str]:
        """The ``onnxdream visualize`` command line (without ``onnxdream``) for these settings
        and ``targets`` (``visualize.Target``: kind class, channel or layer)."""
        targets = list(targets)
        argv = ["visualize"] + (["-o", str(output)] if output is not None else [])
        argv += ["--model", model]
        classes = [str(t.index) for t in targets if t.kind == "class"]
        argv += ["--class", ",".join(classes)] if classes else []
        argv += [a for t in targets if t.kind == "channel"
                 for a in ("--channel", f"{t.layer}:{t.index}")]
        argv += [a for t in targets if t.kind == "layer" for a in ("--layer", t.layer)]
        argv += ["--size", str(self.size), "--steps", str(self.steps)]
        argv += ["--seed", str(self.seed)] if self.seed is not None else []
        argv += ["--param", self.param, "--transforms", self.transforms,
                 "--octaves", str(self.octaves), "--octave-scale", str(self.octave_scale),
                 "--tv", str(self.tv), "--normalize", self.normalize, "--lr", str(self.lr),
                 "--decorrelate" if self.decorrelate else "--no-decorrelate",
                 "--pre-relu" if self.pre_relu else "--post-relu"]
        argv += ["--grid"] if grid else []
        return argv

