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

On CUDA the steps of one image size go further (:class:`StaticSteps`, cached per shape): a
session for that fixed shape (shape arithmetic folded away) whose roll is a ``Gather`` by index
vectors that are *inputs*, so every step launches the same kernels on the same buffers and
onnxruntime can capture the step once as a CUDA graph (``enable_cuda_graph``) and replay it.
Two captures (``gpu_graph_id`` 0 and 1) ping-pong between two image buffers; per step only the
index vectors are copied in place and the objective copied out. If the capture fails (an op
without a CUDA kernel, an old onnxruntime), the dream goes on with the dynamic step graph and a
warning says why. ``ONNXDREAM_CUDA_GRAPH=0`` turns the capture off.
"""

from __future__ import annotations

import itertools
import os
import threading
import warnings
from collections import OrderedDict

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxdream.session import Session, create_session

STEP_INPUTS = ("x", "shift", "step_size")
STATIC_INPUTS = ("x", "rows", "cols", "unrows", "uncols", "step_size")
CUDA_GRAPH_ENV = "ONNXDREAM_CUDA_GRAPH"
#: Per-shape sessions kept by a DeviceAscent (a dream's octaves; each holds its own weights).
STATIC_CACHE = 4


def _with_image_input_x(gradient_model: onnx.ModelProto) -> tuple[onnx.ModelProto, onnx.ValueInfoProto]:
    """A copy of the model without its ``image`` input, and that input renamed ``x`` (not added)."""
    m = onnx.ModelProto()
    m.CopyFrom(gradient_model)
    image = [i for i in m.graph.input if i.name == "image"][0]
    x = onnx.ValueInfoProto()
    x.CopyFrom(image)
    x.name = "x"
    m.graph.input.remove(image)
    return m, x


def step_graph(gradient_model: onnx.ModelProto) -> onnx.ModelProto:
    """Wrap a compiled gradient graph (input ``image``; outputs ``objective``, ``grad``)."""
    m, x = _with_image_input_x(gradient_model)
    g = m.graph
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
    g.node.extend(nodes)
    _step_tail(g, x)
    return m


def _step_tail(g: onnx.GraphProto, x: onnx.ValueInfoProto) -> None:
    """image_out = clip(x + step_size * g / (mean|g| + 1e-8), 0, 1), g = ``step/g``."""
    for name, value in (("step/eps", 1e-8), ("step/lo", 0.0), ("step/hi", 1.0)):
        g.initializer.append(numpy_helper.from_array(np.asarray(value, np.float32), name))
    g.node.extend([
        helper.make_node("Abs", ["step/g"], ["step/abs"]),
        helper.make_node("ReduceMean", ["step/abs"], ["step/mean"], keepdims=0),
        helper.make_node("Add", ["step/mean", "step/eps"], ["step/denom"]),
        helper.make_node("Div", ["step_size", "step/denom"], ["step/scale"]),
        helper.make_node("Mul", ["step/g", "step/scale"], ["step/delta"]),
        helper.make_node("Add", ["x", "step/delta"], ["step/sum"]),
        helper.make_node("Clip", ["step/sum", "step/lo", "step/hi"], ["image_out"]),
    ])
    out = onnx.ValueInfoProto()
    out.CopyFrom(x)
    out.name = "image_out"
    grad_out = [o for o in g.output if o.name == "grad"][0]
    g.output.remove(grad_out)
    g.output.append(out)


def static_step_graph(gradient_model: onnx.ModelProto, shape: tuple[int, int, int, int]) -> onnx.ModelProto:
    """The step graph for one fixed ``shape`` ([1,3,H,W]), rolling by ``Gather`` with index inputs.

    ``rows``/``cols`` ([H], [W] int64) give the rolled view (``image[i] = x[rows[i]]``), and
    ``unrows``/``uncols`` the way back for the gradient: only tensor *values* change from step to
    step, never a kernel's parameters, which is what a CUDA graph replay needs.
    """
    m, x = _with_image_input_x(gradient_model)
    g = m.graph
    for d, v in zip(x.type.tensor_type.shape.dim, shape):
        d.Clear()
        d.dim_value = int(v)
    h, w = int(shape[2]), int(shape[3])
    g.input.extend([x,
                    helper.make_tensor_value_info("rows", onnx.TensorProto.INT64, [h]),
                    helper.make_tensor_value_info("cols", onnx.TensorProto.INT64, [w]),
                    helper.make_tensor_value_info("unrows", onnx.TensorProto.INT64, [h]),
                    helper.make_tensor_value_info("uncols", onnx.TensorProto.INT64, [w]),
                    helper.make_tensor_value_info("step_size", onnx.TensorProto.FLOAT, [1])])
    old_nodes = list(g.node)
    del g.node[:]
    g.node.extend([helper.make_node("Gather", ["x", "rows"], ["step/x_rows"], axis=2),
                   helper.make_node("Gather", ["step/x_rows", "cols"], ["image"], axis=3)])
    g.node.extend(old_nodes)
    g.node.extend([helper.make_node("Gather", ["grad", "unrows"], ["step/g_rows"], axis=2),
                   helper.make_node("Gather", ["step/g_rows", "uncols"], ["step/g"], axis=3)])
    _step_tail(g, x)
    return m


def roll_indices(size: int, shift: int) -> tuple[np.ndarray, np.ndarray]:
    """(take, back): ``v[take]`` is ``np.roll(v, shift)`` and ``r[back]`` undoes it."""
    i = np.arange(size, dtype=np.int64)
    return (i - shift) % size, (i + shift) % size


def cuda_graph_enabled() -> bool:
    """False when ``$ONNXDREAM_CUDA_GRAPH`` is 0/false/no/off."""
    return os.environ.get(CUDA_GRAPH_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


class StaticSteps:
    """Ascent steps at one image shape, on device-resident buffers bound once.

    With ``cuda_graph`` the session is created with ``enable_cuda_graph`` and the two bindings
    (image A -> B, then B -> A) run as ``gpu_graph_id`` 0 and 1, each captured on its first run.
    Without it (CPU, or CUDA with the capture off) the same binding scheme runs plainly.
    """

    def __init__(self, gradient_model: onnx.ModelProto, shape: tuple[int, int, int, int],
                 device: str, threads: int | None = None, cuda_graph: bool = False):
        import onnxruntime as ort

        self.shape = tuple(int(v) for v in shape)
        self.device = device
        self.lock = threading.Lock()  # one run at a time: the buffers are bound once
        options = {"enable_cuda_graph": "1"} if cuda_graph else None
        self.session: Session = create_session(static_step_graph(gradient_model, self.shape),
                                               device=device, threads=threads,
                                               cuda_options=options)
        sess = self.session.session
        h, w = self.shape[2], self.shape[3]

        def buffer(shape, dtype):
            return ort.OrtValue.ortvalue_from_shape_and_type(list(shape), dtype, device, 0)

        self.images = [buffer(self.shape, np.float32), buffer(self.shape, np.float32)]
        self.objectives = [buffer([self.shape[0]], np.float32), buffer([self.shape[0]], np.float32)]
        self.index = {"rows": buffer([h], np.int64), "cols": buffer([w], np.int64),
                      "unrows": buffer([h], np.int64), "uncols": buffer([w], np.int64)}
        self.step_size = buffer([1], np.float32)
        self.bindings, self.run_options = [], []
        for k in (0, 1):
            b = sess.io_binding()
            b.bind_ortvalue_input("x", self.images[k])
            for name, value in self.index.items():
                b.bind_ortvalue_input(name, value)
            b.bind_ortvalue_input("step_size", self.step_size)
            b.bind_ortvalue_output("image_out", self.images[1 - k])
            b.bind_ortvalue_output("objective", self.objectives[k])
            self.bindings.append(b)
            ro = ort.RunOptions()
            ro.log_severity_level = 3
            if cuda_graph:
                ro.add_run_config_entry("gpu_graph_id", str(k))
            self.run_options.append(ro)

    def run(self, img: np.ndarray, steps: int, step_size: float, shifts, on_step=None) -> np.ndarray:
        """Same contract as :meth:`DeviceAscent.run`; ``img`` must have this runner's shape.

        Runs from several threads (the server's workers share a model) take turns.
        """
        with self.lock:
            return self._run(img, steps, step_size, shifts, on_step)

    def _run(self, img: np.ndarray, steps: int, step_size: float, shifts, on_step) -> np.ndarray:
        h, w = self.shape[2], self.shape[3]
        self.images[0].update_inplace(np.ascontiguousarray(img[None], dtype=np.float32))
        self.step_size.update_inplace(np.array([step_size], np.float32))
        sess = self.session.session
        k = 0
        for i in range(steps):
            dy, dx = next(shifts)
            rows, unrows = roll_indices(h, dy)
            cols, uncols = roll_indices(w, dx)
            for name, value in (("rows", rows), ("cols", cols), ("unrows", unrows),
                                ("uncols", uncols)):
                self.index[name].update_inplace(value)
            sess.run_with_iobinding(self.bindings[k], self.run_options[k])
            obj = float(self.objectives[k].numpy()[0])
            k = 1 - k  # the result is in images[k] now
            if on_step is not None and on_step(i, obj):
                break
        return self.images[k].numpy()[0]


class DeviceAscent:
    """Runs ascent steps with the image resident on the session's device.

    ``static_shapes`` (default: on CUDA) runs each image size through its own
    :class:`StaticSteps` (the last :data:`STATIC_CACHE` sizes are kept), with a CUDA graph when
    ``cuda_graph`` (default: on CUDA unless ``$ONNXDREAM_CUDA_GRAPH`` is 0). Otherwise, and as
    the fallback when a static session fails, one dynamic step graph serves every size.
    """

    def __init__(self, gradient_model: onnx.ModelProto, device: str = "auto",
                 threads: int | None = None, *, static_shapes: bool | None = None,
                 cuda_graph: bool | None = None):
        self.session: Session = create_session(step_graph(gradient_model), device=device,
                                               threads=threads)
        self.device = "cuda" if self.session.device == "cuda" else "cpu"
        on_cuda = self.device == "cuda"
        self.static_shapes = on_cuda if static_shapes is None else bool(static_shapes)
        self.cuda_graph = (on_cuda and cuda_graph_enabled()) if cuda_graph is None else \
            bool(cuda_graph and on_cuda)
        self.fallback_reason: str | None = None
        self._model = gradient_model
        self._threads = threads
        self._static: OrderedDict[tuple[int, ...], StaticSteps] = OrderedDict()
        self._lock = threading.Lock()

    def static_steps(self, shape: tuple[int, ...]) -> StaticSteps:
        """The per-shape runner for ``shape`` ([1,3,H,W]), created on first use (LRU)."""
        shape = tuple(int(v) for v in shape)
        with self._lock:
            runner = self._static.pop(shape, None)
            if runner is None:
                runner = StaticSteps(self._model, shape, self.device, self._threads,
                                     self.cuda_graph)
            self._static[shape] = runner
            while len(self._static) > STATIC_CACHE:
                self._static.popitem(last=False)
            return runner

    def run(self, img: np.ndarray, steps: int, step_size: float, shifts,
            on_step=None) -> np.ndarray:
        """``steps`` steps on img ([3,H,W]); ``shifts`` yields (dy, dx) per step. Returns [3,H,W]."""
        if self.static_shapes:
            started, drawn = [], []

            def step(i, obj):
                started.append(i)
                return on_step(i, obj) if on_step is not None else False

            def drawing():
                while True:
                    drawn.append(next(shifts))
                    yield drawn[-1]

            try:
                return self.static_steps((1, *img.shape)).run(img, steps, step_size, drawing(),
                                                              step)
            except Exception as exc:  # noqa: BLE001 - any failure: fall back, say why
                if started:  # steps already ran and were reported: do not silently redo them
                    raise
                self._disable_static(exc)
                shifts = itertools.chain(drawn, shifts)  # the jitter the failed try drew
        return self._run_dynamic(img, steps, step_size, shifts, on_step)

    def _disable_static(self, exc: BaseException) -> None:
        what = "CUDA graph capture" if self.cuda_graph else "per-shape session"
        self.fallback_reason = f"{what} failed ({' '.join(str(exc).split())[:300]})"
        warnings.warn(f"{self.fallback_reason}; continuing with the dynamic step graph",
                      RuntimeWarning, stacklevel=3)
        self.static_shapes = False
        self._static.clear()

    def _run_dynamic(self, img: np.ndarray, steps: int, step_size: float, shifts,
                     on_step=None) -> np.ndarray:
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
