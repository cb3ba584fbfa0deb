"""A small tape for emitting ONNX nodes: unique names, deduplicated constants, opset-aware helpers.

The gradient rules speak in terms of this builder so that they never hand-assemble protobuf and
never have to care whether the model's opset takes reduction axes as an attribute or an input.
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

    def __init__(self, opset: int, prefix: str, taken: set[str]):
        self.opset = opset
        self.prefix = prefix
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._taken = taken
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

    # -- nodes --------------------------------------------------------------------------------
    def op(self, op_type: str, inputs: Sequence[str], n_out: int = 1, hint: str | None = None,
           **attrs) -> str | list[str]:
        outputs = [self.fresh(hint or op_type.lower()) for _ in range(n_out)]
        attrs = {k: v for k, v in attrs.items() if v is not None}
        node = helper.make_node(op_type, list(inputs), outputs, name=self.fresh(op_type), **attrs)
        self.nodes.append(node)
        return outputs[0] if n_out == 1 else outputs

    def const(self, value, dtype=np.float32, hint: str = "const") -> str:
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            name = self.fresh(hint)
            self.initializers.append(numpy_helper.from_array(arr, name))
            self._consts[key] = name
        return self._consts[key]

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

    # -- opset-aware helpers ------------------------------------------------------------------
    def _reduce(self, op_type: str, x: str, axes: Sequence[int] | str | None, keepdims: int,
                input_axes_since: int) -> str:
        if axes is None:
            return self.op(op_type, [x], keepdims=keepdims)
        if self.opset >= input_axes_since:
            ax = axes if isinstance(axes, str) else self.ints(axes)
            extra = {"noop_with_empty_axes": 1} if isinstance(axes, str) else {}
            return self.op(op_type, [x, ax], keepdims=keepdims, **extra)
        if isinstance(axes, str):
            raise ValueError(f"{op_type} with runtime axes needs opset >= {input_axes_since}")
        return self.op(op_type, [x], axes=list(axes), keepdims=keepdims)

    def reduce_sum(self, x, axes, keepdims=1):
        return self._reduce("ReduceSum", x, axes, keepdims, 13)

    def reduce_mean(self, x, axes, keepdims=1):
        return self._reduce("ReduceMean", x, axes, keepdims, 18)

    def reduce_max(self, x, axes, keepdims=1):
        return self._reduce("ReduceMax", x, axes, keepdims, 18)

    def unsqueeze(self, x: str, axes: Sequence[int]) -> str:
        if self.opset >= 13:
            return self.op("Unsqueeze", [x, self.ints(axes)])
        return self.op("Unsqueeze", [x], axes=list(axes))

    def squeeze(self, x: str, axes: Sequence[int]) -> str:
        if self.opset >= 13:
            return self.op("Squeeze", [x, self.ints(axes)])
        return self.op("Squeeze", [x], axes=list(axes))

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
