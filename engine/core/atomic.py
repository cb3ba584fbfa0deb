"""One way to write a file so that readers never see half of it.

``write_atomic(path, data)`` writes ``data`` (bytes, or a callable that writes the file given a
path) next to ``path`` under a temporary name, fsyncs it and moves it into place with
:func:`os.replace`. On any failure (including Ctrl-C) the temporary file is removed and an
existing file at ``path`` is left as it was. Used by the image writer, the gradient compiler's
``save_model``, the exporters and the model cache.

A writer callable gets a path in a private temporary directory inside the target's directory,
named like the target. Files it writes beside that path (an ONNX model's external ``.data``
file, say) are moved into the target directory too, before the main file: the main file appears
last, complete with what it refers to.

A writer that produces its output piece by piece (a video encoder, a folder of frames) uses
:class:`AtomicTarget` instead: a temporary file or folder beside the target, filled at leisure,
moved into place by :meth:`AtomicTarget.commit` (a folder replaces an existing folder whole) or
removed by :meth:`AtomicTarget.abort`.

Temporary names start with ``.`` and end with :data:`TEMP_SUFFIX`, so a sweep after a crash
(``kill -9``) can find them: :func:`remove_stale_temps`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

__all__ = ["TEMP_SUFFIX", "AtomicTarget", "remove_stale_temps", "write_atomic"]

TEMP_SUFFIX = ".tmp"


def write_atomic(path: str | os.PathLike, data: bytes | Callable[[Path], object], *,
                 mode: int | None = None) -> Path:
    """Write ``data`` to ``path`` atomically; returns ``path`` as a Path.

    ``data``: the file's bytes, or ``writer(tmp_path)`` that writes the file at ``tmp_path``
    (and may write sidecar files beside it). ``mode``: the file's permission bits; by default
    those of the file being replaced, else what a plain ``open()`` would give (0666 & ~umask).
    The parent directory must exist. Raises what the write raised (``OSError`` …), after
    cleaning up; callers turn that into their own error type.
    """
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if mode is None:
        mode = _default_mode(path)
    if callable(data):
        _write_with(path, parent, data, mode)
    else:
        _write_bytes(path, parent, bytes(data), mode)
    return path


def _write_bytes(path: Path, parent: Path, data: bytes, mode: int) -> None:
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        _chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _write_with(path: Path, parent: Path, writer: Callable[[Path], object], mode: int) -> None:
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=parent))
    try:
        writer(tmp_dir / path.name)
        main = tmp_dir / path.name
        if not main.is_file():
            raise FileNotFoundError(f"the writer did not write {path.name}")
        written = sorted(p for p in tmp_dir.iterdir() if p.is_file())
        for p in written:
            _fsync(p)
            _chmod(p, mode)
        for p in written:  # sidecars first: the main file appears last, complete
            if p != main:
                os.replace(p, parent / p.name)
        os.replace(main, path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


class AtomicTarget:
    """A temporary file (or, with ``directory=True``, folder) beside ``path`` that becomes
    ``path`` on :meth:`commit`; :meth:`abort` removes it and leaves ``path`` as it was.

    ``tmp`` is the path to write to (created empty). As a context manager it commits when the
    block ends normally and aborts on any exception (Ctrl-C included). The file's permission
    bits are ``mode``, by default those of the file being replaced, else 0666 & ~umask (0777 &
    ~umask for a folder). The parent directory must exist; ``OSError`` propagates.
    """

    def __init__(self, path: str | os.PathLike, *, directory: bool = False,
                 mode: int | None = None):
        self.path = Path(path)
        self.directory = directory
        parent = self.path.parent if str(self.path.parent) else Path(".")
        prefix = f".{self.path.name}."
        if directory:
            self.tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=TEMP_SUFFIX, dir=parent))
            self.mode = 0o777 & ~_umask() if mode is None else mode
        else:
            fd, name = tempfile.mkstemp(prefix=prefix, suffix=TEMP_SUFFIX, dir=parent)
            os.close(fd)
            self.tmp = Path(name)
            self.mode = _default_mode(self.path) if mode is None else mode
        self.done = False

    def __enter__(self) -> AtomicTarget:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()

    def commit(self) -> Path:
        """Move the temporary file or folder into place (fsynced; a folder's files too)."""
        if self.done:
            return self.path
        try:
            if self.directory:
                for p in self.tmp.iterdir():
                    if p.is_file():
                        _fsync(p)
                _chmod(self.tmp, self.mode)
                if self.path.is_dir() and not self.path.is_symlink():
                    # a folder cannot be replaced by rename: move the old one aside first
                    old = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", suffix=TEMP_SUFFIX,
                                                dir=self.tmp.parent))
                    os.replace(self.path, old / "old")
                    try:
                        os.replace(self.tmp, self.path)
                    except BaseException:
                        os.replace(old / "old", self.path)
                        raise
                    finally:
                        shutil.rmtree(old, ignore_errors=True)
                else:
                    os.replace(self.tmp, self.path)
            else:
                _fsync(self.tmp)
                _chmod(self.tmp, self.mode)
                os.replace(self.tmp, self.path)
        except BaseException:
            self.abort()
            raise
        self.done = True
        return self.path

    def abort(self) -> None:
        """Remove the temporary file or folder (the target is left as it was)."""
        if self.done:
            return
        self.done = True
        if self.directory:
            shutil.rmtree(self.tmp, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                self.tmp.unlink()


def _fsync(p: Path) -> None:
    with open(p, "rb+") as fh:
        os.fsync(fh.fileno())


def _chmod(p: Path, mode: int) -> None:
    with contextlib.suppress(OSError):
        os.chmod(p, mode)


def _default_mode(path: Path) -> int:
    try:
        return os.stat(path).st_mode & 0o777
    except OSError:
        return 0o666 & ~_umask()


def _umask() -> int:
    """The process umask, read without changing it where /proc allows (thread-safe)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def remove_stale_temps(directory: str | os.PathLike, older_than: float = 3600.0) -> int:
    """Remove this module's temporary files and directories in ``directory`` older than
    ``older_than`` seconds (left by a killed process); returns how many were removed."""
    d = Path(directory)
    if not d.is_dir():
        return 0
    now, removed = time.time(), 0
    for p in d.iterdir():
        if not (p.name.startswith(".") and p.name.endswith(TEMP_SUFFIX)):
            continue
        try:
            if now - p.lstat().st_mtime < older_than:
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
            removed += 1
        except OSError:
            continue
    return removed
