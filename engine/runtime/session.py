"""onnxruntime sessions: which device, which threads, and honest reporting of what was used.

``device`` is one of ``auto``, ``cpu`` or ``cuda`` (the CLI's ``--device``):

- ``auto``: CUDA then CPU when this onnxruntime has the CUDA provider, otherwise CPU. If CUDA was
  wanted but the session came up on the CPU (no driver, no cuDNN, out of memory ...), the session
  still works, :attr:`Session.fallback_warning` says why, and a :class:`RuntimeWarning` is issued.
- ``cpu``: the CPU provider only.
- ``cuda``: CUDA or nothing; anything else is a :class:`~onnxdream.core.errors.DeviceError`.

onnxruntime's own silent fallbacks are switched off (``enable_fallback=0``): it would otherwise
print to stdout and quietly move a session, or a running dream, to the CPU.

onnxruntime is imported lazily so that ``import onnxdream`` works without the ``[cpu]``/``[gpu]``
extra, and the error for a missing runtime says how to install one.

The engine runs sessions only through the :class:`Session` wrapper (``run``, ``io_binding``,
``run_with_iobinding``, which take run options); the raw ``onnxruntime.InferenceSession`` stays
in ``.session`` for what the wrapper does not cover.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onnxdream.core.env import env_int
from onnxdream.core.errors import DependencyError, DeviceError, ModelError, OnnxDreamError

__all__ = [
    "CPU",
    "CUDA",
    "DEVICES",
    "Session",
    "available_devices",
    "cpu_cores",
    "create_session",
    "default_threads",
    "env_threads",
    "describe_provider",
    "import_onnxruntime",
    "resolve_providers",
]

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
DEVICES = ("auto", "cpu", "cuda")
THREADS_ENV = "ONNXDREAM_THREADS"

#: CUDA execution provider options (onnxruntime wants strings).
#:
#: - ``cudnn_conv_algo_search = HEURISTIC``: cuDNN picks a convolution algorithm from its
#:   heuristics instead of timing every candidate. EXHAUSTIVE can be a little faster per step but
#:   benchmarks anew for every input shape, and a dream sees many shapes (one per octave, plus
#:   edge tiles), so its first step at each shape costs seconds. Pass
#:   ``cuda_options={"cudnn_conv_algo_search": "EXHAUSTIVE"}`` for long runs at one fixed shape.
#: - ``use_tf32 = 0``: full float32 matmuls/convolutions, so CUDA dreams match CPU and PyTorch
#:   closely; ``tf32=True`` trades that for speed on Ampere and newer.
#: - ``arena_extend_strategy = kNextPowerOfTwo``: fewer, larger arena growths as shapes change.
CUDA_DEFAULTS: dict[str, str] = {
    "device_id": "0",
    "cudnn_conv_algo_search": "HEURISTIC",
    "use_tf32": "0",
    "arena_extend_strategy": "kNextPowerOfTwo",
    "do_copy_in_default_stream": "1",
}


def import_onnxruntime() -> Any:
    """``import onnxruntime``, or a :class:`DependencyError` that says how to install it."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise DependencyError(
            "onnxruntime is not installed: pip install 'onnxdream[cpu]' (or '[gpu]' for CUDA)"
        ) from exc
    if not hasattr(ort, "InferenceSession") or not hasattr(ort, "get_available_providers"):
        # what is left after installing onnxruntime and onnxruntime-gpu together and removing one
        raise DependencyError(
            "onnxruntime is installed but incomplete (no InferenceSession); reinstall exactly one "
            "of onnxruntime or onnxruntime-gpu: "
            "pip install --force-reinstall 'onnxdream[cpu]' (or '[gpu]')"
        )
    return ort


def _installed_providers(ort: Any) -> list[str]:
    try:
        return list(ort.get_available_providers())
    except Exception:  # noqa: BLE001 - a broken build reports no providers rather than crashing
        return [CPU]


def _check_device(device: str) -> str:
    d = str(device).strip().lower()
    if d not in DEVICES:
        raise OnnxDreamError(f"unknown device {device!r}; use one of {', '.join(DEVICES)}")
    return d


def available_devices() -> list[str]:
    """Devices this onnxruntime can use, in the order ``auto`` tries them (``["cuda", "cpu"]``).

    ``cuda`` means the CUDA provider is compiled in; whether a driver and GPU are present is only
    known once a session is created.
    """
    ort = import_onnxruntime()
    providers = _installed_providers(ort)
    return (["cuda"] if CUDA in providers else []) + ["cpu"]


def resolve_providers(
    device: str = "auto",
    *,
    cuda_options: Mapping[str, Any] | None = None,
    tf32: bool = False,
) -> list[str | tuple[str, dict[str, str]]]:
    """The ``providers`` argument for ``onnxruntime.InferenceSession`` for ``device``.

    Returns e.g. ``[("CUDAExecutionProvider", {...options}), "CPUExecutionProvider"]`` or
    ``["CPUExecutionProvider"]``. ``cuda_options`` override :data:`CUDA_DEFAULTS`.

    Raises:
        OnnxDreamError: ``device`` is not one of auto, cpu, cuda.
        DeviceError: ``cuda`` was asked for and this onnxruntime has no CUDA provider.
    """
    d = _check_device(device)
    ort = import_onnxruntime()
    if d == "cpu":
        return [CPU]
    installed = _installed_providers(ort)
    has_cuda = CUDA in installed
    if d == "cuda" and not has_cuda:
        raise DeviceError(
            "CUDA was requested but onnxruntime has no CUDA provider here "
            f"(installed: {', '.join(installed) or 'none'}); install onnxdream[gpu] and a CUDA "
            "driver, or use --device cpu"
        )
    if not has_cuda:
        return [CPU]
    opts = dict(CUDA_DEFAULTS)
    opts["use_tf32"] = "1" if tf32 else "0"
    for k, v in (cuda_options or {}).items():
        opts[str(k)] = _option_str(v)
    return [(CUDA, opts), CPU]


def _option_str(v: Any) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    return str(v)


# --------------------------------------------------------------------------------------------
# Threads


def _physical_cores(allowed: set[int] | None) -> int | None:
    """Distinct physical cores among the allowed logical CPUs, from /proc/cpuinfo (Linux)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            text = fh.read()
    except OSError:
        return None
    cores: set[tuple[str, str]] = set()
    for block in text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.splitlines():
            key, sep, value = line.partition(":")
            if sep:
                fields[key.strip()] = value.strip()
        if "processor" not in fields:
            continue
        try:
            if allowed is not None and int(fields["processor"]) not in allowed:
                continue
        except ValueError:
            continue
        if "core id" not in fields:
            return None  # no topology (some ARM kernels, VMs): fall back to logical CPUs
        cores.add((fields.get("physical id", "0"), fields["core id"]))
    return len(cores) or None


def _cgroup_cpu_limit() -> int | None:
    """CPUs allowed by a cgroup v2 (or v1) CPU quota, rounded up; None when unlimited."""
    try:
        with open("/sys/fs/cgroup/cpu.max", encoding="ascii") as fh:
            quota, period = fh.read().split()[:2]
        if quota != "max":
            return max(1, -(-int(quota) // int(period)))
        return None
    except (OSError, ValueError):
        pass
    try:
        with open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", encoding="ascii") as fh:
            quota_us = int(fh.read())
        with open("/sys/fs/cgroup/cpu/cpu.cfs_period_us", encoding="ascii") as fh:
            period_us = int(fh.read())
        if quota_us > 0 and period_us > 0:
            return max(1, -(-quota_us // period_us))
    except (OSError, ValueError):
        pass
    return None


def default_threads() -> int:
    """Intra-op threads: ``$ONNXDREAM_THREADS`` if set, else :func:`cpu_cores`."""
    n = env_threads()
    return n if n is not None else cpu_cores()


def env_threads() -> int | None:
    """``$ONNXDREAM_THREADS`` as a positive integer, or None when it is not set."""
    return env_int(THREADS_ENV)


def cpu_cores() -> int:
    """The physical cores this process may use.

    "May use" is the CPU affinity mask and any cgroup CPU quota (containers). Hyper-threads are
    not counted: onnxruntime's convolution kernels gain nothing from them and lose to the
    contention. Falls back to ``os.cpu_count()`` where the topology is unknown.
    """
    allowed: set[int] | None
    try:
        allowed = set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        allowed = None
    logical = len(allowed) if allowed else (os.cpu_count() or 1)
    physical = _physical_cores(allowed) or logical
    n = min(logical, physical)
    quota = _cgroup_cpu_limit()
    if quota is not None:
        n = min(n, quota)
    return max(1, n)


# --------------------------------------------------------------------------------------------
# Sessions


@dataclass(frozen=True, eq=False)
class Session:
    """An onnxruntime session plus what was asked for and what was actually used.

    Attributes:
        session: the ``onnxruntime.InferenceSession`` (run through :meth:`run`,
            :meth:`io_binding` and :meth:`run_with_iobinding`).
        provider: the provider that runs the model: ``CUDAExecutionProvider`` or
            ``CPUExecutionProvider`` (the first of ``session.get_providers()``).
        device: ``"cuda"`` or ``"cpu"``, from ``provider``.
        fallback_warning: why ``auto`` ended up on the CPU although CUDA was wanted, else None.
        requested: the device that was asked for (``auto``, ``cpu`` or ``cuda``).
        threads: intra-op threads (0: onnxruntime's own default).
        provider_options: the options onnxruntime reports for ``provider``.
    """

    session: Any
    provider: str
    device: str
    fallback_warning: str | None = None
    requested: str = "auto"
    threads: int = 0
    provider_options: dict[str, str] = field(default_factory=dict)

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self.session.get_inputs()]

    @property
    def parameter_names(self) -> list[str]:
        """Inputs with a default (onnxruntime's overridable initializers): a compiled graph's
        objective parameters, which ``input_names`` leaves out."""
        return [i.name for i in self.session.get_overridable_initializers()]

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.session.get_outputs()]

    def run(self, output_names: list[str] | None, feeds: Mapping[str, Any],
            run_options: Any = None) -> list[Any]:
        """``InferenceSession.run``; ``run_options`` an ``onnxruntime.RunOptions`` or None."""
        return self.session.run(output_names, dict(feeds), run_options)

    def io_binding(self) -> Any:
        """``InferenceSession.io_binding()``, for device-resident inputs and outputs on CUDA."""
        return self.session.io_binding()

    def run_with_iobinding(self, binding: Any, run_options: Any = None) -> None:
        """``InferenceSession.run_with_iobinding``: run with the inputs/outputs in ``binding``."""
        self.session.run_with_iobinding(binding, run_options)


def _model_name(model: Any) -> str:
    if isinstance(model, (bytes, bytearray, memoryview)):
        return f"the in-memory model ({len(model):,} bytes)"
    return str(model)


def _ort_message(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : [A-Z_]+ : ", "", text)
    return text if len(text) <= 400 else text[:397] + "..."


def _session_options(ort: Any, threads: int, log_severity: int,
                     config: Mapping[str, str] | None) -> Any:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Memory patterns (onnxruntime planning one block per input shape) doubled the peak of a
    # gradient run (EfficientNet-Lite0 at 896 px: 889 MB with, 457 MB without) for no gain in
    # speed (0.89 vs 0.94 s; GoogLeNet 4.25 vs 3.23 s): off, so the memory budget holds.
    so.enable_mem_pattern = False
    so.enable_cpu_mem_arena = True
    so.log_severity_level = log_severity
    for k, v in (config or {}).items():
        so.add_session_config_entry(str(k), str(v))
    return so


def _resolve_threads(threads: int | None) -> int:
    if threads is None:
        return default_threads()
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
        raise OnnxDreamError(
            f"threads must be a positive integer (or 0 for onnxruntime's default), got {threads!r}"
        )
    return threads


def create_session(
    model: str | os.PathLike[str] | bytes,
    device: str = "auto",
    threads: int | None = None,
    *,
    tf32: bool = False,
    cuda_options: Mapping[str, Any] | None = None,
    session_config: Mapping[str, str] | None = None,
    log_severity: int = 3,
) -> Session:
    """Create an onnxruntime session for ``model`` on ``device``.

    Args:
        model: a path to an ``.onnx`` (or ``.ort``) file, the serialized model as bytes, or an
            ``onnx.ModelProto``.
        device: ``auto``, ``cpu`` or ``cuda``.
        threads: intra-op threads; None: :func:`default_threads` (``$ONNXDREAM_THREADS`` or the
            physical cores); 0: onnxruntime's default.
        tf32: allow TF32 on CUDA (faster on Ampere+, less exact); off by default.
        cuda_options: CUDA provider options overriding :data:`CUDA_DEFAULTS` (e.g. ``device_id``).
        session_config: extra ``SessionOptions.add_session_config_entry`` entries.
        log_severity: onnxruntime's log level for this session (0 verbose ... 3 error, 4 fatal).

    Raises:
        DependencyError: onnxruntime is not installed.
        OnnxDreamError: unknown device or bad thread count.
        DeviceError: ``cuda`` was asked for and the session cannot run on CUDA.
        ModelError: the model is missing, not ONNX, corrupt, or uses ops onnxruntime lacks.
    """
    d = _check_device(device)
    ort = import_onnxruntime()
    n_threads = _resolve_threads(threads)
    providers = resolve_providers(d, cuda_options=cuda_options, tf32=tf32)
    source, name = _model_source(model)
    so = _session_options(ort, n_threads, log_severity, session_config)

    wants_cuda = any((p[0] if isinstance(p, tuple) else p) == CUDA for p in providers)
    fallback: str | None = None
    try:
        sess = ort.InferenceSession(source, sess_options=so, providers=providers, enable_fallback=0)
    except Exception as exc:  # noqa: BLE001 - onnxruntime's exceptions derive from Exception only
        if not wants_cuda:
            raise _model_error(name, exc) from exc
        # Did CUDA fail, or the model? Try the CPU: if that fails too, it is the model.
        try:
            sess = ort.InferenceSession(
                source, sess_options=_session_options(ort, n_threads, log_severity, session_config),
                providers=[CPU], enable_fallback=0,
            )
        except Exception as cpu_exc:  # noqa: BLE001
            raise _model_error(name, cpu_exc) from cpu_exc
        if d == "cuda":
            raise DeviceError(
                f"CUDA was requested but onnxruntime could not start it ({_ort_message(exc)}); "
                "check the CUDA driver and cuDNN, or use --device cpu"
            ) from exc
        fallback = (f"CUDA is installed but could not be used ({_ort_message(exc)}); "
                    "running on the CPU")

    used = list(sess.get_providers())
    provider = used[0] if used else CPU
    if wants_cuda and provider != CUDA:
        if d == "cuda":
            raise DeviceError(
                "CUDA was requested but onnxruntime created the session on "
                f"{provider} (providers: {', '.join(used) or 'none'}); check that a CUDA driver, "
                "the CUDA runtime and cuDNN matching onnxruntime-gpu are installed, "
                "or use --device cpu"
            )
        if fallback is None:
            fallback = (
                "CUDA is installed but the session runs on the CPU "
                f"(providers: {', '.join(used) or 'none'}); check the CUDA driver and cuDNN, "
                "or pass --device cpu to silence this"
            )
    if fallback is not None:
        warnings.warn(fallback, RuntimeWarning, stacklevel=2)

    try:
        opts = dict(sess.get_provider_options().get(provider, {}))
    except Exception:  # noqa: BLE001 - informational only
        opts = {}
    return Session(
        session=sess,
        provider=provider,
        device="cuda" if provider == CUDA else "cpu",
        fallback_warning=fallback,
        requested=d,
        threads=n_threads,
        provider_options={str(k): str(v) for k, v in opts.items()},
    )


def _model_source(model: Any) -> tuple[str | bytes, str]:
    """(what InferenceSession takes, a name for messages); checks paths exist."""
    if isinstance(model, (bytes, bytearray, memoryview)):
        data = bytes(model)
        if not data:
            raise ModelError("the in-memory model is empty (0 bytes); "
                             "expected a serialized ONNX model")
        return data, _model_name(model)
    if hasattr(model, "SerializeToString") and not isinstance(model, (str, os.PathLike)):
        data = model.SerializeToString()
        return data, "the in-memory ONNX model"
    if isinstance(model, (str, os.PathLike)):
        p = Path(model)
        if not p.exists():
            raise ModelError(f"model file {p} does not exist")
        if p.is_dir():
            raise ModelError(f"model path {p} is a directory, not an .onnx file")
        return os.fspath(p), str(p)
    raise ModelError(f"cannot load a model from a {type(model).__name__}; pass a path or bytes")


def _model_error(name: str, exc: BaseException) -> ModelError:
    kind = type(exc).__name__
    msg = _ort_message(exc)
    if kind == "InvalidProtobuf":
        return ModelError(
            f"{name} is not a valid ONNX model "
            "(not a readable ONNX protobuf: truncated, or another format)"
        )
    if kind == "NotImplemented":
        return ModelError(f"{name} uses an operator this onnxruntime cannot run ({msg})")
    if kind == "NoSuchFile":
        return ModelError(f"{name} cannot be read ({msg})")
    return ModelError(f"{name} cannot be loaded by onnxruntime ({msg})")


def describe_provider(session: Session | Any) -> str:
    """One line for logs and ``--verbose``: runtime version, provider, and its main settings.

    E.g. ``"onnxruntime 1.32.0, CPUExecutionProvider, 2 threads"`` or
    ``"onnxruntime 1.32.0, CUDAExecutionProvider (device 0, TF32 off, cuDNN HEURISTIC)"``.
    Accepts a :class:`Session` or a raw ``InferenceSession``.
    """
    ort = import_onnxruntime()
    version = getattr(ort, "__version__", "?")
    if isinstance(session, Session):
        provider, threads, opts = session.provider, session.threads, session.provider_options
        raw = session.session
    else:
        raw = session
        used = list(raw.get_providers())
        provider = used[0] if used else "?"
        threads, opts = 0, {}
        try:
            opts = dict(raw.get_provider_options().get(provider, {}))
        except Exception:  # noqa: BLE001
            pass
    if provider == CUDA:
        bits = [f"device {opts.get('device_id', '0')}"]
        if "use_tf32" in opts:
            bits.append("TF32 " + ("on" if opts["use_tf32"] == "1" else "off"))
        if "cudnn_conv_algo_search" in opts:
            bits.append(f"cuDNN {opts['cudnn_conv_algo_search']}")
        return f"onnxruntime {version}, {provider} ({', '.join(bits)})"
    if not threads:
        try:
            threads = int(raw.get_session_options().intra_op_num_threads)
        except Exception:  # noqa: BLE001
            threads = 0
    t = f"{threads} thread{'s' if threads != 1 else ''}" if threads else "default threads"
    return f"onnxruntime {version}, {provider}, {t}"
