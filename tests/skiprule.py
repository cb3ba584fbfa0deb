"""The CI rule, a pytest plugin (tests/conftest.py loads it for every folder below tests/).

Under ``CI=true`` (or ``CI=1``) a skipped test fails, showing why it skipped: in CI a missing
dependency or browser is a broken set-up, not a pass. Deselection (``-m 'not slow'``, ``-k``) is
not skipping and is unaffected, and so is xfail. A skip that is right even in CI, because it
depends on the machine (no GPU here, a GPU there), says so with :func:`skip_ok` or
``@pytest.mark.skip_ok``.

Self-contained (pytest and the standard library only), so tests/test_ci_skips.py can run it in
a scratch tree.
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest

SKIP_OK = "skip_ok: "  # the reason prefix of a skip that is fine in CI too (see skip_ok)


def skip_ok(reason: str, *, allow_module_level: bool = False) -> NoReturn:
    """``pytest.skip`` for a reason that depends on the machine, so it is not a failure in CI."""
    __tracebackhide__ = True  # the skip is reported at the caller's line
    pytest.skip(SKIP_OK + reason, allow_module_level=allow_module_level)


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1")


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "skip_ok: this test's skips depend on the machine and are fine under CI=true")


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    return reason.removeprefix("Skipped: ")


def _fail_skip_in_ci(report, node) -> None:
    """Turn a skipped ``report`` into a failure under CI, unless the skip is allowed."""
    if not (report.skipped and in_ci()) or hasattr(report, "wasxfail"):
        return
    reason = _skip_reason(report)
    if reason.startswith(SKIP_OK) or node.get_closest_marker("skip_ok") is not None:
        return
    report.outcome = "failed"
    report.longrepr = (
        f"skipped under CI={os.environ['CI']}: {reason} (in CI a skip fails: install what the test "
        "needs, or mark a skip that depends on the machine with skip_ok)")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    report = yield
    _fail_skip_in_ci(report, item)
    return report


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_make_collect_report(collector):
    """Module-level skips (``pytest.skip(..., allow_module_level=True)``, ``importorskip``)."""
    report = yield
    _fail_skip_in_ci(report, collector)
    return report
