"""tests/resources.py: a shared resource starts once for consecutive tests that use it (or share
its xdist_group), across modules, and stops after the last of them, failures included.

Runs pytest in a subprocess on a scratch tree with a copy of the plugin; each start and stop is
a line in a log file.
"""

from __future__ import annotations

from pathlib import Path

pytest_plugins = ["pytester"]

RESOURCES = Path(__file__).with_name("resources.py")

CONFTEST = '''
import contextlib
import os

import pytest

pytest_plugins = ["resources"]


def log(line):
    with open(os.environ["RESOURCE_LOG"], "a") as f:
        f.write(line + "\\n")


@contextlib.contextmanager
def thing(name):
    log(f"start {name}")
    try:
        yield name
    finally:
        log(f"stop {name}")


@pytest.fixture
def gizmo():
    from resources import shared

    return shared("gizmo", lambda: thing("gizmo"))


@pytest.fixture(autouse=True)
def _mark(request):
    log(f"test {request.node.name}")
'''

A = '''
import pytest


def test_a1(gizmo):
    assert gizmo == "gizmo"


def test_a2(gizmo):
    assert False, "a failing test keeps nothing alive"


def test_a3():
    pass


@pytest.mark.xdist_group("g")
def test_a4(gizmo):
    pass


@pytest.mark.xdist_group("g")
def test_a5():
    pass
'''

B = '''
import pytest


@pytest.mark.xdist_group("g")
def test_b1(gizmo):
    pass


def test_b2():
    pass
'''


def test_shared_resources_start_once_per_run_of_users(pytester, monkeypatch):
    log = pytester.path / "log.txt"
    monkeypatch.setenv("RESOURCE_LOG", str(log))
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(resources=RESOURCES.read_text())
    pytester.makepyfile(test_a=A, test_b=B)
    pytester.makeini("[pytest]\naddopts = -p no:cacheprovider\n")
    result = pytester.runpytest_subprocess(timeout=60)
    result.assert_outcomes(passed=6, failed=1)
    assert log.read_text().splitlines() == [
        "test test_a1", "start gizmo",
        "test test_a2", "stop gizmo",  # test_a3 does not use it
        "test test_a3",
        "test test_a4", "start gizmo",
        "test test_a5",  # same group: kept
        "test test_b1",  # uses it (and the same group)
        "stop gizmo",
        "test test_b2",
    ]
