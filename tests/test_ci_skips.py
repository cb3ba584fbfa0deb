"""Under CI=true a skip fails (showing its reason); deselection, xfail and skip_ok do not.

Each case runs pytest in a subprocess on a tiny test tree laid out like tests/: a conftest.py
that loads a copy of tests/skiprule.py as a plugin, pytest's importlib import mode with the
root on ``pythonpath``, and the test modules in a sub-folder.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

SKIPRULE = Path(__file__).with_name("skiprule.py")
CONFTEST = 'pytest_plugins = ["skiprule"]\n'

TESTS = '''
import pytest
from skiprule import skip_ok


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
addopts = -m "not slow" -p no:cacheprovider --import-mode=importlib
pythonpath = .
"""


def layout(pytester, **modules: str) -> None:
    """conftest.py and skiprule.py at the root; ``modules`` (name: text) in sub/."""
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(skiprule=SKIPRULE.read_text())
    pytester.makeini(INI)
    sub = pytester.mkdir("sub")
    for name, text in modules.items():
        (sub / f"{name}.py").write_text(text)


@pytest.fixture
def tree(pytester):
    layout(pytester, test_sample=TESTS)
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
    result.stdout.fnmatch_lines(["SKIPPED [[]1[]] sub/test_sample.py:*: skip_ok: needs a GPU"])
    assert "this machine has the CUDA provider" in out
    assert "never runs" not in out


def test_under_ci_skips_fail_on_xdist_workers_too(tree, monkeypatch):
    """`make test` runs the suite with pytest-xdist: the rule holds in the workers."""
    pytest.importorskip("xdist")
    result = run(tree, monkeypatch, "true", "-n", "2", "--dist", "loadgroup")
    result.assert_outcomes(passed=1, failed=1, errors=2, skipped=2, xfailed=1)
    assert "skipped under CI=true: the mark says so" in result.stdout.str()


@pytest.mark.parametrize("ci", ["false", "0", ""])
def test_other_ci_values_change_nothing(tree, monkeypatch, ci):
    run(tree, monkeypatch, ci).assert_outcomes(passed=1, skipped=5, xfailed=1, deselected=1)


@pytest.mark.parametrize("body", [
    'pytest.skip("these tests need KERAS_BACKEND=torch", allow_module_level=True)',
    'pytest.importorskip("gizmo_that_is_not_installed")',
])
def test_module_level_skips_fail_under_ci(pytester, monkeypatch, body):
    layout(pytester, test_module=f"import pytest\n{body}\n\ndef test_x():\n    pass\n")
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
    layout(pytester, test_module=(
        "from skiprule import skip_ok\n"
        "skip_ok('no GPU on this machine', allow_module_level=True)\n"
        "def test_x():\n    pass\n"))
    result = run(pytester, monkeypatch, "true")
    result.assert_outcomes(skipped=1)
    assert "skip_ok: no GPU on this machine" in result.stdout.str()


def test_the_suite_runs_under_the_rule(request):
    """tests/conftest.py loads the plugin for every folder below tests/."""
    plugin = request.config.pluginmanager.get_plugin("skiprule")
    assert plugin is not None and plugin.__file__ == str(SKIPRULE)
