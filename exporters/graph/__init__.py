"""The framework-free gradient compiler (onnx + numpy only).

The model contract is in contract.py.
"""

from onnxdream.exporters.graph.compiler import compile_features, compile_gradient, save_model
from onnxdream.exporters.graph.contract import ModelInfo, graph_params, load_model
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

__all__ = [
    "LayerInfo", "LayerSpec", "ModelInfo", "Objective", "Term", "channel", "class_logit",
    "compile_features", "compile_gradient", "graph_params", "guide", "l2", "list_layers",
    "load_model", "mean", "neuron", "parse_objective", "save_model", "weighted_channels",
]
