"""`onnxdream serve`: the HTTP API as a client sees it, bad input, bounded queue, jobs.

The acceptance tests start the real server (`python -m onnxdream.cli.main serve`) in a subprocess on
a free port; a few unit tests drive the ASGI app in-process. Small images, 1 octave, 2 steps.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import io
import json
import os
import shutil
import socket
import struct
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the server needs the [serve] extra")
pytest.importorskip("uvicorn", reason="the server needs the [serve] extra")
pytest.importorskip("python_multipart", reason="the server needs python-multipart")
httpx = pytest.importorskip("httpx", reason="the server tests need httpx")

from serverproc import (  # noqa: E402
    FAST,
    SMALL_SIZE,
    Server,
    check_error,
    check_png,
    post_dream,
)

pytestmark = pytest.mark.xdist_group("server")  # one worker starts the module's server

# ---------------------------------------------------------------------------------------------
# Helpers


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _bomb() -> bytes:
    """A 100 kB-per-side PNG header with almost no data: 10 gigapixels if decoded."""
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr)
            + _chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + _chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def server(model_home, tmp_path_factory):
    """A server with small limits: 50,000 pixels, 1 MB bodies, a queue of 16."""
    log = tmp_path_factory.mktemp("server") / "server.log"
    srv = Server(model_home, log, "--max-pixels", "50000", "--max-body", "1",
                 "--max-queue", "16")
    try:
        yield srv
    finally:
        srv.stop()


def _raw_post(url: str, headers: dict[str, str], body: bytes = b"") -> tuple[int, bytes]:
    """An HTTP/1.1 POST on a bare socket; returns (status, body) without sending more."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        s.sendall(f"POST /dream HTTP/1.1\r\nHost: {host}\r\n{head}\r\n".encode() + body)
        data = b""
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _length(data):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    status = int(data.split(b" ", 2)[1])
    return status, data.split(b"\r\n\r\n", 1)[1]


def _length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":")[1])
    return 0


# ---------------------------------------------------------------------------------------------
# Acceptance: the real server


def test_dreams_bad_input_and_the_server_lives_on(server, small, chelsea, tmp_path):
    c = server.client
    before = np.asarray(Image.open(io.BytesIO(small)).convert("RGB"), np.float64)

    # one dream: a PNG of the same size, clearly changed, with its seed in a header
    r = post_dream(c, small, seed=5)
    after = check_png(r)
    assert np.abs(after - before).mean() > 1, "the dream did not change the photo"
    assert r.headers["x-onnxdream-seed"] == "5"
    assert r.headers["x-onnxdream-provider"] == "CPUExecutionProvider"

    # eight at once: all queued and served
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: post_dream(c, small, seed=i), range(8)))
    for r in results:
        check_png(r)

    # other formats, with the CLI's provenance (an XMP packet in JPEG)
    r = post_dream(c, small, format="jpeg", seed=4)
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(r.content)).size == SMALL_SIZE
    from onnxdream.media.imageio import read_metadata

    (tmp_path / "dream.jpg").write_bytes(r.content)
    meta = read_metadata(tmp_path / "dream.jpg")
    assert meta["onnxdream:seed"] == "4" and meta["onnxdream:step_size"] == "0.006"
    assert meta["onnxdream:command"].startswith(
        "onnxdream dream IMAGE -o dream.jpg --model efficientnet-lite0 --layer blocks.5:1 ")

    # bad input: a 4xx with {"error": "..."} each
    check_error(post_dream(c, b"this is not an image"), 400, "not an image")
    check_error(post_dream(c, small[: len(small) // 2]), 400, "truncated")
    check_error(post_dream(c, b""), 400, "empty")
    check_error(post_dream(c, _bomb()), 413, "10,000,000,000 pixels")
    check_error(post_dream(c, chelsea), 413, "more than the limit of 50,000")  # 451x300 > 50,000
    check_error(post_dream(c, small, model="no-such-model"), 400, "unknown model")
    for path in ("/etc/passwd", "../models/x.onnx", str(Path(sys.executable))):
        msg = check_error(post_dream(c, small, model=path), 400, "unknown model")
        assert "efficientnet-lite0" in msg  # says what would be right
    check_error(post_dream(c, small, layer="blocks.99"), 400, "unknown layer")
    check_error(post_dream(c, small, objective="banana"), 400, "bad objective")
    check_error(post_dream(c, small, objective="channel:x"), 400, "objective")
    check_error(post_dream(c, small, octaves=0), 400, "octaves must be auto or between 1 and 12")
    check_error(post_dream(c, small, steps=-1), 400, "steps")
    check_error(post_dream(c, small, steps="many"), 400, "must be an integer")
    check_error(post_dream(c, small, step_size="nan"), 400, "finite number")
    check_error(post_dream(c, small, step_size=0), 400, "step_size")
    check_error(post_dream(c, small, jitter=99999), 400, "jitter")
    check_error(post_dream(c, small, seed=-5), 400, "seed")
    check_error(post_dream(c, small, octaves=12, steps=1000), 400, "limit")
    check_error(post_dream(c, small, format="gif"), 400, "format")
    check_error(post_dream(c, small, pre_relu="maybe"), 400, "true or false")
    check_error(post_dream(c, small, strength=3), 400, "unknown field 'strength'")
    check_error(c.post("/dream", data=FAST, files={"other": ("a.png", small)}), 400, "field")
    check_error(c.post("/dream", data=FAST), 415, "multipart")
    check_error(c.post("/dream", data=FAST, files={"x": ("", b"")}), 400)
    check_error(c.get("/no/such/page"), 404)
    check_error(c.put("/dream"), 405)
    # bodies over --max-body (1 MB): refused from the Content-Length, before any upload
    big = os.urandom(3 * 1024 * 1024)
    status, body = _raw_post(server.url, {"Content-Type": "multipart/form-data; boundary=x",
                                          "Content-Length": str(100 * 1024 * 1024)})
    assert status == 413 and "limit of 1 MB" in json.loads(body)["error"]
    try:  # an honest upload of 3 MB: 413 too (if the server closes before we finish: also fine)
        r = c.post("/dream", files={"image": ("big.png", big)}, data=FAST)
        check_error(r, 413, "limit of 1 MB")
    except httpx.TransportError as exc:
        print(f"3 MB upload: connection closed early ({exc!r})")

    # ... and the server lives on
    assert server.alive(), server.log()
    h = c.get("/health")
    assert h.status_code == 200
    health = h.json()
    assert health["status"] == "ok" and health["version"]
    assert health["provider"] == "CPUExecutionProvider"
    assert any(m["model"] == "efficientnet-lite0" for m in health["models"])
    assert health["queue"]["queued"] == 0 and health["queue"]["running"] == 0
    check_png(post_dream(c, small))
    assert "Traceback" not in server.log()


def test_models_and_layers(server):
    c = server.client
    r = c.get("/models")
    assert r.status_code == 200
    body = r.json()
    names = [m["name"] for m in body["models"]]
    assert body["default"] == "efficientnet-lite0" and "efficientnet-lite0" in names
    r = c.get("/models/efficientnet-lite0/layers")
    assert r.status_code == 200
    layers = r.json()
    assert "blocks.5" in layers["layers"] and layers["default_layers"] == ["blocks.5"]
    check_error(c.get("/models/nope/layers"), 404, "unknown model")
    r = c.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    # the page runs only its own files (the CSP allows no inline script or style)
    assert "<form" in r.text and "<script>" not in r.text and "<style" not in r.text
    assert "http" not in r.text and " style=" not in r.text
    js = c.get("/static/app.js")
    assert js.status_code == 200 and "javascript" in js.headers["content-type"]
    assert "/jobs" in js.text and "http" not in js.text
    css = c.get("/static/app.css")
    assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")


def test_jobs_api(server, small):
    c = server.client
    r = c.post("/jobs", files={"image": ("p.png", small, "image/png")},
               data={"steps": "4", "octaves": "2", "seed": "11", "layer": "blocks.9"})
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["state"] in ("queued", "running") and job["seed"] == 11
    assert r.headers["location"] == f"/jobs/{job['id']}" == job["url"]
    deadline = time.monotonic() + 60
    while True:
        s = c.get(f"/jobs/{job['id']}")
        assert s.status_code == 200
        state = s.json()
        assert state["state"] in ("queued", "running", "done"), state
        assert 0.0 <= state["progress"] <= 1.0
        if state["state"] == "done":
            break
        assert time.monotonic() < deadline, state
        time.sleep(0.05)
    assert state["progress"] == 1.0 and state["eta_s"] == 0.0
    assert state["steps_done"] == state["steps_total"] == 8
    assert state["result_url"] == f"/jobs/{job['id']}/result"
    r = c.get(state["result_url"])
    check_png(r)
    assert r.headers["x-onnxdream-seed"] == "11"
    # a second fetch works too (results are kept until the TTL or DELETE)
    assert c.get(state["result_url"]).content == r.content
    d = c.delete(f"/jobs/{job['id']}")
    assert d.status_code == 200 and d.json()["deleted"] is True
    check_error(c.get(f"/jobs/{job['id']}"), 404, "no job")
    check_error(c.get(f"/jobs/{job['id']}/result"), 404, "no job")
    check_error(c.delete(f"/jobs/{job['id']}"), 404, "no job")
    check_error(c.get("/jobs/0123456789abcdef"), 404, "no job")
    # a bad request to /jobs is refused at once, not as a failed job
    check_error(c.post("/jobs", files={"image": ("p.png", small)}, data={"layer": "nope"}),
                 400, "unknown layer")


def test_full_queue_gets_503_and_cancel_frees_it(model_home, tmp_path, chelsea, small):
    srv = Server(model_home, tmp_path / "server.log", "--workers", "1", "--max-queue", "1")
    try:
        c = srv.client
        slow = {"steps": "400", "octaves": "1", "jitter": "0"}  # ~20 s+ at 451x300: cancelled below
        files = {"image": ("chelsea.png", chelsea, "image/png")}
        first = c.post("/jobs", files=files, data=slow)
        second = c.post("/jobs", files=files, data=slow)
        assert first.status_code == 202 and second.status_code == 202, (first.text, second.text)
        one, two = first.json()["id"], second.json()["id"]
        # capacity is workers + max-queue = 2: a third is refused, with a hint when to retry
        for r in (c.post("/jobs", files=files, data=slow), post_dream(c, small)):
            check_error(r, 503, "busy")
            assert int(r.headers["retry-after"]) >= 1
        # the first runs and reports progress and an ETA; the second waits
        deadline = time.monotonic() + 60
        while True:
            s = c.get(f"/jobs/{one}").json()
            if s["state"] == "running" and s["steps_done"] >= 2:
                break
            assert s["state"] in ("queued", "running") and time.monotonic() < deadline, s
            time.sleep(0.05)
        assert 0 < s["progress"] < 1 and s["eta_s"] > 0
        waiting = c.get(f"/jobs/{two}").json()
        assert waiting["state"] == "queued" and waiting["queue_position"] == 0
        assert waiting["progress"] == 0 and waiting["eta_s"] is None
        check_error(c.get(f"/jobs/{one}/result"), 409, "running")
        # cancel both: the running one stops at its next step, the queued one never starts
        for job_id in (one, two):
            d = c.delete(f"/jobs/{job_id}")
            assert d.status_code == 200 and d.json()["state"] == "cancelled"
        _wait_idle(c)
        # a /dream whose client gives up is cancelled too, not dreamed for nobody
        with pytest.raises(httpx.ReadTimeout):
            c.post("/dream", files=files, data=slow, timeout=1.5)
        _wait_idle(c)
        check_png(post_dream(c, small))
        assert srv.alive()
    finally:
        srv.stop()


def _wait_idle(c, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while (q := c.get("/health").json()["queue"])["running"] or q["queued"]:
        assert time.monotonic() < deadline, q
        time.sleep(0.05)


# ---------------------------------------------------------------------------------------------
# In-process: limits and configuration


def _asgi_post(app, chunks: list[bytes], headers: list[tuple[bytes, bytes]]) -> tuple[int, dict]:
    """POST /dream straight into the ASGI app, the body in ``chunks``; (status, JSON body)."""
    sent: list[dict] = []
    pending = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
               for i, c in enumerate(chunks)]

    async def receive():
        if pending:
            return pending.pop(0)
        await asyncio.sleep(3600)

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": "/dream", "raw_path": b"/dream", "root_path": "",
             "query_string": b"", "headers": headers, "client": ("127.0.0.1", 1),
             "server": ("127.0.0.1", 80)}
    asyncio.run(asyncio.wait_for(app(scope, receive, send), 30))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], json.loads(body)


def test_streamed_body_over_the_limit_is_413():
    """A chunked upload (no Content-Length) is cut off once it passes the limit."""
    from onnxdream.server.app import ServerConfig, create_app

    app = create_app(ServerConfig(max_body=64 * 1024))
    part = (b"--b\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n"
            b"Content-Type: image/png\r\n\r\n")
    chunks = [part] + [b"\0" * 16384] * 40  # 640 kB, never finished
    status, body = _asgi_post(app, chunks, [(b"content-type", b"multipart/form-data; boundary=b"),
                                            (b"transfer-encoding", b"chunked")])
    assert status == 413 and "limit of 0.0625 MB" in body["error"]
    status, body = _asgi_post(app, [b""], [(b"content-type", b"multipart/form-data; boundary=b"),
                                           (b"content-length", b"1000000")])
    assert status == 413


def test_operator_models_by_name_never_by_path(model_home, tmp_path, small):
    """--model-path FILE offers FILE under its stem; requests cannot name files themselves."""
    from onnxdream.core.errors import ModelError
    from onnxdream.models import resolve_model
    from onnxdream.server.app import ServerConfig

    mine = tmp_path / "mycat.onnx"
    shutil.copy(resolve_model("efficientnet-lite0"), mine)
    from onnxdream.server.app import create_app

    config = ServerConfig.from_env(model_paths=[mine], workers=1)
    assert config.model_paths == {"mycat": mine.resolve()}
    app = create_app(config)

    async def requests():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://test", timeout=60) as c:
            files = {"image": ("p.png", small, "image/png")}
            return (await c.get("/models"),
                    await c.post("/dream", files=files, data={**FAST, "model": "mycat",
                                                              "layer": "blocks.3"}),
                    await c.post("/dream", files=files, data={**FAST, "model": str(mine)}),
                    await c.post("/dream", files=files, data={**FAST, "model": "mycat.onnx"}))

    try:
        models, ok, by_path, by_file_name = asyncio.run(requests())
    finally:
        app.state.jobs.stop()
    assert "mycat" in [m["name"] for m in models.json()["models"]]
    check_png(ok)
    check_error(by_path, 400, "unknown model")
    check_error(by_file_name, 400, "did you mean 'mycat'")
    with pytest.raises(ModelError, match="not a file"):
        ServerConfig.from_env(model_paths=[tmp_path / "missing.onnx"])
    clash = tmp_path / "efficientnet-lite0.onnx"
    shutil.copy(mine, clash)
    with pytest.raises(ModelError, match="zoo model"):
        ServerConfig.from_env(model_paths=[clash])


def test_config_from_env(monkeypatch):
    from onnxdream.core.errors import OnnxDreamError
    from onnxdream.server.app import MB, ServerConfig

    for k in list(os.environ):
        if k.startswith("ONNXDREAM_") and k != "ONNXDREAM_HOME":
            monkeypatch.delenv(k)
    cfg = ServerConfig.from_env()
    assert cfg.workers in (1, 2) and cfg.max_queue == 16 and cfg.max_body == 32 * MB
    monkeypatch.setenv("ONNXDREAM_WORKERS", "3")
    monkeypatch.setenv("ONNXDREAM_MAX_QUEUE", "0")
    monkeypatch.setenv("ONNXDREAM_MAX_PIXELS", "1000")
    monkeypatch.setenv("ONNXDREAM_MAX_BODY_MB", "2")
    monkeypatch.setenv("ONNXDREAM_DEVICE", "cpu")
    cfg = ServerConfig.from_env()
    assert (cfg.workers, cfg.max_queue, cfg.max_pixels, cfg.max_body, cfg.device) == \
        (3, 0, 1000, 2 * MB, "cpu")
    assert ServerConfig.from_env(workers=1, max_queue=5).max_queue == 5  # options win
    monkeypatch.setenv("ONNXDREAM_WORKERS", "lots")
    with pytest.raises(OnnxDreamError, match="ONNXDREAM_WORKERS must be an integer"):
        ServerConfig.from_env()
    with pytest.raises(OnnxDreamError, match="device"):
        ServerConfig.from_env(workers=1, device="tpu")


def test_serve_without_the_extra_says_what_to_install(monkeypatch):
    from typer.testing import CliRunner

    from onnxdream.cli.main import app

    monkeypatch.setitem(sys.modules, "uvicorn", None)
    result = CliRunner().invoke(app, ["serve"])
    assert result.exit_code == 2
    out = result.output + (getattr(result, "stderr", "") or "")
    assert "pip install 'onnxdream[serve]'" in out and "Traceback" not in out
