"""Layers of a dreamable model: name lookup, listing, pre-activation lookup.

Loading is :mod:`.onnxfile`'s and the name → tensor table the contract's (:mod:`.contract`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import onnx

from onnxdream.core.errors import LayerError, closest
from onnxdream.exporters.graph.builder import GraphBuilder, node_attr
from onnxdream.exporters.graph.contract import (
    DEFAULT_SIZE,
    image_input,
    layer_table,
    native_size,
)
from onnxdream.exporters.graph.foreign import infer_layout
from onnxdream.exporters.graph.onnxfile import load_model
from onnxdream.exporters.graph.ops import producers
from onnxdream.exporters.graph.shapes import dims_of, infer_shapes


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
        b = GraphBuilder()
        out = b.op("Concat", parts, out=f"{t}/pre_relu", name=f"{t}/pre_relu_concat",
                   axis=node_attr(node, "axis"))
        new_nodes.extend(b.nodes)
        return out
    return tensor


@dataclass(frozen=True)
class LayerInfo:
    name: str
    tensor: str
    op_type: str
    shape: tuple | None  # at the model's native size (224 unless the model says otherwise)


def list_layers(model: str | os.PathLike | onnx.ModelProto) -> list[LayerInfo]:
    """Every dreamable layer with its op type and output shape at the native input size."""
    proto = load_model(model)
    table = layer_table(proto)
    fixed = onnx.ModelProto()
    fixed.CopyFrom(proto)
    inp = image_input(fixed)
    dims = inp.type.tensor_type.shape.dim
    given = dims_of(inp)
    if len(given) == 4 and infer_layout(given) == "nhwc":  # an unwrapped channels-last model
        h, w = (v if isinstance(v, int) and v > 0 else DEFAULT_SIZE for v in given[1:3])
        concrete = (1, h, w, given[3])
    else:
        h, w = native_size(proto)
        channels = given[1] if len(given) > 1 and isinstance(given[1], int) and given[1] > 0 else 3
        concrete = (1, channels, h, w)
    for d, v in zip(dims, concrete):
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


#: Where a network's recommended layers sit, as fractions of its depth: the middle, where dreams
#: go from edges and colour fringes to patterns, eyes and parts (measured on the zoo models:
#: benchmarks/README.md, "Recommended layers").
RECOMMENDED_DEPTHS = (0.3, 0.45, 0.6, 0.75)


def recommend_layers(candidates: Sequence[str], default: Sequence[str] = (), *,
                     weights: Sequence[float] | None = None, order: Sequence[str] = (),
                     depths: Sequence[float] = RECOMMENDED_DEPTHS) -> list[str]:
    """Layers spread over the middle of a network: the rule for models nobody chose layers for.

    ``candidates`` are the layers worth dreaming (block outputs), in network order; the one at
    each of ``depths`` (a fraction of the cumulative ``weights``, default one each; a
    candidate of weight 0 right after the chosen one, like an activation after its conv, is
    taken instead) joins the ``default`` layers. Returned once each, in network order:
    ``order`` (all layer names, in network order) places defaults that are not candidates.
    """
    names = list(candidates)
    w = [1.0] * len(names) if weights is None else [max(0.0, float(v)) for v in weights]
    if len(w) != len(names):
        raise ValueError("one weight per candidate")
    total = sum(w)
    chosen: list[str] = []
    if names and total > 0:
        cumulative, acc = [], 0.0
        for v in w:
            acc += v
            cumulative.append(acc)
        for f in depths:
            i = next(k for k, c in enumerate(cumulative) if c >= f * total - 1e-9)
            while i + 1 < len(names) and w[i + 1] == 0:
                i += 1
            chosen.append(names[i])
    picked = list(dict.fromkeys([*chosen, *default]))
    rank = {n: i for i, n in enumerate(order or names)}
    missing = len(rank)
    for n in picked:  # a name that is in neither list keeps its place after the known ones
        if n not in rank:
            rank[n] = missing
            missing += 1
    return sorted(picked, key=rank.__getitem__)
