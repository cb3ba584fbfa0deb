"""``onnxdream serve``: DeepDream over HTTP, with a small web page.

Endpoints (every error is a 4xx/5xx with a JSON body ``{"error": "one sentence"}``):

- ``GET  /``                    the web page: upload a photo, pick model/layer/strength, watch it dream.
- ``GET  /health``              ``{"status": "ok", "version", "provider", "device", "workers",
                                "queue": {...}, "models": [loaded sessions]}``.
- ``GET  /models``              the models this server may use (zoo + operator-allowed files).
- ``GET  /models/{name}/layers``  that model's layer names and its default layer(s).
- ``POST /dream``               multipart: an ``image`` file plus form fields named like the CLI
                                options → the dreamed image (PNG unless ``format`` says otherwise).
- ``POST /jobs``                the same form → ``202 {"id", "state", "url", "result_url"}``.
- ``GET  /jobs/{id}``           ``{"state": queued|running|done|failed, "progress": 0..1, "eta_s", ...}``.
- ``GET  /jobs/{id}/result``    the image once done (409 while queued/running).
- ``DELETE /jobs/{id}``         cancel (cooperatively, at the next step) and forget the job.

Form fields: ``model``, ``layer`` (repeatable, ``NAME`` or ``NAME:WEIGHT``), ``objective``,
``pre_relu``, ``octaves``, ``octave_scale``, ``steps``, ``step_size``, ``jitter``, ``tile_size``,
``normalize``, ``max_loss``, ``seed``, ``format`` (png, jpeg, webp); the creative controls
(:mod:`onnxdream.controls`): file uploads ``guide``, ``mask`` and ``mask_layers`` (repeatable),
and ``feather``, ``keep_colors``, ``seamless``, ``init`` (``noise`` or ``grey``: then no
``image``, and ``size`` ``WIDTHxHEIGHT``); ``step-size`` spellings are accepted too, unknown
fields are refused. Empty values mean "the default" (the defaults are
:class:`onnxdream.settings.DreamSettings`'s, as for the CLI). The image carries the same provenance
as the CLI's (:mod:`onnxdream.provenance`: PNG text chunks, or an XMP packet in JPEG/WebP).

Nothing from a request becomes a filesystem path: ``model`` must be a zoo name or the file stem of
a model the operator allowed at start-up (``--model-path FILE``).

The job queue, the model cache and the configuration live in :mod:`onnxdream.jobs` (no FastAPI
there); this module is the HTTP layer: the app, the body limit, form parsing, and the mapping of
error *types* to statuses (:func:`refusal`).

Resources stay bounded: one GradientModel (onnxruntime session) per (model, layers, objective,
pre_relu, border), shared by all requests, in a small LRU cache; a fixed pool of worker threads; at most
``workers + max_queue`` dreams accepted at a time (beyond that: 503 with ``Retry-After``); request
bodies capped (413); images capped in pixels before decoding; finished jobs expire after a TTL.

Environment variables (command-line options override them):

- ``ONNXDREAM_HOME``        where zoo models and compiled gradient graphs are cached.
- ``ONNXDREAM_THREADS``     onnxruntime intra-op threads per session (default: physical cores).
- ``ONNXDREAM_DEVICE``      auto (default), cpu or cuda.
- ``ONNXDREAM_WORKERS``     dreams run at once (default: 1 on a CPU with fewer than 8 cores,
                            else 2; onnxruntime already spreads one dream over all cores).
- ``ONNXDREAM_MAX_QUEUE``   dreams that may wait beyond the running ones (default 16).
- ``ONNXDREAM_MAX_PIXELS``  largest image accepted, width x height (default 16,000,000).
- ``ONNXDREAM_MAX_BODY_MB`` largest request body in megabytes (default 32).
- ``ONNXDREAM_MAX_STEPS``   most ascent steps (octaves x steps) one dream may ask for (default 1000).
- ``ONNXDREAM_JOB_TTL``     seconds a finished job (and its image) is kept (default 600).
- ``ONNXDREAM_CACHE_SIZE``  sessions kept loaded, least recently used dropped first (default 4).
- ``ONNXDREAM_MODEL_PATHS`` extra dreamable .onnx files, separated by ``os.pathsep``; each is
                            offered under its file stem (like ``--model-path``).
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
from pathlib import Path
from typing import Any

from onnxdream import __version__
from onnxdream.controls import Controls
from onnxdream.errors import (
    DependencyError,
    ImageTooLargeError,
    ModelError,
    OnnxDreamError,
    SettingsError,
    did_you_mean,
)
from onnxdream.jobs import (
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
from onnxdream.settings import ASCENT_FIELDS, DreamSettings

try:
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from starlette.concurrency import run_in_threadpool
    from starlette.datastructures import UploadFile
    from starlette.exceptions import HTTPException
except ImportError as exc:  # pragma: no cover - exercised without the extra
    raise DependencyError(
        "the server needs the [serve] extra: pip install 'onnxdream[serve]'"
    ) from exc

log = logging.getLogger("onnxdream.server")

STATIC = Path(__file__).resolve().parent / "static"
MAX_LAYERS = 8
FORMATS = {"png": ("image/png", "png"), "jpeg": ("image/jpeg", "jpg"),
           "jpg": ("image/jpeg", "jpg"), "webp": ("image/webp", "webp")}


# ---------------------------------------------------------------------------------------------
# Errors: types → statuses


class ApiError(Exception):
    """A request the server refuses: an HTTP status and one sentence."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def form_field(field: str) -> str:
    """A settings field as this API's form field names it."""
    return {"layers": "layer"}.get(field, field)


def refusal(exc: BaseException) -> ApiError:
    """The response for an error, chosen by its type (never by its message's text)."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, QueueFull):
        return ApiError(503, str(exc), {"Retry-After": str(exc.retry_after)})
    if isinstance(exc, ShuttingDown):
        return ApiError(503, str(exc), {"Retry-After": "10"})
    if isinstance(exc, UnknownJob):
        return ApiError(404, str(exc))
    if isinstance(exc, ImageTooLargeError):  # too many pixels, or a decompression bomb
        return ApiError(413, f"{exc.summary}; send a smaller image")
    if isinstance(exc, SettingsError):
        return ApiError(400, exc.named(form_field(exc.field)))
    if isinstance(exc, OnnxDreamError):
        return ApiError(400, str(exc))
    return ApiError(500, f"internal error: {type(exc).__name__}")


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _respond(err: ApiError) -> JSONResponse:
    return _error(err.status, err.message, err.headers)


# ---------------------------------------------------------------------------------------------
# Form parsing


_TYPES: dict[str, type] = {"model": str, "objective": str, "pre_relu": bool, "octaves": int,
                           "octave_scale": float, "steps": int, "step_size": float,
                           "jitter": int, "tile_size": int, "normalize": str, "max_loss": float,
                           "seed": int, "format": str, "feather": int, "keep_colors": bool,
                           "init": str, "size": str, "seamless": bool}
#: file fields besides ``image`` (the creative controls' pictures); mask_layers repeats
UPLOADS = ("guide", "mask", "mask_layers")
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


def _convert(name: str, text: str) -> Any:
    kind = _TYPES[name]
    text = text.strip()
    if len(text) > 200:
        raise ApiError(400, f"field '{name}' is too long ({len(text)} characters)")
    try:
        if kind is int:
            return int(text)
        if kind is float:
            value = float(text)
            if not math.isfinite(value):
                raise ValueError
            return value
    except ValueError:
        what = "an integer" if kind is int else "a finite number"
        raise ApiError(400, f"field '{name}' must be {what}, got {text[:40]!r}") from None
    if kind is bool:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise ApiError(400, f"field '{name}' must be true or false, got {text[:40]!r}")
    return text


def parse_fields(items: list[tuple[str, Any]]) -> tuple[dict[str, Any], list[str], Any]:
    """Multipart items → (scalar fields, layers, the image upload)."""
    fields: dict[str, Any] = {}
    layers: list[str] = []
    image = None
    known = ["image", "layer", *_TYPES, *UPLOADS]
    for raw_name, value in items:
        name = raw_name.replace("-", "_").lower()
        if name in UPLOADS:  # kept as uploads under their field name (mask_layers: a list)
            if not isinstance(value, UploadFile):
                raise ApiError(400, f"'{name}' must be a file upload (an image)")
            if name == "mask_layers":
                fields.setdefault(name, []).append(value)
            elif name in fields:
                raise ApiError(400, f"send one '{name}' file per request")
            else:
                fields[name] = value
            continue
        if name == "image":
            if image is not None:
                raise ApiError(400, "send one 'image' file per request")
            if not isinstance(value, UploadFile):
                raise ApiError(400, "'image' must be a file upload (multipart/form-data)")
            image = value
            continue
        if isinstance(value, UploadFile):
            raise ApiError(400, f"field '{raw_name[:40]}' must be a plain value, not a file")
        if name == "layer":
            text = value.strip()
            if text:
                if len(text) > 200:
                    raise ApiError(400, "a 'layer' value is too long")
                layers.append(text)
            continue
        if name not in _TYPES:
            raise ApiError(400, f"unknown field '{raw_name[:40]}' (fields: {', '.join(known)})"
                                f"{did_you_mean(name[:40], known)}")
        if name in fields:
            raise ApiError(400, f"field '{name}' is given twice")
        if value.strip():
            fields[name] = _convert(name, value)
    if len(layers) > MAX_LAYERS:
        raise ApiError(400, f"at most {MAX_LAYERS} 'layer' fields per dream, got {len(layers)}")
    if image is None and not fields.get("init"):
        raise ApiError(400, "no 'image' file in the request: send multipart/form-data with "
                            "the photo in a field named 'image' (or init=noise and a size)")
    if image is not None and fields.get("init"):
        raise ApiError(400, "init starts a dream without a photo: send no 'image' with it")
    return fields, layers, image




def build_settings(fields: dict[str, Any], layers: list[str], config: ServerConfig) -> DreamSettings:
    """Form values → a validated DreamSettings with its seed fixed (defaults from settings)."""
    given = {k: fields.get(k) for k in ("model", "objective", "pre_relu", "seed", *ASCENT_FIELDS,
                                        "feather", "keep_colors", "init", "size", "seamless")}
    if given["init"] and not given["size"]:
        given["size"] = "512x512"
    # the uploads by placeholder names (their content hashes go into the provenance)
    given["guide"] = "GUIDE" if "guide" in fields else None
    given["mask"] = "MASK" if "mask" in fields else None
    given["mask_layers"] = [f"MASK{i + 1}" for i in range(len(fields.get("mask_layers", [])))]
    settings = DreamSettings.from_options(layers=layers or None, **given).with_seed()
    if settings.octaves * settings.steps > config.max_steps:
        raise ApiError(400, f"octaves x steps is {settings.octaves * settings.steps}, more than "
                            f"this server's limit of {config.max_steps}")
    return settings


def start_image(data: bytes | None, settings: DreamSettings, max_pixels: int):
    """The decoded upload, or the start of a dream from ``init`` (noise or grey) when there is
    none."""
    from onnxdream.controls import init_image
    from onnxdream.imageio import LoadedImage, load_image_bytes

    if data is not None:
        return load_image_bytes(data, name="the uploaded image", max_pixels=max_pixels)
    w, h = settings.size
    if w * h > max_pixels:
        raise ApiError(413, f"size {w}x{h} is more than this server's limit of {max_pixels:,} "
                            "pixels")
    return LoadedImage(init_image(settings.init, (h, w), settings.seed), None, "RGB", (w, h))


# ---------------------------------------------------------------------------------------------
# Body size limit (pure ASGI, so it also covers chunked uploads)


class BodyLimit:
    """413 when Content-Length says too much, or once the streamed body passes the limit."""

    def __init__(self, app, max_body: int):
        self.app = app
        self.max_body = max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_body
        message = (f"the request body is larger than this server's limit of "
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
# The app


def create_app(config: ServerConfig | None = None) -> FastAPI:
    """The FastAPI app; ``config`` defaults to :meth:`ServerConfig.from_env`."""
    config = config or ServerConfig.from_env()
    models = ModelCache(config)
    jobs = JobManager(config, models)

    from contextlib import asynccontextmanager

    def preload() -> None:  # the default dream is ready before the first request asks
        try:
            models.get(DreamSettings().gradient_key())
        except Exception as exc:  # noqa: BLE001 - the first request will report it properly
            log.warning("could not preload %s: %s", DreamSettings.model, exc)

    @asynccontextmanager
    async def lifespan(app):
        jobs.start()
        threading.Thread(target=preload, name="onnxdream-preload", daemon=True).start()
        yield
        jobs.stop()

    app = FastAPI(title="onnxdream", version=__version__, lifespan=lifespan,
                  docs_url="/docs", redoc_url=None)
    app.state.config, app.state.models, app.state.jobs = config, models, jobs
    app.add_middleware(BodyLimit, max_body=config.max_body)

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return _respond(exc)

    @app.exception_handler(OnnxDreamError)
    async def _user_error(request, exc: OnnxDreamError):
        return _respond(refusal(exc))

    @app.exception_handler(JobError)
    async def _job_error(request, exc: JobError):
        return _respond(refusal(exc))

    @app.exception_handler(HTTPException)
    async def _http_error(request, exc: HTTPException):
        return _error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()))
        return _error(422, f"{where}: {first.get('msg', 'invalid request')}")

    @app.exception_handler(Exception)
    async def _internal_error(request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return _error(500, f"internal error: {type(exc).__name__}")

    async def read_request(request: Request) -> DreamRequest:
        ctype = request.headers.get("content-type", "")
        if not ctype.startswith("multipart/form-data"):
            raise ApiError(415, "send multipart/form-data with the photo in a field named 'image'")
        async with request.form(max_files=12, max_fields=64) as form:
            fields, layers, upload = parse_fields(list(form.multi_items()))
            data = await upload.read() if upload is not None else None
            pictures = {k: ([await f.read() for f in fields[k]] if k == "mask_layers" else
                            await fields[k].read()) for k in UPLOADS if k in fields}
        fmt = str(fields.get("format", "png")).lower()
        if fmt not in FORMATS:
            raise ApiError(400, f"format must be png, jpeg or webp, got {fmt[:20]!r}")
        settings = build_settings(fields, layers, config)
        models.source(settings.model)  # an allowed name, or ModelError now
        loaded = await run_in_threadpool(start_image, data, settings, config.max_pixels)
        controls = await run_in_threadpool(lambda: Controls.from_bytes(
            max_pixels=config.max_pixels, **pictures)) if pictures else None
        await run_in_threadpool(models.get, settings.gradient_key())  # bad layer/objective: 400 now
        return DreamRequest.from_loaded(settings, fmt, loaded, controls)

    def image_response(job: Job) -> Response:
        media, ext = FORMATS[job.request.fmt]
        headers = {"Content-Disposition": f'inline; filename="dream-{job.id[:8]}.{ext}"',
                   "X-Onnxdream-Seed": str(job.request.settings.seed),
                   "X-Onnxdream-Provider": job.provider or "",
                   "X-Onnxdream-Seconds": f"{(job.finished or 0) - (job.started or 0):.2f}",
                   "Cache-Control": "no-store"}
        return Response(job.result, media_type=media, headers=headers)

    def failed_response(job: Job) -> JSONResponse:
        if job.state == CANCELLED:
            if job.shutdown:
                return _error(503, SHUTDOWN, {"Retry-After": "10"})
            return _error(499, job.error or "cancelled")
        if job.exception is not None:
            return _respond(refusal(job.exception))
        return _error(500, job.error or "the dream failed")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index():
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"),
                            headers={"Cache-Control": "no-cache"})

    @app.get("/health")
    async def health():
        return {"status": "ok", "version": __version__, "provider": models.provider(),
                "device": config.device, "workers": config.workers, "queue": jobs.stats(),
                "max_pixels": config.max_pixels, "max_body_mb": round(config.max_body / MB, 2),
                "models": models.loaded()}

    @app.get("/models")
    async def list_models():
        from onnxdream.models import DEFAULT_MODEL, list_zoo

        rows = [{"name": e.name, "default": e.name == DEFAULT_MODEL, "source": "zoo",
                 "installed": e.installed, "input_size": e.input_size,
                 "default_layers": list(e.default_layers), "description": e.description,
                 "license": e.license} for e in list_zoo()]
        rows += [{"name": name, "default": False, "source": "file", "installed": True,
                  "input_size": None, "default_layers": None, "description": f"{path.name}",
                  "license": None} for name, path in config.model_paths.items()]
        return {"models": rows, "default": DEFAULT_MODEL}

    @app.get("/models/{name}/layers")
    async def model_layers(name: str):
        try:
            models.source(name)
        except ModelError as exc:
            raise ApiError(404, str(exc)) from None
        names, defaults = await run_in_threadpool(models.layers, name)
        return {"model": name, "layers": names, "default_layers": defaults}

    @app.post("/dream")
    async def dream_now(request: Request):
        job = jobs.submit(await read_request(request), track=False)
        future = asyncio.wrap_future(job.future)
        while not future.done():
            await asyncio.wait({future}, timeout=1.0)
            if not future.done() and await request.is_disconnected():
                jobs.cancel(job)  # nobody is waiting for it any more
                return _error(499, "the client went away")
        if job.state == DONE:
            return image_response(job)
        return failed_response(job)

    @app.post("/jobs", status_code=202)
    async def create_job(request: Request):
        job = jobs.submit(await read_request(request), track=True)
        body = job.view()
        body["url"] = f"/jobs/{job.id}"
        body["result_url"] = f"/jobs/{job.id}/result"
        return JSONResponse(body, status_code=202, headers={"Location": f"/jobs/{job.id}"})

    @app.get("/jobs/{job_id}")
    async def job_status(job_id: str):
        job, position = jobs.get(job_id)
        return job.view(position)

    @app.get("/jobs/{job_id}/result")
    async def job_result(job_id: str):
        job, _ = jobs.get(job_id)
        if job.state == DONE:
            return image_response(job)
        if job.state == FAILED:
            return failed_response(job)
        return _error(409, f"job {job.id} is {job.state}: poll /jobs/{job.id} until its "
                           "state is done", {"Retry-After": "1"})

    @app.delete("/jobs/{job_id}")
    async def delete_job(job_id: str):
        job, _ = jobs.get(job_id)
        previous = job.state
        jobs.cancel(job)
        return {"id": job.id, "state": CANCELLED if previous in (QUEUED, RUNNING) else previous,
                "deleted": True}

    return app


def run(config: ServerConfig, host: str = "127.0.0.1", port: int = 8000,
        log_level: str = "info") -> None:
    """Serve ``create_app(config)`` with uvicorn until interrupted."""
    try:
        import uvicorn
    except ImportError as exc:
        raise DependencyError("the server needs the [serve] extra: pip install 'onnxdream[serve]'") from exc
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
