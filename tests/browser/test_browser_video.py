"""The web page with a video (issue 13.4) in a real headless Chromium: the file input takes a
clip when the server dreams videos, progress shows in frames, the result plays in a <video>.

Same requirements and skips as tests/browser/test_browser.py (Playwright and a system Chromium);
ONNXDREAM_SCREENSHOT=FILE.png keeps a screenshot of the finished page as FILE-video.png.
"""

from __future__ import annotations

import os

import pytest

pytest.importorskip("fastapi", reason="the server needs the [serve] extra")
pytest.importorskip("av", reason="video needs the [video] extra (PyAV)")
pytest.importorskip("cv2", reason="video needs the [video] extra (OpenCV)")

from chromium import RECORD_STATUS, Watched  # noqa: E402 (skips without Chromium)
from videoclip import SIZE, make_clip  # noqa: E402

pytestmark = pytest.mark.xdist_group("browser")  # one Chromium and one server per worker


@pytest.mark.timeout(120)
def test_a_clip_is_dreamed_with_progress_in_frames_and_plays(browser, page_server, tmp_path):
    clip = make_clip(tmp_path / "clip.mp4")
    srv = page_server
    watched = Watched(browser, srv.url, viewport=(1280, 760))
    try:
        page = watched.page

        page.goto(srv.url + "/")
        page.wait_for_selector("#layer option[value='blocks.5']", state="attached")
        page.wait_for_function(
            "() => document.getElementById('image').accept.includes('video/')")
        assert "video" in page.text_content("label[for='image']").lower()

        page.set_input_files("#image", str(clip))
        page.wait_for_selector("#original_frame video", state="attached")
        assert page.is_visible("#video_options")
        page.fill("#steps", "2")
        page.fill("#octaves", "1")
        page.fill("#seed", "4")
        page.select_option("#video_format", "webm")
        page.evaluate(RECORD_STATUS)
        page.click("#dream")

        page.wait_for_selector("#result_video", state="attached", timeout=90_000)
        page.wait_for_function(
            "() => document.getElementById('result_video').readyState >= 1",
            timeout=20_000)
        shown = page.evaluate("[document.getElementById('result_video').videoWidth,"
                              " document.getElementById('result_video').videoHeight]")
        assert tuple(shown) == SIZE
        status = page.text_content("#status")
        assert status.startswith("done: 20 frames") and "seed 4" in status, status
        seen = page.evaluate("window.__statuses")
        assert any(s.startswith("dreaming frame ") and " of 20" in s for s in seen), seen
        assert page.text_content("#error") == ""
        assert page.is_enabled("#dream") and not page.is_enabled("#cancel")
        assert page.is_hidden("#result")  # the photo's <img> stays out of the way
        shot = os.environ.get("ONNXDREAM_SCREENSHOT") or str(tmp_path / "page.png")
        page.screenshot(path=shot.replace(".png", "-video.png"), full_page=True)

        with page.expect_download() as info:
            page.click("#download")
        assert info.value.suggested_filename == "dream-4.webm"
        assert not watched.issues(), watched.issues()
        # the page deletes its job once it has the video; the job's folder goes with it
        assert srv.client.get("/health").json()["queue"]["jobs_kept"] == 0
    finally:
        watched.close()
