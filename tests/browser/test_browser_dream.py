"""Dreaming in a real (headless) Chromium: an exported site and the server page's browser path,
against the Python engine.

Needs what tests/browser/test_browser.py needs (Playwright, the system's Chromium) and
onnxruntime-web's files: ``$ONNXDREAM_ORT_DIR``, else ``.cache/onnxruntime-web/package``
(``make test`` fetches it with npm). Skipped with the reason when one is missing (a failure
under CI=true). ONNXDREAM_SCREENSHOT=FILE keeps a screenshot of the site after its dream.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from chromium import ARGS, Watched, launch  # skips without Chromium
from helpers import ORT_DIR, have_ort_web, photo, skip_ok

pytestmark = pytest.mark.xdist_group("browser")  # one Chromium and one server per worker
if not have_ort_web():
    pytest.skip(f"no onnxruntime-web at {ORT_DIR}: `make test` fetches it (npm pack "
                "onnxruntime-web), or set ONNXDREAM_ORT_DIR", allow_module_level=True)

SIZE = (128, 96)  # width, height


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def python_dream(image: Path, **settings) -> tuple[np.ndarray, dict[str, str]]:
    """The Python engine's result as its PNG has it (8-bit) and that PNG's metadata, with the
    browser's settings (the browser never tiles: tile_size 0)."""
    from onnxdream.dream.ascent import dream
    from onnxdream.media.imageio import load_image, to_uint8
    from onnxdream.runtime.gradient import GradientModel
    from onnxdream.settings.options import DreamSettings
    from onnxdream.settings.provenance import dream_metadata
    from onnxdream.settings.resolve import resolve

    s = DreamSettings(tile_size=0, **settings)
    rgb = load_image(image).rgb
    gm = GradientModel.from_settings(s, device="cpu", threads=1)
    resolved = resolve(s, *rgb.shape[:2], gm.info)
    out = to_uint8(dream(gm, rgb, resolved)).astype(np.float32) / 255.0  # the CLI's PNG
    meta = dream_metadata(resolved, objective=gm.objective, provider="?", image="IMAGE",
                          output=f"dream-{s.seed}.png")
    return out, meta


def png_of(data_url: str) -> tuple[np.ndarray, dict[str, str]]:
    raw = base64.b64decode(data_url.split(",", 1)[1])
    with Image.open(io.BytesIO(raw)) as im:
        im.load()
        return np.asarray(im.convert("RGB"), np.float32) / 255.0, dict(im.text)


@pytest.fixture(scope="module")
def site(tmp_path_factory, model_home):
    """A site for the default model (its default layer), with a 128x96 test photo in it."""
    from onnxdream.browser.site import export_site

    root = tmp_path_factory.mktemp("web") / "site"
    export_site(root, ort_dir=ORT_DIR)
    with Image.open(photo("chelsea.png")) as im:
        im.convert("RGB").resize(SIZE, Image.Resampling.LANCZOS).save(root / "test.png")
    return root


@pytest.fixture(scope="module")
def site_url(site):
    """`onnxdream web serve SITE` in a subprocess (a free port); stopped at the end."""
    proc = subprocess.Popen([sys.executable, "-m", "onnxdream.cli", "web", "serve", str(site),
                             "--port", "0"], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        line = ""
        while "serving" not in line:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"web serve did not start: {line}{proc.stderr.read()}")
            line = proc.stderr.readline()
        yield line.strip().rsplit(" ", 1)[-1].rstrip("/")
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        proc.stderr.close()


@pytest.fixture
def site_page(browser, site_url):
    w = Watched(browser, site_url)
    try:
        w.page.goto(site_url + "/")
        w.page.wait_for_function("() => window.onnxdream !== undefined")
        w.page.evaluate("window.onnxdream.ready.then(() => true)")
        yield w
    finally:
        w.close()


# ---------------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_site_dreams_like_the_cli_without_jitter(site, site_page):
    page = site_page.page
    assert page.evaluate("self.crossOriginIsolated")  # web serve sends COOP/COEP: threads
    r = page.evaluate("window.onnxdream.dream('test.png', "
                      "{octaves: 1, steps: 5, jitter: 0, seed: 4})")
    assert r["backend"] == "wasm" and r["threads"] >= 1 and r["seconds"] > 0
    got, meta = png_of(r["png"])
    assert got.shape == (SIZE[1], SIZE[0], 3)
    want, want_meta = python_dream(site / "test.png", octaves=1, steps=5, jitter=0, seed=4)
    db = psnr(got, want)
    print(f"\nbrowser (WASM) vs Python engine, 128x96, 1 octave x 5 steps, no jitter: {db:.1f} dB")
    assert db >= 35, db  # measured: 155 dB (one 8-bit level apart in a pixel or two)
    # the same provenance as the CLI's, but for the provider
    assert meta.pop("onnxdream:provider") == "onnxruntime-web 1.30.0 wasm"
    want_meta.pop("onnxdream:provider")
    assert meta == want_meta
    assert site_page.external() == [] and site_page.problems == []
    assert any(u.endswith("/ort/ort-wasm-simd-threaded.wasm") for u in site_page.requests)
    shot = os.environ.get("ONNXDREAM_SCREENSHOT")
    if shot:
        page.set_input_files("#image", str(site / "test.png"))
        page.fill("#steps", "3")
        page.fill("#octaves", "1")
        page.fill("#seed", "4")
        page.click("#dream")
        page.wait_for_selector("#result:not([hidden])")
        page.screenshot(path=shot)


@pytest.mark.timeout(60)
def test_site_jitter_follows_the_clis_random_rolls(site, site_page):
    r = site_page.page.evaluate("window.onnxdream.dream('test.png', "
                                "{octaves: 2, steps: 3, jitter: 32, seed: 4})")
    got, meta = png_of(r["png"])
    assert json.loads(meta["onnxdream:resolved"]) == {
        "batch_pixels": 512 * 512, "jitter": 32, "octave_sizes": [[96, 128], [69, 91]],
        "octaves": 2, "step_size": 0.006, "tile": [0, 0], "tile_size": 0}
    want, want_meta = python_dream(site / "test.png", octaves=2, steps=3, jitter=32, seed=4)
    assert meta["onnxdream:resolved"] == want_meta["onnxdream:resolved"]
    other, _ = python_dream(site / "test.png", octaves=2, steps=3, jitter=32, seed=5)
    db, db_other = psnr(got, want), psnr(got, other)
    print(f"\nbrowser vs Python, 2 octaves x 3 steps, jitter 32, seed 4: {db:.1f} dB "
          f"(vs seed 5: {db_other:.1f} dB)")
    assert db >= 35 and db > db_other + 10, (db, db_other)  # measured: 155 dB vs ~30 dB
    assert site_page.problems == []


@pytest.mark.timeout(60)
def test_the_pages_rules_are_the_engines(site_page):
    """Octave sizes (the resolver's rule), numpy's generator and Python's float spelling, as
    the module computes them, against Python."""
    from onnxdream.browser.site import resolver_rule
    from onnxdream.settings.options import DreamSettings
    from onnxdream.settings.resolve import resolve

    cases = [(h, w, n, s) for h, w in ((96, 128), (33, 33), (45, 320), (513, 769), (2000, 31),
                                       (224, 224), (1000, 1400)) for n in (1, 3, 5, 12)
             for s in (1.4, 2.0, 1.25)]
    autos = [(h, w, s) for h in (64, 224, 313, 512, 700, 2048, 4096) for w in (224, 999)
             for s in (1.4, 2.0)]
    floats = [0.006, 1.4, 2.0, 1e-05, 0.0001, 0.1 + 0.2, 123456.789, 1e16, 2.5e-07, 10.0, 3.0]
    rng_cases = [(0, 1), (4, 32), (7, 16), (2**32 - 1, 100), (12345, 2**30)]
    js = site_page.page.evaluate("""([cases, autos, floats, rngs, rule]) => {
      const m = window.onnxdream;
      return {
        sizes: cases.map(([h, w, n, s]) => m.octaveSizes(h, w, n, s, rule)),
        autos: autos.map(([h, w, s]) => m.octaveSizes(h, w, 'auto', s, rule, [224, 224])),
        floats: floats.map(m.pyFloat),
        rolls: rngs.map(([seed, j]) => { const r = new m.NumpyRng(seed);
          return Array.from({length: 50}, () => r.integers(-j, j + 1, 2)); }),
      };
    }""", [cases, autos, floats, rng_cases, resolver_rule()])
    for (h, w, n, s), got in zip(cases, js["sizes"]):
        want = resolve(DreamSettings(octaves=n, octave_scale=s), h, w).octave_sizes
        assert [tuple(x) for x in got] == list(want), (h, w, n, s)
    try:
        DreamSettings(octaves="auto").validate()
        auto = True
    except Exception:  # noqa: BLE001 - this engine has no "auto" octaves yet
        auto = False
    if auto:
        from onnxdream.exporters.graph.contract import ModelInfo
        from onnxdream.runtime.opening import resolve_model_path

        info = ModelInfo.load(resolve_model_path("efficientnet-lite0"))
        for (h, w, s), got in zip(autos, js["autos"]):
            want = resolve(DreamSettings(octaves="auto", octave_scale=s), h, w, info).octave_sizes
            assert [tuple(x) for x in got] == list(want), (h, w, s)
    assert js["floats"] == [repr(f) for f in floats]
    for (seed, j), got in zip(rng_cases, js["rolls"]):
        rng = np.random.default_rng(seed)
        assert got == [[int(v) for v in rng.integers(-j, j + 1, 2)] for _ in range(50)], seed


@pytest.mark.timeout(60)
def test_server_page_dreams_in_this_browser(browser, page_server, tmp_path):
    src = tmp_path / "small.png"
    with Image.open(photo("chelsea.png")) as im:
        im.convert("RGB").resize(SIZE, Image.Resampling.LANCZOS).save(src)
    srv = page_server  # with --ort-dir
    w = Watched(browser, srv.url)
    try:
        page = w.page
        page.goto(srv.url + "/")
        page.wait_for_selector("#layer option[value='blocks.5']", state="attached")
        page.wait_for_function("() => window.onnxdream !== undefined")  # the module is up
        assert page.is_enabled("#where_browser") and page.text_content("#where_note") == ""
        assert page.evaluate("self.crossOriginIsolated")
        page.set_input_files("#image", str(src))
        page.check("#where_browser")
        assert page.is_visible("#backend")
        page.fill("#steps", "5")
        page.fill("#octaves", "1")
        page.fill("#seed", "4")
        page.click("#dream")
        page.wait_for_selector("#result:not([hidden])")
        status = page.text_content("#status")
        assert status.startswith("done in") and "in this browser on wasm (seed 4)" in status
        with page.expect_download() as info:
            page.click("#download")
        download = info.value
        assert download.suggested_filename == "dream-4.png"
        with Image.open(download.path()) as out:
            got = np.asarray(out.convert("RGB"), np.float32) / 255.0
            meta = dict(out.text)
        assert meta["onnxdream:provider"] == "onnxruntime-web 1.30.0 wasm"
        assert meta["onnxdream:command"].startswith("onnxdream dream small.png -o dream-4.png")
        want, _ = python_dream(src, octaves=1, steps=5, jitter=32, seed=4)
        db = psnr(got, want)
        print(f"\nserver page, in this browser vs Python (jitter 32, seed 4): {db:.1f} dB")
        assert db >= 35, db
        # the photo never went to the server: no dream request, only the graph and runtime
        assert not [u for u in w.requests if "/jobs" in u or "/dream" in u], w.requests
        assert any("/web/step.onnx?" in u for u in w.requests)
        assert w.external() == [] and w.problems == [], (w.external(), w.problems)
    finally:
        w.close()


@pytest.mark.timeout(60)
@pytest.mark.skip_ok
def test_site_dreams_on_webgpu_where_offered(playwright, model_home, tmp_path):
    """WebGPU (the portable graphs; headless Chromium offers only SwiftShader, Vulkan on the
    CPU, so this is about correctness, at a small size), against the Python engine."""
    import threading

    from onnxdream.browser.site import export_site, site_server

    root = export_site(tmp_path / "gpu", ort_dir=ORT_DIR, webgpu=True).path
    with Image.open(photo("chelsea.png")) as im:
        im.convert("RGB").resize((64, 48), Image.Resampling.LANCZOS).save(root / "tiny.png")
    server = site_server(root, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        _dream_on_webgpu(playwright, root, server.url)
    finally:
        server.shutdown()
        server.server_close()


def _dream_on_webgpu(pw, root: Path, url: str) -> None:
    b = launch(pw, [a for a in ARGS if a != "--disable-gpu"] + ["--enable-unsafe-webgpu"])
    try:
        w = Watched(b, url.rstrip("/"))
        w.page.goto(url)
        w.page.wait_for_function("() => window.onnxdream !== undefined")
        w.page.evaluate("window.onnxdream.ready.then(() => true)")
        if not w.page.evaluate("async () => !!(navigator.gpu && "
                               "await navigator.gpu.requestAdapter())"):
            skip_ok("this Chromium offers no WebGPU adapter")
        r = w.page.evaluate("window.onnxdream.dream('tiny.png', {octaves: 1, steps: 2, "
                            "jitter: 8, seed: 3, backend: 'webgpu'})")
        assert r["backend"] == "webgpu"
        got, meta = png_of(r["png"])
        assert meta["onnxdream:provider"] == "onnxruntime-web 1.30.0 webgpu"
        want, _ = python_dream(root / "tiny.png", octaves=1, steps=2, jitter=8, seed=3)
        db = psnr(got, want)
        print(f"\nWebGPU (SwiftShader) vs Python, 64x48, 2 steps: {db:.1f} dB")
        assert db >= 35, db
        assert w.external() == [] and w.problems == [], (w.external(), w.problems)
    finally:
        b.close()
