"""The gradient compiler: dreamable model + objective → a graph with ``objective`` and ``grad``.

Pure onnx + numpy: importable and runnable with no deep learning framework installed. What the
compiled graph takes and gives (``image``, the objective parameters, ``objective``, ``grad``) is
the contract's (:mod:`.contract`).

**Targets** (op profiles, :data:`TARGETS`): every compiled graph uses standard ONNX ops only;
``default`` is the fastest on onnxruntime's CPU and CUDA providers. ``portable`` avoids what some
providers lack, with the same values (up to float rounding; ``tests/test_web.py`` checks it):

- MaxPool's ``Indices`` output and the ScatterElements(add) of its backward (onnxruntime-web's
  WebGPU provider has no ``Indices``; OpenVINO runs them slowly): strided pools get the
  mask-based phase backward (:func:`.passes.fast_adjoints.emit_maxpool_backward`) that the default
  profile uses only at stride 1 (it costs CPU time at large sizes).
- The antialiased Resize that fits a region mask to its layer (WebGPU has no ``antialias``):
  a plain linear Resize after the block average on the layer's stride, which has already
  brought the mask to the layer's size wherever the stride is known (the default mask, all
  ones, is the same either way).

ScatterND(add), which OpenVINO refuses, is avoided by every target where it can be: a Gather
with constant, distinct indices scatters its gradient without a reduction (``rules/shape.py``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import onnx
from onnx import helper

from onnxdream.core.errors import ModelError, ObjectiveError
from onnxdream.exporters.graph import contract
from onnxdream.exporters.graph.autodiff import GraphInfo, differentiate
from onnxdream.exporters.graph.builder import GraphBuilder
from onnxdream.exporters.graph.contract import (
    CHANNEL_WEIGHTS,
    GRAD,
    GUIDE_PREFIX,
    MASK,
    OBJECTIVE,
    WEIGHTS,
    ModelInfo,
    image_input,
    param_input,
)
from onnxdream.exporters.graph.layers import layer_names, pre_activation, resolve_layer
from onnxdream.exporters.graph.objective import (
    MASKED_KINDS,
    LayerSpec,
    Objective,
    channel_weights_shape,
    emit_term,
    guide_channels,
)
from onnxdream.exporters.graph.onnxfile import load_model, opset_of
from onnxdream.exporters.graph.ops import node_inputs
from onnxdream.exporters.graph.optimize import optimize as optimize_graph
from onnxdream.exporters.graph.receptive_field import receptive_field


def _needed_nodes(nodes: Sequence[onnx.NodeProto], targets: set[str]) -> list[onnx.NodeProto]:
    """The nodes needed to compute ``targets``, in their original (topological) order."""
    prod = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    keep: set[int] = set()
    stack = [t for t in targets if t in prod]
    while stack:
        i = prod[stack.pop()]
        if i in keep:
            continue
        keep.add(i)
        stack.extend(x for x in node_inputs(nodes[i]) if x in prod and prod[x] not in keep)
    return [nodes[i] for i in sorted(keep)]


def _upstream_of(nodes: Sequence[onnx.NodeProto], tensor: str) -> set[int]:
    return {id(n) for n in _needed_nodes(nodes, {tensor})}


def compile_gradient(
    model: str | os.PathLike | onnx.ModelProto,
    layers: Sequence[str | LayerSpec] | Objective = (),
    objective: str = "mean",
    *,
    pre_relu: bool = False,
    border: int = 0,
    optimize: bool = True,
    target: str = "default",
) -> onnx.ModelProto:
    """Truncate ``model`` at the layer(s), attach the objective, append its input gradient.

    ``layers`` are names (``"inception4c"``, ``"mixed4:2.0"``) combined with ``objective``
    (``mean``, ``l2``, ``channel:K``, ``neuron:K``, ``class:K``), or an :class:`Objective` built
    in Python. ``pre_relu`` reads layers that come out of a Relu/Clip before the activation;
    ``border`` drops that many pixels at each spatial edge of 4-D layers before reducing.

    The result has the model's input ``image``, the objective parameters ``weights`` (one per
    term, default the terms' weights), for a ``weighted_channels`` term ``channel_weights``,
    for each ``guide`` term t ``guide.<t>`` (no default) and, when a term averages the positions
    of a 4-D layer, the region ``mask`` (default ones); outputs ``objective`` ([N]) and
    ``grad`` (shaped like ``image``); uses default-domain ops only, and serves every input size
    the model does (see :mod:`.contract`). ``target``: the op profile, one of :data:`TARGETS`
    (see the module docstring).
    """
    if target not in TARGETS:
        raise ModelError(f"unknown target {target!r}: use {' or '.join(TARGETS)}",
                         field="target")
    if target == "portable" and not optimize:
        raise ModelError("the portable target needs the optimised graph", field="target")
    proto = load_model(model)
    info_model = ModelInfo.load(proto)
    table = info_model.layers
    obj = layers if isinstance(layers, Objective) else Objective.build(
        list(layers), objective, known=layer_names(proto, table))
    image = image_input(proto)
    opset = max(opset_of(proto), 18)
    if sum(t.kind == "weighted_channels" for t in obj.terms) > 1:
        raise ObjectiveError("an objective has at most one weighted_channels term (one "
                             f"{CHANNEL_WEIGHTS} input)")

    layer_tensor, all_nodes, forward = _forward(proto, info_model, obj, pre_relu)
    taken = {o for n in all_nodes for o in n.output} | {n.name for n in all_nodes}
    taken |= {i.name for i in proto.graph.initializer} | {i.name for i in proto.graph.input}
    taken |= {OBJECTIVE, GRAD, WEIGHTS, CHANNEL_WEIGHTS, MASK}
    taken |= {f"{GUIDE_PREFIX}{k}" for k in range(len(obj.terms))}
    fwd_builder = GraphBuilder(opset, "objective", taken)

    # shapes of the forward tensors (including the pre-relu concat)
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    del probe.graph.node[:]
    probe.graph.node.extend(forward)
    info = GraphInfo.from_model(probe)

    # the objective parameters: graph inputs whose defaults are same-named initializers
    params = [param_input(WEIGHTS, np.asarray(obj.weights, np.float32), [len(obj.terms)])]
    shapes = {t.layer: info.shapes.get(layer_tensor[t.layer]) for t in obj.terms}
    if any(_masked(t, shapes[t.layer]) for t in obj.terms):
        # region masks at image resolution, [1 or N, 1 or T, H, W]; default ones (see contract)
        params.append(param_input(MASK, np.ones((1, 1, 1, 1), np.float32),
                                  ["mask_batch", "mask_terms", "mask_height", "mask_width"]))
    values = []
    for k, t in enumerate(obj.terms):
        tensor, layout = layer_tensor[t.layer], info_model.layout(t.layer)
        shape = shapes[t.layer]
        cw = guide = mask = None
        if t.kind == "weighted_channels":
            cw_shape = channel_weights_shape(t, shape, _batch(image), layout)
            channels = int(np.prod(cw_shape[1:]))  # one axis is C, the others 1
            params.append(param_input(CHANNEL_WEIGHTS, np.full([1] + cw_shape[1:], 1 / channels,
                                                               np.float32), cw_shape))
            cw = CHANNEL_WEIGHTS
        if t.kind == "guide":  # no default: a guided graph needs its guide's features
            guide = f"{GUIDE_PREFIX}{k}"
            params.append((helper.make_tensor_value_info(
                guide, onnx.TensorProto.FLOAT,
                [f"guide{k}_vectors", guide_channels(t, shape, layout)]), None))
        if _masked(t, shape):
            rf = receptive_field(proto, tensor, image.name)
            mask = _region_mask(fwd_builder, k, tensor, layout, rf[1] if rf else None,
                                antialias=target != "portable")
        value = emit_term(fwd_builder, t, tensor, shape, border if t.kind != "class" else 0,
                          layout, cw, guide, mask)
        weight = fwd_builder.op("Gather", [WEIGHTS, fwd_builder.const(k, np.int64)], axis=0,
                                hint="term_weight")
        values.append(fwd_builder.mul(value, weight))
    total = fwd_builder.add_all(values) if len(values) > 1 else fwd_builder.op("Identity", values)
    fwd_builder.op("Identity", [total], out=OBJECTIVE, name="objective/output")
    objective_nodes = fwd_builder.nodes
    forward_all = forward + objective_nodes

    # shapes again, now with the objective nodes, for the rules; the parameters are inputs
    # only (never constants: a caller overrides them)
    probe2 = onnx.ModelProto()
    probe2.CopyFrom(proto)
    del probe2.graph.node[:]
    probe2.graph.node.extend(forward_all)
    probe2.graph.initializer.extend(fwd_builder.initializers)
    probe2.graph.input.extend(vi for vi, _ in params)
    info = GraphInfo.from_model(probe2)

    bwd = GraphBuilder(opset, "grad", taken)
    seed = bwd.ones_of_shape(bwd.shape(OBJECTIVE))
    upstream = {name: _upstream_of(forward_all, t) for name, t in layer_tensor.items()}

    def blame(node: onnx.NodeProto) -> str:
        names = [n for n, ids in upstream.items() if id(node) in ids]
        return "layer " + ", ".join(f"'{n}'" for n in names) if names else "the objective"

    grad = differentiate(forward_all, image.name, OBJECTIVE, seed, bwd, info, blame)
    bwd.op("Identity", [grad], out=GRAD, name="grad/output")

    used = {i for n in forward_all + bwd.nodes for i in n.input}
    inits = [i for i in proto.graph.initializer if i.name in used]
    obj_out = helper.make_tensor_value_info(OBJECTIVE, onnx.TensorProto.FLOAT, [_batch(image)])
    grad_out = onnx.ValueInfoProto()
    grad_out.CopyFrom(image)
    grad_out.name = GRAD
    graph = helper.make_graph(forward_all + bwd.nodes, "onnxdream_gradient",
                              [image] + [vi for vi, _ in params], [obj_out, grad_out],
                              inits + fwd_builder.initializers + bwd.initializers
                              + [default for _, default in params if default is not None])
    opsets = [helper.make_opsetid("", opset)]
    out = helper.make_model(graph, opset_imports=opsets, producer_name="onnxdream",
                            ir_version=proto.ir_version)
    contract.write_compiled(out, proto, {
        "objective": obj.describe(), "terms": [t.__dict__ for t in obj.terms],
        "layers": layer_tensor, "pre_relu": pre_relu, "border": border, "target": target})
    if optimize:  # same values, fewer/faster nodes (see optimize.py)
        out = optimize_graph(out, portable=target == "portable")
        if target == "portable" and (problems := portability_problems(out)):
            raise ModelError("the portable target cannot avoid " + "; ".join(problems[:3]),
                             field="target")
    return out


#: The op profiles :func:`compile_gradient` can target (see the module docstring).
TARGETS = ("default", "portable")


def portability_problems(model: onnx.ModelProto) -> list[str]:
    """What in ``model`` the portable target avoids, one phrase per node (empty: none)."""
    out = []
    for n in model.graph.node:
        reduction = next((a.s for a in n.attribute if a.name == "reduction"), b"none")
        if n.op_type == "MaxPool" and len(n.output) > 1 and n.output[1]:
            out.append(f"MaxPool's Indices output (node {n.name})")
        elif n.op_type == "Resize" and any(a.name == "antialias" and a.i for a in n.attribute):
            out.append(f"an antialiased Resize (node {n.name})")
        elif n.op_type in ("ScatterElements", "ScatterND") and reduction != b"none":
            out.append(f"{n.op_type} with reduction {reduction.decode()} (node {n.name})")
    return out


def _forward(proto: onnx.ModelProto, info_model: ModelInfo, obj: Objective, pre_relu: bool
             ) -> tuple[dict[str, str], list[onnx.NodeProto], list[onnx.NodeProto]]:
    """(layer name -> its tensor, every node incl. the pre-ReLU concats, copies of the nodes
    that compute the layers)."""
    extra_nodes: list[onnx.NodeProto] = []
    layer_tensor: dict[str, str] = {}
    for name in obj.layers:
        if name == contract.LOGITS and name not in info_model.layers:
            info_model.require_logits("class objectives do not apply")
        tensor = resolve_layer(info_model.layers, name, proto)
        if pre_relu and not any(t.kind == "class" for t in obj.terms if t.layer == name):
            tensor = pre_activation(tensor, proto, extra_nodes)
        layer_tensor[name] = tensor
    all_nodes = list(proto.graph.node) + extra_nodes
    forward: list[onnx.NodeProto] = []
    for n in _needed_nodes(all_nodes, set(layer_tensor.values())):
        copy = onnx.NodeProto()
        copy.CopyFrom(n)
        forward.append(copy)
    return layer_tensor, all_nodes, forward


def _masked(term, shape: tuple | None) -> bool:
    """Whether the region mask applies to ``term``: a position-averaging kind on a 4-D map."""
    return term.kind in MASKED_KINDS and shape is not None and len(shape) == 4


def _region_mask(b: GraphBuilder, k: int, tensor: str, layout: str, stride: int | None, *,
                 antialias: bool = True) -> str:
    """Term ``k``'s region mask at ``tensor``'s resolution: channel ``k mod T`` of the ``mask``
    input (one mask for every term, or one per term); ``[B, 1, h, w]``, or ``[B, h, w, 1]`` for
    NHWC. A layer of known ``stride`` s averages each s x s block of pixels (its position's
    own block, whatever the tile it is cut from: tiles start on the stride), then a Resize
    (linear, antialiased unless ``antialias`` is false: the portable target; an identity where
    the sizes agree) makes it the layer's size."""
    index = b.op("Mod", [b.ints([k]), b.dim(MASK, 1)])
    mask = b.op("Gather", [MASK, index], axis=1, hint="term_mask")
    if stride is not None and stride > 1:
        mask = b.op("AveragePool", [mask], kernel_shape=[stride, stride],
                    strides=[stride, stride], ceil_mode=1, count_include_pad=0,
                    hint="block_mask")
    hw = [1, 3] if layout == "NHWC" else [2, 4]
    size = b.slice(b.shape(tensor), [hw[0]], [hw[1]], [0])
    mask = b.op("Resize", [mask, "", "", size], axes=[2, 3], mode="linear",
                antialias=int(antialias), hint="layer_mask")
    if layout == "NHWC":
        mask = b.op("Transpose", [mask], perm=[0, 2, 3, 1])
    return mask


def compile_features(model: str | os.PathLike | onnx.ModelProto,
                     layers: Sequence[str | LayerSpec] | Objective, *,
                     pre_relu: bool = False) -> onnx.ModelProto:
    """A forward-only graph: ``image`` -> the activations of ``layers`` (outputs
    ``features.0``, ``features.1``, ... in the order of ``Objective.layers``), read exactly as
    :func:`compile_gradient` reads them (``pre_relu`` included). The guided dream runs it on the
    guide image to get each guide term's features."""
    proto = load_model(model)
    info_model = ModelInfo.load(proto)
    obj = layers if isinstance(layers, Objective) else Objective.build(
        list(layers), "mean", known=layer_names(proto, info_model.layers))
    layer_tensor, _, forward = _forward(proto, info_model, obj, pre_relu)
    image = image_input(proto)
    b = GraphBuilder(max(opset_of(proto), 18), "features",
                     {o for n in forward for o in n.output})
    outputs = []
    for k, name in enumerate(obj.layers):
        out = b.op("Identity", [layer_tensor[name]], out=f"features.{k}")
        outputs.append(helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, None))
    used = {i for n in forward for i in n.input}
    inits = [i for i in proto.graph.initializer if i.name in used]
    graph = helper.make_graph(forward + b.nodes, "onnxdream_features", [image], outputs, inits)
    out = helper.make_model(graph, opset_imports=[helper.make_opsetid("", max(opset_of(proto),
                                                                              18))],
                            producer_name="onnxdream", ir_version=proto.ir_version)
    for p in proto.metadata_props:
        out.metadata_props.add(key=p.key, value=p.value)
    return out


def _batch(image: onnx.ValueInfoProto):
    d = image.type.tensor_type.shape.dim
    if d and d[0].HasField("dim_value"):
        return d[0].dim_value
    return d[0].dim_param if d and d[0].dim_param else "batch"
