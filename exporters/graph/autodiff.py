"""Reverse-mode differentiation of an ONNX graph into standard ONNX ops.

Walks the forward nodes in reverse topological order, asks the rule registered for each op type
for the gradients of its inputs, and sums the gradients that meet at a tensor. Only the nodes on
a path from the input being differentiated to the target are visited; a node on such a path
whose op has no rule is an error, never a silently dropped path.

The rules live in :mod:`.rules`, one module per op family, each registered with :func:`rule`;
what autodiff knows of ops besides (:data:`~.ops.NON_DIFFERENTIABLE`, the float types) is in
:mod:`.ops`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxdream.core.errors import UnsupportedOpError
from onnxdream.exporters.graph.builder import GraphBuilder
from onnxdream.exporters.graph.ops import FLOAT_TYPES, NON_DIFFERENTIABLE, node_inputs
from onnxdream.exporters.graph.shapes import infer_shapes

Rule = Callable[["RuleContext", Sequence["str | None"]], Sequence["str | None"]]
RULES: dict[str, Rule] = {}


def rule(*op_types: str):
    """Register a gradient rule: fn(ctx, output_grads) -> input_grads (None where not needed)."""

    def register(fn: Rule) -> Rule:
        for op_type in op_types:
            RULES[op_type] = fn
        return fn

    return register


_SLICE_TO_END = 1 << 31  # an end at least this large runs to the end of the axis


def _unit_slice_axes(node: onnx.NodeProto, constants: dict[str, np.ndarray]) -> list[int] | None:
    """The axes along which ``node`` (a Slice) keeps exactly one element whatever the input's
    extent: ``x[..., -1:]`` (start -1 to the end) or ``x[..., k:k+1]`` (k >= 0), step 1. Axes
    may be negative; None when the slice's parameters are not constants."""
    ins = list(node.input) + [""] * (5 - len(node.input))
    starts, ends = constants.get(ins[1]), constants.get(ins[2])
    if starts is None or ends is None:
        return None
    starts, ends = starts.reshape(-1).tolist(), ends.reshape(-1).tolist()
    axes = (constants.get(ins[3]) if ins[3] else np.arange(len(starts)))
    steps = (constants.get(ins[4]) if ins[4] else np.ones(len(starts), np.int64))
    if axes is None or steps is None:
        return None
    out = []
    for start, end, axis, step in zip(starts, ends, axes.reshape(-1).tolist(),
                                      steps.reshape(-1).tolist()):
        unit = (start == -1 and end >= _SLICE_TO_END) or (0 <= start and end == start + 1)
        if step == 1 and unit:
            out.append(int(axis))
    return out


def _with_unit_slices(inferred: onnx.ModelProto, rounds: int = 3) -> onnx.ModelProto:
    """Shape inference that knows ``x[..., -1:]`` has size 1 along a dynamic axis.

    onnx infers such a slice's extent only when the input's extent is static; a symbolic one
    makes it symbolic too, and the rules take a symbolic extent for a real (non-broadcast)
    one, so a gradient flowing into a broadcast ``x[..., -1:]`` would not be summed. The unit
    extents are written into the value infos and inference runs again, so they propagate to the
    ops downstream.
    """
    g = inferred.graph
    constants = {i.name: numpy_helper.to_array(i) for i in g.initializer
                 if i.data_type == onnx.TensorProto.INT64}
    for node in g.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    slices = [(n, axes) for n in g.node if n.op_type == "Slice"
              for axes in [_unit_slice_axes(n, constants)] if axes]
    for _ in range(rounds):
        infos = {vi.name: vi for vi in g.value_info}
        changed = False
        for node, axes in slices:
            vi = infos.get(node.output[0])
            if vi is None or not vi.type.tensor_type.HasField("shape"):
                continue
            dims = vi.type.tensor_type.shape.dim
            for axis in axes:
                if -len(dims) <= axis < len(dims) and not dims[axis].HasField("dim_value"):
                    dims[axis].Clear()
                    dims[axis].dim_value = 1
                    changed = True
        if not changed:
            break
        try:
            inferred = onnx.shape_inference.infer_shapes(inferred, data_prop=True)
        except Exception:  # noqa: BLE001 - keep what we have
            break
        g = inferred.graph
    return inferred


@dataclass
class GraphInfo:
    """What the rules may ask about forward tensors: static shapes, dtypes, constant values."""

    shapes: dict[str, tuple | None]
    dtypes: dict[str, int]
    constants: dict[str, np.ndarray]

    @classmethod
    def from_model(cls, model: onnx.ModelProto) -> GraphInfo:
        inferred = _with_unit_slices(infer_shapes(model))
        shapes: dict[str, tuple | None] = {}
        dtypes: dict[str, int] = {}
        g = inferred.graph
        for vi in list(g.input) + list(g.value_info) + list(g.output):
            tt = vi.type.tensor_type
            dtypes[vi.name] = tt.elem_type
            if tt.HasField("shape"):
                shapes[vi.name] = tuple(
                    d.dim_value if d.HasField("dim_value")
                    else (d.dim_param or None) for d in tt.shape.dim)
        constants: dict[str, np.ndarray] = {}
        for init in model.graph.initializer:  # the inferred copy may lack the large ones
            arr = numpy_helper.to_array(init)
            constants[init.name] = arr
            shapes[init.name] = arr.shape
            dtypes[init.name] = init.data_type
        for node in g.node:
            if node.op_type == "Constant" and node.attribute:
                a = node.attribute[0]
                if a.name == "value":
                    arr = numpy_helper.to_array(a.t)
                elif a.name in ("value_float", "value_int"):
                    arr = np.array(helper.get_attribute_value(a))
                elif a.name in ("value_floats", "value_ints"):
                    arr = np.array(helper.get_attribute_value(a))
                else:
                    continue
                constants[node.output[0]] = arr
                shapes[node.output[0]] = arr.shape
        return cls(shapes, dtypes, constants)


@dataclass
class RuleContext:
    """The node being differentiated, plus helpers the rules share."""

    node: onnx.NodeProto
    b: GraphBuilder
    info: GraphInfo
    active: set[str]
    extra_outputs: dict[tuple[int, int], str] = field(default_factory=dict)
    node_index: int = 0

    @property
    def inputs(self) -> list[str]:
        return list(self.node.input)

    @property
    def outputs(self) -> list[str]:
        return list(self.node.output)

    def needs(self, i: int) -> bool:
        return i < len(self.node.input) and self.node.input[i] in self.active

    def attr(self, name: str, default=None):
        for a in self.node.attribute:
            if a.name == name:
                v = helper.get_attribute_value(a)
                return v.decode() if isinstance(v, bytes) else v
        return default

    def shape(self, name: str) -> tuple | None:
        return self.info.shapes.get(name)

    def rank(self, name: str) -> int:
        s = self.info.shapes.get(name)
        if s is None:
            raise UnsupportedOpError(
                f"cannot differentiate {self.node.op_type} node '{self.node.name}': the rank of "
                f"'{name}' is unknown after shape inference")
        return len(s)

    def const(self, i: int) -> np.ndarray | None:
        """The constant value of input i, if it is an initializer or a Constant."""
        if i >= len(self.node.input) or not self.node.input[i]:
            return None
        return self.info.constants.get(self.node.input[i])

    def input(self, i: int) -> str | None:
        return self.node.input[i] if i < len(self.node.input) and self.node.input[i] else None

    def forward_output(self, i: int) -> str:
        """Name of forward output i, adding it to the forward node if it was not requested."""
        if i < len(self.node.output) and self.node.output[i]:
            return self.node.output[i]
        while len(self.node.output) <= i:
            self.node.output.append("")
        name = self.b.fresh(f"{self.node.op_type.lower()}_out{i}")
        self.node.output[i] = name
        return name

    def fail(self, why: str) -> UnsupportedOpError:
        return UnsupportedOpError(
            f"cannot differentiate {self.node.op_type} node '{self.node.name}': {why}")

    # -- shared gradient helpers --------------------------------------------------------------
    def unbroadcast(self, g: str, x: str, y: str) -> str:
        """Sum g (shaped like the broadcast result y) back to the shape of operand x."""
        b = self.b
        xs, ys = self.shape(x), self.shape(y)
        if xs is None or ys is None:
            raise self.fail(f"the ranks of '{x}' and '{y}' are unknown")
        lead = len(ys) - len(xs)
        if lead > 0:
            g = b.reduce_sum(g, list(range(lead)), keepdims=0)
        # A symbolic dimension is taken to be a real (non-broadcast) extent: feature maps whose
        # size follows the image. Broadcasting comes from static 1s (biases, pooled SE gates).
        axes = [i for i, (dx, dy) in enumerate(zip(xs, ys[lead:])) if dx == 1 and dy != 1]
        if axes:
            g = b.reduce_sum(g, axes, keepdims=1)
        return g


def active_tensors(nodes: Sequence[onnx.NodeProto], wrt: str, info: GraphInfo) -> set[str]:
    """Tensors that depend differentiably on ``wrt``."""
    active = {wrt}
    for node in nodes:
        if node.op_type in NON_DIFFERENTIABLE:
            continue
        if not any(i in active for i in node_inputs(node)):
            continue
        for j, out in enumerate(node.output):
            if not out:
                continue
            if node.op_type == "MaxPool" and j == 1:
                continue
            if node.op_type in ("TopK",) and j == 1:
                continue
            dtype = info.dtypes.get(out)
            if dtype is not None and dtype != 0 and dtype not in FLOAT_TYPES:
                continue
            active.add(out)
    return active


def _rule_for(node: onnx.NodeProto, blame: Callable[[onnx.NodeProto], str]) -> Rule:
    fn = RULES.get(node.op_type) if node.domain in ("", "ai.onnx") else None
    if fn is None:
        op = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
        raise UnsupportedOpError(
            f"no gradient rule for op {op} (node '{node.name or node.output[0]}'), "
            f"needed by {blame(node) or 'the objective'}")
    return fn


def differentiate(
    nodes: list[onnx.NodeProto],
    wrt: str,
    target: str,
    seed: str,
    builder: GraphBuilder,
    info: GraphInfo,
    blame: Callable[[onnx.NodeProto], str] = lambda node: "",
) -> str:
    """Append to ``builder`` the gradient of ``target`` (seeded with ``seed``) w.r.t. ``wrt``.

    ``nodes`` are the forward nodes in topological order; rules may add outputs to them (e.g.
    MaxPool indices). ``blame(node)`` names the layer(s) that need a node, for error messages.
    Returns the name of the gradient tensor.
    """
    # Importing the rule modules registers them (they import this module for @rule: the
    # registry's one cycle, closed here at call time).
    from onnxdream.exporters.graph.rules import math, nn, resize, shape  # noqa: F401

    active = active_tensors(nodes, wrt, info)
    if target not in active:
        raise UnsupportedOpError(f"the objective '{target}' does not depend on '{wrt}'")
    # Fail early, naming the op, on any node of the path that has no rule: later rules may
    # need shapes that inference could not see past an unknown op.
    upstream = {target}
    for node in reversed(nodes):
        if any(o in upstream and o in active for o in node.output):
            upstream.update(i for i in node_inputs(node) if i in active)
            _rule_for(node, blame)
    grads: dict[str, list[str]] = {target: [seed]}
    for index in range(len(nodes) - 1, -1, -1):
        node = nodes[index]
        outs = [o for o in node.output if o in grads]
        if not outs or not any(i in active for i in node_inputs(node)):
            continue
        fn = _rule_for(node, blame)
        dys = [builder.add_all(grads[o]) if o in grads else None for o in node.output]
        ctx = RuleContext(node, builder, info, active, node_index=index)
        dxs = fn(ctx, dys)
        for i, dx in enumerate(dxs):
            if dx is None or i >= len(node.input):
                continue
            name = node.input[i]
            if name in active:
                grads.setdefault(name, []).append(dx)
    if wrt not in grads:
        raise UnsupportedOpError(f"no gradient reaches '{wrt}'")
    return builder.add_all(grads[wrt])
