"""Heavy resources (a Ray cluster, Playwright and Chromium, a server) shared by consecutive tests:
a pytest plugin (tests/conftest.py loads it) and :func:`shared`, for fixtures.

A fixture that returns ``shared(name, start)`` enters ``start()`` (a context manager) for the
first test that asks for it; the resource stays up while the next test uses fixture ``name`` too
or belongs to the same ``xdist_group``, and is exited after the last of them. Lighter than a
session fixture (Chromium or Ray does not idle beside the rest of the suite) and shared across
modules, which a module fixture is not. The tests that use one share an ``xdist_group``, so
under ``pytest -n 2 --dist loadgroup`` they run back to back on one worker and the resource
starts once there.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import pytest

_shared: dict[str, tuple[contextlib.ExitStack, Any]] = {}  # fixture name -> (its stack, value)


def shared(name: str, start: Callable[[], contextlib.AbstractContextManager]) -> Any:
    """The resource of fixture ``name``, entered from ``start()`` on first use."""
    if name not in _shared:
        stack = contextlib.ExitStack()
        try:
            value = stack.enter_context(start())
        except BaseException:
            stack.close()
            raise
        _shared[name] = (stack, value)
    return _shared[name][1]


def release(keep: Callable[[str], bool] = lambda name: False) -> None:
    """Exit the shared resources whose fixture name ``keep`` refuses, the latest first (a
    browser before its Playwright)."""
    for name in reversed(list(_shared)):
        if not keep(name):
            stack, _ = _shared.pop(name)
            stack.close()


def group(item) -> str | None:
    """The test's ``xdist_group`` name, if it has one."""
    mark = item.get_closest_marker("xdist_group")
    if mark is None:
        return None
    return mark.args[0] if mark.args else mark.kwargs.get("name")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    """After the test's own fixtures: stop the shared resources that the next test neither
    uses nor may use (a test of the same ``xdist_group``)."""
    try:
        return (yield)
    finally:
        names = set(nextitem.fixturenames) if nextitem is not None else set()
        same_group = nextitem is not None and group(item) is not None \
            and group(item) == group(nextitem)
        release(lambda name: same_group or name in names)


def pytest_sessionfinish(session):
    release()
