"""Ascent steps that stay on the device: the whole step as one ONNX graph, run with IO binding.

On CUDA the numpy loop would copy the image to the GPU and the gradient back on every step.
Instead the gradient graph is wrapped into a *step graph* (:mod:`onnxdream.exporters.graph.step`:
roll, gradient, unroll, normalised step, clip) and run with IO binding: ``image_out`` is bound to
a device-resident OrtValue that becomes the next step's ``x``, so the image never returns to the
host between steps; only the two-element shift, the step size, the gradient floor and the
objective cross (and the objective parameters, e.g. the term ``weights``, fed from
:attr:`DeviceAscent.params`). The same graph runs on the CPU provider, where the tests check it
against the numpy loop.

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
from collections.abc import Mapping

import numpy as np
import onnx

from onnxdream.exporters.graph.contract import OBJECTIVE, param_defaults
from onnxdream.exporters.graph.step import GRAD_FLOOR, OUTPUT, static_step_graph, step_graph
from onnxdream.runtime.session import Session, create_session

CUDA_GRAPH_ENV = "ONNXDREAM_CUDA_GRAPH"
#: Per-shape sessions kept by a DeviceAscent (a dream's octaves; each holds its own weights).
STATIC_CACHE = 4


def roll_indices(size: int, shift: int) -> tuple[np.ndarray, np.ndarray]:
    """(take, back): ``v[take]`` is ``np.roll(v, shift)`` and ``r[back]`` undoes it."""
    i = np.arange(size, dtype=np.int64)
    return (i - shift) % size, (i + shift) % size


def floor_input(grad_floor: float | None) -> np.ndarray:
    """The step graph's ``grad_floor`` input: 0 (no floor: mean|g| + 1e-8) or the floor."""
    return np.array([0.0 if grad_floor is None else grad_floor], np.float32)


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
                 device: str, threads: int | None = None, cuda_graph: bool = False,
                 params: Mapping[str, np.ndarray] | None = None):
        import onnxruntime as ort

        self.shape = tuple(int(v) for v in shape)
        self.device = device
        self.lock = threading.Lock()  # one run at a time: the buffers are bound once
        #: the objective parameters fed on every run (default: the graph's defaults)
        self.params = param_defaults(gradient_model) if params is None else params
        options = {"enable_cuda_graph": "1"} if cuda_graph else None
        self.session: Session = create_session(static_step_graph(gradient_model, self.shape),
                                               device=device, threads=threads,
                                               cuda_options=options)
        h, w = self.shape[2], self.shape[3]

        def buffer(shape, dtype):
            return ort.OrtValue.ortvalue_from_shape_and_type(list(shape), dtype, device, 0)

        self.images = [buffer(self.shape, np.float32), buffer(self.shape, np.float32)]
        self.objectives = [buffer([self.shape[0]], np.float32), buffer([self.shape[0]], np.float32)]
        self.index = {"rows": buffer([h], np.int64), "cols": buffer([w], np.int64),
                      "unrows": buffer([h], np.int64), "uncols": buffer([w], np.int64)}
        self.step_size = buffer([1], np.float32)
        self.grad_floor = buffer([1], np.float32)
        self.param_buffers = {name: buffer(np.shape(v), np.asarray(v).dtype)
                              for name, v in self.params.items()}
        self.bindings, self.run_options = [], []
        for k in (0, 1):
            b = self.session.io_binding()
            b.bind_ortvalue_input("x", self.images[k])
            for name, value in self.index.items():
                b.bind_ortvalue_input(name, value)
            b.bind_ortvalue_input("step_size", self.step_size)
            b.bind_ortvalue_input(GRAD_FLOOR, self.grad_floor)
            for name, value in self.param_buffers.items():
                b.bind_ortvalue_input(name, value)
            b.bind_ortvalue_output(OUTPUT, self.images[1 - k])
            b.bind_ortvalue_output(OBJECTIVE, self.objectives[k])
            self.bindings.append(b)
            ro = ort.RunOptions()
            ro.log_severity_level = 3
            if cuda_graph:
                ro.add_run_config_entry("gpu_graph_id", str(k))
            self.run_options.append(ro)

    def run(self, img: np.ndarray, steps: int, step_size: float, shifts, on_step=None,
            params: Mapping[str, np.ndarray] | None = None,
            grad_floor: float | None = None) -> np.ndarray:
        """Same contract as :meth:`DeviceAscent.run`; ``img`` must have this runner's shape,
        ``params`` (default :attr:`params`) this runner's parameter names and shapes.

        Runs from several threads (the server's workers share a model) take turns.
        """
        with self.lock:
            return self._run(img, steps, step_size, shifts, on_step,
                             self.params if params is None else params, grad_floor)

    def _run(self, img: np.ndarray, steps: int, step_size: float, shifts, on_step,
             params: Mapping[str, np.ndarray], grad_floor: float | None) -> np.ndarray:
        h, w = self.shape[2], self.shape[3]
        self.images[0].update_inplace(np.ascontiguousarray(img[None], dtype=np.float32))
        self.step_size.update_inplace(np.array([step_size], np.float32))
        self.grad_floor.update_inplace(floor_input(grad_floor))
        for name, value in params.items():
            self.param_buffers[name].update_inplace(np.ascontiguousarray(value))
        k = 0
        for i in range(steps):
            dy, dx = next(shifts)
            rows, unrows = roll_indices(h, dy)
            cols, uncols = roll_indices(w, dx)
            for name, value in (("rows", rows), ("cols", cols), ("unrows", unrows),
                                ("uncols", uncols)):
                self.index[name].update_inplace(value)
            self.session.run_with_iobinding(self.bindings[k], self.run_options[k])
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
                 cuda_graph: bool | None = None, params: Mapping[str, np.ndarray] | None = None):
        self.session: Session = create_session(step_graph(gradient_model), device=device,
                                               threads=threads)
        #: the objective parameters fed on every step (default: the graph's defaults); a
        #: GradientModel passes its own :attr:`~onnxdream.runtime.gradient.GradientModel.params`
        self.params = param_defaults(gradient_model) if params is None else params
        self.device = "cuda" if self.session.device == "cuda" else "cpu"
        on_cuda = self.device == "cuda"
        self.static_shapes = on_cuda if static_shapes is None else bool(static_shapes)
        self.cuda_graph = (on_cuda and cuda_graph_enabled()) if cuda_graph is None else \
            bool(cuda_graph and on_cuda)
        self.fallback_reason: str | None = None
        self._model = gradient_model
        self._threads = threads
        self._static: OrderedDict[tuple, StaticSteps] = OrderedDict()  # (shape, params)
        self._lock = threading.Lock()

    def static_steps(self, shape: tuple[int, ...],
                     params: Mapping[str, np.ndarray] | None = None) -> StaticSteps:
        """The per-shape runner for ``shape`` ([1,3,H,W]) and the names and shapes of
        ``params`` (default :attr:`params`: its buffers are bound once), created on first use
        (LRU)."""
        shape = tuple(int(v) for v in shape)
        params = self.params if params is None else params
        key = (shape, tuple((k, np.shape(v), np.asarray(v).dtype.str)
                            for k, v in sorted(params.items())))
        with self._lock:
            runner = self._static.pop(key, None)
            if runner is None:
                runner = StaticSteps(self._model, shape, self.device, self._threads,
                                     self.cuda_graph, params)
            self._static[key] = runner
            while len(self._static) > STATIC_CACHE:
                self._static.popitem(last=False)
            return runner

    def run(self, img: np.ndarray, steps: int, step_size: float, shifts,
            on_step=None, params: Mapping[str, np.ndarray] | None = None,
            grad_floor: float | None = None) -> np.ndarray:
        """``steps`` steps on img [3,H,W]; ``shifts`` yields (dy, dx) per step. Returns [3,H,W].

        ``params``: the step graph's parameters for this run (default :attr:`params`): the
        gradient graph's (weights, guide features, region masks at this size) and
        ``step_mask``, so that several dreams with other weightings share this runner without
        changing it. ``grad_floor``: None divides the gradient by mean|g| + 1e-8, F by
        max(mean|g|, F).
        """
        params = self.params if params is None else params
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
                return self.static_steps((1, *img.shape), params).run(
                    img, steps, step_size, drawing(), step, params=params, grad_floor=grad_floor)
            except Exception as exc:  # noqa: BLE001 - any failure: fall back, say why
                if started:  # steps already ran and were reported: do not silently redo them
                    raise
                self._disable_static(exc)
                shifts = itertools.chain(drawn, shifts)  # the jitter the failed try drew
        return self._run_dynamic(img, steps, step_size, shifts, on_step, params, grad_floor)

    def _disable_static(self, exc: BaseException) -> None:
        what = "CUDA graph capture" if self.cuda_graph else "per-shape session"
        self.fallback_reason = f"{what} failed ({' '.join(str(exc).split())[:300]})"
        warnings.warn(f"{self.fallback_reason}; continuing with the dynamic step graph",
                      RuntimeWarning, stacklevel=3)
        self.static_shapes = False
        self._static.clear()

    def _run_dynamic(self, img: np.ndarray, steps: int, step_size: float, shifts,
                     on_step=None, params: Mapping[str, np.ndarray] | None = None,
                     grad_floor: float | None = None) -> np.ndarray:
        import onnxruntime as ort

        x = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(img[None]), self.device, 0)
        size = np.array([step_size], np.float32)
        floor = ort.OrtValue.ortvalue_from_numpy(floor_input(grad_floor), self.device, 0)
        # bound as OrtValues: onnxruntime binds a parameter (an input with a default) only so
        params = {name: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value), self.device,
                                                         0)
                  for name, value in (self.params if params is None else params).items()}
        _, h, w = img.shape
        for i in range(steps):
            dy, dx = next(shifts)
            binding = self.session.io_binding()
            binding.bind_ortvalue_input("x", x)
            binding.bind_cpu_input("shift", np.array([dy % h, dx % w], np.int64))
            binding.bind_cpu_input("step_size", size)
            binding.bind_ortvalue_input(GRAD_FLOOR, floor)
            for name, value in params.items():
                binding.bind_ortvalue_input(name, value)
            binding.bind_output(OUTPUT, self.device)
            binding.bind_output(OBJECTIVE, "cpu")
            self.session.run_with_iobinding(binding)
            x, obj = binding.get_outputs()
            if on_step is not None and on_step(i, float(obj.numpy()[0])):
                break
        return x.numpy()[0]
