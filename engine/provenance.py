"""Provenance: the metadata every image onnxdream writes carries, built in one place.

A dream's PNG (or the XMP packet of a JPEG/WebP) records the onnxdream version, the model, the
objective as compiled, the layers, the provider, every setting, the values the resolver chose,
and the command line that makes the same image again. The CLI, the server (and batch/video)
call :func:`dream_metadata`; ``visualize`` calls :func:`visualize_metadata`. Keys are
``onnxdream:<name>``; :func:`onnxdream.imageio.read_metadata` reads them back.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from onnxdream import __version__
from onnxdream.resolve import ResolvedSettings
from onnxdream.settings import ASCENT_FIELDS, CONTROL_FIELDS, VisualizeSettings, describe

__all__ = ["PREFIX", "command", "dream_metadata", "visualize_metadata"]

PREFIX = "onnxdream:"


def command(argv: Sequence[str]) -> str:
    """``onnxdream`` + argv, quoted for a POSIX shell."""
    return "onnxdream " + shlex.join([str(a) for a in argv])


def _keys(values: dict[str, Any]) -> dict[str, str]:
    return {f"{PREFIX}{k}": v if isinstance(v, str) else str(v) for k, v in values.items()}


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
    settings = resolved.settings
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
    meta.update(_keys(describe(settings, (*ASCENT_FIELDS, "seed"))))
    controls = describe(settings, CONTROL_FIELDS)
    controls["mask_layers"] = json.dumps(list(settings.mask_layers))
    controls["size"] = "x".join(map(str, settings.size)) if settings.size else ""
    meta.update(_keys(controls))
    meta.update(_keys({f"{k}_sha256": v for k, v in (hashes or {}).items()}))
    meta.update(resolved.to_metadata())
    return meta


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
