"""Ascent steps that stay on the device: the whole step as one ONNX graph, run with IO binding.

On CUDA the numpy loop would copy the image to the GPU and the gradient back on every step.
Instead the gradient graph is wrapped into a *step graph* of standard ops:

    rolled = roll(x, shift)                         (the jitter, Slice + Concat)
    g      = unroll(grad(rolled), shift)
    x_out  = clip(x + step_size * g / (mean|g| + 1e-8), 0, 1)

and run with IO binding: ``x_out`` is bound to a device-resident OrtValue that becomes the next
step's ``x``, so the image never returns to the host between steps; only the two-element shift,
the step size and the objective cross. The same graph runs on the CPU provider, where the tests
check it against the numpy loop.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxdream.session import Session, create_session

STEP_INPUTS = ("x", "shift", "step_size")


def step_graph(gradient_model: onnx.ModelProto) -> onnx.ModelProto:
    """Wrap a compiled gradient graph (input ``image``; outputs ``objective``, ``grad``)."""
    m = onnx.ModelProto()
    m.CopyFrom(gradient_model)
    g = m.graph
    image = [i for i in g.input if i.name == "image"][0]
    x = onnx.ValueInfoProto()
    x.CopyFrom(image)
    x.name = "x"
    g.input.remove(image)
    g.input.extend([x,
                    helper.make_tensor_value_info("shift", onnx.TensorProto.INT64, [2]),
                    helper.make_tensor_value_info("step_size", onnx.TensorProto.FLOAT, [1])])

    def const(name, value, dtype=np.int64):
        g.initializer.append(numpy_helper.from_array(np.asarray(value, dtype), name))
        return name

    const("step/ax2", [2])
    const("step/ax3", [3])
    const("step/zero", [0])
    const("step/big", [2**62])
    const("step/i0", [0])
    const("step/i1", [1])
    nodes = [helper.make_node("Shape", ["x"], ["step/shape"])]

    def roll(src: str, out: str, sign: int) -> None:
        """out = roll(src, sign * shift) over axes 2 and 3 (shift in [0, size))."""
        cur = src
        for axis, idx in ((2, "step/i0"), (3, "step/i1")):
            p = f"{out}/a{axis}"
            size = f"{p}/size"
            s = f"{p}/s"
            nodes.extend([
                helper.make_node("Gather", ["step/shape", const(f"{p}/axis", [axis])], [size]),
                helper.make_node("Gather", ["shift", idx], [s]),
            ])
            # roll by +s: the last s rows come first; by -s: the first s rows go last
            cut = f"{p}/cut"
            if sign > 0:
                nodes.append(helper.make_node("Sub", [size, s], [cut]))
            else:
                nodes.append(helper.make_node("Identity", [s], [cut]))
            ax = f"step/ax{axis}"
            nodes.extend([
                helper.make_node("Slice", [cur, cut, "step/big", ax], [f"{p}/tail"]),
                helper.make_node("Slice", [cur, "step/zero", cut, ax], [f"{p}/head"]),
                helper.make_node("Concat", [f"{p}/tail", f"{p}/head"], [f"{p}/out"], axis=axis),
            ])
            cur = f"{p}/out"
        nodes.append(helper.make_node("Identity", [cur], [out]))

    roll("x", "image", +1)
    old_nodes = list(g.node)
    del g.node[:]
    g.node.extend(nodes)
    g.node.extend(old_nodes)
    nodes.clear()
    roll("grad", "step/g", -1)
    const("step/eps", np.float32(1e-8), np.float32)
    const("step/lo", np.float32(0.0), np.float32)
    const("step/hi", np.float32(1.0), np.float32)
    nodes.extend([
        helper.make_node("Abs", ["step/g"], ["step/abs"]),
        helper.make_node("ReduceMean", ["step/abs"], ["step/mean"], keepdims=0),
        helper.make_node("Add", ["step/mean", "step/eps"], ["step/denom"]),
        helper.make_node("Div", ["step_size", "step/denom"], ["step/scale"]),
        helper.make_node("Mul", ["step/g", "step/scale"], ["step/delta"]),
        helper.make_node("Add", ["x", "step/delta"], ["step/sum"]),
        helper.make_node("Clip", ["step/sum", "step/lo", "step/hi"], ["image_out"]),
    ])
    g.node.extend(nodes)
    out = onnx.ValueInfoProto()
    out.CopyFrom(x)
    out.name = "image_out"
    grad_out = [o for o in g.output if o.name == "grad"][0]
    g.output.remove(grad_out)
    g.output.append(out)
    return m


class DeviceAscent:
    """Runs ascent steps with the image resident on the session's device."""

    def __init__(self, gradient_model: onnx.ModelProto, device: str = "auto",
                 threads: int | None = None):
        self.session: Session = create_session(step_graph(gradient_model), device=device,
                                               threads=threads)
        self.device = "cuda" if self.session.device == "cuda" else "cpu"

    def run(self, img: np.ndarray, steps: int, step_size: float, shifts,
            on_step=None) -> np.ndarray:
        """``steps`` steps on img ([3,H,W]); ``shifts`` yields (dy, dx) per step. Returns [3,H,W]."""
        import onnxruntime as ort

        sess = self.session.session
        x = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(img[None]), self.device, 0)
        size = np.array([step_size], np.float32)
        _, h, w = img.shape
        for i in range(steps):
            dy, dx = next(shifts)
            binding = sess.io_binding()
            binding.bind_ortvalue_input("x", x)
            binding.bind_cpu_input("shift", np.array([dy % h, dx % w], np.int64))
            binding.bind_cpu_input("step_size", size)
            binding.bind_output("image_out", self.device)
            binding.bind_output("objective", "cpu")
            sess.run_with_iobinding(binding)
            x, obj = binding.get_outputs()
            if on_step is not None and on_step(i, float(obj.numpy()[0])):
                break
        return x.numpy()[0]
