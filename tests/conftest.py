"""Fixtures for every test below tests/, and the plugins that hold for all of them.

Layout: one folder per package of onnxdream (media, settings, runtime, dream, video, batch,
server, browser, exporters, exporters/graph, models); the helper modules the tests import by
name (helpers, gradcheck, serverproc, kerascheck, chromium, raycluster, videoclip, ...) sit here,
next to this file. pyproject.toml runs pytest with ``pythonpath = ["tests"]`` and
``--import-mode=importlib``: helper modules import by name from any folder, test files in
different folders may share a name, and no test module imports another.

Plugins: skiprule (under ``CI=true`` a skip fails unless it says ``skip_ok``) and resources
(``shared``: a Ray cluster or Chromium kept up while consecutive tests use it).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest_plugins = [
    "skiprule",  # under CI=true a skip fails
    "resources",  # shared(): heavy resources kept while consecutive tests use them
]


@pytest.fixture(scope="session")
def model_home(tmp_path_factory) -> Path:
    """One ONNXDREAM_HOME for the session (per xdist worker), so zoo models are built once and
    never in ~/.cache."""
    home = tmp_path_factory.mktemp("onnxdream-home")
    old = os.environ.get("ONNXDREAM_HOME")
    os.environ["ONNXDREAM_HOME"] = str(home)
    yield home
    if old is None:
        os.environ.pop("ONNXDREAM_HOME", None)
    else:
        os.environ["ONNXDREAM_HOME"] = old


@pytest.fixture
def ray_head():
    """A real Ray cluster on 127.0.0.1 (tests/raycluster.py: 2 CPUs, its own port, temporary
    folder and token), shared by consecutive tests; ``.address``, ``.env`` (a driver or
    subprocess that joins it uses that environment)."""
    from raycluster import needs_ray, ray_cluster
    from resources import shared

    needs_ray()
    return shared("ray_head", lambda: ray_cluster(num_cpus=2))
