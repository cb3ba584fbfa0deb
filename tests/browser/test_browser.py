"""The web page at / in a real (headless) Chromium: upload a photo, dream, see and download it.

Needs the Playwright Python package (`pip install playwright`; no `playwright install`: it drives
the system's Chromium, `apt-get install -y chromium`). Skipped with the reason when either is
missing. ONNXDREAM_CHROMIUM overrides the browser path; ONNXDREAM_SCREENSHOT=FILE keeps a
screenshot of the finished page.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the server needs the [serve] extra")
from chromium import RECORD_STATUS, Watched  # noqa: E402 - skips without Chromium
from helpers import photo  # noqa: E402

pytestmark = pytest.mark.xdist_group("browser")  # one Chromium and one server per worker


@pytest.mark.timeout(120)
def test_upload_dream_and_download_in_the_browser(browser, page_server, tmp_path):
    srv = page_server
    src = photo("chelsea.png")
    with Image.open(src) as im:
        size = im.size
    watched = Watched(browser, srv.url, viewport=(1280, 760))
    try:
        page = watched.page

        page.goto(srv.url + "/")
        # the page fills the model and layer lists from the API
        page.wait_for_selector("#layer option[value='blocks.5']", state="attached")
        assert page.input_value("#model") == "efficientnet-lite0"
        assert page.input_value("#layer") == "blocks.5"  # the recommended one

        page.set_input_files("#image", str(src))
        page.wait_for_selector("#original_frame img")
        page.select_option("#layer", "blocks.9")
        page.fill("#steps", "6")
        page.fill("#octaves", "2")
        page.fill("#seed", "4")
        page.evaluate(RECORD_STATUS)
        page.click("#dream")

        page.wait_for_selector("#result:not([hidden])", timeout=120_000)
        page.wait_for_function("() => document.getElementById('result').naturalWidth > 0")
        shown = page.evaluate("[document.getElementById('result').naturalWidth,"
                              " document.getElementById('result').naturalHeight]")
        assert tuple(shown) == size
        status = page.text_content("#status")
        assert status.startswith("done in") and "seed 4" in status, status
        seen = page.evaluate("window.__statuses")
        assert any(s.startswith(("dreaming", "waiting")) for s in seen), seen
        assert page.text_content("#error") == ""
        assert page.is_enabled("#dream") and not page.is_enabled("#cancel")

        shot = os.environ.get("ONNXDREAM_SCREENSHOT") or str(tmp_path / "page.png")
        page.screenshot(path=shot, full_page=True)

        with page.expect_download() as info:
            page.click("#download")
        download = info.value
        assert download.suggested_filename == "dream-4.png"
        with Image.open(io.BytesIO(Path(download.path()).read_bytes())) as out:
            assert out.format == "PNG" and out.size == size
        assert not watched.issues(), watched.issues()
        # the page deletes its job once it has the image
        assert srv.client.get("/health").json()["queue"]["jobs_kept"] == 0
    finally:
        watched.close()
