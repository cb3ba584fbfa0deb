"""Dreams as jobs: configuration, a shared model cache, and a bounded queue of worker threads.

No web framework here: the HTTP server (:mod:`onnxdream.server`) and a batch runner both build on
it. :class:`ServerConfig` says what is allowed and how much runs at once (from options and
``ONNXDREAM_*`` variables); :class:`ModelCache` holds one GradientModel (one onnxruntime session)
per compiled objective, shared by every job; :class:`JobManager` runs :class:`DreamRequest`\\ s
on a fixed pool of threads over a bounded FIFO, with progress, cancellation and expiry.

Errors: a job's failure is kept as the exception itself (``Job.exception``); front ends map its
*type* to what they show (an HTTP status, an exit code). The queue's own refusals are
:class:`JobError`\\ s: :class:`QueueFull`, :class:`ShuttingDown`, :class:`UnknownJob`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import math
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from onnxdream.errors import ModelError, OnnxDreamError, SettingsError, did_you_mean
from onnxdream.settings import DreamSettings, require

__all__ = ["CANCELLED", "DONE", "FAILED", "MB", "QUEUED", "RUNNING", "DreamRequest", "Job",
           "JobCancelled", "JobError", "JobManager", "ModelCache", "ModelKey", "QueueFull",
           "SHUTDOWN", "ServerConfig", "ShuttingDown", "UnknownJob", "run_request"]

log = logging.getLogger("onnxdream.jobs")

MB = 1024 * 1024
SHUTDOWN = "the server is shutting down; retry in a moment"


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
        raise DeviceError("device cuda: this onnxruntime has no CUDA provider; install "
                          "onnxdream[gpu] and a CUDA driver, or use the cpu device",
                          field="device")


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
                 model_paths: list[str | os.PathLike] | None = None) -> ServerConfig:
        """Explicit arguments first, then ``ONNXDREAM_*`` environment variables, then defaults."""
        device = (device or os.environ.get("ONNXDREAM_DEVICE", "").strip() or "auto").lower()
        if device not in ("auto", "cpu", "cuda"):
            raise SettingsError("device", f"must be auto, cpu or cuda, got {device!r}")
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

    def validate(self) -> ServerConfig:
        require([
            (1 <= self.workers <= 64, "workers", "must be between 1 and 64"),
            (0 <= self.max_queue <= 10_000, "max_queue", "must be between 0 and 10000"),
            (self.max_pixels >= 1, "max_pixels", "must be a positive integer"),
            (self.max_body >= 1024, "max_body", "must be at least 1 KB"),
            (self.max_steps >= 1, "max_steps", "must be a positive integer"),
            (self.job_ttl > 0, "job_ttl", "must be positive"),
            (self.cache_size >= 1, "cache_size", "must be at least 1 (sessions kept loaded)"),
        ])
        return self


def _allowed_models(paths: list[str | os.PathLike]) -> dict[str, Path]:
    """Operator-allowed model files → {file stem: resolved path}; checked at start-up."""
    from onnxdream.models import ZOO

    allowed: dict[str, Path] = {}
    for p in paths:
        path = Path(p).expanduser().resolve()
        if not path.is_file():
            raise ModelError(f"model path {p} is not a file (expected a dreamable .onnx model)",
                             field="model_paths")
        name = path.stem
        if name in ZOO:
            raise ModelError(f"model path {p}: its name '{name}' is a zoo model's; rename the "
                             "file", field="model_paths")
        if name in allowed and allowed[name] != path:
            raise ModelError(f"model path {p}: two allowed models are named '{name}'; rename one",
                             field="model_paths")
        allowed[name] = path
    return allowed


# ---------------------------------------------------------------------------------------------
# Sessions: loaded once, shared, bounded


ModelKey = tuple[str, tuple[str, ...], str, bool, int]  # DreamSettings.gradient_key()


class ModelCache:
    """GradientModels keyed by ``DreamSettings.gradient_key()``; thread-safe, bounded LRU.

    One model is built at a time (a compile holds a few hundred MB while it runs); lookups of
    loaded models never wait for a build. A model dropped from the cache while a dream uses it
    lives until that dream ends. Models are named by zoo name or by the file stem of a model
    the operator allowed, never by a path from a request.
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
        raise ModelError(f"unknown model '{name[:100]}': this server offers "
                         f"{', '.join(names)}{did_you_mean(name[:100], names)}", field="model")

    def get(self, key: ModelKey):
        """The GradientModel for ``key`` (built, and cached, on first use)."""
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

            model, layers, objective, pre_relu, border = key
            t0 = time.perf_counter()
            gm = GradientModel(self.source(model), list(layers), objective, pre_relu=pre_relu,
                               border=border, device=self.config.device,
                               threads=self.config.threads)
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

    settings: DreamSettings  # validated, seed fixed
    fmt: str  # output format: png, jpeg (jpg) or webp
    image: np.ndarray | None  # uint8 HxWx3
    alpha: np.ndarray | None  # uint8 HxW
    size: tuple[int, int]  # (width, height)
    controls: Any = None  # onnxdream.controls.Controls: the guide's and masks' pictures

    @property
    def key(self) -> ModelKey:
        return self.settings.gradient_key()

    @classmethod
    def from_loaded(cls, settings: DreamSettings, fmt: str, loaded,
                    controls: Any = None) -> DreamRequest:
        """From a decoded :class:`~onnxdream.imageio.LoadedImage` (kept as uint8 while queued)
        and the creative controls' pictures (:class:`~onnxdream.controls.Controls`), if any."""
        from onnxdream.imageio import to_uint8

        alpha = to_uint8(loaded.alpha) if loaded.alpha is not None else None
        return cls(settings=settings, fmt=fmt, image=to_uint8(loaded.rgb), alpha=alpha,
                   size=(loaded.rgb.shape[1], loaded.rgb.shape[0]), controls=controls)


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
    error: str | None = None  # one sentence, when failed or cancelled
    exception: BaseException | None = None  # what failed it (front ends map its type)
    result: bytes | None = None
    provider: str | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    shutdown: bool = False  # cancelled because the server stops, not by its client
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
            "model": s.model, "seed": s.seed,
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


class JobCancelled(Exception):
    """Raised from the progress callback to stop a cancelled dream."""


class JobError(Exception):
    """The queue refuses or cannot find a job (not a problem with the dream itself)."""


class QueueFull(JobError):
    def __init__(self, retry_after: int, capacity: int):
        super().__init__(f"the server is busy ({capacity} dreams queued or running); "
                         f"retry in {retry_after}s")
        self.retry_after = retry_after


class ShuttingDown(JobError):
    def __init__(self):
        super().__init__(SHUTDOWN)


class UnknownJob(JobError):
    def __init__(self, job_id: str, ttl: float):
        super().__init__(f"no job '{job_id[:64]}' (unknown, deleted, or expired {int(ttl)}s "
                         "after it finished)")


def run_request(req: DreamRequest, models: ModelCache, job: Job | None = None) -> bytes:
    """Dream ``req`` with a model from ``models`` → the encoded image with its provenance.

    With a ``job``, progress goes into it and a set ``job.cancel`` stops the dream at the next
    step (:class:`JobCancelled`).
    """
    from onnxdream.ascent import dream
    from onnxdream.imageio import encode_image
    from onnxdream.provenance import dream_metadata
    from onnxdream.resolve import resolve

    if job is not None and job.cancel.is_set():
        raise JobCancelled()
    gm = models.get(req.key)
    rgb = req.image.astype(np.float32)
    rgb *= np.float32(1.0 / 255.0)
    resolved = resolve(req.settings, rgb.shape[0], rgb.shape[1], gm.info)
    progress = None
    if job is not None:
        job.provider = gm.provider
        job.total = resolved.steps_total

        def progress(p) -> None:
            if job.cancel.is_set():
                raise JobCancelled()
            job.done, job.total, job.octave = p.done, p.total, p.octave
            job.objective = float(p.objective) if math.isfinite(p.objective) else None

    controls = req.controls
    params = controls.params(gm, req.settings, rgb.shape[:2]) if controls is not None else None
    out = dream(gm, rgb, resolved, progress, params)
    if job is not None:
        if job.cancel.is_set():
            raise JobCancelled()
        job.done = job.total
    ext = "jpg" if req.fmt in ("jpeg", "jpg") else req.fmt
    meta = dream_metadata(resolved, objective=gm.objective, provider=gm.provider,
                          image="IMAGE", output=f"dream.{ext}",
                          hashes=controls.hashes if controls is not None else None)
    return encode_image(out, req.alpha, req.fmt, metadata=meta)


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
        self._jobs: dict[str, Job] = {}  # tracked jobs by id
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
        """Cancel everything queued or running (``shutdown`` set on each) and wait for the workers."""
        with self._cond:
            self._stopping = True
            while self._queue:
                job = self._queue.popleft()
                job.shutdown = True
                job.cancel.set()
                self._finish(job, CANCELLED, error=SHUTDOWN)
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
        """Queue ``request``; ``track`` keeps the job findable by id (:meth:`get`)."""
        self.start()
        job = Job(request)
        with self._cond:
            if self._stopping:
                raise ShuttingDown()
            self._sweep()
            if len(self._queue) + self._running >= self.capacity:
                raise QueueFull(self._retry_after(), self.capacity)
            self._queue.append(job)
            if track:
                self._jobs[job.id] = job
            self._cond.notify()
        return job

    def get(self, job_id: str) -> tuple[Job, int | None]:
        """A tracked job and its queue position (None unless queued); UnknownJob if none."""
        with self._cond:
            self._sweep()
            job = self._jobs.get(job_id)
            if job is None:
                raise UnknownJob(job_id, self.config.job_ttl)
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

    def _finish(self, job: Job, state: str, *, error: str | None = None,
                exception: BaseException | None = None, result: bytes | None = None) -> None:
        job.state, job.error, job.exception, job.result = state, error, exception, result
        job.finished = time.monotonic()
        job.request.image = job.request.alpha = job.request.controls = None  # only the result
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
                data = run_request(job.request, self.models, job)
            except JobCancelled:
                outcome = dict(state=CANCELLED, error=SHUTDOWN if job.shutdown else "cancelled")
            except OnnxDreamError as exc:
                outcome = dict(state=FAILED, error=str(exc), exception=exc)
            except Exception as exc:  # noqa: BLE001 - a bug must not kill the worker
                log.exception("job %s failed", job.id)
                outcome = dict(state=FAILED, error=f"internal error: {type(exc).__name__}",
                               exception=exc)
            else:
                outcome = dict(state=DONE, result=data)
            with self._cond:
                self._running -= 1
                self._active.discard(job)
                if outcome["state"] == DONE:
                    self._durations.append(time.monotonic() - (job.started or job.created))
                self._finish(job, **outcome)
                self._cond.notify_all()
