"""Errors that onnxdream raises for things a user can fix.

The library raises; only the CLI (and the server) print them. Every message is one sentence
that names what was wrong and, where it can, what would be right.
"""

from __future__ import annotations


class OnnxDreamError(Exception):
    """Base class: a user-facing problem (bad input, missing file, unsupported model)."""

    exit_code = 2


class ModelError(OnnxDreamError):
    """A model file is missing, corrupt or not usable as a dreamable model."""


class LayerError(OnnxDreamError):
    """A layer name is unknown or a layer spec is malformed."""


class ObjectiveError(OnnxDreamError):
    """An objective spec is malformed or does not fit the model."""


class UnsupportedOpError(OnnxDreamError):
    """The gradient compiler has no rule for an op on the path to a layer."""


class ImageError(OnnxDreamError):
    """An input image cannot be read, or an output cannot be written."""


class DeviceError(OnnxDreamError):
    """The requested execution device (e.g. CUDA) is not available."""


class DependencyError(OnnxDreamError):
    """An optional dependency (an extra such as [cpu], [torch] or [serve]) is missing."""


class UnsafeCheckpointError(ModelError):
    """A checkpoint's pickle asks for something other than plain tensors."""


def closest(name: str, choices: list[str], n: int = 5) -> list[str]:
    """The choices closest to ``name`` (for 'did you mean' messages)."""
    import difflib

    found = difflib.get_close_matches(name, choices, n=n, cutoff=0.4)
    if not found:
        found = [c for c in choices if name.lower() in c.lower()][:n]
    return found
