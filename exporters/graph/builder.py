"""The one emitter of ONNX: a small tape with unique names, deduplicated constants and helpers.

The gradient rules, the objective, the optimiser's rewrites, the step graphs and the zoo builder
all speak in terms of this builder, so none of them hand-assembles protobuf. Graphs are built at
opset >= 18 (the loader converts older models), so reductions, Unsqueeze and Slice take their
axes as inputs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

FLOAT = onnx.TensorProto.FLOAT
INT64 = onnx.TensorProto.INT64


class GraphBuilder:
    """Appends nodes and initializers to lists; names every value it creates uniquely."""

    def __init__(self, opset: int = 18, prefix: str = "", taken: set[str] | None = None):
        self.opset = opset
        self.prefix = prefix
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._taken = taken if taken is not None else set()
        self._count = 0
        self._consts: dict[tuple, str] = {}
        self._shapes: dict[str, str] = {}

    # -- naming -------------------------------------------------------------------------------
    def fresh(self, hint: str) -> str:
        hint = hint.replace("/", "_").replace(":", "_")[-48:]
        while True:
            self._count += 1
            name = f"{self.prefix}/{hint}_{self._count}"
            if name not in self._taken:
                self._taken.add(name)
                return name

    def take_name(self, name: str) -> str:
        """Reserve an explicit name (a graph's own tensor names: ``image``, ``logits``)."""
        self._taken.add(name)
        return name

    # -- nodes --------------------------------------------------------------------------------
    def op(self, op_type: str, inputs: Sequence[str], n_out: int = 1, hint: str | None = None,
           *, out: str | Sequence[str] | None = None, name: str | None = None,
           **attrs) -> str | list[str]:
        """Append one node; returns its output name(s).

        Outputs get fresh names from ``hint`` unless ``out`` names them; the node is named
        ``name`` or a fresh name. Attributes that are None are left out.
        """
        if out is None:
            outputs = [self.fresh(hint or op_type.lower()) for _ in range(n_out)]
        else:
            outputs = [self.take_name(o) for o in ([out] if isinstance(out, str) else out)]
        attrs = {k: v for k, v in attrs.items() if v is not None}
        node = helper.make_node(op_type, list(inputs), outputs,
                                name=self.take_name(name) if name else self.fresh(op_type),
                                **attrs)
        self.nodes.append(node)
        return outputs[0] if len(outputs) == 1 else outputs

    def const(self, value, dtype=np.float32, hint: str = "const") -> str:
        """A constant (initializer); equal constants share one name."""
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._consts[key] = self.initializer(arr, hint=hint)
        return self._consts[key]

    def initializer(self, value: np.ndarray, name: str | None = None, hint: str = "const") -> str:
        """A new initializer (not shared: weights), named ``name`` or a fresh name from ``hint``."""
        name = self.take_name(name) if name else self.fresh(hint)
        self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def ints(self, values: Sequence[int]) -> str:
        return self.const(list(values), np.int64, "ints")

    def scalar(self, value: float) -> str:
        return self.const(value, np.float32, "scalar")

    # -- shapes -------------------------------------------------------------------------------
    def shape(self, x: str) -> str:
        if x not in self._shapes:
            self._shapes[x] = self.op("Shape", [x], hint="shape")
        return self._shapes[x]

    def dim(self, x: str, axis: int) -> str:
        """Runtime size of one axis of x, as a 1-element int64 tensor."""
        return self.op("Gather", [self.shape(x), self.ints([axis])], axis=0, hint="dim")

    def zeros_like(self, x: str) -> str:
        return self.op("ConstantOfShape", [self.shape(x)],
                       value=numpy_helper.from_array(np.zeros(1, np.float32)), hint="zeros")

    def ones_of_shape(self, shape: str) -> str:
        return self.op("ConstantOfShape", [shape],
                       value=numpy_helper.from_array(np.ones(1, np.float32)), hint="ones")

    def reshape_like(self, x: str, like: str) -> str:
        return self.op("Reshape", [x, self.shape(like)], hint="reshape")

    # -- helpers ------------------------------------------------------------------------------
    def _reduce(self, op_type: str, x: str, axes: Sequence[int] | None, keepdims: int) -> str:
        if axes is None:
            return self.op(op_type, [x], keepdims=keepdims)
        return self.op(op_type, [x, self.ints(axes)], keepdims=keepdims)

    def reduce_sum(self, x: str, axes: Sequence[int] | None, keepdims: int = 1) -> str:
        return self._reduce("ReduceSum", x, axes, keepdims)

    def reduce_mean(self, x: str, axes: Sequence[int] | None, keepdims: int = 1) -> str:
        return self._reduce("ReduceMean", x, axes, keepdims)

    def unsqueeze(self, x: str, axes: Sequence[int]) -> str:
        return self.op("Unsqueeze", [x, self.ints(axes)])

    def slice(self, x: str, starts, ends, axes: Sequence[int], steps=None) -> str:
        """Slice; starts/ends are int lists or names of int64 tensors."""
        s = starts if isinstance(starts, str) else self.ints(starts)
        e = ends if isinstance(ends, str) else self.ints(ends)
        ins = [x, s, e, self.ints(axes)]
        if steps is not None:
            ins.append(self.ints(steps))
        return self.op("Slice", ins)

    def concat(self, xs: Sequence[str], axis: int = 0) -> str:
        if len(xs) == 1:
            return xs[0]
        return self.op("Concat", list(xs), axis=axis)

    def add_all(self, xs: Sequence[str]) -> str:
        if len(xs) == 1:
            return xs[0]
        return self.op("Sum", list(xs), hint="acc")

    def mul(self, a: str, b: str) -> str:
        return self.op("Mul", [a, b])

    def where(self, cond: str, a: str, b: str) -> str:
        return self.op("Where", [cond, a, b])

    def cast(self, x: str, to: int) -> str:
        return self.op("Cast", [x], to=to)


def node_attr(node: onnx.NodeProto, name: str, default=None):
    """The value of ``node``'s attribute ``name`` (strings as bytes, as onnx gives them)."""
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def probe_model() -> onnx.ModelProto:
    """The smallest runnable model, ``y = Identity(x)`` on a float32 ``[1]``: a health check
    creates a session from it to know that onnxruntime and the device work."""
    b = GraphBuilder()
    b.op("Identity", [b.take_name("x")], out=b.take_name("y"))
    value = [helper.make_tensor_value_info(n, FLOAT, [1]) for n in ("x", "y")]
    graph = helper.make_graph(b.nodes, "probe", value[:1], value[1:], b.initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", b.opset)])
