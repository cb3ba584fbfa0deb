"""Exporters: turn a framework's image network into a dreamable ONNX model.

A dreamable model is a plain ONNX file that follows the contract documented in
:mod:`onnxdream.exporters.graph.contract`; every onnxdream command (and onnxruntime alone) can
use it. The public surface:

- :func:`export_torchvision` — a torchvision classifier by name (``"googlenet"``).
- :func:`export_keras` — a ``keras.applications`` model by name, or a ``.keras`` / ``.h5`` file.
- :func:`export_timm` — a timm (PyTorch Image Models) classifier by name (``"convnext_tiny"``).
- :func:`export_module` — your own PyTorch ``nn.Module`` (see its docstring for an example).
- :func:`import_onnx` — an ONNX file from anywhere (tf2onnx, paddle2onnx, …), wrapped as it is
  (no framework needed; ``onnxdream import onnx`` on the command line).
- :class:`ExportResult` — what each of them returns: the path written, the layers, whether the
  model runs at any size, and notes on what was tried.

An export that fails raises a :class:`onnxdream.core.errors.ModelError` (an :class:`ExportError`
when the failure was not foreseen) whose message is one line naming the model.

The names are imported lazily: ``import onnxdream.exporters`` needs neither torch, timm nor
keras.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from onnxdream.exporters.graph.importer import import_onnx
    from onnxdream.exporters.keras import export_keras
    from onnxdream.exporters.timm import export_timm
    from onnxdream.exporters.torch_export import ExportError, ExportResult, export_module
    from onnxdream.exporters.torchvision import export_torchvision

__all__ = ["ExportError", "ExportResult", "export_keras", "export_module", "export_timm",
           "export_torchvision", "import_onnx"]

_HOME = {
    "ExportError": "onnxdream.exporters.torch_export",
    "ExportResult": "onnxdream.exporters.torch_export",
    "export_module": "onnxdream.exporters.torch_export",
    "export_torchvision": "onnxdream.exporters.torchvision",
    "export_keras": "onnxdream.exporters.keras",
    "export_timm": "onnxdream.exporters.timm",
    "import_onnx": "onnxdream.exporters.graph.importer",
}


def __getattr__(name: str) -> Any:
    if name in _HOME:
        value = getattr(importlib.import_module(_HOME[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
