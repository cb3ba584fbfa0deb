"""Keras 3 on its PyTorch backend: importing it (or saying what to install), and its errors
as one line.

Under ``KERAS_BACKEND=torch`` every Keras layer is a ``torch.nn.Module``, which is what lets the
torch exporter trace it. keras and torch are imported only when called.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Any

from onnxdream.core.errors import DependencyError

INSTALL_HINT = "pip install 'onnxdream[keras]' and set KERAS_BACKEND=torch"


def import_keras() -> Any:
    """Import keras on its PyTorch backend, or raise DependencyError saying what to do.

    If keras is not imported yet, KERAS_BACKEND is set to ``torch`` first; if it was already
    imported with another backend, that cannot be changed in this process.
    """
    try:
        import torch  # noqa: F401
    except ImportError as exc:
        raise DependencyError(f"exporting Keras models needs PyTorch; {INSTALL_HINT}") from exc
    if "keras" not in sys.modules:
        os.environ["KERAS_BACKEND"] = "torch"  # keras reads it once, on its first import
    try:
        import keras
    except ImportError as exc:
        raise DependencyError(f"exporting Keras models needs Keras 3; {INSTALL_HINT}") from exc
    version = getattr(keras, "__version__", "0")
    if int(version.split(".")[0]) < 3:
        raise DependencyError(f"exporting Keras models needs Keras 3 (found {version}); "
                              f"{INSTALL_HINT}")
    backend = keras.backend.backend()
    if backend != "torch":
        raise DependencyError(
            f"keras was already imported with the {backend} backend in this process; exporting "
            "runs on its torch backend: set KERAS_BACKEND=torch before anything imports keras "
            "(or run `onnxdream export keras` in a fresh process)"
        )
    return keras


def keras_error_line(exc: BaseException) -> str:
    """first_line for Keras' errors: no ANSI colours, and the cause after Keras' own wrapper."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    # Keras wraps errors in "Exception encountered when calling X.call()": keep the cause too
    if len(lines) > 1 and lines[0].startswith("Exception encountered"):
        return f"{lines[0]} {lines[1]}"[:200]
    return lines[0][:200] if lines else type(exc).__name__
