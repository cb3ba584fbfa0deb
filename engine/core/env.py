"""Integers from ``ONNXDREAM_*`` environment variables: one parser, one message.

Every variable that holds a count, a size or a number of seconds goes through :func:`env_int`,
so an operator's typo (``ONNXDREAM_THREADS=many``) is the same one-line error everywhere,
naming the variable, what it must be, and what was given.
"""

from __future__ import annotations

import os

from onnxdream.core.errors import OnnxDreamError

__all__ = ["env_int"]


def env_int(name: str, default: int | None = None, *, minimum: int = 1, unit: str = "",
            field: str | None = None) -> int | None:
    """``$name`` as an integer >= ``minimum``; ``default`` when unset or blank.

    A value that is not an integer or is below ``minimum`` raises OnnxDreamError ("NAME must be
    an integer >= 1 (megabytes), got 'x'"; ``unit`` adds the parenthesis, ``field`` is the
    setting the variable stands for, for front ends that point at it)."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        what = f"an integer >= {minimum}" + (f" ({unit})" if unit else "")
        raise OnnxDreamError(f"{name} must be {what}, got {text!r}", field=field)
    return value
