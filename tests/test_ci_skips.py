"""Under CI=true a skip fails (showing its reason); deselection, xfail and skip_ok do not.

Each case runs pytest in a subprocess on a tiny test tree that uses a copy of tests/conftest.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

CONFTEST = Path(__file__).with_name("conftest.py")

TESTS = '''
import pytest
from conftest import skip_ok


def test_passes():
    pass


def test_skips_in_body():
    pytest.skip("no widget here")


@pytest.fixture
def needs_gizmo():
    pytest.importorskip("gizmo_that_is_not_installed")


def test_skips_in_fixture(needs_gizmo):
    pass


@pytest.mark.skipif(True, reason="the mark says so")
def test_skip_mark():
    pass


def test_skip_ok_helper():
    skip_ok("needs a GPU")


@pytest.mark.skip_ok
def test_skip_ok_marker():
    pytest.skip("this machine has the CUDA provider")


@pytest.mark.xfail(reason="known bug", strict=True)
def test_xfails():
    assert False


@pytest.mark.slow
def test_slow_skips():
    pytest.skip("never runs: deselected")
'''

INI = """
[pytest]
markers =
    slow: long checks
addopts = -m "not slow" -p no:cacheprovider
"""


@pytest.fixture
def tree(pytester):
    pytester.makeconftest(CONFTEST.read_text())
    pytester.makeini(INI)
    pytester.makepyfile(test_sample=TESTS)
    return pytester


def run(pytester, monkeypatch, ci: str | None, *args: str):
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    return pytester.runpytest_subprocess("-rA", *args, timeout=60)


def test_without_ci_skips_pass(tree, monkeypatch):
    result = run(tree, monkeypatch, None)
    result.assert_outcomes(passed=1, skipped=5, xfailed=1, deselected=1)
    assert result.ret == 0


@pytest.mark.parametrize("ci", ["true", "1", "TRUE"])
def test_under_ci_skips_fail_with_their_reason(tree, monkeypatch, ci):
    result = run(tree, monkeypatch, ci)
    # skips in the test body fail; skips during setup (fixtures, skip marks) are errors at setup
    result.assert_outcomes(passed=1, failed=1, errors=2, skipped=2, xfailed=1, deselected=1)
    assert result.ret == 1
    out = result.stdout.str()
    assert f"skipped under CI={ci}: no widget here" in out
    assert f"skipped under CI={ci}: could not import 'gizmo_that_is_not_installed'" in out
    assert f"skipped under CI={ci}: the mark says so" in out
    # the allowed ones stay skips, and say why
    result.stdout.fnmatch_lines(["SKIPPED [[]1[]] test_sample.py:*: skip_ok: needs a GPU"])
    assert "this machine has the CUDA provider" in out
    assert "never runs" not in out


@pytest.mark.parametrize("ci", ["false", "0", ""])
def test_other_ci_values_change_nothing(tree, monkeypatch, ci):
    run(tree, monkeypatch, ci).assert_outcomes(passed=1, skipped=5, xfailed=1, deselected=1)


@pytest.mark.parametrize("body", [
    'pytest.skip("these tests need KERAS_BACKEND=torch", allow_module_level=True)',
    'pytest.importorskip("gizmo_that_is_not_installed")',
])
def test_module_level_skips_fail_under_ci(pytester, monkeypatch, body):
    pytester.makeconftest(CONFTEST.read_text())
    pytester.makepyfile(test_module=f"import pytest\n{body}\n\ndef test_x():\n    pass\n")
    result = run(pytester, monkeypatch, None)
    result.assert_outcomes(skipped=1)
    assert result.ret == pytest.ExitCode.NO_TESTS_COLLECTED
    result = run(pytester, monkeypatch, "true")
    result.assert_outcomes(errors=1)
    assert result.ret != 0
    result.stdout.fnmatch_lines(["*skipped under CI=true:*"])
    assert ("KERAS_BACKEND=torch" in result.stdout.str()
            or "gizmo_that_is_not_installed" in result.stdout.str())


def test_module_level_skip_ok_is_allowed_under_ci(pytester, monkeypatch):
    pytester.makeconftest(CONFTEST.read_text())
    pytester.makepyfile(test_module=(
        "from conftest import skip_ok\n"
        "skip_ok('no GPU on this machine', allow_module_level=True)\n"
        "def test_x():\n    pass\n"))
    result = run(pytester, monkeypatch, "true")
    result.assert_outcomes(skipped=1)
    assert "skip_ok: no GPU on this machine" in result.stdout.str()
