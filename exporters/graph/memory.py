"""How much memory a graph's activations take: the live-tensor peak, read off the graph.

:func:`activation_peak` fixes the image input at one size, infers every tensor's shape, and walks
the nodes in graph order keeping each tensor alive from the node that makes it to the last node
that reads it (graph outputs stay to the end). The largest sum of live bytes is the peak a
runtime that frees every tensor as soon as it can would reach; onnxruntime's arena, its memory
patterns and its fusions move the real figure away from it by a roughly constant factor, which
the engine calibrates (see :mod:`onnxdream.settings.memory`). For a compiled gradient graph the walk
covers the forward pass and the backward pass together: the forward activations that the
backward pass reads stay alive until it has read them, which is what makes gradients costly.

The activations of a convolutional network scale with the image's pixels, so the peak at one
reference size, divided by its pixels, prices any size (:attr:`ActivationPeak.bytes_per_pixel`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from onnxdream.exporters.graph.contract import IMAGE, image_input
from onnxdream.exporters.graph.shapes import infer_shapes

__all__ = ["ActivationPeak", "activation_peak"]


@dataclass(frozen=True)
class ActivationPeak:
    """The live-tensor peak of one run of a graph at ``size`` (h, w), batch 1."""

    size: tuple[int, int]
    peak_bytes: int  # the most bytes of activations alive at once
    total_bytes: int  # every activation's bytes together (what no reuse at all would take)
    weight_bytes: int  # the initializers
    tensors: int  # activations whose shapes were known
    unknown: int  # activations whose shapes inference could not tell (not counted)

    @property
    def bytes_per_pixel(self) -> float:
        """Peak activation bytes per input pixel (per image of the batch)."""
        return self.peak_bytes / float(self.size[0] * self.size[1])


def _bytes(vi: onnx.ValueInfoProto) -> int | None:
    tt = vi.type.tensor_type
    if not tt.HasField("shape") or not tt.elem_type:
        return None
    n = 1
    for i, d in enumerate(tt.shape.dim):
        if d.HasField("dim_value"):
            n *= d.dim_value
        elif i > 0:  # an unknown leading dimension is the batch (1 here); others are unknown
            return None
    itemsize = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).itemsize
    return int(n) * int(itemsize)


def _at_size(model: onnx.ModelProto, size: tuple[int, int]) -> onnx.ModelProto:
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    dims = image_input(fixed).type.tensor_type.shape.dim
    for d, v in zip(dims, (1, 3, *size)):
        d.Clear()
        d.dim_value = int(v)
    return fixed


def activation_peak(model: onnx.ModelProto, size: tuple[int, int]) -> ActivationPeak:
    """The activation peak of ``model`` (a dreamable model or its compiled gradient graph) run
    once on a 1x3x``size`` image (see the module docstring)."""
    inferred = infer_shapes(_at_size(model, size))
    graph = inferred.graph
    sizes: dict[str, int | None] = {}
    for vi in [*graph.value_info, *graph.output, *graph.input]:
        sizes[vi.name] = _bytes(vi)
    consts = {i.name for i in model.graph.initializer}
    consts |= {i.name for i in graph.input if i.name != IMAGE}  # weights and parameters
    weight_bytes = sum(int(np.prod(i.dims, dtype=np.int64)) *
                       onnx.helper.tensor_dtype_to_np_dtype(i.data_type).itemsize
                       for i in model.graph.initializer)
    last_use: dict[str, int] = {}
    nodes = list(graph.node)
    for k, node in enumerate(nodes):
        for name in node.input:
            if name:
                last_use[name] = k
    end = len(nodes)
    for o in graph.output:
        last_use[o.name] = end
    live = sizes.get(IMAGE) or 0
    peak = total = live
    known = unknown = 0
    frees: dict[int, int] = {}
    frees[last_use.get(IMAGE, end)] = live
    for k, node in enumerate(nodes):
        if node.op_type == "Constant":
            continue
        for name in node.output:
            if not name or name in consts:
                continue
            b = sizes.get(name)
            if b is None:
                unknown += 1
                continue
            known += 1
            live += b
            total += b
            frees[last_use.get(name, k)] = frees.get(last_use.get(name, k), 0) + b
        peak = max(peak, live)
        live -= frees.pop(k, 0)
    return ActivationPeak(size=(int(size[0]), int(size[1])), peak_bytes=int(peak),
                          total_bytes=int(total), weight_bytes=int(weight_bytes), tensors=known,
                          unknown=unknown)
