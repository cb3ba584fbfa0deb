"""Redirecting the process's own output: file descriptors 1 and 2, so that what C and C++
libraries print (onnxruntime, the exporters' tracers, Ray's workers) goes there too, not only
Python's ``sys.stdout``/``sys.stderr``."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

__all__ = ["output_to"]


@contextlib.contextmanager
def output_to(path: str | os.PathLike[str]) -> Iterator[None]:
    """Inside the block, fds 1 and 2 write to ``path`` (appended; ``os.devnull`` to silence
    them); both are restored afterwards, whatever happens."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])
