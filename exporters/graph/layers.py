"""Layers of a dreamable model: loading, the name → tensor table, listing, pre-activation lookup."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import onnx

from onnxdream.errors import LayerError, ModelError, closest
from onnxdream.exporters.graph.autodiff import NON_DIFFERENTIABLE, infer_shapes

MIN_OPSET = 18
LAYERS_KEY = "onnxdream.layers"


def load_model(model: str | os.PathLike | onnx.ModelProto) -> onnx.ModelProto:
    """Load an ONNX model from a path (or pass a ModelProto through), at opset >= 18."""
    if isinstance(model, onnx.ModelProto):
        proto = model
    else:
        path = Path(model)
        if not path.exists():
            raise ModelError(f"no such model file: {path}")
        if path.is_dir():
            raise ModelError(f"{path} is a directory, not an ONNX model file")
        try:
            proto = onnx.load(str(path))
        except Exception as exc:  # noqa: BLE001 - protobuf raises many types
            raise ModelError(f"{path} is not a valid ONNX model ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:120] if str(exc) else 'corrupt'})") from None
        if not proto.graph.node:
            raise ModelError(f"{path} is not a valid ONNX model (it has no graph nodes)")
    if len(proto.graph.input) < 1:
        raise ModelError("the model has no input")
    return ensure_opset(proto)


def opset_of(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return 1


def ensure_opset(model: onnx.ModelProto) -> onnx.ModelProto:
    if opset_of(model) >= MIN_OPSET:
        return model
    from onnx import version_converter

    try:
        return version_converter.convert_version(model, MIN_OPSET)
    except Exception as exc:  # noqa: BLE001
        raise ModelError(f"the model uses opset {opset_of(model)} and could not be converted to "
                         f"opset {MIN_OPSET} ({exc}); re-export it at opset {MIN_OPSET}") from None


def metadata(model: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


def image_input(model: onnx.ModelProto) -> onnx.ValueInfoProto:
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise ModelError(f"a dreamable model has exactly one input, this one has {len(inputs)}: "
                         + ", ".join(i.name for i in inputs))
    return inputs[0]


def layer_table(model: onnx.ModelProto) -> dict[str, str]:
    """Layer name → tensor name. From the model's metadata, else every float node output."""
    meta = metadata(model)
    if LAYERS_KEY in meta:
        try:
            table = json.loads(meta[LAYERS_KEY])
        except json.JSONDecodeError:
            raise ModelError(f"the model's {LAYERS_KEY} metadata is not valid JSON") from None
        if "logits" not in table and any(o.name == "logits" for o in model.graph.output):
            table["logits"] = "logits"
        return table
    table = {}
    for node in model.graph.node:
        if node.op_type in NON_DIFFERENTIABLE:
            continue
        for out in node.output:
            if out:
                table[out] = out
    for o in model.graph.output:
        table.setdefault(o.name, o.name)
    return table


def layer_names(model: onnx.ModelProto, table: dict[str, str] | None = None) -> dict[str, str]:
    """Every name :func:`resolve_layer` accepts → its tensor: the layer table and every tensor
    a node produces (for parsing ``--layer`` specs; see ``LayerSpec.parse``)."""
    names = {o: o for n in model.graph.node for o in n.output if o}
    names.update(layer_table(model) if table is None else table)
    return names


def resolve_layer(table: dict[str, str], name: str, model: onnx.ModelProto) -> str:
    """The tensor that carries layer ``name`` (a layer name or any tensor name)."""
    if name in table:
        return table[name]
    produced = {o for n in model.graph.node for o in n.output}
    if name in produced:
        return name
    near = closest(name, list(table))
    names = list(table)
    hint = (f"; closest: {', '.join(near)}" if near else
            f"; layers: {', '.join(names[:8])}{', …' if len(names) > 8 else ''}")
    raise LayerError(f"unknown layer '{name}'{hint} (run `onnxdream layers MODEL` for the list)")


def producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in model.graph.node for o in n.output if o}


def _through_identity(tensor: str, prod: dict[str, onnx.NodeProto]) -> str:
    while tensor in prod and prod[tensor].op_type == "Identity":
        tensor = prod[tensor].input[0]
    return tensor


ACTIVATIONS = ("Relu", "Clip")


def pre_activation(tensor: str, model: onnx.ModelProto, new_nodes: list[onnx.NodeProto]) -> str:
    """The tensor before a Relu/Clip that produces ``tensor`` (or a Concat of such).

    Appends a Concat node to ``new_nodes`` when the layer is a Concat of activations. Returns
    ``tensor`` unchanged when there is no activation to look through.
    """
    prod = producers(model)
    t = _through_identity(tensor, prod)
    node = prod.get(t)
    if node is None:
        return tensor
    if node.op_type in ACTIVATIONS:
        return node.input[0]
    if node.op_type == "Concat":
        parts = []
        for inp in node.input:
            src = prod.get(_through_identity(inp, prod))
            if src is None or src.op_type not in ACTIVATIONS:
                return tensor
            parts.append(src.input[0])
        out = f"{t}/pre_relu"
        new_nodes.append(onnx.helper.make_node("Concat", parts, [out], name=f"{t}/pre_relu_concat",
                                               axis=[a.i for a in node.attribute
                                                     if a.name == "axis"][0]))
        return out
    return tensor


@dataclass(frozen=True)
class LayerInfo:
    name: str
    tensor: str
    op_type: str
    shape: tuple | None  # at the model's native size (224 unless the model says otherwise)


def native_size(model: onnx.ModelProto) -> tuple[int, int]:
    meta = metadata(model)
    dims = image_input(model).type.tensor_type.shape.dim
    if len(dims) == 4 and dims[2].HasField("dim_value") and dims[3].HasField("dim_value"):
        return dims[2].dim_value, dims[3].dim_value
    size = int(meta.get("onnxdream.input_size", "224") or 224)
    return size, size


def list_layers(model: str | os.PathLike | onnx.ModelProto) -> list[LayerInfo]:
    """Every dreamable layer with its op type and output shape at the native input size."""
    proto = load_model(model)
    table = layer_table(proto)
    h, w = native_size(proto)
    fixed = onnx.ModelProto()
    fixed.CopyFrom(proto)
    inp = image_input(fixed)
    dims = inp.type.tensor_type.shape.dim
    for d, v in zip(dims, (1, 3, h, w)):
        d.Clear()
        d.dim_value = v
    # expose layer tensors as outputs so inference keeps their shapes
    inferred = infer_shapes(fixed)
    shapes = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
        tt = vi.type.tensor_type
        if tt.HasField("shape"):
            shapes[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else "?"
                                    for d in tt.shape.dim)
    prod = producers(proto)
    out = []
    for name, tensor in table.items():
        src = prod.get(_through_identity(tensor, prod))
        out.append(LayerInfo(name, tensor, src.op_type if src is not None else "input",
                             shapes.get(tensor)))
    return out
