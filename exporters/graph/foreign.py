"""A foreign ONNX model as it comes, before ``onnxdream import onnx`` wraps it: its inputs, the
layout and size of its image input, its logits, and the import flags it probably needs.

:func:`guess_flags` is the hint that ``dream``/``predict``/``compile`` give for an unwrapped file
(:func:`onnxdream.exporters.graph.contract.require_dreamable`); the importer
(:mod:`.importer`) reads the model with the same helpers. A leaf: it knows nothing of the
contract (the contract passes in the size to probe at).
"""

from __future__ import annotations

from collections.abc import Sequence

import onnx

from onnxdream.core.errors import SettingsError, did_you_mean
from onnxdream.exporters.graph.ops import FLOAT_TYPES, producers
from onnxdream.exporters.graph.shapes import dims_of, infer_shapes

#: ops a classifier's logits pass through unchanged on their way to an output
RESHAPES = ("Identity", "Flatten", "Reshape", "Squeeze")


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The graph inputs that are not initializers."""
    inits = {i.name for i in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def infer_layout(dims: Sequence) -> str | None:
    """``"nchw"`` or ``"nhwc"`` from an input's dims where a channel axis of 3 (or 1) tells;
    None when ambiguous."""
    for channels in (3, 1):
        first, last = dims[1] == channels, dims[3] == channels
        if first != last:
            return "nchw" if first else "nhwc"
        if first and last:
            return None
    return None


def spatial_dims(dims: Sequence, layout: str) -> tuple:
    """(H, W) of image dims in ``layout``."""
    return (dims[2], dims[3]) if layout == "nchw" else (dims[1], dims[2])


def channel_dim(dims: Sequence, layout: str):
    """C of image dims in ``layout``."""
    return dims[1] if layout == "nchw" else dims[3]


def shape_text(dims: Sequence) -> str:
    """Dims for a message: ``[1, 3, ?, ?]``."""
    return "[" + ", ".join("?" if not isinstance(d, int) or d <= 0 else str(d) for d in dims) + "]"


def shapes_at(model: onnx.ModelProto, inp: str, dims: Sequence, layout: str,
              native: tuple[int, int]) -> tuple[dict, dict]:
    """Shapes and dtypes of every tensor with ``inp`` set to one image at the native size."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    concrete = [1, 3, native[0], native[1]] if layout == "nchw" else [1, native[0], native[1], 3]
    channels = channel_dim(dims, layout) if len(dims) == 4 else 3
    if isinstance(channels, int) and channels > 0:
        concrete[1 if layout == "nchw" else 3] = channels
    for i in probe.graph.input:
        if i.name == inp:
            d = i.type.tensor_type.shape.dim
            for axis, v in enumerate(concrete):
                d[axis].Clear()
                d[axis].dim_value = v
    del probe.graph.value_info[:]
    inferred = infer_shapes(probe)
    shapes, dtypes = {}, {}
    g = inferred.graph
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        tt = vi.type.tensor_type
        dtypes[vi.name] = tt.elem_type
        if tt.HasField("shape"):
            shapes[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else None
                                    for d in tt.shape.dim)
    return shapes, dtypes


def find_logits(model: onnx.ModelProto, shapes: dict, requested: str | None
                ) -> tuple[str | None, str | None]:
    """(the logits tensor or None, a note on how it was chosen)."""
    prod = producers(model)
    if requested is not None:
        if requested.lower() == "none":
            return None, None
        known = set(prod) | {o.name for o in model.graph.output}
        if requested not in known:
            raise SettingsError("logits", f"names no tensor of the model: {requested!r}"
                                + did_you_mean(requested, sorted(known)))
        shape = shapes.get(requested)
        if shape is not None and len(shape) != 2:
            raise SettingsError("logits", f"must name an [N, classes] tensor; {requested!r} is "
                                f"{shape_text(shape)}")
        return requested, None
    rank2 = [o.name for o in model.graph.output
             if o.type.tensor_type.elem_type in FLOAT_TYPES
             and len(shapes.get(o.name) or dims_of(o)) == 2]
    if not rank2:
        return None, None
    if len(rank2) > 1:
        return None, (f"several [N, K] outputs ({', '.join(rank2)}): no logits; name them with "
                      "--logits")
    name = rank2[0]
    src = name
    while src in prod and prod[src].op_type in RESHAPES:
        src = prod[src].input[0]
    node = prod.get(src)
    if node is not None and node.op_type in ("Softmax", "LogSoftmax"):
        src = node.input[0]  # back through the reshapes an opset conversion adds
        while (src in prod and prod[src].op_type in RESHAPES
               and len(shapes.get(prod[src].input[0]) or ()) == 2):
            src = prod[src].input[0]
        return src, (f"the output {name!r} is a {node.op_type.lower()}, not logits: using its "
                     f"input {src!r}")
    return name, None


def guess_flags(model: onnx.ModelProto, size: int) -> tuple[list[str], str]:
    """(the ``import onnx`` flags an unwrapped model probably needs, what its input is);
    ``size`` is the side its shapes are probed at when the input does not fix it."""
    inputs = graph_inputs(model)
    floats = [i for i in inputs if i.type.tensor_type.elem_type in FLOAT_TYPES]
    flags: list[str] = []
    vi = floats[0] if floats else (inputs[0] if inputs else None)
    if vi is None:
        return flags, "no input"
    if len(floats) != 1:
        flags += ["--input", vi.name]
    dims = dims_of(vi)
    what = f"input {vi.name!r} {shape_text(dims)}"
    if len(dims) == 4:
        lay = infer_layout(dims)
        if lay == "nhwc":
            flags += ["--layout", "nhwc"]
            what += " NHWC"
        elif lay is None:
            flags += ["--layout", "nchw|nhwc"]
        h, w = spatial_dims(dims, lay or "nchw")
        if isinstance(h, int) != isinstance(w, int):
            flags += ["--size", "HxW"]
    producer = (model.producer_name or "").lower()
    prep = ("torch" if "torch" in producer else "tf" if "tf2onnx" in producer
            or "keras" in producer else "unit")
    flags += ["--preprocess", prep]
    try:
        shapes, _ = (shapes_at(model, vi.name, dims, infer_layout(dims) or "nchw", (size, size))
                     if len(dims) == 4 else ({}, {}))
        tensor, note = find_logits(model, shapes, None)
    except Exception:  # noqa: BLE001 - a hint is best effort
        tensor, note = None, None
    if tensor is None and note:  # several [N, K] outputs: the user picks
        flags += ["--logits", "TENSOR"]
    return flags, what
