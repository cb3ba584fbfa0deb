"""The framework-free gradient compiler (onnx + numpy only).

The model contract is in contract.py; reading and writing ONNX files in onnxfile.py.
"""

from __future__ import annotations

from onnxdream.exporters.graph.compiler import compile_features, compile_gradient
from onnxdream.exporters.graph.contract import ModelInfo, graph_params
from onnxdream.exporters.graph.layers import LayerInfo, list_layers
from onnxdream.exporters.graph.objective import (
    LayerSpec,
    Objective,
    Term,
    channel,
    class_logit,
    guide,
    l2,
    mean,
    neuron,
    parse_objective,
    weighted_channels,
)
from onnxdream.exporters.graph.onnxfile import load_model, save_model

__all__ = [
    "LayerInfo", "LayerSpec", "ModelInfo", "Objective", "Term", "channel", "class_logit",
    "compile_features", "compile_gradient", "graph_params", "guide", "l2", "list_layers",
    "load_model", "mean", "neuron", "parse_objective", "save_model", "weighted_channels",
]
