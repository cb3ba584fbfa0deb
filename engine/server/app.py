"""``onnxdream serve``: DeepDream over HTTP, with a small web page.

Endpoints (every error is a 4xx/5xx with a JSON body ``{"error": "one sentence"}``):

- ``GET  /``                    the web page: upload a photo, pick model/layer/strength, watch it
                                dream.
- ``GET  /health``              ``{"status": "ok", "version", "provider", "device", "workers",
                                "queue": {...}, "models": [loaded sessions]}``; 503 with
                                ``"status": "unavailable"`` and the reason when the server
                                cannot work (its compiled-graph cache is not writable, or
                                onnxruntime cannot create a session; checked at most every
                                ``health_ttl`` seconds).
- ``GET  /openapi.json``        the API's schema (``/docs``, the Swagger UI, only with ``--docs``:
                                it loads its script from a CDN).
- ``GET  /models``              the models this server may use (zoo + operator-allowed files).
- ``GET  /models/{name}/layers``  that model's layer names, its default and recommended layers
                                and its recommended step size.
- ``GET  /models/{name}/atlas``   thumbnails of what each recommended layer dreams:
                                ``{"state", "progress", "cell", "layers": [{"layer", "url"}]}``,
                                200 when all are there, else 202 (computing in the background
                                through the job queue; ``url`` is null until a layer's is done).
- ``GET  /models/{name}/atlas/{layer}.png``  one thumbnail (cached on disk, see
                                :mod:`onnxdream.jobs.atlas_cache`).
- ``GET  /static/...``          the page's scripts and styles.
- ``POST /dream``               multipart: an ``image`` file plus form fields named like the CLI
                                options → the dreamed image (PNG unless ``format`` says otherwise).
- ``POST /jobs``                the same form → ``202 {"id", "state", "url", "result_url"}``;
                                or a ``video`` file instead of the image: a video job
                                (:mod:`onnxdream.jobs.video`).
- ``GET  /jobs/{id}``           ``{"state": queued|running|done|failed, "progress": 0..1,
                                "eta_s", ...}``; a video job also ``"kind": "video",
                                "frames_done", "frames_total", "fps"`` (frames dreamed per
                                second), ``"stage"`` (dream, encode) and ``"frame_rate"``.
- ``GET  /jobs/{id}/result``    the image once done (409 while queued/running); a video job's
                                file, streamed (range requests work).
- ``DELETE /jobs/{id}``         cancel (cooperatively, at the next step) and forget the job (a
                                video job's folder is removed).
- ``GET  /web/...``             the page's "dream in this browser" (:mod:`onnxdream.server.web`):
                                the step graph of a model and layer, onnxruntime-web's files
                                (with ``--ort-dir``).

Form fields: ``model``, ``layer`` (repeatable, ``NAME`` or ``NAME:WEIGHT``), ``objective``,
``pre_relu``, ``octaves`` (a number, or ``auto``: the default), ``octave_scale``, ``steps``,
``step_size``, ``jitter``, ``tile_size`` (0: as large as the memory budget allows), ``normalize``,
``grad_floor``, ``max_loss``, ``seed``, ``format`` (png, jpeg, webp); the creative controls
(:mod:`onnxdream.dream.controls`): file uploads ``guide``, ``mask`` and ``mask_layers``
(repeatable), and ``feather``, ``keep_colors``, ``seamless``, ``init`` (``noise`` or ``grey``: then
no ``image``, and ``size`` ``WIDTHxHEIGHT``); ``step-size`` spellings are accepted too, unknown
fields are refused. A video job takes ``format`` mp4 (default), webm or gif, the ``video`` command's
``flow``, ``blend``, ``width``, ``start``, ``duration``, ``every``, and keyframes in ``layer``,
``steps``, ``step_size`` and ``blend`` (``0:blocks.5,5s:blocks.9``, through
:func:`onnxdream.dream.frame.keyframed_settings`, so a bad key is a 400 naming its field). ``POST
/dream`` refuses a video (before reading it) with a sentence pointing to ``/jobs``; without the
``[video]`` extra ``POST /jobs`` answers a video with 501 and the pip command, and ``/health``'s
``"video"`` says whether videos are available, and their limits. Empty values mean "the default"
(the defaults are :class:`onnxdream.settings.options.DreamSettings`'s, as for the CLI). The image
carries the same provenance as the CLI's (:mod:`onnxdream.settings.provenance`: PNG text chunks, or
an XMP packet in JPEG/WebP).

Nothing from a request becomes a filesystem path: ``model`` must be a zoo name or the file stem of
a model the operator allowed at start-up (``--model-path FILE``).

The job queue, the model cache and the configuration live in :mod:`onnxdream.jobs.queue` (no FastAPI
there), the request form and the API's schema in :mod:`onnxdream.server.form`; this module is
the HTTP layer: the app, the body limit, health, and the mapping of error *types* to statuses
(:func:`refusal`).

Resources stay bounded: one GradientModel (onnxruntime session) per (model, layers, objective
kinds, pre_relu, border), shared by all requests whatever their layer weights, in a small LRU
cache; compiled graphs on disk within ``ONNXDREAM_CACHE_MB``; a fixed pool of worker threads; at
most ``workers + max_queue`` dreams accepted at a time, a place being taken *before* the request
is read, decoded or compiled (beyond that: 503 with a ``Retry-After`` from the work waiting and
the recent speed); request bodies capped (413; a body with a video by its own, larger limit);
images capped in pixels from their header, and decoded only when their dream starts; finished
jobs expire after a TTL. Videos: the upload is streamed into its job's folder as it arrives
(:class:`~onnxdream.server.formstream.FormReader`, never held in memory), probed and checked (413:
longer
than ``max_video_seconds`` or frames over ``max_pixels``, unless ``width`` downscales them; 400:
not a video, audio only, no frames) before it is queued, and the disk all video jobs hold is
capped (413 for a job that could never fit, 503 with Retry-After when full); a job's folder goes
when it fails, is cancelled, deleted or expires, and with the server.

Every response carries the security headers of :mod:`onnxdream.server.security` (a CSP that runs
only the page's own files, ``nosniff``, no framing, no referrer); ``--trusted-host`` limits the
``Host`` headers served (Starlette's TrustedHostMiddleware: others get a plain-text 400). Error
bodies never name server paths (:class:`~onnxdream.server.security.PathScrubber`: operator models
appear by name). A dream whose objective stops being finite is a 422.

Environment variables (command-line options override them):

- ``ONNXDREAM_HOME``        where zoo models and compiled gradient graphs are cached.
- ``ONNXDREAM_THREADS``     onnxruntime intra-op threads per session (default: physical cores).
- ``ONNXDREAM_DEVICE``      auto (default), cpu or cuda.
- ``ONNXDREAM_WORKERS``     dreams run at once (default: 1 on a CPU with fewer than 8 cores,
                            else 2; onnxruntime already spreads one dream over all cores).
- ``ONNXDREAM_MAX_QUEUE``   dreams that may wait beyond the running ones (default 16).
- ``ONNXDREAM_MAX_PIXELS``  largest image accepted, width x height (default 16,000,000).
- ``ONNXDREAM_MAX_BODY_MB`` largest request body in megabytes (default 32).
- ``ONNXDREAM_MAX_STEPS``   most ascent steps (octaves x steps) one dream may ask for
                            (default 1000).
- ``ONNXDREAM_MAX_MEMORY_MB`` memory the running dreams may take together, shared equally by
                            the workers (default: half the cgroup's or the machine's memory); each
                            dream's tiles are the largest that fit its share, and a dream
                            that
                            cannot fit even in small tiles gets 413
                            (:mod:`onnxdream.settings.memory`).
- ``ONNXDREAM_JOB_TTL``     seconds a finished job (and its image) is kept (default 600).
- ``ONNXDREAM_CACHE_SIZE``  sessions kept loaded, least recently used dropped first (default 4).
- ``ONNXDREAM_CACHE_MB``    disk budget of the compiled-graph cache, least recently used graphs
                            removed first (default 512).
- ``ONNXDREAM_TRUSTED_HOSTS`` Host headers accepted, comma-separated (``example.com``,
                            ``*.example.com``); default: any (``onnxdream serve`` on a loopback
                            address accepts only localhost names unless told otherwise).
- ``ONNXDREAM_MODEL_PATHS`` extra dreamable .onnx files, separated by ``os.pathsep``; each is
                            offered under its file stem (like ``--model-path``).
- ``ONNXDREAM_ORT_DIR``     an unpacked onnxruntime-web npm package: the page then offers
                            "dream in this browser" (like ``--ort-dir``).
- ``ONNXDREAM_MAX_VIDEO_SECONDS`` longest clip (the part dreamed) a video job takes (default
                            60; 0 turns video jobs off).
- ``ONNXDREAM_MAX_VIDEO_MB`` largest request body carrying a video, in MB (default 256).
- ``ONNXDREAM_MAX_VIDEO_DISK_MB`` disk all video jobs together may hold: uploads, dreamed
                            frames, results (default 4096).
- ``ONNXDREAM_JOBS_DIR``    where video jobs keep their files (default ``$ONNXDREAM_HOME/jobs``);
                            folders of servers that stopped are removed at start.
"""

from __future__ import annotations

import asyncio
import logging
import math
import mimetypes
import re
import threading
import time
from pathlib import Path
from typing import Any

from onnxdream import __version__
from onnxdream.core.errors import (
    DependencyError,
    ImageTooLargeError,
    MemoryBudgetError,
    ModelError,
    NonFiniteError,
    OnnxDreamError,
    SettingsError,
    VideoTooLargeError,
    first_line,
)
from onnxdream.core.static import STATIC
from onnxdream.dream.controls import Controls
from onnxdream.jobs.atlas_cache import AtlasStore, ThumbnailMissing
from onnxdream.jobs.queue import (
    CANCELLED,
    DONE,
    FAILED,
    MB,
    QUEUED,
    RUNNING,
    SHUTDOWN,
    DreamRequest,
    Job,
    JobError,
    JobManager,
    ModelCache,
    QueueFull,
    ServerConfig,
    ShuttingDown,
    UnknownJob,
)
from onnxdream.jobs.video import (
    VIDEO_FORMATS,
    VideoOptions,
    WorkArea,
    WorkSpaceFull,
    prepare_video,
    video_problem,
)
from onnxdream.server.form import (
    DREAM_ERRORS,
    ERROR_OR_STATUS,
    FORMATS,
    IMAGE_BODY,
    JOB_VIEW,
    RESULT_BODY,
    VIDEO_TO_JOBS,
    ApiError,
    build_settings,
    error_responses,
    form_field,
    form_schema,
    parse_fields,
)
from onnxdream.server.formstream import FilePart, FormError, FormReader
from onnxdream.server.security import (
    DOCS_CSP,
    PathScrubber,
    SecurityHeaders,
    content_security_policy,
)
from onnxdream.settings.options import DreamSettings
from onnxdream.settings.resolve import step_size_for

try:
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
    from fastapi.staticfiles import StaticFiles
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.middleware.trustedhost import TrustedHostMiddleware
    from starlette.requests import ClientDisconnect
except ImportError as exc:  # pragma: no cover - exercised without the extra
    raise DependencyError(
        "the server needs the [serve] extra: pip install 'onnxdream[serve]'"
    ) from exc

log = logging.getLogger("onnxdream.server")

# ---------------------------------------------------------------------------------------------
# Errors: types → statuses


def refusal(exc: BaseException) -> ApiError:
    """The response for an error, chosen by its type (never by its message's text)."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, FormError):
        return ApiError(exc.status, exc.message)
    if isinstance(exc, (QueueFull, WorkSpaceFull)):
        return ApiError(503, str(exc), {"Retry-After": str(exc.retry_after)})
    if isinstance(exc, ShuttingDown):
        return ApiError(503, str(exc), {"Retry-After": "10"})
    if isinstance(exc, UnknownJob):
        return ApiError(404, str(exc))
    if isinstance(exc, ImageTooLargeError):  # too many pixels, or a decompression bomb
        return ApiError(413, f"{exc.summary}; send a smaller image")
    if isinstance(exc, MemoryBudgetError):  # the image cannot be dreamed within the budget
        return ApiError(413, f"{exc}; send a smaller image")
    if isinstance(exc, VideoTooLargeError):  # too long, too many pixels, too much disk
        return ApiError(413, str(exc))
    if isinstance(exc, DependencyError):  # e.g. video without the [video] extra
        return ApiError(501, str(exc))
    if isinstance(exc, SettingsError):
        return ApiError(400, exc.named(form_field(exc.field)))
    if isinstance(exc, NonFiniteError):  # well-formed, but this dream cannot be computed
        return ApiError(422, str(exc))
    if isinstance(exc, OnnxDreamError):
        return ApiError(400, str(exc))
    return ApiError(500, f"internal error: {type(exc).__name__}")


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """An error response, ``{"error": message}`` (the app's handlers take server paths out of
    ``message`` first: ``create_app``'s ``error``)."""
    return JSONResponse({"error": message}, status_code=status, headers=headers)


# ---------------------------------------------------------------------------------------------
# Body size limit (pure ASGI, so it also covers chunked uploads)


class BodyLimit:
    """413 when Content-Length says too much, or once the streamed body passes the limit.

    ``larger`` maps a path to a higher limit for its POSTs (``/jobs``, which takes videos; the
    form reader holds other uploads to ``max_body``)."""

    def __init__(self, app, max_body: int, larger: dict[str, int] | None = None):
        self.app = app
        self.max_body = max_body
        self.larger = larger or {}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_body
        if scope.get("method") == "POST":
            limit = max(limit, self.larger.get(scope.get("path", ""), 0))
        what = "" if limit == self.max_body else " for videos"
        message = (f"the request body is larger than this server's limit{what} of "
                   f"{limit / MB:g} MB")
        for key, value in scope.get("headers", []):
            if key == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    await _error(400, "bad Content-Length header")(scope, receive, send)
                    return
                if length > limit:
                    await _error(413, message, {"Connection": "close"})(scope, receive, send)
                    return
        received = 0

        async def limited_receive():
            nonlocal received
            msg = await receive()
            if msg["type"] == "http.request":
                received += len(msg.get("body", b""))
                if received > limit:
                    raise HTTPException(413, message)
            return msg

        await self.app(scope, limited_receive, send)


# ---------------------------------------------------------------------------------------------
# Health


class HealthCheck:
    """Whether this server can dream: its compiled-graph cache takes a file, and onnxruntime
    creates (and runs) a session on the configured device. The answer is reused for
    ``config.health_ttl`` seconds; None when healthy, else one sentence without paths."""

    def __init__(self, config: ServerConfig, models: ModelCache):
        self.config, self.models = config, models
        self._lock = threading.Lock()
        self._checked = -math.inf
        self._problem: str | None = None

    def problem(self) -> str | None:
        with self._lock:
            if time.monotonic() - self._checked >= self.config.health_ttl:
                self._problem = self._check()
                self._checked = time.monotonic()
            return self._problem

    def _check(self) -> str | None:
        try:
            self.models.compiled.check_writable()
        except OSError as exc:
            why = exc.strerror or type(exc).__name__
            return f"the compiled-graph cache directory is not writable ({why})"
        try:
            import numpy as np

            from onnxdream.exporters.graph.builder import probe_model
            from onnxdream.runtime.session import create_session

            session = create_session(probe_model().SerializeToString(),
                                     device=self.config.device, threads=1)
            session.run(["y"], {"x": np.zeros(1, np.float32)})
        except Exception as exc:  # noqa: BLE001 - whatever it is, the server cannot work
            return f"onnxruntime cannot create a session ({first_line(exc, 120)})"
        return None


# ---------------------------------------------------------------------------------------------
# The app


class _App(FastAPI):
    """FastAPI with :class:`SecurityHeaders` around the whole stack (the 500s of Starlette's
    outermost error middleware included)."""

    def build_middleware_stack(self):
        return SecurityHeaders(super().build_middleware_stack(), self.state.csp_by_path)


def create_app(config: ServerConfig | None = None) -> FastAPI:
    """The FastAPI app; ``config`` defaults to :meth:`ServerConfig.from_env`."""
    config = config or ServerConfig.from_env()
    models = ModelCache(config)
    jobs = JobManager(config, models)
    health_check = HealthCheck(config, models)
    from onnxdream.models import model_home

    area = WorkArea(config.jobs_dir or model_home() / "jobs", config.max_video_disk,
                    retry_after=lambda: max(10, jobs.retry_after()))
    video_unavailable = video_problem(config)  # None: this server dreams videos
    scrub = PathScrubber.for_server(config.model_paths, models.compiled.directory, area.root)

    from contextlib import asynccontextmanager

    def preload() -> None:  # the default dream is ready before the first request asks
        try:
            models.get(DreamSettings())
        except Exception as exc:  # noqa: BLE001 - the first request will report it properly
            log.warning("could not preload %s: %s", DreamSettings.model, exc)

    @asynccontextmanager
    async def lifespan(app):
        models.compiled.sweep()  # temporary files of writes killed an hour or more ago
        if video_unavailable is None:
            try:  # this server's folder for video jobs; those of servers that died are removed
                await run_in_threadpool(area.open)
            except OnnxDreamError as exc:
                log.warning("%s", exc)  # each video request will say so
        jobs.start()
        threading.Thread(target=preload, name="onnxdream-preload", daemon=True).start()
        yield
        jobs.stop()
        area.close()

    app = _App(title="onnxdream", version=__version__, lifespan=lifespan,
               docs_url="/docs" if config.docs else None, redoc_url=None)
    atlas = AtlasStore(models, jobs)
    app.state.config, app.state.models, app.state.jobs = config, models, jobs
    app.state.atlas = atlas
    app.state.video_area = area
    app.state.csp_by_path = {"/docs": content_security_policy(DOCS_CSP)} if config.docs else {}
    app.add_middleware(BodyLimit, max_body=config.max_body,
                       larger={"/jobs": config.max_video_body} if video_unavailable is None
                       else None)
    if config.trusted_hosts:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(config.trusted_hosts))
    mimetypes.add_type("text/javascript", ".mjs")  # the browser path's module
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    from onnxdream.server.web import add_browser_routes

    add_browser_routes(app, config, models)

    def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
        """THE error response of this app: server paths are taken out of every message."""
        return _error(status, scrub(message), headers)

    def respond(err: ApiError) -> JSONResponse:
        return error(err.status, err.message, err.headers)

    async def _refused(request, exc: Exception):
        return respond(refusal(exc))  # an ApiError as it is; the others by their type

    for refused in (ApiError, OnnxDreamError, JobError, FormError):
        app.add_exception_handler(refused, _refused)

    @app.exception_handler(HTTPException)
    async def _http_error(request, exc: HTTPException):
        return error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()))
        return error(422, f"{where}: {first.get('msg', 'invalid request')}")

    @app.exception_handler(Exception)
    async def _internal_error(request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error(500, f"internal error: {type(exc).__name__}")

    async def read_request(request: Request, *, videos: bool = False):
        """The form → a checked request (call within an admission): a DreamRequest (the image
        held encoded, its header read) or, with ``videos`` (``POST /jobs``), a VideoRequest
        (the clip streamed into its job's folder as it arrives, then probed and checked)."""
        ctype = request.headers.get("content-type", "")
        if not ctype.startswith("multipart/form-data"):
            raise ApiError(415, "send multipart/form-data with the photo in a field named "
                                "'image'" + (" (or a clip in 'video')" if videos else ""))
        upload: dict[str, Any] = {}  # the video's space, path and open file, once it arrives

        def on_file(reader: FormReader, part: FilePart):
            if upload:  # after a video nothing more may come (its limit is the video's)
                raise ApiError(400, "send one file per request: an 'image' or a 'video'")
            if part.name.replace("-", "_").lower() != "video":
                return None  # a photo: in memory, within max_body
            if not videos:
                raise ApiError(400, VIDEO_TO_JOBS)
            if video_unavailable is not None:
                raise ApiError(501, video_unavailable)
            try:
                length = int(request.headers.get("content-length", ""))
            except ValueError:
                length = config.max_video_body
            space = upload["space"] = area.new_space(min(length, config.max_video_body))
            upload["path"] = space.path / f"upload{_suffix(part.filename)}"
            upload["file"] = open(upload["path"], "wb")  # noqa: SIM115 - closed below
            reader.limit = config.max_video_body
            return upload["file"]

        try:
            try:
                reader = FormReader(ctype, limit=config.max_body, on_file=on_file)
                try:
                    items = await reader.read(request.stream())
                except ClientDisconnect:
                    raise ApiError(400, "the upload was cut off (the client went away)") from None
                form = parse_fields(items)
            finally:
                if "file" in upload:
                    upload["file"].close()
            if form.video:
                f = form.fields
                options = VideoOptions(fmt=str(f.get("format", "mp4")).lower(),
                                       flow=f.get("flow", True), blend=f.get("blend"),
                                       width=f.get("width"), start=f.get("start", 0.0),
                                       duration=f.get("duration"), every=f.get("every", 1))
                return await run_in_threadpool(prepare_video, upload["space"], upload["path"],
                                               options, f, form.layers, form.keyed, config,
                                               models)
        except BaseException:
            if "space" in upload:
                upload["space"].release()
            raise
        fields, layers, upload = form.fields, form.layers, form.upload
        if upload is not None and upload.content_type.lower().startswith("video/"):
            raise ApiError(400, "the 'image' file is a video: " + (
                "send it as the 'video' file" if videos else VIDEO_TO_JOBS))
        fmt = str(fields.get("format", "png")).lower()
        if fmt not in FORMATS:
            raise ApiError(400, f"format must be png, jpeg or webp for a photo, got "
                                f"{fmt[:20]!r}")
        settings = build_settings({**fields, **form.pictures}, layers, config)
        models.source(settings.model)  # an allowed name, or ModelError now
        controls = await run_in_threadpool(lambda: Controls.from_bytes(
            max_pixels=config.max_pixels, **form.pictures)) if form.pictures else None
        req = await run_in_threadpool(  # the header only: decoded when the dream starts
            DreamRequest.from_bytes, settings, fmt,
            upload.read() if upload is not None else None, config.max_pixels, controls)
        # bad layer/objective: 400 now; a compile runs one at a time, within the admission
        await run_in_threadpool(models.get, settings)
        return req

    async def submit(request: Request, *, track: bool, videos: bool = False) -> Job:
        """Admit first (a full queue: 503 before the body is even read), then read and check."""
        with jobs.admit() as admission:
            req = await read_request(request, videos=videos)
            try:
                return jobs.submit(req, track=track, admission=admission)
            except BaseException:
                req.release()  # a video's folder, if the queue refuses it after all
                raise

    def video_response(job: Job) -> Response:
        path = job.result_path
        if path is None or not path.is_file():
            return error(404, f"job {job.id}'s video is gone (deleted or expired)")
        ext = job.request.fmt
        return FileResponse(path, media_type=VIDEO_FORMATS[ext],
                            filename=f"dream-{job.id[:8]}.{ext}", content_disposition_type="inline",
                            headers=result_headers(job))

    def image_response(job: Job) -> Response:
        media, ext = FORMATS[job.request.fmt]
        headers = {"Content-Disposition": f'inline; filename="dream-{job.id[:8]}.{ext}"',
                   **result_headers(job)}
        return Response(job.result, media_type=media, headers=headers)

    def result_headers(job: Job) -> dict[str, str]:
        """What every dream's response says of it: its seed, provider and seconds (no caching)."""
        return {"X-Onnxdream-Seed": str(job.request.settings.seed),
                "X-Onnxdream-Provider": job.provider or "",
                "X-Onnxdream-Seconds": f"{(job.finished or 0) - (job.started or 0):.2f}",
                "Cache-Control": "no-store"}

    def failed_response(job: Job) -> JSONResponse:
        if job.state == CANCELLED:
            if job.shutdown:
                return error(503, SHUTDOWN, {"Retry-After": "10"})
            return error(499, job.error or "cancelled")
        if job.exception is not None:
            return respond(refusal(job.exception))
        return error(500, job.error or "the dream failed")

    def job_view(job: Job, position: int | None = None) -> dict[str, Any]:
        body = job.view(position)
        if "error" in body:
            body["error"] = scrub(body["error"])
        return body

    def video_status() -> dict[str, Any]:
        """Whether this server dreams videos, and within which limits (for /health)."""
        if video_unavailable is not None:
            return {"available": False, "reason": video_unavailable}
        return {"available": True, "formats": list(VIDEO_FORMATS),
                "max_seconds": config.max_video_seconds,
                "max_mb": round(config.max_video_body / MB, 2),
                "disk_mb": {"used": round(area.used / MB, 1),
                            "limit": round(config.max_video_disk / MB, 1)}}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index():
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"),
                            headers={"Cache-Control": "no-cache"})

    @app.get("/health", responses={503: {"description": "The server cannot dream now",
                                         **ERROR_OR_STATUS}})
    async def health():
        problem = await run_in_threadpool(health_check.problem)
        body = {"status": "ok" if problem is None else "unavailable", "version": __version__,
                "provider": models.provider(), "device": config.device,
                "workers": config.workers, "queue": jobs.stats(),
                "max_pixels": config.max_pixels, "max_body_mb": round(config.max_body / MB, 2),
                "max_memory_mb": config.max_memory_mb, "video": video_status(),
                "models": models.loaded()}
        if problem is not None:
            body["error"] = scrub(problem)
            return JSONResponse(body, status_code=503, headers={"Retry-After": "30"})
        return body

    @app.get("/models")
    async def list_models():
        from onnxdream.models import DEFAULT_MODEL, list_zoo

        rows = [{"name": e.name, "default": e.name == DEFAULT_MODEL, "source": "zoo",
                 "installed": e.installed, "input_size": e.input_size,
                 "default_layers": list(e.default_layers),
                 "recommended_layers": list(e.recommended_layers), "step_size": e.step_size,
                 "description": e.description, "license": e.license} for e in list_zoo()]
        rows += [{"name": name, "default": False, "source": "file", "installed": True,
                  "input_size": None, "default_layers": None, "recommended_layers": None,
                  "step_size": None, "description": f"{path.name}", "license": None}
                 for name, path in config.model_paths.items()]
        return {"models": rows, "default": DEFAULT_MODEL}

    @app.get("/models/{name}/layers", responses=error_responses(400, 404))
    async def model_layers(name: str):
        try:
            models.source(name)
        except ModelError as exc:
            raise ApiError(404, str(exc)) from None
        info = await run_in_threadpool(models.info, name)
        return {"model": name, "layers": list(info.layers),
                "default_layers": list(info.default_layers),
                "recommended_layers": list(info.recommended_layers),
                "step_size": step_size_for(DreamSettings(), info)}

    @app.get("/models/{name}/atlas", responses=error_responses(
        404, 500, 503, _202={"description": "Some thumbnails are still being made (see "
                                            "Retry-After); the ones so far are listed"}))
    async def model_atlas(name: str):
        try:
            models.source(name)
        except ModelError as exc:
            raise ApiError(404, str(exc)) from None
        status, body, headers = await run_in_threadpool(atlas.status, name)
        return JSONResponse(body, status_code=status,
                            headers={"Cache-Control": "no-store", **headers})

    @app.get("/models/{name}/atlas/{file}", response_class=Response, responses=error_responses(
        404, 500, _200={"description": "The thumbnail", "content": {
            "image/png": {"schema": {"type": "string", "format": "binary"}}}}))
    async def atlas_thumbnail(name: str, file: str):
        try:
            models.source(name)
            if not file.endswith(".png"):
                raise ThumbnailMissing(f"no thumbnail '{file[:80]}': thumbnails end in .png")
            path = await run_in_threadpool(atlas.thumbnail, name, file[:-len(".png")])
        except (ModelError, ThumbnailMissing) as exc:
            raise ApiError(404, str(exc)) from None
        # the URL carries the model's digest (?v=), so a thumbnail may be kept a long time
        return FileResponse(path, media_type="image/png",
                            headers={"Cache-Control": "public, max-age=86400"})

    @app.post("/dream", openapi_extra=form_schema(), response_class=Response,
              responses=error_responses(*DREAM_ERRORS, _200={"description": "The dreamed image",
                                                      **IMAGE_BODY}))
    async def dream_now(request: Request):
        job = await submit(request, track=False)
        future = asyncio.wrap_future(job.future)
        while not future.done():
            await asyncio.wait({future}, timeout=1.0)
            if not future.done() and await request.is_disconnected():
                jobs.cancel(job)  # nobody is waiting for it any more
                return error(499, "the client went away")
        if job.state == DONE:
            return image_response(job)
        return failed_response(job)

    @app.post("/jobs", status_code=202, openapi_extra=form_schema(video=True),
              responses=error_responses(*DREAM_ERRORS, 501, _202={"description": "Queued",
                                                           **JOB_VIEW}))
    async def create_job(request: Request):
        job = await submit(request, track=True, videos=True)
        body = job_view(job)
        body["url"] = f"/jobs/{job.id}"
        body["result_url"] = f"/jobs/{job.id}/result"
        return JSONResponse(body, status_code=202, headers={"Location": f"/jobs/{job.id}"})

    @app.get("/jobs/{job_id}", responses=error_responses(404, _200={"description": "The job",
                                                             **JOB_VIEW}))
    async def job_status(job_id: str):
        job, position = jobs.get(job_id)
        return job_view(job, position)

    @app.get("/jobs/{job_id}/result", response_class=Response,
             responses=error_responses(*DREAM_ERRORS, 404, 409, _200={
                 "description": "The dreamed image, or video (range requests work)",
                 **RESULT_BODY}))
    async def job_result(job_id: str):
        job, _ = jobs.get(job_id)
        if job.state == DONE:
            return video_response(job) if job.request.kind == "video" else image_response(job)
        if job.state == FAILED:
            return failed_response(job)
        return error(409, f"job {job.id} is {job.state}: poll /jobs/{job.id} until its "
                          "state is done", {"Retry-After": "1"})

    @app.delete("/jobs/{job_id}", responses=error_responses(404))
    async def delete_job(job_id: str):
        job, _ = jobs.get(job_id)
        previous = job.state
        jobs.cancel(job)
        return {"id": job.id, "state": CANCELLED if previous in (QUEUED, RUNNING) else previous,
                "deleted": True}

    return app


def _suffix(filename: str) -> str:
    """The upload's extension, if it looks like one (FFmpeg probes the content anyway)."""
    suffix = Path(filename or "").suffix.lower()
    return suffix if re.fullmatch(r"\.[a-z0-9]{1,8}", suffix) else ""


def run(config: ServerConfig, host: str = "127.0.0.1", port: int = 8000,
        log_level: str = "info") -> None:
    """Serve ``create_app(config)`` with uvicorn until interrupted."""
    try:
        import uvicorn
    except ImportError as exc:
        raise DependencyError(
            "the server needs the [serve] extra: pip install 'onnxdream[serve]'") from exc
    app = create_app(config)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            # cancel the dreams first, so requests waiting on them get their 503 and uvicorn's
            # graceful shutdown does not wait for minutes of work nobody will collect
            threading.Thread(target=app.state.jobs.stop, kwargs={"timeout": 0}, daemon=True).start()
            super().handle_exit(sig, frame)

    Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                          timeout_graceful_shutdown=5, server_header=False)).run()


# the job queue's names, re-exported for callers that imported them from here
__all__ = ["ApiError", "BodyLimit", "DreamRequest", "Job", "JobManager", "MB", "ModelCache",
           "ServerConfig", "build_settings", "create_app", "form_field", "parse_fields",
           "refusal", "run"]
