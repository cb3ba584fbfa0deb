"""The on-disk cache of compiled gradient graphs: bounded in size, least recently used first out.

A compiled graph is a pure function of the model file, the objective's *structure* (layers,
kinds, pre_relu, border; never the weights, which are the graph's ``weights`` input) and the
compiler version, so it is cached as ``$ONNXDREAM_HOME/compiled/<model>-<key>.onnx`` (with a
``.data`` sidecar for graphs past 2 GB). Clients choose what gets compiled (a server compiles
for any request), so the cache has a size budget: ``ONNXDREAM_CACHE_MB`` (default
:data:`DEFAULT_BUDGET_MB`; ``onnxdream serve --cache-mb``).

- A hit *touches* the file (its mtime is the "last used" time: atime is unreliable under
  ``noatime``/``relatime`` mounts).
- Before a new graph is written, the least recently used graphs are removed until it fits.
  Graphs that a live :class:`~onnxdream.runtime.gradient.GradientModel` in this process uses are
  skipped (it may re-read its file, e.g. for the step graph). Removing a file that a session
  in *another* process loaded is harmless on Linux and macOS: onnxruntime has read it into
  memory, and an open or mapped file lives on until closed; that process recompiles if it needs
  the file again.
- A graph that cannot fit even in an empty cache (or only beside graphs in use) is not written:
  the session is created from memory and the caller says so in its log.
- Writes go through :func:`onnxdream.core.atomic.write_atomic`: a failure (disk full, Ctrl-C) leaves
  nothing; ``kill -9`` leaves a ``.*.tmp`` that :meth:`CompiledCache.sweep` removes once it is an
  hour old (the server sweeps at start; any process sweeps before its first write).
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import logging
import os
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from onnxdream.core.env import env_int
from onnxdream.core.errors import OnnxDreamError
from onnxdream.exporters.graph.objective import Objective

__all__ = ["CACHE_ENV", "COMPILER_VERSION", "DEFAULT_BUDGET_MB", "CompiledCache", "budget_from_env",
           "graph_key"]

log = logging.getLogger("onnxdream.cache")

CACHE_ENV = "ONNXDREAM_CACHE_MB"
DEFAULT_BUDGET_MB = 512

# 2: optimised graphs; 3: separable MaxPool backward; 4: depthwise phase Convs; 5: activation
# masks; 6: slice chains; 7: Sum as Adds; 8: pool masks; 9: Conv outputs added first;
# 10: term weights are the graph's `weights` input (the cache key leaves them out);
# 11: negative Pad pads (were mis-cropped); 12: the region `mask` input, guide terms;
# 13: region masks block-averaged on the layer's stride; 14: constant Gathers scatter without
# a reduction; 15: the portable target fits region masks without an antialiased Resize
COMPILER_VERSION = "15"
MB = 1024 * 1024
STALE_TEMP_SECONDS = 3600.0

# graph files that live GradientModels of this process use: path -> how many
_in_use: collections.Counter[Path] = collections.Counter()
_lock = threading.Lock()  # eviction + write, and _in_use
_swept: set[Path] = set()  # directories swept by this process


def graph_key(model_path: Path, objective: Objective, pre_relu: bool, border: int,
              target: str = "default") -> str:
    """The compiled graph's file name: model file + objective structure (not the weights) +
    the compiler's target (see ``compile_gradient``)."""
    key = hashlib.sha256()
    key.update(model_path.read_bytes() if model_path.stat().st_size < 2**31 else
               str(model_path.stat()).encode())
    key.update(json.dumps([COMPILER_VERSION, objective.structure(), pre_relu, border]
                          + ([target] if target != "default" else [])).encode())
    return f"{model_path.stem}-{key.hexdigest()[:16]}.onnx"


def budget_from_env(default: int = DEFAULT_BUDGET_MB) -> int:
    """``$ONNXDREAM_CACHE_MB`` (an integer >= 1), else ``default``."""
    return env_int(CACHE_ENV, default, unit="megabytes", field="cache_mb")


def _default_dir() -> Path:
    from onnxdream.models import model_home

    return model_home() / "compiled"


@dataclass(frozen=True)
class Entry:
    path: Path  # the .onnx file
    size: int  # with its sidecar
    used: float  # mtime: last written or used

    @property
    def files(self) -> list[Path]:
        return [self.path, self.path.with_name(self.path.name + ".data")]


class CompiledCache:
    """One directory of compiled graphs with a size budget (bytes)."""

    def __init__(self, directory: str | os.PathLike | None = None,
                 budget_mb: float | None = None):
        self.directory = Path(directory) if directory is not None else _default_dir()
        self.budget_mb = budget_from_env() if budget_mb is None else budget_mb
        if not (isinstance(self.budget_mb, (int, float)) and 0 < self.budget_mb < float("inf")):
            raise OnnxDreamError("the compiled-graph cache budget must be a positive number "
                                 "of MB", field="cache_mb")

    @property
    def budget(self) -> int:
        return int(self.budget_mb * MB)

    # -- reading
    def path_for(self, name: str) -> Path:
        return self.directory / name

    def lookup(self, name: str) -> Path | None:
        """The cached graph ``name`` (touched: now the most recently used), or None."""
        path = self.path_for(name)
        try:
            os.utime(path)
        except OSError:  # missing, or a read-only cache: then it simply is not touched
            return path if path.is_file() else None
        return path

    def get_or_compile(self, name: str, compile: Callable[[], Any],
                       lock: threading.Lock | None = None) -> tuple[Path | bytes, bool]:
        """The cached graph ``name``; else ``compile()`` (a ModelProto) stored under the budget.

        Returns (the graph's file, or its serialized bytes when the cache cannot take it;
        whether it was compiled just now). ``lock``, if given, is held while compiling (one
        compile at a time: each holds a few hundred MB), with the look-up repeated under it.
        An unwritable cache only costs a recompile next time."""
        if (hit := self.lookup(name)) is not None:
            return hit, False
        with lock if lock is not None else contextlib.nullcontext():
            if lock is not None and (hit := self.lookup(name)) is not None:
                return hit, False
            graph = compile()
            try:
                stored = self.store(name, graph, graph.ByteSize())
            except OSError:
                stored = None
            return (stored if stored is not None else graph.SerializeToString()), True

    def entries(self) -> list[Entry]:
        """The cached graphs, least recently used first."""
        out = []
        try:
            files = list(self.directory.iterdir())
        except OSError:
            return []
        for p in files:
            if p.suffix != ".onnx" or p.name.startswith("."):
                continue
            try:
                st = p.stat()
                side = p.with_name(p.name + ".data")
                size = st.st_size + (side.stat().st_size if side.exists() else 0)
            except OSError:
                continue
            out.append(Entry(p, size, st.st_mtime))
        return sorted(out, key=lambda e: e.used)

    def usage(self) -> int:
        """Bytes the cached graphs take."""
        return sum(e.size for e in self.entries())

    # -- writing
    def store(self, name: str, graph, size: int) -> Path | None:
        """Write ``graph`` (a ModelProto, ``size`` bytes) as ``name`` after evicting the least
        recently used graphs until it fits; None (nothing written) when it cannot fit.
        Raises what the write raises (OSError, ModelError); nothing is left behind then."""
        from onnxdream.exporters.graph.onnxfile import save_model

        self.sweep()
        path = self.path_for(name)
        with _lock:
            if not self._make_room(size, keep=path):
                log.warning("compiled graph %s (%.1f MB) does not fit the %g MB cache "
                            "(%s); running it from memory", name, size / MB, self.budget_mb,
                            CACHE_ENV)
                return None
            self.directory.mkdir(parents=True, exist_ok=True)
            save_model(graph, path)
        return path

    def _make_room(self, size: int, keep: Path) -> bool:
        if size > self.budget:
            return False
        entries = [e for e in self.entries() if e.path != keep]
        total = sum(e.size for e in entries)
        for e in entries:  # least recently used first
            if total + size <= self.budget:
                break
            if e.path in _in_use:
                continue
            for f in e.files:
                with contextlib.suppress(OSError):
                    f.unlink()
            total -= e.size
            log.info("evicted compiled graph %s (%.1f MB, least recently used)", e.path.name,
                     e.size / MB)
        return total + size <= self.budget

    def remove(self, path: Path) -> None:
        """Remove a cached graph (a corrupt or unusable one) with its sidecar."""
        for f in Entry(path, 0, 0.0).files:
            with contextlib.suppress(OSError):
                f.unlink()

    def sweep(self, older_than: float = STALE_TEMP_SECONDS, *, force: bool = False) -> int:
        """Remove temporary files of interrupted writes (``kill -9``) older than ``older_than``
        seconds, here and in the model home; once per directory per process unless ``force``.
        Returns how many were removed."""
        from onnxdream.core.atomic import remove_stale_temps

        removed = 0
        for d in (self.directory, self.directory.parent):
            if d in _swept and not force:
                continue
            _swept.add(d)
            n = remove_stale_temps(d, older_than)
            if n:
                log.info("removed %d stale temporary file(s) from %s", n, d)
            removed += n
        return removed

    def check_writable(self) -> None:
        """OSError unless a file can be created in the cache directory (made if missing)."""
        from onnxdream.core.atomic import TEMP_SUFFIX

        self.directory.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=".probe.", suffix=TEMP_SUFFIX, dir=self.directory)
        try:
            os.write(fd, b"ok")
        finally:
            os.close(fd)
            os.unlink(name)

    # -- live graphs
    @staticmethod
    def hold(path: Path) -> None:
        """Mark ``path`` as used by a live model: eviction skips it until :meth:`release`."""
        with _lock:
            _in_use[Path(path)] += 1

    @staticmethod
    def release(path: Path) -> None:
        with _lock:
            _in_use[Path(path)] -= 1
            if _in_use[Path(path)] <= 0:
                del _in_use[Path(path)]
