"""The framework-free gradient compiler (onnx + numpy only)."""

from onnxdream.exporters.graph.compiler import compile_gradient, save_model
from onnxdream.exporters.graph.layers import LayerInfo, list_layers, load_model
from onnxdream.exporters.graph.objective import (
    LayerSpec,
    Objective,
    Term,
    channel,
    class_logit,
    l2,
    mean,
    neuron,
    parse_objective,
)

__all__ = [
    "LayerInfo", "LayerSpec", "Objective", "Term", "channel", "class_logit", "compile_gradient",
    "l2", "list_layers", "load_model", "mean", "neuron", "parse_objective", "save_model",
]
