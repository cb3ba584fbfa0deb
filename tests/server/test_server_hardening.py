"""Issue 15 over HTTP: admission before decoding, honest /health, no server paths in errors,
security headers on every response, trusted hosts, API docs without a CDN, finite weights.

In-process tests drive the ASGI app with httpx; the end-to-end ones start `onnxdream serve`
(serverproc.Server) with a timeout and stop it in `finally`.
"""

from __future__ import annotations

import asyncio
import io
import os
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the server needs the [serve] extra")
httpx = pytest.importorskip("httpx", reason="the server tests need httpx")

from helpers import overflowing_model, skip_ok  # noqa: E402
from serverproc import FAST, Server, check_error, check_png, post_dream  # noqa: E402

pytestmark = pytest.mark.xdist_group("server")  # with the other server processes

SECURITY = {"x-content-type-options": "nosniff", "x-frame-options": "DENY",
            "referrer-policy": "no-referrer"}


def _png(w: int, h: int, color=(0, 0, 0)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, "PNG")
    return buf.getvalue()


def _secure(r: httpx.Response) -> None:
    for k, v in SECURITY.items():
        assert r.headers.get(k) == v, (r.request.url, r.status_code, dict(r.headers))
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp, csp
    assert "unsafe-inline" not in csp and "default-src 'none'" in csp, csp


def _run(app, requests, **client):
    """Run ``requests(client)`` (a coroutine function) against the app in-process."""
    async def main():
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost",
                                     timeout=60, **client) as c:
            return await requests(c)
    try:
        return asyncio.run(main())
    finally:
        app.state.jobs.stop()


# ---------------------------------------------------------------------------------------------
# Admission before decoding (issue 15, finding 3)


def test_a_full_queue_refuses_before_anything_is_decoded_or_compiled(model_home, monkeypatch):
    import onnxdream.jobs.queue as jobs
    import onnxdream.media.imageio as imageio
    from onnxdream.server.app import ServerConfig, create_app

    calls = {"header": 0, "decode": 0, "model": 0, "form": 0}
    release, running = threading.Event(), threading.Event()
    real_size = imageio.image_size

    def counting_size(*a, **k):
        calls["header"] += 1
        return real_size(*a, **k)

    def counting_decode(*a, **k):
        calls["decode"] += 1
        raise AssertionError("nothing is decoded in this test")

    def blocking_run(req, models, job):
        running.set()
        release.wait(30)
        return b""

    monkeypatch.setattr(imageio, "image_size", counting_size)
    monkeypatch.setattr(imageio, "load_image_bytes", counting_decode)
    monkeypatch.setattr(jobs, "run_request", blocking_run)
    app = create_app(ServerConfig(workers=1, max_queue=0))
    models = app.state.models
    monkeypatch.setattr(models, "get", lambda settings: calls.__setitem__(
        "model", calls["model"] + 1))
    from onnxdream.server.formstream import FormReader

    real_read = FormReader.read

    def counting_form(self, *a, **k):
        calls["form"] += 1
        return real_read(self, *a, **k)

    monkeypatch.setattr(FormReader, "read", counting_form)
    # a 3000x3000 PNG of zeros: ~30 kB to send, 27 MB of pixels (108 MB as float32) to decode
    expensive = _png(3000, 3000)
    assert len(expensive) < 100_000

    async def requests(c):
        files = {"image": ("small.png", _png(64, 48), "image/png")}
        first = await c.post("/jobs", files=files, data=FAST)
        assert first.status_code == 202, first.text
        assert await asyncio.to_thread(running.wait, 10)
        before = dict(calls)
        full = await c.post("/dream", files={"image": ("big.png", expensive, "image/png")},
                            data=FAST)
        after = dict(calls)
        also = await c.post("/jobs", files={"image": ("big.png", expensive, "image/png")},
                            data=FAST)
        release.set()
        return before, full, after, also

    before, full, after, also = _run(app, requests)
    assert before == {"header": 1, "decode": 0, "model": 1, "form": 1}
    check_error(full, 503, "busy")
    check_error(also, 503, "busy")
    assert int(full.headers["retry-after"]) >= 1
    assert after == before, "a refused request was read, decoded or compiled"
    assert calls["decode"] == 0


def test_the_worker_decodes_when_the_dream_starts(model_home, small):
    """Queued dreams hold the encoded upload; the pixels are decoded by a worker."""
    import onnxdream.media.imageio as imageio
    from onnxdream.server.app import ServerConfig, create_app

    threads = []
    real = imageio.load_image_bytes

    def spy(*a, **k):
        threads.append(threading.current_thread().name)
        return real(*a, **k)

    imageio.load_image_bytes = spy
    try:
        app = create_app(ServerConfig(workers=1))

        async def requests(c):
            return await c.post("/dream", files={"image": ("p.png", small, "image/png")},
                                data=FAST)

        check_png(_run(app, requests))
    finally:
        imageio.load_image_bytes = real
    assert threads == ["onnxdream-worker-0"]


# ---------------------------------------------------------------------------------------------
# Health, paths in errors, finite weights, non-finite dreams (issue 15, findings 4-6)


def _home_with_broken_cache(model_home: Path, tmp_path: Path, how: str) -> Path:
    """A model home sharing the zoo models, whose compiled-graph cache cannot take files."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "models").symlink_to(model_home / "models", target_is_directory=True)
    if how == "file":  # works as root too (root writes into read-only directories)
        (home / "compiled").write_text("not a directory")
    else:
        (home / "compiled").mkdir()
        (home / "compiled").chmod(0o555)
    return home


@pytest.mark.parametrize("how", ["file", "read-only"])
def test_health_is_503_when_the_cache_cannot_be_written_and_errors_name_no_paths(
        model_home, tmp_path, small, how):
    if how == "read-only" and os.geteuid() == 0:
        skip_ok("root writes into read-only directories (the 'file' case covers root)")
    from onnxdream.models import resolve_model

    resolve_model("efficientnet-lite0")  # built once, before the new home shares it
    home = _home_with_broken_cache(model_home, tmp_path, how)
    broken = tmp_path / "operator-models" / "mycat.onnx"
    broken.parent.mkdir()
    broken.write_bytes(b"not an onnx model at all")
    overflow = overflowing_model(tmp_path / "operator-models" / "overflow.onnx")
    srv = Server(home, tmp_path / "server.log", "--model-path", str(broken),
                 "--model-path", str(overflow), "--max-pixels", "50000")
    try:
        c = srv.client
        r = c.get("/health")
        assert r.status_code == 503, r.text
        body = r.json()
        assert body["status"] == "unavailable"
        assert "compiled-graph cache directory is not writable" in body["error"]
        assert str(home) not in r.text and str(tmp_path) not in r.text
        assert r.headers["retry-after"] == "30"
        _secure(r)
        # dreams still work (the graph runs from memory), and errors name no server path
        check_png(post_dream(c, small, seed=1))
        msg = check_error(post_dream(c, small, model="mycat", layer="x"), 400, "'mycat'")
        assert "not a valid ONNX model" in msg
        for r in (post_dream(c, small, model="mycat", layer="x"),
                  c.post("/jobs", files={"image": ("p.png", small)},
                         data={"model": "mycat", "layer": "x"})):
            assert str(tmp_path) not in r.text and "operator-models" not in r.text, r.text
        # two huge weights: refused by field; an overflowing model: a 422, not a black image
        huge = c.post("/dream", files={"image": ("p.png", small)},
                      data={**FAST, "layer": ["blocks.5:1e308", "blocks.9:1e308"]})
        msg = check_error(huge, 400, "between -1e+06 and 1e+06")
        assert "layer weight in 'blocks.5:1e308'" in msg
        msg = check_error(post_dream(c, small, model="overflow", layer="act", objective="l2"), 422,
                           "stopped being a finite number")
        job = c.post("/jobs", files={"image": ("p.png", small)},
                     data={**FAST, "model": "overflow", "layer": "act", "objective": "l2"})
        assert job.status_code == 202
        for _ in range(600):
            view = c.get(f"/jobs/{job.json()['id']}").json()
            if view["state"] != "queued" and view["state"] != "running":
                break
            time.sleep(0.05)
        assert view["state"] == "failed" and "finite" in view["error"]
        check_error(c.get(f"/jobs/{job.json()['id']}/result"), 422, "finite")
        assert srv.alive() and "Traceback" not in srv.log()
    finally:
        srv.stop()
        if how == "read-only":
            (home / "compiled").chmod(0o755)


def test_health_turns_503_when_the_cache_breaks_later(model_home, tmp_path, monkeypatch):
    """The check is cached for health_ttl seconds, then redone."""
    from onnxdream.server.app import ServerConfig, create_app

    app = create_app(ServerConfig(workers=1, health_ttl=0))
    compiled = tmp_path / "compiled"
    app.state.models.compiled.directory = compiled

    async def requests(c):
        ok = await c.get("/health")
        compiled.rmdir()
        compiled.write_text("now a file")
        return ok, await c.get("/health")

    ok, broken = _run(app, requests)
    assert ok.status_code == 200 and ok.json()["status"] == "ok"
    assert broken.status_code == 503 and "not writable" in broken.json()["error"]
    assert str(tmp_path) not in broken.text


def test_path_scrubber():
    from onnxdream.server.security import PathScrubber

    root = "/nonexistent-onnxdream"
    scrub = PathScrubber({Path(f"{root}/models/mycat.onnx"): "'mycat'"}, [f"{root}/cache"])
    assert scrub(f"{root}/models/mycat.onnx is not a valid ONNX model") == \
        "'mycat' is not a valid ONNX model"
    assert scrub(f"cannot write {root}/cache/compiled/x.onnx (Read-only file system)") == \
        "cannot write …/compiled/x.onnx (Read-only file system)"
    assert scrub(f"{root}/cachet stays") == f"{root}/cachet stays"  # whole components only
    assert scrub(f"see {Path.home()}/x and '/etc/passwd'") == "see … and '…'"  # existing paths
    assert scrub("poll /jobs/abc until done; step 3/4") == "poll /jobs/abc until done; step 3/4"


# ---------------------------------------------------------------------------------------------
# Security headers, trusted hosts, docs (issue 15, finding 6)


def test_security_headers_on_every_response_errors_included(model_home, monkeypatch):
    from onnxdream.server.app import ServerConfig, create_app

    app = create_app(ServerConfig(workers=1, max_body=64 * 1024))

    async def requests(c):
        out = [await c.get(p) for p in ("/", "/static/app.js", "/static/app.css", "/models",
                                        "/openapi.json", "/nope", "/jobs/x", "/docs")]
        out.append(await c.post("/dream", content=b"x" * 100_000,
                                headers={"content-type": "multipart/form-data; boundary=b"}))
        out.append(await c.post("/dream", data={"a": "b"}))  # 415
        out.append(await c.put("/dream"))  # 405
        monkeypatch.setattr(app.state.models, "provider", lambda: 1 / 0)
        out.append(await c.get("/health"))  # an unhandled error: Starlette's outermost 500
        return out

    responses = _run(app, requests)
    assert [r.status_code for r in responses] == [200, 200, 200, 200, 200, 404, 404, 404, 413,
                                                  415, 405, 500]
    for r in responses:
        _secure(r)
    assert responses[-1].json() == {"error": "internal error: ZeroDivisionError"}


def test_trusted_hosts(model_home, tmp_path, monkeypatch):
    from onnxdream.server.app import ServerConfig, create_app

    monkeypatch.setenv("ONNXDREAM_TRUSTED_HOSTS", "dream.example.com, *.example.org")
    config = ServerConfig.from_env(workers=1)
    assert config.trusted_hosts == ("dream.example.com", "*.example.org")
    app = create_app(config)

    async def requests(c):
        return [await c.get("/models", headers={"host": h})
                for h in ("dream.example.com", "a.example.org", "evil.example", "localhost")]

    statuses = [r.status_code for r in _run(app, requests)]
    assert statuses == [200, 200, 400, 400]
    # `onnxdream serve` on 127.0.0.1 serves localhost names only (no DNS rebinding onto it)
    srv = Server(model_home, tmp_path / "server.log")
    try:
        assert srv.client.get("/models").status_code == 200
        r = srv.client.get("/models", headers={"host": "rebound.attacker.example"})
        assert r.status_code == 400
        _secure(r)
    finally:
        srv.stop()


def test_api_docs_without_a_cdn_unless_asked(model_home):
    from onnxdream.server.app import ServerConfig, create_app

    async def requests(c):
        return await c.get("/docs"), await c.get("/openapi.json"), await c.get("/")

    docs, schema, page = _run(create_app(ServerConfig(workers=1)), requests)
    assert docs.status_code == 404 and schema.status_code == 200
    paths = schema.json()["paths"]
    for route in ("/dream", "/jobs"):
        body = paths[route]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
        if route == "/dream":
            assert body["required"] == ["image"]
        else:  # a photo or a video
            assert body["anyOf"] == [{"required": ["image"]}, {"required": ["video"]}]
            assert body["properties"]["video"]["format"] == "binary"
        assert body["properties"]["image"]["format"] == "binary"
        assert {"model", "layer", "steps", "step_size", "seed", "format"} <= set(
            body["properties"])
    docs, schema, page = _run(create_app(ServerConfig(workers=1, docs=True)), requests)
    assert docs.status_code == 200 and "cdn.jsdelivr.net" in docs.text
    assert "https://cdn.jsdelivr.net" in docs.headers["content-security-policy"]
    _secure(page)  # the page itself keeps the strict policy


def test_serve_docs_and_trusted_host_options(monkeypatch):
    from typer.testing import CliRunner

    import onnxdream.server.app as server
    from onnxdream.cli.main import app

    seen = {}
    monkeypatch.setattr(server, "run", lambda config, **kw: seen.update(config=config, **kw))
    for k in list(os.environ):
        if k.startswith("ONNXDREAM_") and k != "ONNXDREAM_HOME":
            monkeypatch.delenv(k)
    runner = CliRunner()
    result = runner.invoke(app, ["serve", "--workers", "1", "--docs", "--cache-mb", "64",
                                 "--trusted-host", "dream.example.com"])
    assert result.exit_code == 0, result.output
    cfg = seen["config"]
    assert cfg.docs and cfg.cache_mb == 64 and cfg.trusted_hosts == ("dream.example.com",)
    result = runner.invoke(app, ["serve", "--workers", "1", "--host", "0.0.0.0"])
    assert result.exit_code == 0 and seen["config"].trusted_hosts == () and not seen[
        "config"].docs
    result = runner.invoke(app, ["serve", "--workers", "1"])
    assert "localhost" in seen["config"].trusted_hosts
    result = runner.invoke(app, ["serve", "--workers", "1", "--max-body", "nan"])
    assert result.exit_code == 2 and "max_body" in result.output.replace("-", "_")


def test_static_files_are_package_data():
    import tomllib

    from helpers import REPO as root

    data = tomllib.loads((root / "pyproject.toml").read_text())
    patterns = data["tool"]["setuptools"]["package-data"]["onnxdream.static"]
    static = root / "engine" / "static"
    for f in static.iterdir():
        assert any(f.match(p) for p in patterns), f"{f.name} would not be installed"
    assert {"index.html", "app.js", "app.css"} <= {f.name for f in static.iterdir()}

