"""Headless Chromium for the browser tests: where it is, how it starts, and a page that records
what went wrong (page errors, console errors, requests leaving the page's origin).

Importing this skips the importing test module (with the reason) when Playwright or Chromium is
missing: `pip install playwright` (no `playwright install`: the system's Chromium is driven,
`apt-get install -y chromium`); ONNXDREAM_CHROMIUM overrides the browser path.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="the browser test needs Playwright: pip install playwright")

CHROMIUM = os.environ.get("ONNXDREAM_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
if not Path(CHROMIUM).is_file():
    pytest.skip(f"no Chromium at {CHROMIUM}: apt-get install -y chromium "
                "(or set ONNXDREAM_CHROMIUM)", allow_module_level=True)

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]

#: Page script: keep every text the #status element shows in window.__statuses.
RECORD_STATUS = """() => {
  window.__statuses = [];
  new MutationObserver(() => window.__statuses.push(document.getElementById('status').textContent))
    .observe(document.getElementById('status'),
             {childList: true, characterData: true, subtree: true});
}"""


def launch(pw, args: list[str] | None = None):
    """Headless Chromium from Playwright ``pw`` (with ``args``, default :data:`ARGS`); a skip
    naming why when it does not start."""
    try:
        return pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                  args=ARGS if args is None else args)
    except sync_api.Error as exc:
        pytest.skip(f"Chromium at {CHROMIUM} does not start: {str(exc).splitlines()[0]}")


class Watched:
    """A new page of ``browser`` that records every request, console error and page error."""

    def __init__(self, browser, origin: str, viewport: tuple[int, int] = (1200, 720)):
        self.page = browser.new_page(viewport={"width": viewport[0], "height": viewport[1]},
                                     accept_downloads=True)
        self.page.set_default_timeout(45_000)
        self.requests: list[str] = []
        self.problems: list[str] = []
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))
        self.page.on("console", lambda m: self.problems.append(f"console: {m.text}")
                     if m.type == "error" else None)
        self.origin = origin

    def external(self) -> list[str]:
        """Requests that left the page's origin (blob: and data: URLs stay local)."""
        return [u for u in self.requests if not u.startswith((self.origin + "/", "blob:", "data:"))]

    def issues(self) -> list[str]:
        """Everything that went wrong: errors, then requests that left the origin."""
        return self.problems + [f"external request: {u}" for u in self.external()]

    def close(self):
        self.page.close()
