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
                                :mod:`onnxdream.atlas_cache`).
- ``GET  /static/...``          the page's scripts and styles.
- ``POST /dream``               multipart: an ``image`` file plus form fields named like the CLI
                                options → the dreamed image (PNG unless ``format`` says otherwise).
- ``POST /jobs``                the same form → ``202 {"id", "state", "url", "result_url"}``;
                                or a ``video`` file instead of the image: a video job
                                (:mod:`onnxdream.videojobs`).
- ``GET  /jobs/{id}``           ``{"state": queued|running|done|failed, "progress": 0..1,
                                "eta_s", ...}``; a video job also ``"kind": "video",
                                "frames_done", "frames_total", "fps"`` (frames dreamed per
                                second), ``"stage"`` (dream, encode) and ``"frame_rate"``.
- ``GET  /jobs/{id}/result``    the image once done (409 while queued/running); a video job's
                                file, streamed (range requests work).
- ``DELETE /jobs/{id}``         cancel (cooperatively, at the next step) and forget the job (a
                                video job's folder is removed).
- ``GET  /web/...``             the page's "dream in this browser" (:mod:`onnxdream.server_web`):
                                the step graph of a model and layer, onnxruntime-web's files
                                (with ``--ort-dir``).

Form fields: ``model``, ``layer`` (repeatable, ``NAME`` or ``NAME:WEIGHT``), ``objective``,
``pre_relu``, ``octaves`` (a number, or ``auto``: the default), ``octave_scale``, ``steps``,
``step_size``, ``jitter``, ``tile_size`` (0: as large as the memory budget allows), ``normalize``,
``grad_floor``, ``max_loss``, ``seed``, ``format`` (png, jpeg, webp); the creative controls
(:mod:`onnxdream.controls`): file uploads ``guide``, ``mask`` and ``mask_layers`` (repeatable), and
``feather``, ``keep_colors``, ``seamless``, ``init`` (``noise`` or ``grey``: then no ``image``, and
``size`` ``WIDTHxHEIGHT``); ``step-size`` spellings are accepted too, unknown fields are refused. A
video job takes ``format`` mp4 (default), webm or gif, the ``video`` command's ``flow``, ``blend``,
``width``, ``start``, ``duration``, ``every``, and keyframes in ``layer``, ``steps``, ``step_size``
and ``blend`` (``0:blocks.5,5s:blocks.9``, through :func:`onnxdream.framedream.keyframed_settings`,
so a bad key is a 400 naming its field). ``POST /dream`` refuses a video (before reading it) with a
sentence pointing to ``/jobs``; without the ``[video]`` extra ``POST /jobs`` answers a video with
501 and the pip command, and ``/health``'s ``"video"`` says whether videos are available, and their
limits. Empty values mean "the default" (the defaults are
:class:`onnxdream.settings.DreamSettings`'s, as for the CLI). The image carries the same provenance
as the CLI's (:mod:`onnxdream.provenance`: PNG text chunks, or an XMP packet in JPEG/WebP).

Nothing from a request becomes a filesystem path: ``model`` must be a zoo name or the file stem of
a model the operator allowed at start-up (``--model-path FILE``).

The job queue, the model cache and the configuration live in :mod:`onnxdream.jobs` (no FastAPI
there); this module is the HTTP layer: the app, the body limit, form parsing, and the mapping of
error *types* to statuses (:func:`refusal`).

Resources stay bounded: one GradientModel (onnxruntime session) per (model, layers, objective
kinds, pre_relu, border), shared by all requests whatever their layer weights, in a small LRU
cache; compiled graphs on disk within ``ONNXDREAM_CACHE_MB``; a fixed pool of worker threads; at
most ``workers + max_queue`` dreams accepted at a time, a place being taken *before* the request
is read, decoded or compiled (beyond that: 503 with a ``Retry-After`` from the work waiting and
the recent speed); request bodies capped (413; a body with a video by its own, larger limit);
images capped in pixels from their header, and decoded only when their dream starts; finished
jobs expire after a TTL. Videos: the upload is streamed into its job's folder as it arrives
(:class:`~onnxdream.formstream.FormReader`, never held in memory), probed and checked (413: longer
than ``max_video_seconds`` or frames over ``max_pixels``, unless ``width`` downscales them; 400:
not a video, audio only, no frames) before it is queued, and the disk all video jobs hold is
capped (413 for a job that could never fit, 503 with Retry-After when full); a job's folder goes
when it fails, is cancelled, deleted or expires, and with the server.

Every response carries the security headers of :mod:`onnxdream.http_security` (a CSP that runs
only the page's own files, ``nosniff``, no framing, no referrer); ``--trusted-host`` limits the
``Host`` headers served (Starlette's TrustedHostMiddleware: others get a plain-text 400). Error
bodies never name server paths (:class:`~onnxdream.http_security.PathScrubber`: operator models
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
                            dream's tiles are the largest that fit its share, and a dream that
                            cannot fit even in small tiles gets 413 (:mod:`onnxdream.memory`).
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onnxdream import __version__
from onnxdream.atlas_cache import AtlasStore, ThumbnailMissing
from onnxdream.controls import Controls
from onnxdream.errors import (
    DependencyError,
    ImageTooLargeError,
    MemoryBudgetError,
    ModelError,
    NonFiniteError,
    OnnxDreamError,
    SettingsError,
    VideoTooLargeError,
    did_you_mean,
    first_line,
)
from onnxdream.formstream import FilePart, FormError, FormReader
from onnxdream.http_security import (
    DOCS_CSP,
    PathScrubber,
    SecurityHeaders,
    content_security_policy,
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
from onnxdream.resolve import step_size_for
from onnxdream.settings import ASCENT_FIELDS, AUTO, MAX_OCTAVES, DreamSettings
from onnxdream.videojobs import (
    VIDEO_FORMATS,
    VideoOptions,
    WorkArea,
    WorkSpaceFull,
    prepare_video,
    video_problem,
)

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
# Form parsing


_TYPES: dict[str, type] = {"model": str, "objective": str, "pre_relu": bool, "octaves": str,
                           "octave_scale": float, "steps": int, "step_size": float,
                           "jitter": int, "tile_size": int, "normalize": str,
                           "grad_floor": float, "max_loss": float,
                           "seed": int, "format": str, "feather": int, "keep_colors": bool,
                           "init": str, "size": str, "seamless": bool}
#: A video job's own fields (onnxdream.videojobs.VideoOptions, the CLI's `video` options).
_VIDEO_TYPES: dict[str, type] = {"flow": bool, "blend": str, "width": int, "start": float,
                                 "duration": float, "every": int}
#: Dream fields a video may keyframe ("0:10,5s:20"): kept as text for keyframed_settings.
_KEYFRAMED = ("steps", "step_size")
_FILES = ("image", "video")
#: file fields besides ``image`` (the creative controls' pictures); mask_layers repeats
UPLOADS = ("guide", "mask", "mask_layers")
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}
#: What a client that sends a video to /dream is told.
VIDEO_TO_JOBS = ("POST /dream takes photos only: send a video as the 'video' file of POST /jobs "
                 "and poll GET /jobs/{id} (progress in frames)")


def _convert(name: str, text: str) -> Any:
    kind = _TYPES.get(name) or _VIDEO_TYPES[name]
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


@dataclass
class Form:
    """A parsed dream form: typed ``fields``, the ``layer`` values, the upload (an ``image``
    held in memory, or a ``video`` already on disk; None for a dream from ``init``), the
    creative controls' pictures (``pictures``: ``guide``, ``mask``, ``mask_layers`` bytes, in
    memory within the body limit), and for a video the keyframable fields as given (``keyed``:
    ``steps``, ``step_size``)."""

    fields: dict[str, Any]
    layers: list[str]
    upload: FilePart | None
    video: bool = False
    keyed: dict[str, str] = field(default_factory=dict)
    pictures: dict[str, Any] = field(default_factory=dict)


def parse_fields(items: list[tuple[str, Any]]) -> Form:
    """Multipart items (:class:`~onnxdream.formstream.FormReader`'s) → a :class:`Form`."""
    files = [(n.replace("-", "_").lower(), v) for n, v in items if isinstance(v, FilePart)]
    pictures: dict[str, Any] = {}
    uploads = []
    for name, value in files:
        if name in UPLOADS:  # the creative controls' pictures (mask_layers: a list)
            if name == "mask_layers":
                pictures.setdefault(name, []).append(value.read())
            elif name in pictures:
                raise ApiError(400, f"send one '{name}' file per request")
            else:
                pictures[name] = value.read()
        elif name in _FILES:
            uploads.append((name, value))
        else:
            raise ApiError(400, f"field '{value.name[:40]}' must be a plain value, not a file")
    if len(uploads) > 1:
        raise ApiError(400, "send one file per request: an 'image' or a 'video'")
    kind, upload = uploads[0] if uploads else ("image", None)
    video = kind == "video"
    form = Form({}, [], upload, video, pictures=pictures)
    known = [kind, "layer", *_TYPES, *UPLOADS, *(_VIDEO_TYPES if video else ())]
    for raw_name, value in items:
        if isinstance(value, FilePart):
            continue
        name = raw_name.replace("-", "_").lower()
        if name in _FILES or name in UPLOADS:
            raise ApiError(400, f"'{name}' must be a file upload (multipart/form-data)")
        if name == "layer":
            text = value.strip()
            if text:
                if len(text) > (2000 if video else 200):  # a video's may hold keyframes
                    raise ApiError(400, "a 'layer' value is too long")
                form.layers.append(text)
            continue
        if name in _VIDEO_TYPES and not video:
            raise ApiError(400, f"field '{name}' is for videos (a 'video' file sent to "
                                "POST /jobs), not photos")
        if name not in _TYPES and name not in _VIDEO_TYPES:
            raise ApiError(400, f"unknown field '{raw_name[:40]}' (fields: {', '.join(known)})"
                                f"{did_you_mean(name[:40], known)}")
        if name in form.fields or name in form.keyed:
            raise ApiError(400, f"field '{name}' is given twice")
        if not value.strip():
            continue
        if video and name in _KEYFRAMED:
            if len(value) > 2000:
                raise ApiError(400, f"field '{name}' is too long ({len(value)} characters)")
            form.keyed[name] = value.strip()
        elif video and name == "blend":
            if len(value) > 2000:
                raise ApiError(400, "field 'blend' is too long")
            form.fields[name] = value.strip()
        else:
            form.fields[name] = _convert(name, value)
    if len(form.layers) > MAX_LAYERS:
        raise ApiError(400, f"at most {MAX_LAYERS} 'layer' fields per dream, got "
                            f"{len(form.layers)}")
    if upload is None and not form.fields.get("init"):
        raise ApiError(400, "no 'image' file in the request: send multipart/form-data with "
                            "the photo in a field named 'image' (or a clip in 'video', to "
                            "POST /jobs; or init=noise and a size)")
    if upload is not None and form.fields.get("init"):
        raise ApiError(400, "init starts a dream without a photo: send no 'image' with it")
    if video and pictures:
        raise ApiError(400, f"'{next(iter(pictures))}' is for photos: a video job takes no "
                            "guide or mask")
    return form


def build_settings(fields: dict[str, Any], layers: list[str],
                   config: ServerConfig) -> DreamSettings:
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
    # octaves "auto" depend on the image: run_request checks those once it is decoded
    if settings.octaves != AUTO and settings.octaves * settings.steps > config.max_steps:
        raise ApiError(400, f"octaves x steps is {settings.octaves * settings.steps}, more than "
                            f"this server's limit of {config.max_steps}")
    return settings


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
            from onnxdream.session import create_session

            session = create_session(probe_model().SerializeToString(),
                                     device=self.config.device, threads=1)
            session.run(["y"], {"x": np.zeros(1, np.float32)})
        except Exception as exc:  # noqa: BLE001 - whatever it is, the server cannot work
            return f"onnxruntime cannot create a session ({first_line(exc, 120)})"
        return None


# ---------------------------------------------------------------------------------------------
# OpenAPI: the multipart form of /dream and /jobs, and the error bodies


_VIDEO_HELP = {
    "video": "A clip (MP4, MOV, WebM, MKV, animated GIF, …; instead of 'image'): dreamed frame "
             "by frame into a video, its sound kept. At most the server's max_video_seconds "
             "(/health), each frame at most its max_pixels (or give 'width').",
    "flow": "Carry each frame's dream into the next along the optical flow (default true).",
    "blend": "How much of the previous frame's dream goes into the next, 0 to 1, or keyframes "
             "FRAME:VALUE / SECONDSs:VALUE, comma-separated (default 0.6 with flow, else 0).",
    "width": "Resize the frames to this width first (height follows; both made even).",
    "start": "Start this many seconds into the clip.",
    "duration": "Dream this many seconds (default: to the end).",
    "every": "Take every N-th frame.",
}


def _form_schema(video: bool = False) -> dict[str, Any]:
    """The dream form as an OpenAPI requestBody (FastAPI cannot infer it: the form is read by
    hand, to refuse unknown fields and to admit the request before reading it). With ``video``
    (``POST /jobs``): a ``video`` file instead of the ``image``, its own fields, and
    ``layer``/``steps``/``step_size`` that may be keyframes."""
    kinds = {str: {"type": "string"}, int: {"type": "integer"}, float: {"type": "number"},
             bool: {"type": "boolean"}}
    props: dict[str, Any] = {
        "image": {"type": "string", "format": "binary",
                  "description": "The photo (PNG, JPEG, WebP, …)."},
        "layer": {"type": "array", "items": {"type": "string"}, "maxItems": MAX_LAYERS,
                  "description": "NAME or NAME:WEIGHT, repeatable; default: the model's."},
    }
    for name, kind in _TYPES.items():
        props[name] = dict(kinds[kind])
    props["octaves"] = {"oneOf": [{"type": "integer", "minimum": 1, "maximum": MAX_OCTAVES},
                                  {"type": "string", "enum": [AUTO]}],
                        "description": "A number, or auto (the default): from the photo's size"}
    props["format"] = {"type": "string", "enum": sorted(FORMATS)}
    props["init"] = {"type": "string", "enum": ["noise", "grey"],
                     "description": "Dream without a photo (send no image): its start."}
    props["size"] = {"type": "string", "description": "WIDTHxHEIGHT of a dream from init."}
    for name, text in (("guide", "A picture whose features the dream moves toward."),
                       ("mask", "White: dream, black: keep the photo, grey: part.")):
        props[name] = {"type": "string", "format": "binary", "description": text}
    props["mask_layers"] = {"type": "array", "items": {"type": "string", "format": "binary"},
                            "description": "Where each layer dreams, one picture per layer."}
    if not video:
        return {"requestBody": {"required": True, "content": {"multipart/form-data": {
            "schema": {"type": "object", "required": ["image"], "properties": props},
            "encoding": {"layer": {"style": "form", "explode": True}}}}}}
    props["image"]["description"] += " Send an 'image' or a 'video'."
    for name in ("init", "size", "guide", "mask", "mask_layers"):  # photos only
        props.pop(name)
    props["video"] = {"type": "string", "format": "binary", "description": _VIDEO_HELP["video"]}
    for name, kind in _VIDEO_TYPES.items():
        props[name] = {**kinds[kind], "description": _VIDEO_HELP[name]}
    props["blend"] = {"anyOf": [{"type": "number"}, {"type": "string"}],
                      "description": _VIDEO_HELP["blend"]}
    for name in _KEYFRAMED:
        props[name] = {"anyOf": [props[name], {"type": "string"}],
                       "description": "A value, or for a video keyframes FRAME:VALUE / "
                                      "SECONDSs:VALUE, comma-separated (e.g. 0:10,5s:20)."}
    props["layer"]["description"] += (" For a video also keyframes: 0:blocks.5,120:blocks.9 "
                                       "(layers of one key joined by +).")
    props["format"] = {"type": "string", "enum": sorted({*FORMATS, *VIDEO_FORMATS}),
                       "description": "png (default), jpeg or webp for a photo; mp4 (default), "
                                      "webm or gif for a video."}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {
        "schema": {"type": "object", "properties": props,
                   "anyOf": [{"required": ["image"]}, {"required": ["video"]}]},
        "encoding": {"layer": {"style": "form", "explode": True}}}}}}


_ERROR = {"content": {"application/json": {"schema": {
    "type": "object", "required": ["error"], "properties": {"error": {"type": "string"}},
    "additionalProperties": False}}}}
_IMAGE = {"content": {media: {"schema": {"type": "string", "format": "binary"}}
                      for media in sorted({m for m, _ in FORMATS.values()})}}
_RESULT = {"content": {media: {"schema": {"type": "string", "format": "binary"}}
                       for media in sorted({*(m for m, _ in FORMATS.values()),
                                            *VIDEO_FORMATS.values()})}}


def _errors(*codes: int, **described: dict) -> dict[int | str, dict]:
    texts = {400: "Bad request (the message names the field)", 404: "Not found",
             409: "Not ready yet",
             413: "Too large (body, image; a video too long, too many pixels or too much disk)",
             415: "Not multipart/form-data", 422: "The dream's objective stopped being finite",
             499: "Cancelled", 500: "Internal error",
             501: "Videos are not available on this server (the message says why)",
             503: "Busy, out of space for videos, or shutting down (see Retry-After)"}
    out: dict[int | str, dict] = {c: {"description": texts[c], **_ERROR} for c in codes}
    for code, value in described.items():
        out[int(code.lstrip("_"))] = value
    return out


_DREAM_ERRORS = (400, 413, 415, 422, 499, 500, 503)
_JOB_VIEW = {"content": {"application/json": {"schema": {
    "type": "object", "required": ["id", "state", "progress"],
    "properties": {
        "id": {"type": "string"},
        "state": {"type": "string", "enum": ["queued", "running", "done", "failed", "cancelled"]},
        "progress": {"type": "number"}, "error": {"type": "string"},
        "eta_s": {"type": ["number", "null"], "description": "Seconds left (estimate)."},
        "kind": {"type": "string", "enum": ["video"], "description": "Only for a video job."},
        "frames_done": {"type": "integer", "description": "A video job's frames dreamed."},
        "frames_total": {"type": "integer",
                         "description": "A video job's frames (known to ±1 until done)."},
        "fps": {"type": "number", "description": "A video job's frames dreamed per second."},
        "stage": {"type": ["string", "null"], "enum": ["dream", "encode", None],
                  "description": "A video job's stage: dreaming frames, then encoding."},
        "frame_rate": {"type": "number", "description": "The output video's frame rate."}}}}}}
_ERROR_OR_STATUS = {"content": {"application/json": {"schema": {
    "type": "object", "required": ["status", "error"],
    "properties": {"status": {"type": "string"}, "error": {"type": "string"}}}}}}


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
    from onnxdream.server_web import add_browser_routes

    add_browser_routes(app, config, models)

    def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
        """THE error response of this app: server paths are taken out of every message."""
        return _error(status, scrub(message), headers)

    def respond(err: ApiError) -> JSONResponse:
        return error(err.status, err.message, err.headers)

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return respond(exc)

    @app.exception_handler(OnnxDreamError)
    async def _user_error(request, exc: OnnxDreamError):
        return respond(refusal(exc))

    @app.exception_handler(JobError)
    async def _job_error(request, exc: JobError):
        return respond(refusal(exc))

    @app.exception_handler(FormError)
    async def _form_error(request, exc: FormError):
        return respond(refusal(exc))

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
                            headers={"X-Onnxdream-Seed": str(job.request.settings.seed),
                                     "X-Onnxdream-Provider": job.provider or "",
                                     "X-Onnxdream-Seconds":
                                         f"{(job.finished or 0) - (job.started or 0):.2f}",
                                     "Cache-Control": "no-store"})

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
                                         **_ERROR_OR_STATUS}})
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

    @app.get("/models/{name}/layers", responses=_errors(400, 404))
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

    @app.get("/models/{name}/atlas", responses=_errors(
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

    @app.get("/models/{name}/atlas/{file}", response_class=Response, responses=_errors(
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

    @app.post("/dream", openapi_extra=_form_schema(), response_class=Response,
              responses=_errors(*_DREAM_ERRORS, _200={"description": "The dreamed image",
                                                      **_IMAGE}))
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

    @app.post("/jobs", status_code=202, openapi_extra=_form_schema(video=True),
              responses=_errors(*_DREAM_ERRORS, 501, _202={"description": "Queued",
                                                           **_JOB_VIEW}))
    async def create_job(request: Request):
        job = await submit(request, track=True, videos=True)
        body = job_view(job)
        body["url"] = f"/jobs/{job.id}"
        body["result_url"] = f"/jobs/{job.id}/result"
        return JSONResponse(body, status_code=202, headers={"Location": f"/jobs/{job.id}"})

    @app.get("/jobs/{job_id}", responses=_errors(404, _200={"description": "The job",
                                                             **_JOB_VIEW}))
    async def job_status(job_id: str):
        job, position = jobs.get(job_id)
        return job_view(job, position)

    @app.get("/jobs/{job_id}/result", response_class=Response,
             responses=_errors(*_DREAM_ERRORS, 404, 409, _200={
                 "description": "The dreamed image, or video (range requests work)",
                 **_RESULT}))
    async def job_result(job_id: str):
        job, _ = jobs.get(job_id)
        if job.state == DONE:
            return video_response(job) if job.request.kind == "video" else image_response(job)
        if job.state == FAILED:
            return failed_response(job)
        return error(409, f"job {job.id} is {job.state}: poll /jobs/{job.id} until its "
                          "state is done", {"Retry-After": "1"})

    @app.delete("/jobs/{job_id}", responses=_errors(404))
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
