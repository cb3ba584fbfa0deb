"""Receptive field and stride of a layer, read off the graph (for exact tiling)."""

from __future__ import annotations

import onnx
from onnx import helper, numpy_helper

from onnxdream.exporters.graph.ops import NON_DIFFERENTIABLE, node_inputs

# ops that keep every output position tied to a bounded input window
_POINTWISE = {
    "Relu", "Clip", "LeakyRelu", "HardSigmoid", "HardSwish", "Sigmoid", "Tanh", "Erf", "Gelu",
    "Exp", "Log", "Sqrt", "Reciprocal", "Abs", "Neg", "Identity", "Dropout", "Cast", "Softplus",
    "Elu", "Add", "Sub", "Mul", "Div", "Pow", "Sum", "Max", "Min", "Where", "Concat", "Split",
    "BatchNormalization", "LRN",
}
_WINDOWED = {"Conv", "MaxPool", "AveragePool"}


def _const(model: onnx.ModelProto, name: str):
    for i in model.graph.initializer:
        if i.name == name:
            return numpy_helper.to_array(i)
    for n in model.graph.node:
        if n.op_type == "Constant" and n.output[0] == name and n.attribute and \
                n.attribute[0].name == "value":
            return numpy_helper.to_array(n.attribute[0].t)
    return None


def _pad_or_resize(model: onnx.ModelProto, node: onnx.NodeProto, rf: int,
                   stride: int) -> tuple[int, int] | None:
    """Pad: edge/reflect copies reach in by the pad width; wrap reaches across the image.
    Resize: an integer upsampling divides the stride; linear taps one more input pixel."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    attrs = {k: v.decode() if isinstance(v, bytes) else v for k, v in attrs.items()}
    if node.op_type == "Pad":
        mode = attrs.get("mode", "constant")
        pads = _const(model, node.input[1]) if len(node.input) > 1 else None
        if mode == "wrap" or pads is None:
            return None
        reach = 0 if mode == "constant" else int(max(abs(pads).max(), 0))
        return rf + reach * stride, stride
    scales = _const(model, node.input[2]) if len(node.input) > 2 and node.input[2] else None
    mode = attrs.get("mode", "nearest")
    if scales is None or mode not in ("nearest", "linear") or attrs.get("antialias", 0):
        return None
    up = {float(s) for s in scales.reshape(-1) if float(s) != 1.0}
    if not up:
        return rf, stride
    f = up.pop()
    if up or f != int(f) or stride % int(f):
        return None
    return rf + (stride if mode == "linear" else 0), stride // int(f)


def receptive_field(model: onnx.ModelProto, tensor: str,
                    image: str = "image") -> tuple[int, int] | None:
    """(receptive field in pixels, total stride) of ``tensor``, or None when it is global.

    A layer whose value anywhere depends on the whole image (global pooling, attention, a
    squeeze-excite gate, reshapes) has no bounded receptive field: tiles then only approximate.
    """
    consts = {i.name for i in model.graph.initializer}
    state: dict[str, tuple[int, int] | None] = {image: (1, 1)}
    for node in model.graph.node:
        if node.op_type in NON_DIFFERENTIABLE:
            continue
        ins = [i for i in node_inputs(node) if i in state]
        if not ins:
            continue
        if any(state[i] is None for i in ins):
            result = None
        else:
            rf = max(state[i][0] for i in ins)
            stride = max(state[i][1] for i in ins)
            if node.op_type in _WINDOWED:
                attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
                kernel = attrs.get("kernel_shape")
                if kernel is None:
                    w = next((i for i in model.graph.initializer if i.name == node.input[1]), None)
                    kernel = list(w.dims[2:]) if w is not None else None
                if kernel is None:
                    result = None
                else:
                    dil = attrs.get("dilations") or [1] * len(kernel)
                    strides = attrs.get("strides") or [1] * len(kernel)
                    rf += max((k - 1) * d for k, d in zip(kernel, dil)) * stride
                    stride *= max(strides)
                    result = (rf, stride)
            elif node.op_type in ("Pad", "Resize"):
                result = _pad_or_resize(model, node, rf, stride)
            elif node.op_type in _POINTWISE:
                # an operand that is constant or shaped like a broadcast gate from a global op
                # would have state None and been caught above
                result = (rf, stride)
            else:
                result = None
        for out in node.output:
            if out and out not in consts:
                state[out] = result
    return state.get(tensor)
