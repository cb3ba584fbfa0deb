"""Tensor shapes: onnx shape inference that also works past protobuf's 2 GB limit, and a value's
dims as plain Python values.

A leaf (onnx only): autodiff, the layer listing, the importer, the memory estimate and the
optimiser infer shapes through :func:`infer_shapes`.
"""

from __future__ import annotations

import onnx
from onnx import helper


def infer_shapes(model: onnx.ModelProto, data_prop: bool = True) -> onnx.ModelProto:
    """onnx shape inference that also works past protobuf's 2 GB limit.

    Large weights are swapped for graph inputs of the same type and shape (inference needs their
    shapes, not their values); returns the model unchanged where inference fails.
    """
    big = [i for i in model.graph.initializer if i.ByteSize() > 1 << 20]
    light = model
    if big:
        light = onnx.ModelProto()
        _copy_without(model, light, big)
        names = {i.name for i in big}
        keep = [i for i in light.graph.initializer if i.name not in names]
        del light.graph.initializer[:]
        light.graph.initializer.extend(keep)
        light.graph.input.extend(helper.make_tensor_value_info(i.name, i.data_type, list(i.dims))
                                 for i in big)
    try:
        return onnx.shape_inference.infer_shapes(light, data_prop=data_prop)
    except Exception:  # noqa: BLE001 - shape inference is best effort
        return light


def _copy_without(model: onnx.ModelProto, dst: onnx.ModelProto, big) -> None:
    """Copy ``model`` into ``dst`` without serialising its large initializers."""
    names = {i.name for i in big}
    dst.CopyFrom(onnx.ModelProto())
    for attr in ("ir_version", "producer_name", "producer_version", "domain", "model_version"):
        setattr(dst, attr, getattr(model, attr))
    dst.opset_import.extend(model.opset_import)
    g = model.graph
    dst.graph.name = g.name
    dst.graph.node.extend(g.node)
    dst.graph.input.extend(g.input)
    dst.graph.output.extend(g.output)
    dst.graph.value_info.extend(g.value_info)
    dst.graph.initializer.extend(i for i in g.initializer if i.name not in names)


def dims_of(vi: onnx.ValueInfoProto) -> list:
    """A value's dims: ints where fixed, the symbol (or None) where not."""
    tt = vi.type.tensor_type
    if not tt.HasField("shape"):
        return []
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
            for d in tt.shape.dim]
