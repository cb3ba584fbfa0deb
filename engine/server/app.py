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
longer than ``max_video_seconds`` or frames over ``max_pixels``, unless ``width`` downscales them;
400: not a video, audio only, no frames) before it is queued, and the disk all video jobs hold is
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
                            that cannot fit even in small tiles gets 413
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

import logging
import mimetypes
import threading
from contextlib import asynccontextmanager

from onnxdream.core.errors import DependencyError

try:
    from fastapi import FastAPI
    from fastapi.staticfiles import StaticFiles
    from starlette.concurrency import run_in_threadpool
    from starlette.middleware.trustedhost import TrustedHostMiddleware
except ImportError as exc:  # pragma: no cover - exercised without the extra
    raise DependencyError(
        "the server needs the [serve] extra: pip install 'onnxdream[serve]'"
    ) from exc

from onnxdream import __version__
from onnxdream.core.errors import OnnxDreamError
from onnxdream.core.static import STATIC
from onnxdream.jobs.atlas_cache import AtlasStore
from onnxdream.jobs.config import MB, ServerConfig
from onnxdream.jobs.queue import JobManager
from onnxdream.jobs.video import WorkArea, video_problem
from onnxdream.models import model_home
from onnxdream.server.context import ServerContext
from onnxdream.server.errors import Errors, refusal
from onnxdream.server.health import HealthCheck
from onnxdream.server.middleware import BodyLimit, SecuredApp
from onnxdream.server.routes_jobs import add_job_routes
from onnxdream.server.routes_models import add_model_routes
from onnxdream.server.security import DOCS_CSP, PathScrubber, content_security_policy
from onnxdream.server.web import add_browser_routes
from onnxdream.settings.options import DreamSettings

__all__ = ["MB", "ServerConfig", "create_app", "refusal", "run"]

log = logging.getLogger("onnxdream.server")


def create_app(config: ServerConfig | None = None) -> FastAPI:
    """The FastAPI app; ``config`` defaults to :meth:`ServerConfig.from_env`."""
    config = config or ServerConfig.from_env()
    models = config.model_cache()
    jobs = JobManager(config, models)
    health_check = HealthCheck(config, models)
    area = WorkArea(config.jobs_dir or model_home() / "jobs", config.max_video_disk,
                    retry_after=lambda: max(10, jobs.retry_after()))
    video_unavailable = video_problem(config)  # None: this server dreams videos
    scrub = PathScrubber.for_server(config.model_paths, models.compiled.directory, area.root)

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

    app = SecuredApp(title="onnxdream", version=__version__, lifespan=lifespan,
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
    errors = Errors(scrub)
    errors.install(app)
    ctx = ServerContext(config=config, models=models, jobs=jobs, area=area, atlas=atlas,
                        health=health_check, errors=errors,
                        video_unavailable=video_unavailable)
    add_model_routes(app, ctx)
    add_job_routes(app, ctx)
    add_browser_routes(app, config, models)
    return app


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

