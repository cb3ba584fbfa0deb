"""Keyframed parameters: parsing, frames vs seconds, interpolation vs hold, typed errors."""

from __future__ import annotations

from fractions import Fraction

import pytest

from onnxdream.core.errors import OnnxDreamError
from onnxdream.settings.schedule import ScheduleError, parse_schedule, values_at


def test_constant():
    s = parse_schedule("0.01", "step_size")
    assert s.constant and s.at(0) == 0.01 and s.at(10_000) == 0.01
    assert parse_schedule(12, "steps").at(3) == 12
    assert parse_schedule("blocks.5:2", "layers").at(0) == "blocks.5:2"  # NAME:WEIGHT stays whole


def test_layers_hold_and_switch():
    s = parse_schedule("0:blocks.5,120:blocks.9", "layers")
    assert [s.at(f) for f in (0, 119, 120, 500)] == ["blocks.5", "blocks.5", "blocks.9",
                                                      "blocks.9"]
    s = parse_schedule("0:blocks.5:2 + blocks.9, 10:blocks.12:0.5", "layers")
    assert s.at(0) == "blocks.5:2+blocks.9" and s.at(10) == "blocks.12:0.5"


def test_numbers_interpolate_and_steps_hold():
    s = parse_schedule("0:0.004,100:0.012", "step_size")
    assert s.at(0) == pytest.approx(0.004) and s.at(50) == pytest.approx(0.008)
    assert s.at(100) == pytest.approx(0.012) and s.at(1000) == pytest.approx(0.012)
    steps = parse_schedule("0:10,50:20", "steps")
    assert steps.at(49) == 10 and steps.at(50) == 20 and isinstance(steps.at(60), int)


def test_before_the_first_key_holds_it():
    s = parse_schedule("10:0.5,20:0.7", "blend")
    assert s.at(0) == 0.5 and s.at(15) == pytest.approx(0.6)


def test_seconds_use_the_fps():
    s = parse_schedule("0:blocks.5,12.5s:blocks.9", "layers")
    assert s.frames(Fraction(24000, 1001)) == [(0, "blocks.5"), (300, "blocks.9")]
    assert s.at(299, Fraction(24000, 1001)) == "blocks.5"
    assert s.at(5, 10) == "blocks.5" and s.at(125, 10) == "blocks.9"
    mixed = parse_schedule("0:0.5, 2s:0.7, 30:0.9", "blend")
    assert mixed.at(20, 10) == pytest.approx(0.7) and mixed.at(25, 10) == pytest.approx(0.8)


def test_values_at_and_describe():
    scheds = {"layers": parse_schedule("0:a,5:b", "layers"),
              "step_size": parse_schedule("0.01", "step_size")}
    assert values_at(scheds, 6) == {"layers": "b", "step_size": 0.01}
    assert scheds["layers"].describe() == "0:a,5:b" and scheds["step_size"].describe() == "0.01"
    assert parse_schedule(" 0 : a , 2.5s : b ", "layers").describe() == "0:a,2.5s:b"


@pytest.mark.parametrize("text,field,problem", [
    ("", "layers", "empty"),
    ("0:0.01,abc", "step_size", "is not a number"),
    ("0:abc", "step_size", "'abc' is not a number"),
    ("0:10,5:2.5", "steps", "'2.5' is not a whole number"),
    ("10:a,5:b", "layers", "positions must increase"),
    ("1s:a,1.0s:b", "layers", "positions must increase"),
    ("0:", "layers", "has no value"),
    ("0:a+,3:b", "layers", r"'a\+' is not a layer list"),
    ("x,3:b", "layers", "has no position"),
    ("3", "octaves", "octaves cannot be keyframed"),
])
def test_errors_name_the_field(text, field, problem):
    with pytest.raises(ScheduleError, match=problem) as info:
        parse_schedule(text, field)
    assert info.value.field == field and str(info.value).startswith(field)
    assert isinstance(info.value, OnnxDreamError) and "\n" not in str(info.value)


def test_keys_colliding_after_conversion():
    s = parse_schedule("0:a,10:b,1s:c", "layers")
    with pytest.raises(ScheduleError, match="not after frame 10"):
        s.at(0, fps=10)


def test_check_hook():
    def positive(v):
        return None if v > 0 else "values must be > 0"

    with pytest.raises(ScheduleError, match="values must be > 0"):
        parse_schedule("0:0.01,10:-1", "step_size", check=positive)
