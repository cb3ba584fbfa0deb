"""`onnxdream serve` in a subprocess for the server and browser tests, and the checks of its
answers that several test modules make.

Importing this skips the importing test module (with the reason) when the [serve] extra or httpx
is missing. A test that starts a :class:`Server` stops it in ``finally`` (or uses a fixture that
does) and keeps a pytest timeout.
"""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the server needs the [serve] extra")
pytest.importorskip("uvicorn", reason="the server needs the [serve] extra")
pytest.importorskip("python_multipart", reason="the server needs python-multipart")
httpx = pytest.importorskip("httpx", reason="the server tests need httpx")

FAST = {"steps": "2", "octaves": "1"}
SMALL_SIZE = (128, 96)  # width, height


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`onnxdream serve ARGS` in a subprocess; `.url`, `.client`, `.alive()`, `.log()`."""

    def __init__(self, home: Path, log: Path, *args: str, env: dict[str, str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        extra = env or {}
        env = {k: v for k, v in os.environ.items() if not k.startswith("ONNXDREAM_")}
        env["ONNXDREAM_HOME"] = str(home)
        env.update(extra)
        self.log_path = log
        self._log = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "onnxdream.cli", "serve", "--port", str(self.port),
             "--log-level", "warning", *args],
            stdout=self._log, stderr=subprocess.STDOUT, env=env)
        self.client = httpx.Client(base_url=self.url, timeout=120)
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                self.stop()
                raise AssertionError(f"the server exited ({self.proc.returncode}):\n{self.log()}")
            try:
                if self.client.get("/health", timeout=2).status_code in (200, 503):
                    break  # up (503: up, and saying what stops it from dreaming)
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"the server did not answer within 60 s:\n{self.log()}")
            time.sleep(0.1)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def post_dream(client, image: bytes, **fields) -> httpx.Response:
    """POST /dream with ``image`` and :data:`FAST` settings, overridden by ``fields``."""
    data = {**FAST, **{k: str(v) for k, v in fields.items()}}
    return client.post("/dream", files={"image": ("photo.png", image, "image/png")}, data=data)


def check_png(r: httpx.Response, size=SMALL_SIZE) -> np.ndarray:
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    with Image.open(io.BytesIO(r.content)) as im:
        assert im.format == "PNG" and im.size == size
        return np.asarray(im.convert("RGB"), np.float64)


def check_error(r: httpx.Response, status: int, needle: str = "") -> str:
    assert r.status_code == status, f"{r.status_code} {r.text[:300]}"
    assert r.headers["content-type"].startswith("application/json"), r.headers
    body = r.json()
    assert set(body) == {"error"} and isinstance(body["error"], str) and body["error"], body
    assert "Traceback" not in body["error"]
    assert needle.lower() in body["error"].lower(), body["error"]
    return body["error"]
