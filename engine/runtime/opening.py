"""Opening a model: a zoo name or a dreamable ``.onnx`` file → its file, graph and contract facts.

:func:`open_model` is the one way the run time opens a model (the gradient model, the
classifier, feature visualisation, the model cache, the browser export): it resolves a zoo name
(building the zoo model on first use) or a path, loads the graph, refuses an ONNX file that
onnxdream did not make dreamable with the ``onnxdream import onnx`` command that wraps it
(:class:`~onnxdream.core.errors.UnwrappedModelError`), and reads the contract's
:class:`~onnxdream.exporters.graph.contract.ModelInfo`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import onnx

from onnxdream.exporters.graph.contract import ModelInfo, load_model, require_dreamable
from onnxdream.exporters.graph.layers import layer_names
from onnxdream.models import resolve_model

__all__ = ["OpenedModel", "open_model", "resolve_model_path"]


def resolve_model_path(model: str | os.PathLike) -> Path:
    """A zoo name or a path to an .onnx file → the file."""
    return Path(resolve_model(str(model)))


@dataclass(frozen=True)
class OpenedModel:
    """A dreamable model, opened: its file, its graph and the contract's facts about it."""

    path: Path
    proto: onnx.ModelProto
    info: ModelInfo

    def layer_names(self) -> dict[str, str]:
        """Every name a layer may be given by (the layer table's and the tensors') → its
        tensor."""
        return layer_names(self.proto, self.info.layers)


def open_model(model: str | os.PathLike, *, name: str | None = None,
               dreamable: bool = True) -> OpenedModel:
    """Open ``model`` (a zoo name or a path). ``name`` is what errors call it (default: as
    given; the server passes the model's public name, never a path). ``dreamable=False`` skips
    the dreamable check (``onnxdream layers`` lists any file's layers)."""
    path = resolve_model_path(model)
    proto = load_model(path)
    if dreamable:
        require_dreamable(proto, name if name is not None else str(model))
    return OpenedModel(path, proto, ModelInfo.load(proto))
