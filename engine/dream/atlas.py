"""The layer atlas: what each layer of a model dreams, side by side.

Choosing a layer is the most important creative decision of a dream, and a layer's name says
nothing about what it dreams. An atlas shows it: the same picture (a photo, grey noise, or the
bundled example :data:`EXAMPLE`) centre-cropped to a square ``cell`` pixels wide and dreamed at
each of the model's recommended layers (``onnxdream.recommended_layers``, see the contract), or
at every layer, one cell per layer with the same settings and seed, into a labelled grid
(:func:`onnxdream.dream.visualize.grid`). :func:`channel_atlas` shows one layer's channels the
feature-visualisation way instead (:func:`onnxdream.dream.visualize.render`).

``onnxdream atlas`` (:mod:`onnxdream.cli.atlas`) and the server's layer thumbnails
(:mod:`onnxdream.jobs.atlas_cache`) are built on :func:`dream_atlas`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from onnxdream.core.errors import LayerError, ObjectiveError
from onnxdream.core.static import STATIC
from onnxdream.media.imageio import resize
from onnxdream.settings.options import DreamSettings, VisualizeSettings

__all__ = ["DEFAULT_CELL", "DEFAULT_COUNT", "EXAMPLE", "INITS", "MAX_CELLS", "AtlasProgress",
           "atlas_layers", "channel_atlas", "dream_atlas", "feature_layers", "noise",
           "start_image", "square"]

#: The picture an atlas dreams on when none is given (the cat of examples/chelsea.png).
EXAMPLE = STATIC / "chelsea.jpg"
#: Side of one cell in pixels, unless told otherwise.
DEFAULT_CELL = 256
#: Channels shown by :func:`channel_atlas` unless told otherwise.
DEFAULT_COUNT = 16
#: The most cells (layers or channels) one atlas has.
MAX_CELLS = 64
#: What a cell starts from: the photo, or grey noise.
INITS = ("photo", "noise")
# channels rendered in one batch at most (x cell^2 pixels): bounds visualize's memory
_CHANNEL_BATCH = 8


@dataclass(frozen=True)
class AtlasProgress:
    """Where an atlas is: ``cell`` of ``cells`` (1-based, at ``layer``), ``done`` of ``total``
    ascent steps over all cells."""

    cell: int
    cells: int
    layer: str
    done: int
    total: int
    objective: float


ProgressFn = Callable[[AtlasProgress], None]


# -- the picture ------------------------------------------------------------------------------


def square(rgb: np.ndarray, side: int) -> np.ndarray:
    """The centre square of ``rgb`` (HxWx3 in [0,1]), resized to ``side`` x ``side``."""
    h, w = rgb.shape[:2]
    s = min(h, w)
    y, x = (h - s) // 2, (w - s) // 2
    return np.clip(resize(rgb[y:y + s, x:x + s], (side, side)), 0.0, 1.0)


def noise(side: int, seed: int | None) -> np.ndarray:
    """Grey with a faint uniform noise (the classic start of a dream from nothing)."""
    rng = np.random.default_rng(seed)
    return (0.5 + 0.1 * (rng.random((side, side, 3)) - 0.5)).astype(np.float32)


def start_image(photo: str | os.PathLike | None, init: str, side: int,
                seed: int | None = None) -> np.ndarray:
    """What every cell starts from: ``photo`` (or :data:`EXAMPLE`) squared, or noise."""
    if init not in INITS:
        raise ObjectiveError(f"init must be {' or '.join(INITS)}, got {init!r}")
    if init == "noise":
        return noise(side, seed)
    from onnxdream.media.imageio import load_image

    return square(load_image(photo if photo is not None else EXAMPLE).rgb, side)


# -- which layers -----------------------------------------------------------------------------


def feature_layers(model: str | os.PathLike) -> list[str]:
    """The layers of ``model`` (a file) whose output is a feature map ([N, C, H, W] or NHWC,
    larger than 1x1, at the native size), in network order: the layers a dream can amplify."""
    from onnxdream.exporters.graph.contract import LOGITS
    from onnxdream.exporters.graph.layers import list_layers

    def spatial(shape) -> bool:  # 4-D with a height and width (not a pooled 1x1 vector)
        return len(shape) == 4 and sum(d != 1 for d in shape[1:]) >= 2

    return [i.name for i in list_layers(model)
            if i.name != LOGITS and i.shape is not None and spatial(i.shape)]


def atlas_layers(model: str | os.PathLike, layers: Sequence[str] | None = None, *,
                 every: bool = False) -> list[str]:
    """The atlas's cells for ``model`` (a file): ``layers`` as given, every feature layer
    (``every``), or the model's recommended layers. LayerError for an unknown name, none at all,
    or more than :data:`MAX_CELLS`."""
    from onnxdream.exporters.graph.contract import ModelInfo, load_model
    from onnxdream.exporters.graph.layers import layer_names, resolve_layer

    if layers and every:
        raise LayerError("give --layers or --all, not both", field="layers")
    proto = load_model(model)
    info = ModelInfo.load(proto)
    if layers:
        known = layer_names(proto, info.layers)
        for name in layers:
            resolve_layer(known, name, proto)  # LayerError with the closest names
        chosen = list(layers)
        what = "layers given"
    elif every:
        chosen = feature_layers(proto)
        what = "feature layers"
    else:
        chosen = list(info.recommended_layers)
        if not chosen:
            raise LayerError(f"{info.name} recommends no layers: name them with --layers A,B "
                             "or use --all (`onnxdream layers MODEL` lists them)",
                             field="layers")
        what = "recommended layers"
    chosen = list(dict.fromkeys(chosen))  # once each, in order
    if not chosen:
        raise LayerError(f"{info.name} has no feature layers to dream on", field="layers")
    if len(chosen) > MAX_CELLS:
        raise LayerError(f"{info.name} has {len(chosen)} {what}, more than an atlas shows "
                         f"({MAX_CELLS}): name some with --layers A,B,…", field="layers")
    return chosen


# -- dreams -----------------------------------------------------------------------------------


def dream_atlas(model: str | os.PathLike, start: np.ndarray, layers: Sequence[str],
                settings: DreamSettings | None = None, *,
                progress: ProgressFn | None = None,
                on_cell: Callable[[int, str, np.ndarray], None] | None = None,
                gradient_model: Callable[[DreamSettings], object] | None = None,
                device: str = "auto", threads: int | None = None) -> list[np.ndarray]:
    """``start`` (HxWx3 in [0,1]) dreamed at each of ``layers`` of ``model`` → one image each.

    Every cell uses ``settings`` (its model, objective and ascent values; its own layers are
    replaced by the cell's) with the same seed, so cells differ only by layer. ``on_cell(i,
    layer, image)`` is called as each cell is done (the server stores thumbnails as they come);
    ``gradient_model(cell_settings)`` makes the GradientModel of a cell (default: a new one per
    cell, freed before the next).
    """
    from onnxdream.dream.ascent import dream
    from onnxdream.runtime.gradient import GradientModel
    from onnxdream.settings.resolve import resolve

    if not layers:
        raise LayerError("an atlas needs at least one layer", field="layers")
    settings = replace(settings or DreamSettings(), model=str(model)).with_seed()
    h, w = start.shape[:2]
    cells = [replace(settings, layers=(layer,)) for layer in layers]
    make = gradient_model or (lambda s: GradientModel.from_settings(s, device=device,
                                                                     threads=threads))
    out: list[np.ndarray] = []
    before = total = 0
    for i, (layer, cell) in enumerate(zip(layers, cells)):
        gm = make(cell)
        resolved = resolve(cell, h, w, gm.info)
        if i == 0:  # every cell has the same model, size and so the same steps
            total = len(cells) * resolved.steps_total

        def step(p, i=i, layer=layer, before=before, total=total) -> None:
            if progress is not None:
                progress(AtlasProgress(i + 1, len(cells), layer, before + p.done, total,
                                       p.objective))

        image = np.ascontiguousarray(dream(gm, start, resolved, step))
        del gm  # one session at a time
        before += resolved.steps_total
        out.append(image)
        if on_cell is not None:
            on_cell(i, layer, image)
    return out


def channel_atlas(model: str | os.PathLike, layer: str, count: int = DEFAULT_COUNT,
                  settings: VisualizeSettings | None = None, *,
                  progress: Callable[[int, int, float], None] | None = None,
                  device: str = "auto", threads: int | None = None
                  ) -> tuple[list[np.ndarray], list[str], str]:
    """The first ``count`` channels of ``layer`` rendered the feature-visualisation way at
    ``settings.size`` → (images, captions ``LAYER:K``, the onnxruntime provider).
    ``progress(done, total, objective)`` counts steps over all channels (rendered a few at a
    time, each batch from the same seed, to bound memory)."""
    from onnxdream.dream.visualize import BatchObjective, Target, render

    if not 1 <= count <= MAX_CELLS:
        raise ObjectiveError(f"count must be between 1 and {MAX_CELLS}, got {count}")
    settings = (settings or VisualizeSettings()).validate().with_seed()
    objective = BatchObjective(model, layer, pre_relu=settings.pre_relu, device=device,
                               threads=threads)
    targets = [Target("channel", layer, k) for k in range(min(count, objective.channels))]
    batches = [targets[i:i + _CHANNEL_BATCH] for i in range(0, len(targets), _CHANNEL_BATCH)]
    total = settings.steps * len(batches)
    images: list[np.ndarray] = []
    for b, batch in enumerate(batches):
        def step(p, b=b) -> None:
            if progress is not None:
                progress(b * settings.steps + p.done, total, float(np.mean(p.objective)))

        images += render(model, batch, settings, step, device=device, threads=threads,
                         objectives={layer: objective})
    return images, [t.caption for t in targets], objective.provider
