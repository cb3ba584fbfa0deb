"""The standard per-frame dream of :mod:`onnxdream.video.clip`: one DreamSettings, resolved per
frame.

:class:`StandardDream` is a ``dream_frame(rgb, params) -> rgb`` for :func:`onnxdream.video.clip.
dream_video` and :func:`onnxdream.video.clip.zoom` on ``onnxdream.dream.ascent.dream`` (the CPU
ascent or, on CUDA, the device loop that keeps the image on the GPU). It is built from one
:class:`~onnxdream.settings.options.DreamSettings`, validated and with its seed fixed once, so every
frame gets the same jitter sequence; a frame's keyframed ``layers``/``steps``/``step_size``
replace the settings' own (:func:`frame_settings`), and the result is resolved for the frame
size (:func:`onnxdream.settings.resolve.resolve`). It also tells the video loop what identifies it
(:meth:`StandardDream.digest`: the resolver's digest and the model file's fingerprint) and what
each frame's PNG records (:meth:`StandardDream.metadata`: :mod:`onnxdream.settings.provenance`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from onnxdream.runtime.model_cache import ModelCache
from onnxdream.settings.options import DreamSettings

if TYPE_CHECKING:
    from onnxdream.settings.schedule import Schedule

__all__ = ["KEYFRAMED", "StandardDream", "file_fingerprint", "frame_settings",
           "keyframed_settings", "make_dream_frame", "stable_seed"]

#: The DreamSettings fields a clip may keyframe (see :func:`keyframed_settings`).
KEYFRAMED = ("layers", "steps", "step_size")


def file_fingerprint(path: str | os.PathLike[str]) -> str:
    """A cheap content fingerprint: size + the first and last MiB (not the name or mtime)."""
    p = Path(path)
    size = p.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(p, "rb") as fh:
        h.update(fh.read(1 << 20))
        if size > 2 << 20:
            fh.seek(-(1 << 20), os.SEEK_END)
            h.update(fh.read())
    return h.hexdigest()[:16]


def stable_seed(settings: DreamSettings, *parts: Any) -> DreamSettings:
    """``settings`` with a seed: its own, else one derived from the other settings and
    ``parts`` (the input's fingerprint, the run's options), so the same command run again
    without a seed gets the same one, and so resumes from (and reproduces) its frames."""
    if settings.seed is not None:
        return settings
    text = json.dumps([dataclasses.asdict(settings), [str(p) for p in parts]], sort_keys=True,
                      default=str)
    return dataclasses.replace(settings, seed=int(hashlib.sha256(text.encode()).hexdigest()[:8],
                                                  16))


def frame_settings(base: DreamSettings, params: Mapping[str, Any]) -> DreamSettings:
    """The dream settings for one frame: ``base`` with the frame's keyframed ``layers``
    (``"blocks.5+blocks.9:0.5"``: layers joined by ``+``), ``steps`` and ``step_size``; other
    params (blend, zoom, …) are not dream settings."""
    change: dict[str, Any] = {}
    if params.get("layers"):
        change["layers"] = tuple(p.strip() for p in str(params["layers"]).split("+"))
    if "steps" in params:
        change["steps"] = int(params["steps"])
    if "step_size" in params:
        change["step_size"] = float(params["step_size"])
    return dataclasses.replace(base, **change) if change else base


def keyframed_settings(texts: Mapping[str, str | Sequence[str] | None]
                       ) -> tuple[dict[str, Any], dict[str, Schedule]]:
    """Front-end values of keyframable settings → what DreamSettings gets, and the schedules.

    ``texts``: field (of :data:`KEYFRAMED`) → a value or keyframes as text
    (``"0:blocks.5,120:blocks.9"``, see :mod:`onnxdream.settings.schedule`), or None (not given);
    ``layers`` may also be a list of layer specs (a constant mix) or a one-item list holding
    keyframes. Returns ``(first, schedules)``: ``first`` maps each given field to its first
    key's value, typed for ``settings.build.from_options`` (``layers`` as a list); ``schedules``
    holds the fields whose value changes over the clip. Every key's value is checked as the
    setting would be (out of range: a ScheduleError naming the field), so a bad key late in a
    clip fails before its first frame. The CLI's keyframed options and the server's form
    fields both go through here.
    """
    from onnxdream.core.errors import ScheduleError, SettingsError
    from onnxdream.settings.schedule import parse_schedule

    first: dict[str, Any] = {}
    schedules: dict[str, Schedule] = {}
    base = DreamSettings()
    for name, value in texts.items():
        if name not in KEYFRAMED:
            raise ScheduleError(name, f"cannot be keyframed (keyframed: {', '.join(KEYFRAMED)})")
        if value is None or (not isinstance(value, str) and not list(value)):
            continue
        if not isinstance(value, str):
            items = [str(v) for v in value]
            parsed = [parse_schedule(t, name) for t in items]
            if len(items) > 1 and any(len(p.keys) > 1 or p.keys[0].position for p in parsed):
                raise ScheduleError(name, "keyframes go in one value: join the layers of a key "
                                          "with + (0:blocks.5+blocks.9:0.5,120:blocks.9)")
            value = "+".join(items)

        def check(v: Any, name: str = name) -> str | None:
            try:
                frame_settings(base, {name: v}).validate()
            except SettingsError as exc:
                return exc.reason
            return None

        schedule = parse_schedule(value, name, check=check)
        head = schedule.keys[0].value
        first[name] = [p.strip() for p in head.split("+")] if name == "layers" else head
        if not schedule.constant:
            schedules[name] = schedule
    return first, schedules


# --------------------------------------------------------------------------------------------
# The standard dream


class StandardDream:
    """``dream_frame`` for :func:`dream_video`/:func:`zoom` on ``onnxdream.dream.ascent.dream``,
    from one DreamSettings (validated, its seed fixed here once).

    A frame's settings are :func:`frame_settings` of these with its keyframed values, resolved
    for the frame size (:func:`onnxdream.settings.resolve.resolve`); the gradient models of the
    last two (model, layers, objective, …) stay open, so a schedule that cuts between two layers
    does not recompile.
    """

    def __init__(self, settings: DreamSettings, *, device: str = "auto",
                 threads: int | None = None, models: ModelCache | None = None):
        self.settings = settings.validate().with_seed()
        self._models = models if models is not None else ModelCache(device=device,
                                                                     threads=threads, size=2)
        self._geometry = None
        self._model_file: str | None = None

    def gradient_model(self, settings: DreamSettings):
        """The GradientModel of ``settings`` (model, layers, objective, pre_relu, border)."""
        return self._models.get(settings).model

    def _model_facts(self) -> tuple[Any, str]:
        """The model's contract facts (``ModelInfo``: what the resolver reads) and its file's
        fingerprint, read once."""
        if self._geometry is None:
            from onnxdream.exporters.graph.contract import ModelInfo
            from onnxdream.runtime.opening import resolve_model_path

            path = resolve_model_path(self.settings.model)
            self._geometry = ModelInfo.load(path)
            self._model_file = file_fingerprint(path)
        return self._geometry, self._model_file

    def prepare(self, layers: Iterable[str] = ()):
        """Open the first frame's gradient model (compiling it if needed) and check that every
        layer of the keyframed ``layers`` values (``"blocks.5+blocks.9:0.5"``) exists, so that
        a typo in a late key fails before the first frame. Returns the GradientModel.

        Raises:
            ModelError, LayerError, ObjectiveError: as GradientModel does.
        """
        from onnxdream.exporters.graph import LayerSpec
        from onnxdream.exporters.graph.contract import load_model
        from onnxdream.exporters.graph.layers import layer_names, resolve_layer

        gm = self.gradient_model(self.settings)
        values = list(layers)
        if values:
            proto = load_model(gm.model_path)
            known = layer_names(proto, gm.info.layers)
            for value in values:
                for spec in str(value).split("+"):
                    resolve_layer(gm.info.layers, LayerSpec.parse(spec, known).name, proto)
        return gm

    def resolved(self, height: int, width: int, params: Mapping[str, Any] | None = None):
        """The ResolvedSettings of a ``height`` x ``width`` frame with keyframed ``params``."""
        from onnxdream.settings.resolve import resolve

        geometry, _ = self._model_facts()
        return resolve(frame_settings(self.settings, params or {}), height, width, geometry)

    def digest(self, height: int, width: int) -> dict[str, str]:
        """What identifies this dream in the work dir's digest: the resolved settings' digest
        at the frame size and the model file's fingerprint."""
        _, model_file = self._model_facts()
        return {"resolved": self.resolved(height, width).digest(), "model_file": model_file}

    def metadata(self, height: int, width: int, params: Mapping[str, Any]) -> dict[str, str]:
        """A frame's provenance (``onnxdream.settings.provenance.dream_metadata``; the recorded
        command dreams one still, ``FRAME``: a caller with the whole command overrides it)."""
        from onnxdream.settings.provenance import dream_metadata

        resolved = self.resolved(height, width, params)
        loaded = self._models.get(resolved.settings)
        return dream_metadata(resolved, objective=loaded.objective, provider=loaded.model.provider,
                              image="FRAME")

    def __call__(self, rgb: np.ndarray, params: Mapping[str, Any]) -> np.ndarray:
        from onnxdream.dream.ascent import dream

        resolved = self.resolved(rgb.shape[0], rgb.shape[1], params)
        loaded = self._models.get(resolved.settings)
        return dream(loaded.model, rgb, resolved, params=loaded.params)


def make_dream_frame(settings: DreamSettings | None = None, *, device: str = "auto",
                     threads: int | None = None) -> StandardDream:
    """The standard ``dream_frame``: ``onnxdream.dream.ascent.dream`` with ``settings`` (default
    ``DreamSettings()``; for :func:`zoom`, ``DreamSettings(**ZOOM_DEFAULTS)`` keeps frames
    quick), its seed fixed here, per-frame ``layers``/``steps``/``step_size`` from the
    schedules."""
    if settings is not None and not isinstance(settings, DreamSettings):
        raise TypeError(f"settings must be a DreamSettings, got {type(settings).__name__}")
    return StandardDream(settings if settings is not None else DreamSettings(), device=device,
                         threads=threads)
