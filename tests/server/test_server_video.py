"""Video jobs over HTTP (issue 13.4): POST /jobs with a 'video' file, progress in frames, the
dreamed clip streamed back, the limits (length, pixels, disk), clean-up of each job's folder.

End-to-end tests start `onnxdream serve` (serverproc.Server, stopped in `finally`) and send the
synthetic clip of tests/videoclip.py (textured shapes moving, a sine tone, 2 s at 10 fps,
160x120); the rest drive the app or the work area in-process. 1 octave, 1-2 steps a frame.
"""

from __future__ import annotations

import asyncio
import math
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the server needs the [serve] extra")
pytest.importorskip("av", reason="video needs the [video] extra (PyAV)")
pytest.importorskip("cv2", reason="video needs the [video] extra (OpenCV)")
httpx = pytest.importorskip("httpx", reason="the server tests need httpx")

from serverproc import Server, check_error, png  # noqa: E402
from videoclip import FPS, SIZE, make_clip  # noqa: E402

pytestmark = pytest.mark.xdist_group("server")  # one worker starts the module's server

FAST = {"steps": "1", "octaves": "1", "seed": "7"}


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("clips")
    return {
        "clip": make_clip(d / "clip.mp4"),  # 2 s, 20 frames, AAC sound
        "long": make_clip(d / "long.mp4", seconds=4.0, audio=None),
        "big": make_clip(d / "big.mp4", size=(320, 240), seconds=1.0, audio=None),
        "audio": make_clip(d / "audio.m4a", video=False, container="mp4"),
        "empty": make_clip(d / "empty.mp4", n_frames=0, audio=None),
    }


def _video(client, path: Path, name: str = "clip.mp4", **fields) -> httpx.Response:
    data = {**FAST, **{k: str(v) for k, v in fields.items()}}
    return client.post("/jobs", files={"video": (name, path.read_bytes(), "video/mp4")},
                       data=data)


def _jobs_dirs(jobs: Path) -> list[Path]:
    """The job folders of every server using the work area ``jobs`` (trash and lock
    excluded)."""
    return [d for s in jobs.glob("server-*") for d in s.iterdir()
            if d.is_dir() and not d.name.startswith(".")]


def _wait(client, job_id: str, until=("done", "failed", "cancelled"), timeout: float = 50,
          seen: list | None = None) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        s = client.get(f"/jobs/{job_id}").json()
        if seen is not None:
            seen.append(s)
        if s["state"] in until:
            return s
        assert time.monotonic() < deadline, s
        time.sleep(0.05)


def _gone(jobs: Path, timeout: float = 10) -> None:
    """Wait until no job folder is left (removal runs in the background)."""
    deadline = time.monotonic() + timeout
    while _jobs_dirs(jobs) or any(t.is_dir() and any(t.iterdir())
                                  for t in jobs.glob("server-*/.trash")):
        assert time.monotonic() < deadline, _jobs_dirs(jobs)
        time.sleep(0.05)


def _server(model_home: Path, jobs: Path, log: Path, *args: str) -> Server:
    return Server(model_home, log, "--max-pixels", "50000", *args,
                  env={"ONNXDREAM_JOBS_DIR": str(jobs)})


@pytest.fixture(scope="module")
def jobs(tmp_path_factory) -> Path:
    """This module's work area for video jobs (ONNXDREAM_JOBS_DIR)."""
    return tmp_path_factory.mktemp("jobs")


@pytest.fixture(scope="module")
def server(model_home, jobs, tmp_path_factory):
    """Small limits: 50,000 pixels a frame, clips up to 3 s, 1 MB photos."""
    log = tmp_path_factory.mktemp("server") / "server.log"
    srv = _server(model_home, jobs, log, "--max-video-seconds", "3", "--max-body", "1")
    try:
        yield srv
    finally:
        srv.stop()


# ---------------------------------------------------------------------------------------------
# End to end


def test_a_video_job_reports_frames_and_returns_the_clip_with_its_sound(server, jobs, clips,
                                                                       tmp_path):
    from onnxdream.media.videoio import probe

    c = server.client
    health = c.get("/health").json()["video"]
    assert health["available"] and health["max_seconds"] == 3 and "mp4" in health["formats"]
    r = _video(c, clips["clip"], steps=2)
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["kind"] == "video" and job["frames_total"] == 20 and job["frame_rate"] == FPS
    assert (job["width"], job["height"]) == SIZE and job["format"] == "mp4"
    seen: list[dict] = []
    done = _wait(c, job["id"], seen=seen)
    assert done["state"] == "done", done
    # progress in frames while it ran: some frames done of 20, a rate and an ETA
    running = [s for s in seen if s["state"] == "running" and s["stage"] == "dream"]
    assert running, seen
    assert any(0 < s["frames_done"] < 20 and s["fps"] > 0 and s["eta_s"] is not None
               for s in running), running
    assert all(0 <= s["progress"] <= 1 for s in seen)
    assert [s["frames_done"] for s in seen] == sorted(s["frames_done"] for s in seen)
    assert done["frames_done"] == done["frames_total"] == 20 and done["progress"] == 1.0
    # only the result is kept on disk: frames and upload are gone
    (folder,) = _jobs_dirs(jobs)
    assert [p.name for p in folder.iterdir()] == ["dream.mp4"]

    r = c.get(done["result_url"])
    assert r.status_code == 200 and r.headers["content-type"] == "video/mp4"
    assert r.headers["x-onnxdream-seed"] == "7"
    out = tmp_path / "dream.mp4"
    out.write_bytes(r.content)
    info = probe(out)
    assert abs(info.frames - 20) <= 1 and info.fps == FPS and info.size == SIZE
    assert abs(info.duration - 2.0) <= 1 / FPS
    assert info.audio is not None and info.audio.codec == "aac"
    # a range request (what a <video> element sends) gets part of the file
    part = c.get(done["result_url"], headers={"Range": "bytes=0-99"})
    assert part.status_code == 206 and part.content == r.content[:100]

    d = c.delete(f"/jobs/{job['id']}")
    assert d.status_code == 200 and d.json()["deleted"] is True
    _gone(jobs)  # DELETE removed the job's folder
    check_error(c.get(done["result_url"]), 404, "no job")
    assert server.alive() and "Traceback" not in server.log()


def test_bad_videos_get_one_sentence_without_paths(server, jobs, clips, tmp_path):
    c = server.client
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"this is not a video" * 100)
    cases = [
        (_video(c, clips["long"]), 413, "4.0 s long, more than this server's limit of 3 s"),
        (_video(c, clips["big"]), 413, "width of at most 256"),  # 320x240 > 50,000 pixels
        (_video(c, junk), 400, "the uploaded video is not a video"),
        (_video(c, clips["audio"], name="a.m4a"), 400, "only audio"),
        (_video(c, clips["empty"]), 400, "no frames"),
        (c.post("/jobs", files={"video": ("p.png", _png_bytes(), "image/png")}, data=FAST),
         400, "still image"),
        (_video(c, clips["clip"], format="png"), 400, "format"),
        (_video(c, clips["clip"], steps="0:1,1s:x"), 400, "steps"),
        (_video(c, clips["clip"], layer="0:blocks.5,1s:blocks.99"), 400, "blocks.99"),
        (_video(c, clips["clip"], blend="2"), 400, "blend"),
        (_video(c, clips["clip"], start=5), 400, "start is past the end"),
        (_video(c, clips["clip"], width=1), 400, "width"),
    ]
    for r, status, needle in cases:
        msg = check_error(r, status, needle)
        assert str(jobs) not in msg and "/tmp" not in msg and "upload." not in msg, msg
    # the same clips fit within the limits when asked for less
    for r in (_video(c, clips["long"], start=1, duration=2.5),
              _video(c, clips["big"], width=256, steps="0:1,5:2", layer="0:blocks.3,5:blocks.5",
                     blend="0:0.5,0.5s:0.2", format="webm")):
        assert r.status_code == 202, r.text
        assert c.delete(f"/jobs/{r.json()['id']}").status_code == 200
    # /dream dreams photos only, and says where videos go (before reading the clip)
    r = c.post("/dream", files={"video": ("clip.mp4", clips["clip"].read_bytes(), "video/mp4")},
               data=FAST)
    check_error(r, 400, "send a video as the 'video' file of POST /jobs")
    r = c.post("/dream", files={"image": ("clip.mp4", clips["clip"].read_bytes(), "video/mp4")},
               data=FAST)
    check_error(r, 400, "POST /jobs")
    # video fields on a photo are refused by name
    r = c.post("/jobs", files={"image": ("p.png", _png_bytes(), "image/png")},
               data={**FAST, "width": "64"})
    check_error(r, 400, "'width' is for videos")
    # a photo's body limit still holds on /jobs (1 MB), a video's is larger
    r = c.post("/jobs", files={"image": ("p.png", b"\0" * (2 * 1024 * 1024), "image/png")},
               data=FAST)
    check_error(r, 413, "limit of 1 MB")
    _gone(jobs)  # no refused or cancelled request left a folder behind
    assert server.alive() and "Traceback" not in server.log()


def _png_bytes() -> bytes:
    from PIL import Image

    return png(Image.new("RGB", (64, 48), (20, 120, 200)))


def test_the_disk_cap_refuses_when_full_and_frees_on_cancel(model_home, clips, tmp_path):
    from onnxdream.jobs.video import disk_estimate

    need = disk_estimate(clips["clip"].stat().st_size, SIZE, 20, "mp4")
    cap = math.ceil(1.5 * need / 2**20)  # one job fits, two do not
    jobs = tmp_path / "jobs"
    srv = _server(model_home, jobs, tmp_path / "server.log", "--workers", "1",
                  "--max-video-disk-mb", str(cap))
    try:
        c = srv.client
        first = _video(c, clips["clip"], steps=40)  # ~ 10 s+ to dream: cancelled below
        assert first.status_code == 202, first.text
        full = _video(c, clips["clip"])
        msg = check_error(full, 503, "space for video jobs is full")
        assert int(full.headers["retry-after"]) >= 1 and str(jobs) not in msg
        assert c.get("/health").json()["video"]["disk_mb"]["used"] > 0
        # cancelling the first gives its space back (once its worker stops, at the next step)
        assert c.delete(f"/jobs/{first.json()['id']}").status_code == 200
        deadline = time.monotonic() + 30
        while (r := _video(c, clips["clip"])).status_code == 503:
            assert time.monotonic() < deadline, r.text
            time.sleep(0.2)
        assert r.status_code == 202, r.text
        assert _wait(c, r.json()["id"])["state"] == "done"
        assert c.delete(f"/jobs/{r.json()['id']}").status_code == 200
        _gone(jobs)
    finally:
        srv.stop()
    assert not any(jobs.iterdir()), "the server's folder outlived it"
    # a cap smaller than one job: 413, it would never fit
    srv = _server(model_home, jobs, tmp_path / "server2.log",
                  "--max-video-disk-mb", str(max(1, math.floor(need / 2**20 / 2))))
    try:
        check_error(_video(srv.client, clips["clip"]), 413, "disk space")
    finally:
        srv.stop()


# ---------------------------------------------------------------------------------------------
# In-process: without the [video] extra, the work area


def test_without_the_video_extra_the_server_says_what_to_install(monkeypatch, model_home, clips):
    from onnxdream.server.app import MB, ServerConfig, create_app

    monkeypatch.setitem(sys.modules, "av", None)  # `import av` fails, as without the extra
    app = create_app(ServerConfig(workers=1, max_body=MB))

    async def requests(c):
        files = {"video": ("clip.mp4", clips["clip"].read_bytes(), "video/mp4")}
        return await c.get("/health"), await c.post("/jobs", files=files, data=FAST)

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost",
                                     timeout=60) as c:
            return await requests(c)

    try:
        health, job = asyncio.run(main())
    finally:
        app.state.jobs.stop()
    video = health.json()["video"]
    assert video["available"] is False and "pip install 'onnxdream[video]'" in video["reason"]
    check_error(job, 501, "pip install 'onnxdream[video]'")


def test_the_work_area_budget_and_stale_folders(tmp_path):
    from onnxdream.core.errors import VideoTooLargeError
    from onnxdream.jobs.video import WorkArea, WorkSpaceFull

    MB = 2**20
    root = tmp_path / "jobs"
    stale = root / "server-dead"
    (stale / "job").mkdir(parents=True)
    (stale / ".lock").write_bytes(b"")
    (stale / "job" / "frame.png").write_bytes(b"x" * 1000)
    live = WorkArea(root, 100 * MB)
    live.open()  # the stale folder goes, this one stays
    assert not stale.exists() and live.session.is_dir()
    other = WorkArea(root, 10 * MB, retry_after=lambda: 42)
    other.open()
    assert live.session.is_dir(), "a running server's folder was taken for stale"

    a = other.new_space(4 * MB)
    b = other.new_space(4 * MB)
    assert other.used == 8 * MB
    with pytest.raises(WorkSpaceFull) as full:
        other.new_space(4 * MB)
    assert full.value.retry_after == 42
    with pytest.raises(VideoTooLargeError, match="more than this server allows"):
        other.new_space(11 * MB)
    b.resize(1 * MB)  # shrinking always fits
    c = other.new_space(4 * MB)
    with pytest.raises(WorkSpaceFull):
        c.resize(6 * MB)
    (a.path / "f").write_bytes(b"x" * 1234)
    assert a.usage() == 1234
    a.release()
    a.release()  # idempotent
    assert not a.path.exists() and other.used == 5 * MB
    session = other.session
    other.close()  # the server stops: its folder goes, jobs and all
    assert other.used == 0 and not session.exists() and live.session.is_dir()
    live.close()
    assert not any(root.iterdir())


def test_a_jobs_files_go_when_it_fails_is_cancelled_deleted_or_expires(tmp_path):
    """JobManager gives a request's files back (``release``) at the end of its life."""
    from fractions import Fraction

    from onnxdream.core.errors import VideoError
    from onnxdream.jobs.queue import DONE, FAILED, JobManager, ServerConfig
    from onnxdream.settings.options import DreamSettings

    class FakeVideo:  # what JobManager sees of a VideoRequest
        kind, fmt, size, fps, frames, work = "video", "mp4", (8, 8), Fraction(10), 3, 1.0
        settings = DreamSettings(seed=1)

        def __init__(self, outcome):
            self.outcome, self.released = outcome, 0

        def run(self, models, job):
            if self.outcome == "fail":
                raise VideoError("cannot decode the uploaded video")
            out = tmp_path / f"{id(self)}.mp4"
            out.write_bytes(b"v")
            return out

        def forget_input(self):
            pass

        def release(self):
            self.released += 1

    now = [0.0]
    manager = JobManager(ServerConfig(workers=1, job_ttl=60), models=None, clock=lambda: now[0])
    try:
        ok, fail, kept = (FakeVideo(o) for o in ("ok", "fail", "ok"))
        jobs = [manager.submit(r, track=True) for r in (ok, fail, kept)]
        for j in jobs:
            j.future.result(10)
        assert [j.state for j in jobs] == [DONE, FAILED, DONE]
        assert jobs[0].result_path.read_bytes() == b"v" and jobs[0].view()["frames_total"] == 3
        assert (ok.released, fail.released, kept.released) == (0, 1, 0)  # failed: at once
        manager.cancel(jobs[0])  # DELETE of a finished job
        assert ok.released == 1
        assert manager.stats()["jobs_kept"] == 2 and kept.released == 0
        now[0] = 61.0  # the TTL passes: the finished jobs expire, and their files go
        assert manager.stats()["jobs_kept"] == 0 and kept.released == 1
        assert ok.released >= 1 and fail.released >= 1  # release() is idempotent
    finally:
        manager.stop()


def test_an_upload_cut_off_or_followed_by_another_file_leaves_nothing(model_home, clips,
                                                                       tmp_path):
    """The job's folder goes when the client goes away mid-upload or sends a second file."""
    import json

    from onnxdream.server.app import ServerConfig, create_app

    app = create_app(ServerConfig(workers=1, jobs_dir=tmp_path / "jobs"))
    head = (b"--b\r\nContent-Disposition: form-data; name=\"video\"; filename=\"c.mp4\"\r\n"
            b"Content-Type: video/mp4\r\n\r\n")
    data = clips["clip"].read_bytes()
    second = (b"\r\n--b\r\nContent-Disposition: form-data; name=\"image\"; filename=\"p.png\""
              b"\r\n\r\n" + b"\0" * 1000 + b"\r\n--b--\r\n")

    def post(chunks: list[bytes], disconnect: bool) -> tuple[int, dict]:
        messages = [{"type": "http.request", "body": c, "more_body": True} for c in chunks]
        messages.append({"type": "http.disconnect"} if disconnect else
                        {"type": "http.request", "body": b"", "more_body": False})
        sent: list[dict] = []

        async def receive():
            if messages:
                return messages.pop(0)
            await asyncio.sleep(3600)

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
                 "method": "POST", "scheme": "http", "path": "/jobs", "raw_path": b"/jobs",
                 "root_path": "", "query_string": b"", "client": ("127.0.0.1", 1),
                 "server": ("127.0.0.1", 80),
                 "headers": [(b"content-type", b"multipart/form-data; boundary=b"),
                             (b"content-length", b"%d" % (len(head) + len(data) + 2000))]}
        asyncio.run(asyncio.wait_for(app(scope, receive, send), 30))
        start = next(m for m in sent if m["type"] == "http.response.start")
        body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
        return start["status"], json.loads(body)

    try:
        status, body = post([head, data[:30000]], disconnect=True)
        assert status == 400 and "cut off" in body["error"], body
        status, body = post([head, data, second], disconnect=False)
        assert status == 400 and "one file per request" in body["error"], body
        _gone(tmp_path / "jobs")
    finally:
        app.state.jobs.stop()
        app.state.video_area.close()


def test_the_form_reader_streams_files_where_it_is_told_and_holds_its_limits(tmp_path):
    from onnxdream.server.formstream import FormError, FormReader

    def body(*parts: tuple[str, str | None, bytes], end: bool = True) -> bytes:
        out = b""
        for name, filename, data in parts:
            disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
            out += f"--b\r\nContent-Disposition: {disp}\r\n\r\n".encode() + data + b"\r\n"
        return out + (b"--b--\r\n" if end else b"")

    async def chunks(data: bytes, size: int = 1000):
        for i in range(0, len(data), size):
            yield data[i:i + size]

    def read(data: bytes, limit: int = 4000, on_file=None, **kw):
        reader = FormReader("multipart/form-data; boundary=b", limit=limit, on_file=on_file,
                            **kw)
        return asyncio.run(reader.read(chunks(data)))

    video = tmp_path / "v.bin"

    def to_disk(reader, part):
        if part.name != "video":
            return None
        reader.limit = 100_000
        return open(video, "wb")  # noqa: SIM115 - closed below

    items = read(body(("steps", None, b"3"), ("video", "c.mp4", b"x" * 50_000),
                      ("seed", None, b"1")), on_file=to_disk)
    names = [(n, v if isinstance(v, str) else (v.filename, v.size, v.data)) for n, v in items]
    assert names == [("steps", "3"), ("video", ("c.mp4", 50_000, None)), ("seed", "1")]
    items[1][1].file.close()
    assert video.read_bytes() == b"x" * 50_000  # on disk, never in memory
    image = read(body(("image", "p.png", b"y" * 3000)))[0][1]
    assert image.read() == b"y" * 3000 and image.file is None
    for data, kw, status, needle in [
        (body(("image", "p.png", b"y" * 5000)), {}, 413, "limit of"),  # in memory: max_body
        (body(("steps", None, b"9" * 2000)), {"max_field_bytes": 1024}, 400, "longer than"),
        (body(*[("a", "f", b"")] * 3), {"max_files": 2}, 400, "too many files"),
        (body(("a", None, b"1"), end=False), {}, 400, "ended early"),
        (b"--b\r\nContent-Disposition: form-data\r\n\r\nx\r\n--b--\r\n", {}, 400, "no name"),
    ]:
        with pytest.raises(FormError, match=needle) as info:
            read(data, **kw)
        assert info.value.status == status
    with pytest.raises(FormError) as info:
        FormReader("application/json", limit=10)
    assert info.value.status == 415
