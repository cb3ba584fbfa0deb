"""Provenance: the metadata every image onnxdream writes carries, built in one place.

A dream's PNG (or the XMP packet of a JPEG/WebP) records the onnxdream version, the model, the
objective as compiled, the layers, the provider, every setting as it ran (``onnxdream:octaves``
is the number of octaves the resolver chose, the step size the model's recommendation when none
was given; ``onnxdream:requested`` keeps what was asked, ``"auto"`` included), the resolver's
values, the memory estimate, and the command line that makes the same image again (with the
resolved values spelled out). The CLI, the server (and batch/video) call :func:`dream_metadata`;
``visualize`` calls :func:`visualize_metadata`, ``atlas`` :func:`atlas_metadata` or
:func:`channel_atlas_metadata`. Keys are ``onnxdream:<name>``;
:func:`onnxdream.media.imageio.read_metadata` reads them back.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from onnxdream import __version__
from onnxdream.settings.memory import MB
from onnxdream.settings.options import (
    ASCENT_FIELDS,
    CONTROL_FIELDS,
    DreamSettings,
    VisualizeSettings,
    describe,
)
from onnxdream.settings.resolve import ResolvedSettings

__all__ = ["PREFIX", "atlas_metadata", "channel_atlas_metadata", "command", "control_metadata",
           "dream_metadata", "key", "resolved_metadata", "visualize_metadata"]

PREFIX = "onnxdream:"


def command(argv: Sequence[str]) -> str:
    """``onnxdream`` + argv, quoted for a POSIX shell."""
    return "onnxdream " + shlex.join([str(a) for a in argv])


def key(name: str) -> str:
    """The metadata key of ``name``: ``onnxdream:<name>`` (every key onnxdream writes)."""
    return f"{PREFIX}{name}"


def _keys(values: dict[str, Any]) -> dict[str, str]:
    return {key(k): v if isinstance(v, str) else str(v) for k, v in values.items()}


def resolved_metadata(resolved: ResolvedSettings) -> dict[str, str]:
    """The resolver's keys: the resolved values, the request, the memory estimate."""
    meta = _keys({"resolved": json.dumps(resolved.values(), sort_keys=True),
                  "requested": json.dumps(resolved.requested(), sort_keys=True)})
    if resolved.memory is not None:
        budget = resolved.memory.budget
        meta[key("memory")] = json.dumps(
            {"estimate_mb": round(resolved.memory.total / MB),
             "budget_mb": None if budget is None else round(budget / MB)}, sort_keys=True)
    return meta


def dream_metadata(resolved: ResolvedSettings, *, objective: Any, provider: str,
                   image: str = "IMAGE", output: str | None = None,
                   hashes: Mapping[str, str] | None = None) -> dict[str, str]:
    """The metadata of a dream made with ``resolved`` settings.

    ``objective``: the compiled :class:`~onnxdream.exporters.graph.objective.Objective`
    (``GradientModel.objective``: the model's default layers made concrete); ``image`` and
    ``output``: the paths to put in the recorded command (placeholders where there are none,
    as for an upload). The creative controls are recorded as set (``onnxdream:guide`` ...), and
    the pictures they read by content: ``hashes`` (``Controls.hashes``: the SHA-256 of each
    file's bytes) as ``onnxdream:guide_sha256``, ``onnxdream:mask_sha256`` and
    ``onnxdream:mask_layers_sha256`` (comma-separated, in order).
    """
    settings = resolved.concrete()
    concrete = replace(settings, layers=tuple(f"{t.layer}:{t.weight:g}" for t in objective.terms))
    meta = _keys({
        "version": __version__,
        "model": settings.model,
        "objective": objective.describe(),
        "layers": json.dumps([t.layer for t in objective.terms]),
        "pre_relu": str(settings.pre_relu),
        "border": str(settings.border),
        "preset": settings.preset or "",
        "provider": provider,
        "command": command(concrete.to_argv(image, output)),
    })
    meta.update(_keys(describe(concrete, (*ASCENT_FIELDS, "seed"))))
    meta.update(control_metadata(settings))
    meta.update(_keys({f"{k}_sha256": v for k, v in (hashes or {}).items()}))
    meta.update(resolved_metadata(resolved))
    return meta


def control_metadata(settings: DreamSettings) -> dict[str, str]:
    """The creative controls' keys of :func:`dream_metadata` (``onnxdream:guide`` ...), as set in
    ``settings`` (the browser's page, which has none, writes those of ``DreamSettings()``)."""
    controls = describe(settings, CONTROL_FIELDS)
    controls["mask_layers"] = json.dumps(list(settings.mask_layers))
    controls["size"] = "x".join(map(str, settings.size)) if settings.size else ""
    return _keys(controls)


def visualize_metadata(settings: VisualizeSettings, *, model: str, provider: str,
                       targets: Iterable[Any], output: str | None = None, grid: bool = False,
                       file_targets: Iterable[Any] | None = None) -> dict[str, str]:
    """The metadata of a ``visualize`` image: ``targets`` are all the run's targets (for the
    command), ``file_targets`` those shown in this file (default: all of them)."""
    targets = list(targets)
    shown = targets if file_targets is None else list(file_targets)
    meta = _keys({
        "version": __version__,
        "model": model,
        "provider": provider,
        "command": command(settings.to_argv(model=model, targets=targets, output=output,
                                            grid=grid)),
    })
    meta.update(_keys(describe(settings)))
    meta[f"{PREFIX}targets"] = json.dumps([t.describe() for t in shown])
    return meta


def atlas_metadata(resolved: ResolvedSettings, *, layers: Sequence[str], cell: int, init: str,
                   provider: str, image: str | None = None, output: str | None = None,
                   columns: int | None = None) -> dict[str, str]:
    """The metadata of a layer atlas: every cell dreamed with ``resolved`` (the settings of its
    first cell; the cells differ only by layer) at ``layers``. ``image`` None: the bundled
    example (or noise, by ``init``)."""
    settings = resolved.settings
    dream_argv = replace(settings, layers=(), step_size=resolved.step_size).to_argv("IMAGE")
    argv = ["atlas"] + ([image] if image is not None else [])
    argv += ["-o", output] if output is not None else []
    argv += dream_argv[2:] + ["--layers", ",".join(layers), "--cell", str(cell)]
    argv += ["--init", init] if init != "photo" else []
    argv += ["--columns", str(columns)] if columns else []
    meta = _keys({
        "version": __version__,
        "kind": "atlas",
        "model": settings.model,
        "layers": json.dumps(list(layers)),
        "cell": str(cell),
        "init": init,
        "image": image if image is not None else ("" if init == "noise" else "bundled example"),
        "objective": settings.objective,
        "pre_relu": str(settings.pre_relu),
        "border": str(settings.border),
        "preset": settings.preset or "",
        "provider": provider,
        "command": command(argv),
    })
    meta.update(_keys(describe(replace(settings, step_size=resolved.step_size),
                               (*ASCENT_FIELDS, "seed"))))
    meta.update(resolved_metadata(resolved))
    return meta


def channel_atlas_metadata(settings: VisualizeSettings, *, model: str, layer: str,
                           channels: Sequence[int], provider: str, output: str | None = None,
                           columns: int | None = None) -> dict[str, str]:
    """The metadata of ``atlas --channels``: ``channels`` of ``layer`` rendered with
    ``settings`` (whose ``size`` is the cell)."""
    argv = ["atlas"] + (["-o", output] if output is not None else [])
    argv += ["--model", model, "--channels", layer, "--count", str(len(channels)),
             "--cell", str(settings.size), "--steps", str(settings.steps),
             "--seed", str(settings.seed)]
    argv += ["--columns", str(columns)] if columns else []
    meta = _keys({
        "version": __version__,
        "kind": "channel-atlas",
        "model": model,
        "provider": provider,
        "command": command(argv),
    })
    meta.update(_keys(describe(settings)))
    meta[f"{PREFIX}targets"] = json.dumps([f"channel:{layer}:{k}" for k in channels])
    return meta
