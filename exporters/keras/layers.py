"""A Keras model's layers as onnxdream sees them: every layer by name, which are channels-last
feature maps, the default layer and the recommended ones, and the size of the model's output."""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

from onnxdream.exporters.graph.layers import recommend_layers
from onnxdream.exporters.keras.applications import application_layers
from onnxdream.exporters.keras.backend import import_keras

# the end of stage 4 of ResNets and DenseNets (like torchvision's layer3 / denseblock3)
_STAGE4 = re.compile(r"^conv4_block\d+_(out|concat)$")


def keras_layers(model: Any) -> dict[str, Any]:
    """Every layer, nested models' included, by its Keras name (``outer/inner`` when a name
    occurs more than once). Input layers are left out."""
    keras = import_keras()
    found: list[tuple[str, Any]] = []

    def walk(m: Any, prefix: str) -> None:
        for layer in getattr(m, "layers", []):
            if isinstance(layer, keras.layers.InputLayer):
                continue
            found.append((prefix + layer.name, layer))
            if isinstance(layer, keras.Model):
                walk(layer, prefix + layer.name + "/")

    walk(model, "")
    counts = Counter(layer.name for _, layer in found)
    return {(layer.name if counts[layer.name] == 1 else path): layer for path, layer in found}


def output_rank(layer: Any) -> int | None:
    """The rank of the layer's one symbolic output; None if called several times or unknown."""
    try:
        out = layer.output
    except (AttributeError, ValueError, RuntimeError):
        return None
    if isinstance(out, (list, tuple, dict)):
        return None
    shape = getattr(out, "shape", None)
    return None if shape is None else len(shape)


def layer_layouts(layers: dict[str, Any], channels_last: bool) -> dict[str, str]:
    """{layer: "NHWC"} for 4-D channels-last layer outputs (the compiler's layer_layouts)."""
    out = {}
    for name, layer in layers.items():
        if output_rank(layer) != 4:
            continue
        fmt = getattr(layer, "data_format", None)
        last = fmt == "channels_last" if fmt in ("channels_last", "channels_first") else \
            channels_last
        if last:
            out[name] = "NHWC"
    return out


def default_layers(name: str, layers: dict[str, Any]) -> list[str]:
    """The layer a dream uses when none is named: the application's well-known one, else the
    end of stage 4 (ResNets, DenseNets), else a block output ~60% into the network."""
    known = application_layers(name)
    if known and all(k in layers for k in known):
        return known
    stage4 = [n for n in layers if _STAGE4.match(n)]
    if stage4:
        return [stage4[-1]]
    # ~60% into the network, preferring the blocks' outputs (merges and activations)
    preferred = block_outputs(layers)
    return [preferred[len(preferred) * 6 // 10]] if preferred else []


def recommended_layers(layers: dict[str, Any], default: list[str]) -> list[str]:
    """The blocks' outputs (merges, else activations) spread over the middle of the network,
    plus the default layers (:func:`~onnxdream.exporters.graph.layers.recommend_layers`)."""
    return recommend_layers(block_outputs(layers), default, order=list(layers))


def block_outputs(layers: dict[str, Any]) -> list[str]:
    """The 4-D outputs of the network's blocks, in order: its merges (Add, Concatenate), else
    its activations, else every 4-D layer."""
    four_d = [n for n, layer in layers.items() if output_rank(layer) == 4]
    merges = [n for n in four_d if type(layers[n]).__name__ in ("Add", "Concatenate")]
    acts = [n for n in four_d if type(layers[n]).__name__ in ("Activation", "ReLU")]
    return merges or acts or four_d


def output_units(model: Any) -> int | None:
    """The size of a model's [N, K] output (its classes), None if it outputs anything else."""
    try:
        shape = model.output_shape
    except (AttributeError, ValueError):
        return None
    if isinstance(shape, list):
        shape = shape[0]
    return int(shape[-1]) if len(shape) == 2 and shape[-1] is not None else None
