"""The memory budget: what a dream will take before it runs, and the largest tile that fits.

A dream's peak memory is the runtime (Python, numpy, onnxruntime), the model's session (its
weights), the ascent's image buffers (the photo, the octave pyramid's base and detail, the image,
its gradient: a few float32 copies of the largest octave) and the activations of one run of the
gradient graph, which grow with the pixels of a run: the whole image untiled, or one batch of
tiles. :class:`MemoryProfile` prices a compiled gradient graph (from its live-tensor peak, see
:mod:`onnxdream.exporters.graph.memory`) and :func:`estimate` adds the parts up for one image and
tile. The resolver (:func:`onnxdream.settings.resolve.resolve`) picks the largest tile whose
estimate fits the budget, and raises :class:`MemoryBudgetError` when even the smallest does not.

The constants below were measured as peak RSS (``VmHWM``) of a child process on the CPU (see
``benchmarks/memory_estimate.py`` and benchmarks/README.md for the figures and the error).

The budget: ``--max-memory MB`` (CLI), ``ONNXDREAM_MAX_MEMORY_MB`` (server, shared by its
workers), else :func:`default_budget_mb`: half of the memory this process may use (the cgroup
limit, or the machine's memory).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

from onnxdream.core.env import env_int
from onnxdream.core.errors import MemoryBudgetError

__all__ = ["BUDGET_ENV", "MB", "MemoryBudgetError", "MemoryEstimate", "MemoryProfile",
           "budget_from_env", "default_budget_mb", "estimate", "system_memory_bytes"]

MB = 1 << 20
BUDGET_ENV = "ONNXDREAM_MAX_MEMORY_MB"

#: onnxruntime's peak over the graph's live-tensor peak (arena on, memory patterns off). Measured
#: 1.0-1.45 over whole dreams (GoogLeNet at 2048 px the highest: the arena grows in powers of
#: two), so 1.6 keeps the estimate above every peak measured (benchmarks/README.md).
ACTIVATION_FACTOR = 1.6
#: numpy buffers of the ascent per pixel of the largest octave, in bytes: float32 RGB copies
#: (12 bytes a pixel each) of the photo, the base, the detail (two sizes), the image and the
#: gradient; an untiled step adds the jittered image, onnxruntime's gradient and its unjittered
#: copy. Measured at 3000x3000 px: ~120 untiled (a model with negligible activations), ~50
#: tiled with one octave (the detail buffers come with more octaves).
IMAGE_BYTES_PER_PIXEL = 80
UNTILED_BYTES_PER_PIXEL = 48
#: the session's memory over the compiled graph's weights, and what it takes besides them (the
#: model file is read whole on top: measured ResNet-18 122 MB for 23 MB of weights, 47 MB file).
WEIGHTS_FACTOR = 2.5
SESSION_BYTES = 32 * MB
#: Python, numpy and onnxruntime before any model is loaded (measured 75 MB; the CLI's more).
RUNTIME_BYTES = 128 * MB


@dataclass(frozen=True)
class MemoryProfile:
    """The memory price of one compiled gradient graph.

    ``bytes_per_pixel``: its activations' live peak per input pixel (uncalibrated: the graph's
    own figure); ``weight_bytes``: its initializers; ``model_bytes``: the size of the model
    file it was compiled from (read whole while the session is made).
    """

    bytes_per_pixel: float
    weight_bytes: int
    model_bytes: int = 0

    @classmethod
    def of_graph(cls, graph, size: tuple[int, int]) -> MemoryProfile:
        """The profile of a compiled graph (a path, serialized bytes or a ModelProto) measured
        at ``size`` (h, w): a size the graph runs at (the model's native size). Profiles of
        files are cached by path and modification time."""
        size = (int(size[0]), int(size[1]))
        if isinstance(graph, (str, os.PathLike)):
            return _profile(str(graph), _mtime(graph), size)
        if isinstance(graph, bytes):
            import onnx

            graph = onnx.load_from_string(graph)
        return _measure(graph, size)

    def run_bytes(self, pixels: int) -> int:
        """What one run over ``pixels`` input pixels (all images of the batch) takes."""
        return int(ACTIVATION_FACTOR * self.bytes_per_pixel * pixels)

    def fixed_bytes(self) -> int:
        """The runtime and the session: what any dream with this graph takes."""
        return int(RUNTIME_BYTES + SESSION_BYTES + WEIGHTS_FACTOR * self.weight_bytes
                   + self.model_bytes)


def _mtime(path) -> float:
    try:
        return Path(path).stat().st_mtime
    except OSError:
        return 0.0


def _measure(proto, size: tuple[int, int]) -> MemoryProfile:
    from onnxdream.exporters.graph.memory import activation_peak

    peak = activation_peak(proto, size)
    return MemoryProfile(bytes_per_pixel=peak.bytes_per_pixel, weight_bytes=peak.weight_bytes)


@functools.lru_cache(maxsize=32)
def _profile(path: str, mtime: float, size: tuple[int, int]) -> MemoryProfile:
    import onnx

    return _measure(onnx.load(path), size)


@dataclass(frozen=True)
class MemoryEstimate:
    """A dream's estimated peak, in bytes, and its parts."""

    fixed: int  # runtime + session
    images: int  # the ascent's image buffers
    run: int  # the activations of the largest run
    budget: int | None = None

    @property
    def total(self) -> int:
        return self.fixed + self.images + self.run

    @property
    def fits(self) -> bool:
        return self.budget is None or self.total <= self.budget

    def describe(self) -> str:
        """``"1.9 GB (network 1.2 GB, image buffers 0.6 GB, model 0.1 GB)"``"""
        return (f"{_size(self.total)} (network {_size(self.run)}, image buffers "
                f"{_size(self.images)}, model and runtime {_size(self.fixed)})")


def _size(n: float) -> str:
    return f"{n / 1024**3:.1f} GB" if n >= 1024**3 else f"{n / MB:.0f} MB"


def estimate(profile: MemoryProfile, size: tuple[int, int], run_pixels: int,
             budget: int | None = None, *, tiled: bool = True) -> MemoryEstimate:
    """The peak of a dream whose largest octave is ``size`` (h, w), each run of the gradient
    graph covering ``run_pixels`` input pixels (the whole octave when not ``tiled``)."""
    per_pixel = IMAGE_BYTES_PER_PIXEL + (0 if tiled else UNTILED_BYTES_PER_PIXEL)
    return MemoryEstimate(fixed=profile.fixed_bytes(), images=int(per_pixel * size[0] * size[1]),
                          run=profile.run_bytes(run_pixels), budget=budget)


# -- the budget --------------------------------------------------------------------------------


def _cgroup_limit() -> int | None:
    """This process's cgroup memory limit in bytes (v2, then v1), or None when unlimited."""
    candidates = [Path("/sys/fs/cgroup/memory.max"),
                  Path("/sys/fs/cgroup/memory/memory.limit_in_bytes")]
    try:  # the process's own cgroup (v2), when it is not the root
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            parts = line.split(":", 2)
            if len(parts) == 3 and parts[0] == "0" and parts[2] not in ("", "/"):
                candidates.insert(0, Path("/sys/fs/cgroup") / parts[2].lstrip("/") / "memory.max")
    except OSError:
        pass
    for path in candidates:
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text and text != "max":
            try:
                value = int(text)
            except ValueError:
                continue
            if 0 < value < 1 << 60:  # v1 says "unlimited" with a huge number
                return value
    return None


def _machine_memory() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def system_memory_bytes() -> int | None:
    """The memory this process may use: the cgroup limit or the machine's, the smaller."""
    found = [v for v in (_cgroup_limit(), _machine_memory()) if v]
    return min(found) if found else None


def default_budget_mb() -> int:
    """Half of :func:`system_memory_bytes` (4 GB where it cannot be read), in MB."""
    total = system_memory_bytes()
    return int(total // 2 // MB) if total else 4096


def budget_from_env(default: int | None = None) -> int:
    """``ONNXDREAM_MAX_MEMORY_MB`` if set, else ``default`` or :func:`default_budget_mb`."""
    value = env_int(BUDGET_ENV, unit="megabytes")
    if value is not None:
        return value
    return default if default is not None else default_budget_mb()
