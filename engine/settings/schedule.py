"""Keyframed parameters for video and zoom: ``"0:blocks.5,120:blocks.9"``.

A schedule is a comma-separated list of ``POSITION:VALUE`` keys, or one plain value (a
constant). A position is a frame number (``120``) or a time in seconds (``12.5s``, turned into
a frame with the output's frame rate: frame = round(seconds × fps)). Positions count on the
*output* clip: frame 0 is its first frame (after ``--start`` and ``--every`` have picked the
input frames), ``2s`` is two seconds into it.

Between keys:

- numbers that change smoothly interpolate linearly (``step_size``, ``blend``, ``zoom``,
  ``rotate``): ``"0:0.004,100:0.012"`` ramps the step size over 100 frames;
- everything else holds its value until the next key (``layers``, ``steps``): a layer change
  is a cut, and the number of steps is an integer.

Before the first key the first value holds; after the last, the last. A ``layers`` value may
name several layers joined by ``+`` (``blocks.5+blocks.9:0.5``), each ``NAME`` or
``NAME:WEIGHT`` as ``--layer`` takes them.

Errors are :class:`~onnxdream.core.errors.ScheduleError` (a ``SettingsError``) naming the field
(``step_size``), never a CLI flag: the CLI maps the field to its option (``--step-size``).
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from onnxdream.core.errors import ScheduleError  # defined there; importable from here too

__all__ = [
    "SCHEDULABLE",
    "Schedule",
    "ScheduleError",
    "parse_schedule",
    "values_at",
]


def _layers(text: str) -> str:
    parts = [p.strip() for p in text.split("+")]
    if not all(parts):
        raise ValueError("empty layer name")
    return "+".join(parts)


#: Schedulable fields: name → (value parser, interpolate linearly between keys).
SCHEDULABLE: dict[str, tuple[Callable[[str], Any], bool]] = {
    "layers": (_layers, False),
    "steps": (int, False),
    "step_size": (float, True),
    "blend": (float, True),
    "zoom": (float, True),
    "rotate": (float, True),
}

_POSITION = r"\d+(?:\.\d*)?s|\d+"
_KEY = re.compile(rf"\s*({_POSITION})\s*:(.*)", re.S)
_SPLIT = re.compile(rf",(?=\s*(?:{_POSITION})\s*:)")  # commas that start a new key


@dataclass(frozen=True)
class Key:
    position: int | float  # a frame number (int) or seconds (float)
    seconds: bool
    value: Any

    def frame(self, fps: Fraction | float) -> int:
        return round(self.position * fps) if self.seconds else int(self.position)

    def describe(self) -> str:
        pos = f"{self.position:g}s" if self.seconds else str(self.position)
        return f"{pos}:{self.value}"


@dataclass(frozen=True)
class Schedule:
    """A parsed schedule; :meth:`at` gives the value at an output frame."""

    field: str
    keys: tuple[Key, ...]
    interpolate: bool

    @property
    def constant(self) -> bool:
        return len({k.value for k in self.keys}) == 1

    def describe(self) -> str:
        """Canonical text (for the settings hash and the reproducible command)."""
        if len(self.keys) == 1 and self.keys[0].position == 0:
            return str(self.keys[0].value)
        return ",".join(k.describe() for k in self.keys)

    def frames(self, fps: Fraction | float) -> list[tuple[int, Any]]:
        """The keys as (frame, value), in order; raises if two land on one frame."""
        out = [(k.frame(fps), k.value) for k in self.keys]
        for (fa, _), (fb, _), kb in zip(out, out[1:], self.keys[1:]):
            if fb <= fa:
                raise ScheduleError(self.field, f"schedule: key {kb.describe()!r} is at frame "
                                    f"{fb}, not after frame {fa}")
        return out

    def at(self, frame: int, fps: Fraction | float = 1) -> Any:
        """The value at output frame ``frame`` (fps converts keys given in seconds)."""
        keys = self.frames(fps)
        frames = [f for f, _ in keys]
        i = bisect.bisect_right(frames, frame) - 1
        if i < 0:
            return keys[0][1]
        if i == len(keys) - 1 or not self.interpolate:
            return keys[i][1]
        (f0, v0), (f1, v1) = keys[i], keys[i + 1]
        return v0 + (v1 - v0) * (frame - f0) / (f1 - f0)


def parse_schedule(text: str | int | float, field: str, *,
                   parse: Callable[[str], Any] | None = None,
                   interpolate: bool | None = None,
                   check: Callable[[Any], str | None] | None = None) -> Schedule:
    """Parse ``text`` (a schedule or a plain value) for ``field``.

    ``parse`` turns one value's text into a value and ``interpolate`` says whether numbers
    between keys are interpolated; both default from :data:`SCHEDULABLE`. ``check(value)``
    returns a problem (a string) or None, for range checks.

    Raises:
        ScheduleError: naming ``field``, for an unknown field, an empty or malformed key, a
            value that does not parse or fails ``check``, or positions out of order.
    """
    if parse is None or interpolate is None:
        if field not in SCHEDULABLE:
            raise ScheduleError(field, f"cannot be keyframed (schedulable: "
                                f"{', '.join(SCHEDULABLE)})")
        default_parse, default_interp = SCHEDULABLE[field]
        parse = parse or default_parse
        interpolate = default_interp if interpolate is None else interpolate
    raw = str(text).strip()

    def fail(problem: str) -> ScheduleError:
        return ScheduleError(field, f"schedule {raw!r}: {problem}")

    if not raw:
        raise fail("empty")
    items = _SPLIT.split(raw)
    keys: list[Key] = []
    if not _KEY.fullmatch(items[0]):
        if len(items) > 1:
            raise fail(f"{items[0]!r} has no position (write FRAME:VALUE or SECONDSs:VALUE)")
        keys.append(Key(0, False, _value(raw, parse, check, fail)))
    else:
        for item in items:
            m = _KEY.fullmatch(item)
            if m is None:  # pragma: no cover - the split only cuts before a key
                raise fail(f"{item!r} is not POSITION:VALUE")
            pos, value = m.group(1), m.group(2).strip()
            if not value:
                raise fail(f"key {pos!r} has no value")
            if pos.endswith("s"):
                key = Key(float(pos[:-1]), True, _value(value, parse, check, fail))
            else:
                key = Key(int(pos), False, _value(value, parse, check, fail))
            if keys and keys[-1].seconds == key.seconds and key.position <= keys[-1].position:
                raise fail(f"positions must increase ({keys[-1].describe()!r} then "
                           f"{key.describe()!r})")
            keys.append(key)
    return Schedule(field, tuple(keys), bool(interpolate))


def _value(text: str, parse, check, fail) -> Any:
    try:
        value = parse(text)
    except (TypeError, ValueError) as exc:
        kind = {float: "a number", int: "a whole number", _layers: "a layer list"}.get(
            parse, "valid")
        raise fail(f"{text!r} is not {kind}") from exc
    if check is not None:
        problem = check(value)
        if problem:
            raise fail(problem)
    return value


def values_at(schedules: Mapping[str, Schedule], frame: int,
              fps: Fraction | float = 1) -> dict[str, Any]:
    """Every schedule's value at ``frame``: the per-frame parameters."""
    return {name: s.at(frame, fps) for name, s in schedules.items()}
