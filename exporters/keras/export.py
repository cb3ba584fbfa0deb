"""Exporting a loaded Keras model through the torch exporter: the network wrapped as an
``nn.Module`` (NCHW in, NHWC inside), logits rather than a softmax, Keras' torch ops made
traceable at any H/W, and the no-op Casts Keras traces dropped before the file is written."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import onnx

from onnxdream.core.errors import ModelError
from onnxdream.exporters.graph.contract import FRAMEWORK_KEY, LAYOUTS_KEY, PREPROCESS_KEY
from onnxdream.exporters.keras.backend import import_keras
from onnxdream.exporters.keras.layers import (
    keras_layers,
    layer_layouts,
    output_units,
    recommended_layers,
)
from onnxdream.exporters.keras.loading import KerasModel, load_keras
from onnxdream.exporters.preprocess import PREPROCESSING, preprocess_fn
from onnxdream.exporters.torch_export import (
    ExportResult,
    Progress,
    export_errors,
    export_module,
    say,
)


def _softmax_head(model: Any) -> Any:
    """The output layer if it applies softmax through an ``activation`` attribute, else None."""
    keras = import_keras()
    layers = getattr(model, "layers", [])
    if not layers:
        return None
    last = layers[-1]
    act = getattr(last, "activation", None)
    if act is not None and act is getattr(keras.activations, "softmax", None):
        return last
    return None


@contextmanager
def _logits_head(model: Any, notes: list[str]) -> Iterator[None]:
    """Export logits rather than probabilities: a softmax output layer is linear meanwhile."""
    keras = import_keras()
    head = _softmax_head(model)
    if head is None:
        yield
        return
    original = head.activation
    head.activation = keras.activations.linear
    notes.append(f"the softmax of {head.name} is left out: the output is logits")
    try:
        yield
    finally:
        head.activation = original


@contextmanager
def traceable_keras_ops() -> Iterator[None]:
    """Make Keras' torch backend trace with symbolic H/W (the TorchScript exporter).

    Keras computes two things in Python from the traced sizes, which the tracer then records as
    runtime shape ops the ONNX exporter cannot take (or freezes at the traced size):

    - ``LayerNormalization`` passes ``normalized_shape`` read off ``x.shape`` to
      ``F.layer_norm``: that is the channel count, constant, so it is made a Python int here
      (ConvNeXt's "Failed to export a node … onnx::Gather").
    - ``padding="same"`` with strides (convolutions, pools) computes its pads with
      ``max(0, …)`` and picks ``F.pad`` or the op's own padding by an ``if`` on their symmetry;
      here the pads are torch ops on the runtime size, always applied by ``F.pad``, as Keras
      does in the asymmetric case (Xception's "Failed to export a node … onnx::Cast").

    Outside tracing both do exactly what Keras does.
    """
    import torch
    import torch.nn.functional as F

    import_keras()
    from keras.src.backend.torch import nn as keras_nn

    layer_norm, same_padding = F.layer_norm, keras_nn._apply_same_padding

    def static_layer_norm(x: Any, normalized_shape: Any, *args: Any, **kwargs: Any) -> Any:
        if torch.jit.is_tracing():
            normalized_shape = tuple(int(d) for d in normalized_shape)
        return layer_norm(x, normalized_shape, *args, **kwargs)

    def traced_same_padding(inputs: Any, kernel_size: Any, strides: Any, data_format: Any,
                            operation_type: str, dilation_rate: Any = 1) -> Any:
        if not torch.jit.is_tracing():
            return same_padding(inputs, kernel_size, strides, data_format, operation_type,
                                dilation_rate)
        nd = inputs.dim() - 2
        dil = [1] * nd if operation_type == "pooling" else (
            [int(dilation_rate)] * nd if isinstance(dilation_rate, int) else list(dilation_rate))
        pads: list[tuple[Any, Any]] = []
        for i in range(nd):
            keff, s = (int(kernel_size[i]) - 1) * dil[i] + 1, int(strides[i])
            if s == 1:  # keff - 1 whatever the size
                pads.append(((keff - 1) // 2, keff - 1 - (keff - 1) // 2))
                continue
            n = torch.as_tensor(inputs.shape[2 + i])
            out = torch.div(n + (s - 1), s, rounding_mode="floor")
            total = torch.clamp((out - 1) * s + keff - n, min=0)
            left = torch.div(total, 2, rounding_mode="floor")
            pads.append((left, total - left))
        if all(isinstance(a, int) and a == b for a, b in pads):
            return inputs, [a for a, _ in pads]
        flat = tuple(p for pair in reversed(pads) for p in pair)
        mode = "replicate" if operation_type == "pooling" else "constant"
        return F.pad(inputs, pad=flat, mode=mode), 0

    F.layer_norm = static_layer_norm
    keras_nn._apply_same_padding = traced_same_padding
    try:
        yield
    finally:
        F.layer_norm = layer_norm
        keras_nn._apply_same_padding = same_padding


def drop_noop_casts(model: Any) -> int:
    """Remove ``Cast`` nodes that cast a float32 tensor to float32; returns how many.

    Keras' torch backend converts every op's inputs to the working dtype, which traces as a
    Cast to FLOAT of an already-float tensor (hundreds in InceptionV3). They cost nothing at
    run time, but they hide a layer's ReLU from ``--pre-relu`` and bloat the gradient graph.
    """
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in (
        *inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)}
    types.update({i.name: i.data_type for i in model.graph.initializer})
    outputs = {o.name for o in model.graph.output}
    rename: dict[str, str] = {}
    keep = []
    for node in model.graph.node:
        to = next((a.i for a in node.attribute if a.name == "to"), None)
        src = node.input[0] if node.input else ""
        src = rename.get(src, src)
        if (node.op_type == "Cast" and to == onnx.TensorProto.FLOAT
                and types.get(src) == onnx.TensorProto.FLOAT and node.output[0] not in outputs):
            rename[node.output[0]] = src
            continue
        keep.append(node)
    if not rename:
        return 0
    for node in keep:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    del model.graph.node[:]
    model.graph.node.extend(keep)
    dropped = set(rename)
    kept_info = [v for v in model.graph.value_info if v.name not in dropped]
    del model.graph.value_info[:]
    model.graph.value_info.extend(kept_info)
    return len(rename)


def _wrap(km: KerasModel) -> Any:
    """An ``nn.Module``: preprocessed NCHW → the Keras model (NHWC inside) → its output."""
    import torch

    class KerasNet(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.keras_model = km.model  # a torch.nn.Module under the torch backend

        def forward(self, x: Any) -> Any:
            if km.channels_last:
                x = x.permute(0, 2, 3, 1)
            y = self.keras_model(x, training=False)
            if isinstance(y, dict):
                y = next(iter(y.values()))
            if isinstance(y, (list, tuple)):
                y = y[0]
            return y

    return KerasNet()


def export_keras(
    model: str | os.PathLike[str] | KerasModel,
    out: str | os.PathLike[str],
    *,
    weights: str | None = None,
    preprocess: str | None = None,
    include_top: bool = False,
    input_size: int | None = None,
    opset: int = 18,
    progress: Progress = None,
) -> ExportResult:
    """Export a ``keras.applications`` model (by name) or a ``.keras``/``.h5`` file at ``out``.

    ``weights``: for names ``imagenet`` (default), ``none`` or a ``.weights.h5`` FILE; for files
    the file's own (default) or a weights FILE. ``preprocess``: tf, caffe, torch, none or unit
    (see ``PREPROCESSING``); inferred for names, required for files. ``include_top`` keeps the
    classifier (its logits become the ``logits`` output). ``model`` may also be a
    :class:`KerasModel` from :func:`load_keras`. ``input_size`` overrides the size the export
    traces and checks at (a model with dynamic H/W only). Returns an :class:`ExportResult`; an
    unexpected failure is an ``ExportError`` naming the model.
    """
    import_keras()
    label = model.name if isinstance(model, KerasModel) else Path(os.fspath(model)).name
    with export_errors(label):
        km = model if isinstance(model, KerasModel) else load_keras(
            model, weights, preprocess, include_top, progress)
        if input_size is not None:
            if not km.dynamic:
                raise ModelError(f"{km.name} has a fixed input size; input_size cannot change it")
            km.input_size = int(input_size)
        return _export(km, out, opset, progress)


def _export(km: KerasModel, out: str | os.PathLike[str], opset: int, progress: Progress
            ) -> ExportResult:
    layers = keras_layers(km.model)
    layouts = layer_layouts(layers, km.channels_last)
    has_logits = output_units(km.model) is not None
    notes = list(km.notes)
    with _logits_head(km.model, notes), traceable_keras_ops():
        for note in notes:
            say(progress, note)
        result = export_module(
            _wrap(km),
            out,
            name=km.name,
            input_size=km.input_size,
            source=km.source,
            license=km.license,
            labels=km.labels,
            default_layers=km.default_layers,
            recommended_layers=recommended_layers(layers, km.default_layers),
            preprocess=preprocess_fn(km.preprocess),
            layers=layers,
            opset=opset,
            progress=progress,
            dynamic=km.dynamic,
            output_name="logits" if has_logits else "features",
            transform=drop_noop_casts,  # before the one write
            extra_metadata={
                PREPROCESS_KEY: f"keras {km.preprocess}: {PREPROCESSING[km.preprocess]} "
                                "(inside the graph)",
                LAYOUTS_KEY: json.dumps(layouts),
                FRAMEWORK_KEY: "keras " + str(import_keras().__version__),
            },
        )
    if km.dynamic and not result.dynamic_hw:
        # say why in the command's output, not only in result.notes
        say(progress, f"{km.name} exports with a fixed input size: "
                       + "; ".join(result.notes[-2:]))
    result.notes[:0] = notes
    return result
