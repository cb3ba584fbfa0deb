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
``normalize``, ``max_loss``, ``seed``, ``format`` (png, jpeg, webp); ``step-size`` spellings are
accepted too, unknown fields are refused. Empty values mean "the default".

Nothing from a request becomes a filesystem path: ``model`` must be a zoo name or the file stem of
a model the operator allowed at start-up (``--model-path FILE``).

Resources stay bounded: one GradientModel (onnxruntime session) per (model, layers, objective,
pre_relu), shared by all requests, in a small LRU cache; a fixed pool of worker threads; at most
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
import collections
import concurrent.futures
import io
import logging
import math
import os
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from onnxdream import __version__
from onnxdream.errors import DependencyError, ModelError, OnnxDreamError, closest

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
MB = 1024 * 1024
MAX_LAYERS = 8
FORMATS = {"png": ("PNG", "image/png", "png"), "jpeg": ("JPEG", "image/jpeg", "jpg"),
           "jpg": ("JPEG", "image/jpeg", "jpg"), "webp": ("WEBP", "image/webp", "webp")}
SHUTDOWN = "the server is shutting down; retry in a moment"
CLI_STEP_SIZE = 0.006  # the CLI's default; DreamSettings' own default is stronger


# ---------------------------------------------------------------------------------------------
# Configuration


def _env_int(name: str, default: int | None, minimum: int = 1) -> int | None:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise OnnxDreamError(f"{name} must be an integer >= {minimum}, got {text!r}")
    return value


def _check_device(device: str) -> None:
    """Fail at start-up, not on the first request: onnxruntime missing, or no CUDA for cuda."""
    from onnxdream.errors import DeviceError
    from onnxdream.session import available_devices

    if device == "cuda" and "cuda" not in available_devices():
        raise DeviceError("--device cuda: this onnxruntime has no CUDA provider; install "
                          "onnxdream[gpu] and a CUDA driver, or use --device cpu")


def _default_workers(device: str) -> int:
    from onnxdream.session import available_devices, default_threads

    if device == "cuda" or (device == "auto" and "cuda" in available_devices()):
        return 2  # one overlaps the host-side work (resize, normalise) of the other
    return 1 if default_threads() < 8 else 2


@dataclass(frozen=True)
class ServerConfig:
    """What the server allows and how much it does at once."""

    device: str = "auto"
    workers: int = 1
    max_queue: int = 16
    max_pixels: int = 16_000_000
    max_body: int = 32 * MB
    max_steps: int = 1000
    job_ttl: float = 600.0
    cache_size: int = 4
    max_results: int = 64  # finished jobs kept at most, whatever their TTL
    threads: int | None = None
    model_paths: dict[str, Path] = field(default_factory=dict)  # name (file stem) -> file

    @classmethod
    def from_env(cls, *, workers: int | None = None, max_queue: int | None = None,
                 max_pixels: int | None = None, max_body_mb: float | None = None,
                 max_steps: int | None = None, job_ttl: float | None = None,
                 cache_size: int | None = None, device: str | None = None,
                 model_paths: list[str | os.PathLike] | None = None) -> "ServerConfig":
        """Explicit arguments first, then ``ONNXDREAM_*`` environment variables, then defaults."""
        device = (device or os.environ.get("ONNXDREAM_DEVICE", "").strip() or "auto").lower()
        if device not in ("auto", "cpu", "cuda"):
            raise OnnxDreamError(f"device must be auto, cpu or cuda, got {device!r}")
        _check_device(device)
        env_paths = [p for p in os.environ.get("ONNXDREAM_MODEL_PATHS", "").split(os.pathsep) if p]
        body_mb = max_body_mb if max_body_mb is not None else _env_int("ONNXDREAM_MAX_BODY_MB", 32)
        cfg = cls(
            device=device,
            workers=workers or _env_int("ONNXDREAM_WORKERS", None) or _default_workers(device),
            max_queue=max_queue if max_queue is not None else _env_int("ONNXDREAM_MAX_QUEUE", 16, 0),
            max_pixels=max_pixels or _env_int("ONNXDREAM_MAX_PIXELS", 16_000_000),
            max_body=int(float(body_mb) * MB),
            max_steps=max_steps or _env_int("ONNXDREAM_MAX_STEPS", 1000),
            job_ttl=float(job_ttl if job_ttl is not None else _env_int("ONNXDREAM_JOB_TTL", 600)),
            cache_size=cache_size or _env_int("ONNXDREAM_CACHE_SIZE", 4),
            model_paths=_allowed_models(list(model_paths or []) + env_paths),
        )
        return cfg.validate()

    def validate(self) -> "ServerConfig":
        checks = [
            (1 <= self.workers <= 64, "--workers must be between 1 and 64"),
            (0 <= self.max_queue <= 10_000, "--max-queue must be between 0 and 10000"),
            (self.max_pixels >= 1, "--max-pixels must be a positive integer"),
            (self.max_body >= 1024, "--max-body must be at least 1 KB"),
            (self.max_steps >= 1, "--max-steps must be a positive integer"),
            (self.job_ttl > 0, "the job TTL must be positive"),
            (self.cache_size >= 1, "the session cache must hold at least one model"),
        ]
        for ok, message in checks:
            if not ok:
                raise OnnxDreamError(message)
        return self


def _allowed_models(paths: list[str | os.PathLike]) -> dict[str, Path]:
    """Operator-allowed model files → {file stem: resolved path}; checked at start-up."""
    from onnxdream.models import ZOO

    allowed: dict[str, Path] = {}
    for p in paths:
        path = Path(p).expanduser().resolve()
        if not path.is_file():
            raise ModelError(f"--model-path {p} is not a file (expected a dreamable .onnx model)")
        name = path.stem
        if name in ZOO:
            raise ModelError(f"--model-path {p}: its name '{name}' is a zoo model's; rename the file")
        if name in allowed and allowed[name] != path:
            raise ModelError(f"--model-path {p}: two allowed models are named '{name}'; rename one")
        allowed[name] = path
    return allowed


# ---------------------------------------------------------------------------------------------
# Errors


class ApiError(Exception):
    """A request the server refuses: an HTTP status and one sentence."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


class JobCancelled(Exception):
    """Raised from the progress callback to stop a cancelled dream."""


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


# ---------------------------------------------------------------------------------------------
# Sessions: loaded once, shared, bounded


ModelKey = tuple[str, tuple[str, ...], str, bool]  # (model name, layers, objective, pre_relu)


class ModelCache:
    """GradientModels keyed by (model, layers, objective, pre_relu); thread-safe, bounded LRU.

    One model is built at a time (a compile holds a few hundred MB while it runs); lookups of
    loaded models never wait for a build. A model dropped from the cache while a dream uses it
    lives until that dream ends.
    """

    def __init__(self, config: ServerConfig):
        self.config = config
        self._lock = threading.Lock()
        self._build_lock = threading.Lock()
        self._models: collections.OrderedDict[ModelKey, Any] = collections.OrderedDict()
        self._layers: dict[str, tuple[list[str], list[str]]] = {}

    def source(self, name: str) -> str:
        """The zoo name or allowed file for ``name``; ModelError for anything else."""
        from onnxdream.models import ZOO

        if name in ZOO:
            return name
        if name in self.config.model_paths:
            return str(self.config.model_paths[name])
        names = list(ZOO) + list(self.config.model_paths)
        near = closest(name[:100], names)
        hint = f"; did you mean {', '.join(repr(n) for n in near)}?" if near else ""
        raise ModelError(f"unknown model '{name[:100]}': this server offers "
                         f"{', '.join(names)}{hint}")

    def get(self, key: ModelKey):
        with self._lock:
            gm = self._models.get(key)
            if gm is not None:
                self._models.move_to_end(key)
                return gm
        with self._build_lock:
            with self._lock:
                gm = self._models.get(key)
                if gm is not None:
                    self._models.move_to_end(key)
                    return gm
            from onnxdream.gradient import GradientModel

            model, layers, objective, pre_relu = key
            t0 = time.perf_counter()
            gm = GradientModel(self.source(model), list(layers), objective, pre_relu=pre_relu,
                               device=self.config.device, threads=self.config.threads)
            if gm.session.fallback_warning:
                log.warning("%s", gm.session.fallback_warning)
            log.info("loaded %s %s on %s in %.1fs", model, gm.objective.describe(), gm.provider,
                     time.perf_counter() - t0)
            with self._lock:
                self._models[key] = gm
                while len(self._models) > self.config.cache_size:
                    self._models.popitem(last=False)
            return gm

    def layers(self, name: str) -> tuple[list[str], list[str]]:
        """(all layer names, default layers) of model ``name``."""
        with self._lock:
            if name in self._layers:
                return self._layers[name]
        from onnxdream.exporters.graph.contract import ModelInfo
        from onnxdream.gradient import resolve_model_path

        with self._build_lock:
            info = ModelInfo.load(resolve_model_path(self.source(name)))
            result = (list(info.layers), list(info.default_layers))
        with self._lock:
            self._layers[name] = result
        return result

    def loaded(self) -> list[dict[str, Any]]:
        with self._lock:
            items = list(self._models.items())
        return [{"model": k[0], "objective": gm.objective.describe(), "pre_relu": k[3],
                 "provider": gm.provider} for k, gm in items]

    def provider(self) -> str:
        with self._lock:
            for gm in self._models.values():
                return gm.provider
        from onnxdream.session import resolve_providers

        first = resolve_providers(self.config.device)[0]
        return first[0] if isinstance(first, tuple) else first


# ---------------------------------------------------------------------------------------------
# Requests and jobs


@dataclass(eq=False)
class DreamRequest:
    """A validated dream: what to run and on which pixels (uint8 while queued, dropped after)."""

    key: ModelKey
    settings: Any  # DreamSettings, seed fixed
    fmt: str  # a FORMATS key
    image: np.ndarray | None  # uint8 HxWx3
    alpha: np.ndarray | None  # uint8 HxW
    size: tuple[int, int]  # (width, height)


QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"


@dataclass(eq=False)
class Job:
    request: DreamRequest
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    state: str = QUEUED
    created: float = field(default_factory=time.monotonic)
    started: float | None = None
    finished: float | None = None
    done: int = 0
    total: int = 0
    octave: int = 0
    objective: float | None = None
    error: str | None = None
    status: int = 200
    result: bytes | None = None
    provider: str | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    shutdown: bool = False  # cancelled because the server stops (503), not by its client
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)

    def view(self, position: int | None = None) -> dict[str, Any]:
        now = time.monotonic()
        progress = 1.0 if self.state == DONE else (self.done / self.total if self.total else 0.0)
        eta = None
        if self.state == RUNNING and self.started is not None and self.done:
            eta = round((now - self.started) / self.done * (self.total - self.done), 1)
        elif self.state == DONE:
            eta = 0.0
        s = self.request.settings
        out = {
            "id": self.id, "state": self.state, "progress": round(progress, 4), "eta_s": eta,
            "elapsed_s": round((self.finished or now) - (self.started or now), 2),
            "steps_done": self.done, "steps_total": self.total,
            "octave": self.octave, "objective": self.objective,
            "model": self.request.key[0], "seed": s.seed,
            "width": self.request.size[0], "height": self.request.size[1],
            "format": self.request.fmt,
        }
        if position is not None:
            out["queue_position"] = position
        if self.error:
            out["error"] = self.error
        if self.state == DONE:
            out["result_url"] = f"/jobs/{self.id}/result"
        return out


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        super().__init__(retry_after)
        self.retry_after = retry_after


class JobManager:
    """A fixed pool of worker threads over a bounded FIFO; finished jobs expire.

    At most ``workers + max_queue`` dreams are outstanding (queued, or running including ones
    cancelled but not yet stopped); ``submit`` beyond that raises :class:`QueueFull`.
    """

    def __init__(self, config: ServerConfig, models: ModelCache):
        self.config = config
        self.models = models
        self._cond = threading.Condition()
        self._queue: collections.deque[Job] = collections.deque()
        self._jobs: dict[str, Job] = {}  # tracked (POST /jobs) jobs by id
        self._running = 0
        self._active: set[Job] = set()  # running now, tracked or not
        self._threads: list[threading.Thread] = []
        self._stopping = False
        self._durations: collections.deque[float] = collections.deque(maxlen=20)

    # -- lifecycle
    def start(self) -> None:
        with self._cond:
            if self._threads or self._stopping:
                return
            for i in range(self.config.workers):
                t = threading.Thread(target=self._worker, name=f"onnxdream-worker-{i}", daemon=True)
                t.start()
                self._threads.append(t)

    def stop(self, timeout: float = 5.0) -> None:
        """Cancel everything queued or running (their waiters get a 503) and wait for the workers."""
        with self._cond:
            self._stopping = True
            while self._queue:
                job = self._queue.popleft()
                job.shutdown = True
                job.cancel.set()
                self._finish(job, CANCELLED, error=SHUTDOWN, status=503)
            for job in self._active:
                job.shutdown = True
                job.cancel.set()
            self._cond.notify_all()
            threads = list(self._threads)
        for t in threads:
            if t is not threading.current_thread():
                t.join(timeout)

    # -- API
    @property
    def capacity(self) -> int:
        return self.config.workers + self.config.max_queue

    def submit(self, request: DreamRequest, *, track: bool) -> Job:
        self.start()
        job = Job(request)
        with self._cond:
            if self._stopping:
                raise ApiError(503, SHUTDOWN, {"Retry-After": "10"})
            self._sweep()
            if len(self._queue) + self._running >= self.capacity:
                raise QueueFull(self._retry_after())
            self._queue.append(job)
            if track:
                self._jobs[job.id] = job
            self._cond.notify()
        return job

    def get(self, job_id: str) -> tuple[Job, int | None]:
        with self._cond:
            self._sweep()
            job = self._jobs.get(job_id)
            if job is None:
                raise ApiError(404, f"no job '{job_id[:64]}' (unknown, deleted, or expired "
                                    f"{int(self.config.job_ttl)}s after it finished)")
            position = None
            if job.state == QUEUED:
                position = next((i for i, j in enumerate(self._queue) if j is job), None)
            return job, position

    def cancel(self, job: Job) -> None:
        """Stop ``job`` at its next step (or before it starts) and forget it."""
        with self._cond:
            job.cancel.set()
            self._jobs.pop(job.id, None)
            if job.state == QUEUED and job in self._queue:
                self._queue.remove(job)
                self._finish(job, CANCELLED, error="cancelled")

    def stats(self) -> dict[str, Any]:
        with self._cond:
            self._sweep()
            return {"queued": len(self._queue), "running": self._running,
                    "capacity": self.capacity, "jobs_kept": len(self._jobs)}

    # -- internals (call with self._cond held)
    def _sweep(self) -> None:
        now = time.monotonic()
        finished = [j for j in self._jobs.values() if j.finished is not None]
        for j in finished:
            if now - j.finished > self.config.job_ttl:
                del self._jobs[j.id]
        finished = sorted((j for j in self._jobs.values() if j.finished is not None),
                          key=lambda j: j.finished)
        for j in finished[:max(0, len(finished) - self.config.max_results)]:
            del self._jobs[j.id]

    def _retry_after(self) -> int:
        avg = sum(self._durations) / len(self._durations) if self._durations else 10.0
        waiting = len(self._queue) + self._running
        return int(min(600, max(1, math.ceil(avg * waiting / self.config.workers))))

    def _finish(self, job: Job, state: str, *, error: str | None = None, status: int = 200,
                result: bytes | None = None) -> None:
        job.state, job.error, job.status, job.result = state, error, status, result
        job.finished = time.monotonic()
        job.request.image = job.request.alpha = None  # only the result is needed now
        if not job.future.done():
            job.future.set_result(job)

    # -- the worker
    def _worker(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                job = self._queue.popleft()
                self._running += 1
                self._active.add(job)
                job.state, job.started = RUNNING, time.monotonic()
            try:
                data = self._run(job)
            except JobCancelled:
                outcome = dict(state=CANCELLED, error=SHUTDOWN if job.shutdown else "cancelled",
                               status=503 if job.shutdown else 499)
            except OnnxDreamError as exc:
                outcome = dict(state=FAILED, error=str(exc), status=400)
            except Exception as exc:  # noqa: BLE001 - a bug must not kill the worker
                log.exception("job %s failed", job.id)
                outcome = dict(state=FAILED, error=f"internal error: {type(exc).__name__}",
                               status=500)
            else:
                outcome = dict(state=DONE, result=data)
            with self._cond:
                self._running -= 1
                self._active.discard(job)
                if outcome["state"] == DONE:
                    self._durations.append(time.monotonic() - (job.started or job.created))
                self._finish(job, **outcome)
                self._cond.notify_all()

    def _run(self, job: Job) -> bytes:
        from onnxdream.ascent import dream, steps_total

        req = job.request
        if job.cancel.is_set():
            raise JobCancelled()
        gm = self.models.get(req.key)
        job.provider = gm.provider
        rgb = req.image.astype(np.float32)
        rgb *= np.float32(1.0 / 255.0)
        job.total = steps_total(rgb.shape[0], rgb.shape[1], req.settings)

        def progress(p) -> None:
            if job.cancel.is_set():
                raise JobCancelled()
            job.done, job.total, job.octave = p.done, p.total, p.octave
            job.objective = float(p.objective) if math.isfinite(p.objective) else None

        out = dream(gm, rgb, req.settings, progress)
        if job.cancel.is_set():
            raise JobCancelled()
        job.done = job.total
        return encode_image(out, req.alpha, req.fmt, _metadata(req, gm))


def _metadata(req: DreamRequest, gm) -> dict[str, str]:
    from onnxdream.ascent import describe

    meta = {"onnxdream:version": __version__, "onnxdream:model": req.key[0],
            "onnxdream:objective": gm.objective.describe(), "onnxdream:pre_relu": str(req.key[3]),
            "onnxdream:provider": gm.provider}
    meta.update({f"onnxdream:{k}": v for k, v in describe(req.settings).items()})
    return meta


def encode_image(rgb: np.ndarray, alpha: np.ndarray | None, fmt: str,
                 metadata: dict[str, str] | None = None) -> bytes:
    """float32 HxWx3 in [0,1] (+ uint8 alpha) → PNG/JPEG/WebP bytes, in memory."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    from onnxdream.imageio import to_uint8

    pil_format = FORMATS[fmt][0]
    img = Image.fromarray(to_uint8(rgb), "RGB")
    if alpha is not None and pil_format != "JPEG":
        img.putalpha(Image.fromarray(alpha, "L"))
    buf = io.BytesIO()
    if pil_format == "PNG":
        info = PngInfo()
        for k, v in (metadata or {}).items():
            info.add_text(k, v)
        img.save(buf, "PNG", pnginfo=info, compress_level=6)
    else:
        img.save(buf, pil_format, quality=92)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# Form parsing


_TYPES: dict[str, type] = {"model": str, "objective": str, "pre_relu": bool, "octaves": int,
                           "octave_scale": float, "steps": int, "step_size": float,
                           "jitter": int, "tile_size": int, "normalize": str, "max_loss": float,
                           "seed": int, "format": str}
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
    known = ["image", "layer", *_TYPES]
    for raw_name, value in items:
        name = raw_name.replace("-", "_").lower()
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
            near = closest(name[:40], known)
            hint = f"; did you mean {', '.join(repr(n) for n in near)}?" if near else ""
            raise ApiError(400, f"unknown field '{raw_name[:40]}' (fields: {', '.join(known)}){hint}")
        if name in fields:
            raise ApiError(400, f"field '{name}' is given twice")
        if value.strip():
            fields[name] = _convert(name, value)
    if len(layers) > MAX_LAYERS:
        raise ApiError(400, f"at most {MAX_LAYERS} 'layer' fields per dream, got {len(layers)}")
    if image is None:
        raise ApiError(400, "no 'image' file in the request: send multipart/form-data with "
                            "the photo in a field named 'image'")
    return fields, layers, image


def build_settings(fields: dict[str, Any], config: ServerConfig):
    from onnxdream.ascent import DreamSettings

    names = ("octaves", "octave_scale", "steps", "step_size", "jitter", "tile_size", "seed",
             "normalize", "max_loss")
    kwargs = {k: fields[k] for k in names if k in fields}
    kwargs.setdefault("step_size", CLI_STEP_SIZE)
    try:
        settings = DreamSettings(**kwargs).validate().with_seed()
    except OnnxDreamError as exc:  # "--step-size must be ..." → "step_size must be ..."
        message = re.sub(r"--([a-z-]+)", lambda m: m.group(1).replace("-", "_"), str(exc))
        raise ApiError(400, message) from None
    if settings.octaves * settings.steps > config.max_steps:
        raise ApiError(400, f"octaves x steps is {settings.octaves * settings.steps}, more than "
                            f"this server's limit of {config.max_steps}")
    return settings


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
        from onnxdream.models import DEFAULT_MODEL

        try:
            models.get((DEFAULT_MODEL, (), "mean", False))
        except Exception as exc:  # noqa: BLE001 - the first request will report it properly
            log.warning("could not preload %s: %s", DEFAULT_MODEL, exc)

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
        return _error(exc.status, exc.message, exc.headers)

    @app.exception_handler(OnnxDreamError)
    async def _user_error(request, exc: OnnxDreamError):
        return _error(400, str(exc))

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
        async with request.form(max_files=4, max_fields=64) as form:
            fields, layers, upload = parse_fields(list(form.multi_items()))
            data = await upload.read()
        fmt = str(fields.get("format", "png")).lower()
        if fmt not in FORMATS:
            raise ApiError(400, f"format must be png, jpeg or webp, got {fmt[:20]!r}")
        settings = build_settings(fields, config)
        from onnxdream.models import DEFAULT_MODEL

        model = fields.get("model", DEFAULT_MODEL)
        models.source(model)  # an allowed name, or ModelError now
        key: ModelKey = (model, tuple(layers), fields.get("objective", "mean"),
                         bool(fields.get("pre_relu", False)))
        loaded = await run_in_threadpool(_decode, data, config.max_pixels)
        await run_in_threadpool(models.get, key)  # unknown layer / bad objective: 400 now
        return loaded_request(key, settings, fmt, loaded)

    def image_response(job: Job) -> Response:
        _, media, ext = FORMATS[job.request.fmt]
        headers = {"Content-Disposition": f'inline; filename="dream-{job.id[:8]}.{ext}"',
                   "X-Onnxdream-Seed": str(job.request.settings.seed),
                   "X-Onnxdream-Provider": job.provider or "",
                   "X-Onnxdream-Seconds": f"{(job.finished or 0) - (job.started or 0):.2f}",
                   "Cache-Control": "no-store"}
        return Response(job.result, media_type=media, headers=headers)

    def failed_response(job: Job) -> JSONResponse:
        return _error(job.status if job.status >= 400 else 500, job.error or "the dream failed")

    def submit(req: DreamRequest, track: bool) -> Job:
        try:
            return jobs.submit(req, track=track)
        except QueueFull as full:
            raise ApiError(503, f"the server is busy ({jobs.capacity} dreams queued or running); "
                                f"retry in {full.retry_after}s",
                           {"Retry-After": str(full.retry_after)}) from None

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
        job = submit(await read_request(request), track=False)
        future = asyncio.wrap_future(job.future)
        while not future.done():
            await asyncio.wait({future}, timeout=1.0)
            if not future.done() and await request.is_disconnected():
                jobs.cancel(job)  # nobody is waiting for it any more
                return _error(499, "the client went away")
        if job.state == DONE:
            return image_response(job)
        if job.shutdown:
            return _error(503, SHUTDOWN, {"Retry-After": "10"})
        return failed_response(job)

    @app.post("/jobs", status_code=202)
    async def create_job(request: Request):
        job = submit(await read_request(request), track=True)
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


def _decode(data: bytes, max_pixels: int):
    from onnxdream.errors import ImageError
    from onnxdream.imageio import load_image_bytes

    try:
        return load_image_bytes(data, name="the uploaded image", max_pixels=max_pixels)
    except ImageError as exc:
        text = str(exc)
        if "more than the limit of" in text:  # too many pixels, or a decompression bomb
            raise ApiError(413, text.split(";")[0] + "; send a smaller image") from None
        raise


def loaded_request(key: ModelKey, settings, fmt: str, loaded) -> DreamRequest:
    from onnxdream.imageio import to_uint8

    alpha = to_uint8(loaded.alpha) if loaded.alpha is not None else None
    return DreamRequest(key=key, settings=settings, fmt=fmt, image=to_uint8(loaded.rgb),
                        alpha=alpha, size=(loaded.rgb.shape[1], loaded.rgb.shape[0]))


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


__all__ = ["ApiError", "BodyLimit", "DreamRequest", "Job", "JobManager", "ModelCache",
           "ServerConfig", "create_app", "encode_image", "run"]
