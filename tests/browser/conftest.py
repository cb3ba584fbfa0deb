"""One Playwright, one headless Chromium and one server for the tests of the web page in a real
browser, shared by consecutive tests (tests/resources.py); their modules are in
``xdist_group("browser")``, so under pytest-xdist they run back to back on one worker.
"""

from __future__ import annotations

import contextlib

import pytest

from helpers import ORT_DIR, have_ort_web
from resources import shared


@pytest.fixture
def playwright():
    from chromium import sync_api  # skips without Playwright or Chromium

    return shared("playwright", sync_api.sync_playwright)


@pytest.fixture
def browser(playwright):
    """Headless Chromium (tests/chromium.py's ARGS); a test opens its own page (a new context)
    and closes it."""
    from chromium import launch

    return shared("browser", lambda: contextlib.closing(launch(playwright)))


@contextlib.contextmanager
def _page_server(home, folder):
    from serverproc import Server

    args = ["--ort-dir", str(ORT_DIR)] if have_ort_web() else []
    srv = Server(home, folder / "server.log", *args,
                 env={"ONNXDREAM_JOBS_DIR": str(folder / "jobs")})
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def page_server(model_home, tmp_path_factory):
    """`onnxdream serve` with the defaults, onnxruntime-web's files (``--ort-dir``, when they
    are there) and a private jobs folder; a test leaves no job behind."""
    return shared("page_server",
                  lambda: _page_server(model_home, tmp_path_factory.mktemp("page-server")))
