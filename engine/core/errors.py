"""Errors that onnxdream raises for things a user can fix.

The library raises; only the CLI (and the server) print them. Every message is one sentence
that names what was wrong and, where it can, what would be right. An error about a setting
carries the setting's *field* name (``step_size``), never a command-line flag: the CLI turns the
field into ``--step-size``, the server into its form field, by the ``field`` attribute (never by
reading the message). Front ends map error *types* to exit codes and HTTP statuses.
"""

from __future__ import annotations

from collections.abc import Iterable


class OnnxDreamError(Exception):
    """Base class: a user-facing problem (bad input, missing file, unsupported model).

    ``field`` names the setting the error is about (``"layers"``, ``"model"``), or is None.
    """

    exit_code = 2
    field: str | None = None

    def __init__(self, message: str = "", *, field: str | None = None):
        super().__init__(message)
        if field is not None:
            self.field = field


class SettingsError(OnnxDreamError):
    """A setting's value is out of range or malformed: ``field`` plus the ``reason``.

    ``str(exc)`` reads ``"step_size must be > 0 and <= 10"``; :meth:`named` puts another name
    for the field in front (``exc.named("--step-size")``).
    """

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field} {reason}", field=field)
        self.reason = reason

    def named(self, name: str) -> str:
        """The message with ``name`` (a CLI flag, a form field) in place of the field name."""
        return f"{name} {self.reason}"


class ScheduleError(SettingsError):
    """A keyframed setting (``"0:blocks.5,120:blocks.9"``, see :mod:`onnxdream.settings.schedule`)
    cannot be parsed: ``field`` names the setting, ``reason`` what is wrong with its schedule
    (``str(exc)``: ``"step_size schedule '0:x': 'x' is not a number"``)."""


class ModelError(OnnxDreamError):
    """A model file is missing, corrupt or not usable as a dreamable model."""


class UnwrappedModelError(ModelError):
    """An ONNX file that is not a dreamable model (its input is not ``image`` [N,3,H,W] in
    [0,1]); ``command`` is the ``onnxdream import onnx`` command line that probably wraps it."""

    def __init__(self, message: str, command: str):
        super().__init__(message, field="model")
        self.command = command


class LayerError(OnnxDreamError):
    """A layer name is unknown or a layer spec is malformed."""


class ObjectiveError(OnnxDreamError):
    """An objective spec is malformed or does not fit the model."""


class UnsupportedOpError(OnnxDreamError):
    """The gradient compiler has no rule for an op on the path to a layer."""


class ImageError(OnnxDreamError):
    """An input image cannot be read, or an output cannot be written."""


class ImageTooLargeError(ImageError):
    """An image has more pixels than allowed (or claims to: a decompression bomb)."""

    def __init__(self, name: str, pixels: int | None, limit: int):
        self.subject, self.pixels, self.limit = name, pixels, limit
        super().__init__(f"{self.summary}; it may be a decompression bomb, or pass a larger "
                         "max_pixels if you trust it")

    @property
    def summary(self) -> str:
        """``"NAME has N pixels, more than the limit of L"``: what was wrong, no advice."""
        what = f"has {self.pixels:,} pixels" if self.pixels is not None else "is too large"
        return f"{self.subject} {what}, more than the limit of {self.limit:,}"


class MemoryBudgetError(OnnxDreamError):
    """A dream would need more memory than its budget allows (CLI exit 2, HTTP 413).

    ``needed`` and ``budget`` are in bytes; ``field`` is ``max_memory`` (the CLI's
    ``--max-memory``; the server's budget is the operator's ``ONNXDREAM_MAX_MEMORY_MB``).
    """

    field = "max_memory"

    def __init__(self, message: str, *, needed: int, budget: int):
        super().__init__(message)
        self.needed, self.budget = int(needed), int(budget)


class VideoError(OnnxDreamError):
    """A video cannot be read (not a video, no frames, audio only, a still image), a frame
    selection is out of range, or an output cannot be written (unknown extension, …)."""


class VideoTooLargeError(VideoError):
    """A video is over a limit a server sets (its length, its frames' pixels, the disk its job
    needs): the server answers 413."""


class NonFiniteError(OnnxDreamError):
    """The objective or its gradient stopped being a finite number during a dream (float32
    overflow: huge layer weights, or a model whose activations overflow); nothing is written."""


class BatchError(OnnxDreamError):
    """A batch as a whole cannot run: no inputs, two inputs for one output, an unreachable
    cluster (``field`` names the option: ``inputs``, ``address``, ...)."""


class DeviceError(OnnxDreamError):
    """The requested execution device (e.g. CUDA) is not available."""


class DependencyError(OnnxDreamError):
    """An optional dependency (an extra such as [cpu], [torch] or [serve]) is missing."""


class UnsafeCheckpointError(ModelError):
    """A checkpoint's pickle asks for something other than plain tensors."""


def closest(name: str, choices: Iterable[str], n: int = 5) -> list[str]:
    """The choices closest to ``name`` (for 'did you mean' messages)."""
    import difflib

    choices = list(choices)
    found = difflib.get_close_matches(name, choices, n=n, cutoff=0.4)
    if not found:
        found = [c for c in choices if name.lower() in c.lower()][:n]
    return found


def did_you_mean(name: str, choices: Iterable[str], n: int = 5) -> str:
    """``"; did you mean 'a', 'b'?"`` for the choices close to ``name``, or ``""`` if none."""
    near = closest(name, choices, n)
    return f"; did you mean {', '.join(repr(str(c)) for c in near)}?" if near else ""


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message, cut to ``limit`` characters (its type's name
    when the message is empty): for wrapping a foreign library's error in one of ours."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__
