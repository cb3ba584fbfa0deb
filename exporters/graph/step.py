"""Step graphs: one whole ascent step as an ONNX graph around a compiled gradient graph.

The CUDA loop (:mod:`onnxdream.runtime.device_loop`) and the browser run these, so the image stays
on
the device between steps::

    rolled = roll(x, shift)                         (the jitter)
    g      = unroll(grad(rolled), shift)
    x_out  = clip(x + step_mask * step_size * g / d, 0, 1)
    d      = mean(|g| step_mask) / mean(step_mask) + 1e-8            if grad_floor <= 0 (default)
             max(mean(|g| step_mask) / mean(step_mask), grad_floor)  otherwise (keras.io's
                                                     normaliser: onnxdream.dream.normalize)

:func:`step_graph` serves every image size: the roll is ``Slice`` + ``Concat`` by the ``shift``
input. :func:`static_step_graph` is for one fixed shape: the roll is a ``Gather`` by index vectors
that are *inputs* (``rows``/``cols`` and their inverses), so every step launches the same kernels
on the same buffers, which a CUDA graph capture needs.

Inputs: ``x`` (the image, float32 [1,3,H,W] in [0,1]), the roll (``shift`` int64 [2], or
``rows``/``cols``/``unrows``/``uncols``), ``step_size`` float32 [1], ``grad_floor`` float32 [1]
(default 0: no floor; an input with a default, so a caller may leave it out), then the gradient
graph's objective parameters, passed through with their defaults (see :mod:`.contract`); spatial
ones are rolled with the image; last ``step_mask`` ([1 or N, 1, H, W] or a broadcastable shape,
default ones), the per-pixel scale of the step (a region mask: 0 keeps a pixel as it is), in the
image's own frame. Outputs: ``objective`` and ``image_out``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import helper

from onnxdream.exporters.graph.builder import INT64, GraphBuilder
from onnxdream.exporters.graph.contract import GRAD, IMAGE, STEP_MASK, graph_params, param_input

DYNAMIC_INPUTS = ("x", "shift", "step_size", "grad_floor")
STATIC_INPUTS = ("x", "rows", "cols", "unrows", "uncols", "step_size", "grad_floor")
OUTPUT = "image_out"
#: The step input that floors the normaliser's divisor (0, its default: mean|g| + 1e-8).
GRAD_FLOOR = "grad_floor"


class _Wrap:
    """A copy of the gradient graph whose ``image`` input becomes ``x``, plus a builder."""

    def __init__(self, gradient_model: onnx.ModelProto):
        m = onnx.ModelProto()
        m.CopyFrom(gradient_model)
        image = [i for i in m.graph.input if i.name == IMAGE][0]
        self.x = onnx.ValueInfoProto()
        self.x.CopyFrom(image)
        self.x.name = "x"
        m.graph.input.remove(image)
        self.model, self.graph = m, m.graph
        self.params = []  # passed through, after the step's inputs
        for vi in m.graph.input:
            copy = onnx.ValueInfoProto()
            copy.CopyFrom(vi)
            self.params.append(copy)
        self.spatial = [p.name for p in graph_params(m).values() if p.spatial]
        g = m.graph
        taken = {o for n in g.node for o in n.output} | {n.name for n in g.node}
        taken |= {i.name for i in g.initializer} | {i.name for i in g.input}
        taken |= {"x", OUTPUT, GRAD_FLOOR, STEP_MASK}
        self.b = GraphBuilder(prefix="step", taken=taken)
        self.g = ""  # the unrolled gradient, set by the caller before finish()

    def read_rolled(self, name: str, rolled: str) -> None:
        """The gradient graph's nodes read ``rolled`` where they read parameter ``name``."""
        for n in self.graph.node:
            for k, i in enumerate(n.input):
                if i == name:
                    n.input[k] = rolled

    def finish(self, inputs: Sequence[onnx.ValueInfoProto], before: list[onnx.NodeProto]
               ) -> onnx.ModelProto:
        """Nodes: ``before``, the gradient graph's, then the builder's since; the step's tail."""
        b, g = self.b, self.graph
        eps, lo, hi = b.scalar(1e-8), b.scalar(0.0), b.scalar(1.0)
        # mean |g| where the step mask dreams: mean(|g| m) / mean(m) (m in x's frame: never
        # rolled; the default ones make it mean |g|)
        weighted = b.op("ReduceMean", [b.op("Mul", [b.op("Abs", [self.g]), STEP_MASK])],
                        keepdims=0)
        area = b.op("Max", [b.op("ReduceMean", [STEP_MASK], keepdims=0), b.scalar(1e-12)])
        size = b.op("Div", [weighted, area], hint="mean_abs")
        b.initializer(np.zeros([1], np.float32), name=GRAD_FLOOR)  # the input's default
        floored = b.op("Greater", [GRAD_FLOOR, lo], hint="floored")
        denom = b.where(floored, b.op("Max", [size, GRAD_FLOOR]), b.op("Add", [size, eps]))
        delta = b.op("Mul", [self.g, b.op("Div", ["step_size", denom])])
        delta = b.op("Mul", [delta, STEP_MASK])
        b.op("Clip", [b.op("Add", ["x", delta]), lo, hi], out=OUTPUT)
        after = b.nodes[len(before):]
        nodes = list(g.node)
        del g.node[:]
        g.node.extend(before + nodes + after)
        mask, default = param_input(STEP_MASK, np.ones((1, 1, 1, 1), np.float32),
                                    ["step_mask_batch", 1, "step_mask_height", "step_mask_width"])
        g.initializer.extend(b.initializers + [default])
        del g.input[:]
        floor = helper.make_tensor_value_info(GRAD_FLOOR, onnx.TensorProto.FLOAT, [1])
        g.input.extend(list(inputs) + [floor] + self.params + [mask])
        out = onnx.ValueInfoProto()
        out.CopyFrom(self.x)
        out.name = OUTPUT
        keep = [o for o in g.output if o.name != GRAD]
        del g.output[:]
        g.output.extend(keep + [out])
        return self.model


def step_graph(gradient_model: onnx.ModelProto) -> onnx.ModelProto:
    """Wrap a compiled gradient graph into the step for any image size (input ``shift``)."""
    w = _Wrap(gradient_model)
    b = w.b
    shape = b.op("Shape", ["x"], hint="shape")
    big = b.ints([2**62])

    def roll(src: str, sign: int, out: str | None = None) -> str:
        """roll(src, sign * shift) over axes 2 and 3 (shift in [0, size))."""
        cur = src
        for axis, k in ((2, 0), (3, 1)):
            size = b.op("Gather", [shape, b.ints([axis])], hint="size")
            s = b.op("Gather", ["shift", b.ints([k])], hint="shift")
            # roll by +s: the last s rows come first; by -s: the first s rows go last
            cut = b.op("Sub", [size, s], hint="cut") if sign > 0 else s
            tail = b.slice(cur, cut, big, [axis])
            head = b.slice(cur, [0], cut, [axis])
            cur = b.op("Concat", [tail, head], axis=axis, hint="rolled",
                       out=out if axis == 3 else None)
        return cur

    roll("x", +1, IMAGE)
    for name in w.spatial:  # image-aligned parameters roll with the image
        full = b.op("Expand", [name, b.op("Concat", [b.ints([1, 1]), b.slice(shape, [2], [4], [0])],
                                           axis=0)], hint="full")
        w.read_rolled(name, roll(full, +1))
    before = list(b.nodes)
    w.g = roll(GRAD, -1)
    return w.finish([w.x, helper.make_tensor_value_info("shift", INT64, [2]),
                     helper.make_tensor_value_info("step_size", onnx.TensorProto.FLOAT, [1])],
                    before)


def static_step_graph(gradient_model: onnx.ModelProto, shape: tuple[int, int, int, int]
                      ) -> onnx.ModelProto:
    """The step graph for one fixed ``shape`` ([1,3,H,W]), rolling by ``Gather`` with index inputs.

    ``rows``/``cols`` ([H], [W] int64) give the rolled view (``image[i] = x[rows[i]]``), and
    ``unrows``/``uncols`` the way back for the gradient: only tensor *values* change from step to
    step, never a kernel's parameters, which is what a CUDA graph replay needs.
    """
    w = _Wrap(gradient_model)
    b = w.b
    for d, v in zip(w.x.type.tensor_type.shape.dim, shape):
        d.Clear()
        d.dim_value = int(v)
    h, wd = int(shape[2]), int(shape[3])

    def gather(src: str, rows: str, cols: str, out: str | None = None) -> str:
        return b.op("Gather", [b.op("Gather", [src, rows], axis=2, hint="rows"), cols], axis=3,
                    hint="rolled", out=out)

    gather("x", "rows", "cols", IMAGE)
    for name in w.spatial:  # image-aligned parameters roll with the image
        full = b.op("Expand", [name, b.const(np.array([1, 1, h, wd]), np.int64)], hint="full")
        w.read_rolled(name, gather(full, "rows", "cols"))
    before = list(b.nodes)
    w.g = gather(GRAD, "unrows", "uncols")
    inputs = [w.x] + [helper.make_tensor_value_info(n, INT64, [size]) for n, size in
                      (("rows", h), ("cols", wd), ("unrows", h), ("uncols", wd))]
    inputs.append(helper.make_tensor_value_info("step_size", onnx.TensorProto.FLOAT, [1]))
    return w.finish(inputs, before)


def resize_graph(opset: int = 18) -> onnx.ModelProto:
    """The octave resize as one ``Resize`` node: ``x`` float32 [1,3,H,W] and ``sizes`` int64 [4]
    → ``y`` [1,3,h,w], equal to :func:`onnxdream.media.imageio.resize` (Pillow's float bicubic, Keys
    a = -0.5, antialiased when shrinking) to float rounding: ``exclude_outside`` renormalises
    the taps at the borders as Pillow does, ``antialias`` widens the kernel by the scale.

    The browser (issue 16) runs it between octaves, so that octave sizes and detail match the
    Python engine's.
    """
    b = GraphBuilder(opset, "resize", {"x", "sizes", "y"})
    b.op("Resize", ["x", "", "", "sizes"], out="y", mode="cubic", cubic_coeff_a=-0.5,
         antialias=1, exclude_outside=1, coordinate_transformation_mode="half_pixel")
    graph = helper.make_graph(
        b.nodes, "onnxdream_resize",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, "height", "width"]),
         helper.make_tensor_value_info("sizes", INT64, [4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT,
                                       [1, 3, "out_height", "out_width"])], b.initializers)
    # IR 8 (what opset 18 needs), not onnx's newest: older runtimes (onnxruntime-web) refuse those
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                             producer_name="onnxdream", ir_version=8)


__all__ = ["DYNAMIC_INPUTS", "GRAD_FLOOR", "OUTPUT", "STATIC_INPUTS", "resize_graph",
           "static_step_graph", "step_graph"]
