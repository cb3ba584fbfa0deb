"""Dreams as jobs: configuration, a shared model cache, and a bounded queue of worker threads.

No web framework here: the HTTP server (:mod:`onnxdream.server`) and a batch runner both build on
it. :class:`ServerConfig` says what is allowed and how much runs at once (from options and
``ONNXDREAM_*`` variables); :class:`ModelCache` holds one GradientModel (one onnxruntime session)
per objective *structure* (layers and kinds, not weights), shared by every job, each dream
feeding its own weights; :class:`JobManager` runs :class:`DreamRequest`\\ s on a fixed pool of
threads over a bounded FIFO, with progress, cancellation and expiry. A front end takes a place
in the queue (:meth:`JobManager.admit`) before it reads, decodes or compiles anything; queued
requests hold the encoded image, which the worker decodes when the dream starts.

Requests have a ``kind``: ``"image"`` (:class:`DreamRequest`, its result the encoded image in
``Job.result``) or ``"video"`` (:class:`onnxdream.videojobs.VideoRequest`: it runs itself, its
result is a file, ``Job.result_path``, and its ``release()`` removes its folder, which the
manager calls when the job fails, is cancelled, deleted or expires, and when it stops).

Errors: a job's failure is kept as the exception itself (``Job.exception``); front ends map its
*type* to what they show (an HTTP status, an exit code). The queue's own refusals are
:class:`JobError`\\ s: :class:`QueueFull`, :class:`ShuttingDown`, :class:`UnknownJob`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import logging
import math
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import numpy as np

from onnxdream.errors import ModelError, OnnxDreamError, SettingsError, did_you_mean
from onnxdream.memory import budget_from_env as memory_budget_from_env
from onnxdream.settings import DreamSettings, require

__all__ = ["CANCELLED", "DONE", "FAILED", "MB", "QUEUED", "RUNNING", "SHUTDOWN", "Admission",
           "DreamRequest", "Job", "JobCancelled", "JobError", "JobManager", "Loaded", "ModelCache",
           "ModelKey", "QueueFull", "ServerConfig", "ShuttingDown", "UnknownJob", "run_request"]

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


def _ort_dir(given: str | os.PathLike | None) -> Path | None:
    """onnxruntime-web's files for the browser path: ``given`` or ``$ONNXDREAM_ORT_DIR`` (checked
    now: a wrong folder fails at start), else None (the page's browser path is off)."""
    from onnxdream.web import ORT_DIR_ENV, find_ort_dir

    if given is None and not os.environ.get(ORT_DIR_ENV, "").strip():
        return None
    return find_ort_dir(given)


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
    cache_mb: int = 512  # the compiled-graph cache's disk budget (graph_cache.DEFAULT_BUDGET_MB)
    max_results: int = 64  # finished jobs kept at most, whatever their TTL
    threads: int | None = None
    model_paths: dict[str, Path] = field(default_factory=dict)  # name (file stem) -> file
    trusted_hosts: tuple[str, ...] = ()  # Host headers accepted ("*.example.com"); () = any
    docs: bool = False  # serve the Swagger UI at /docs (it loads scripts from a CDN)
    health_ttl: float = 10.0  # seconds a /health self-check result is reused
    # video jobs (onnxdream.videojobs): 0 seconds turns them off
    max_video_seconds: float = 60.0  # longest clip (the selected part) a job may dream
    max_video_body: int = 256 * MB  # largest request body carrying a video
    max_video_disk: int = 4096 * MB  # disk all video jobs together may hold
    jobs_dir: Path | None = None  # where video jobs keep their files (default: <home>/jobs)
    # onnxruntime-web's dist/ folder: the page's "dream in this browser" (onnxdream.web); None: off
    ort_dir: Path | None = None
    max_memory_mb: int = 4096  # for all the dreams running at once (ONNXDREAM_MAX_MEMORY_MB)

    @property
    def dream_memory_mb(self) -> int:
        """The memory budget of one dream: the server's, shared by its workers."""
        return max(1, self.max_memory_mb // self.workers)

    @classmethod
    def from_env(cls, *, workers: int | None = None, max_queue: int | None = None,
                 max_pixels: int | None = None, max_body_mb: float | None = None,
                 max_steps: int | None = None, job_ttl: float | None = None,
                 cache_size: int | None = None, cache_mb: int | None = None,
                 device: str | None = None,
                 model_paths: list[str | os.PathLike] | None = None,
                 trusted_hosts: list[str] | None = None,
                 docs: bool = False, ort_dir: str | os.PathLike | None = None,
                 max_memory_mb: int | None = None,
                 max_video_seconds: float | None = None, max_video_mb: float | None = None,
                 max_video_disk_mb: float | None = None,
                 jobs_dir: str | os.PathLike | None = None) -> ServerConfig:
        """Explicit arguments first, then ``ONNXDREAM_*`` environment variables, then defaults."""
        from onnxdream.graph_cache import budget_from_env

        device = (device or os.environ.get("ONNXDREAM_DEVICE", "").strip() or "auto").lower()
        if device not in ("auto", "cpu", "cuda"):
            raise SettingsError("device", f"must be auto, cpu or cuda, got {device!r}")
        _check_device(device)
        env_paths = [p for p in os.environ.get("ONNXDREAM_MODEL_PATHS", "").split(os.pathsep) if p]
        body_mb = max_body_mb if max_body_mb is not None else _env_int("ONNXDREAM_MAX_BODY_MB", 32)
        if not math.isfinite(body_mb) or body_mb <= 0:
            raise SettingsError("max_body", f"must be a positive number of MB, got {body_mb}")
        if job_ttl is not None and not math.isfinite(job_ttl):
            raise SettingsError("job_ttl", "must be a finite number of seconds")
        hosts = trusted_hosts or [h.strip() for h in os.environ.get(
            "ONNXDREAM_TRUSTED_HOSTS", "").split(",") if h.strip()]
        video_s = _first(max_video_seconds, _env_int("ONNXDREAM_MAX_VIDEO_SECONDS", 60, 0))
        video_mb = _first(max_video_mb, _env_int("ONNXDREAM_MAX_VIDEO_MB", 256))
        disk_mb = _first(max_video_disk_mb, _env_int("ONNXDREAM_MAX_VIDEO_DISK_MB", 4096))
        for name, value in (("max_video_seconds", video_s), ("max_video_body", video_mb),
                            ("max_video_disk", disk_mb)):
            if not math.isfinite(value) or value < 0:
                raise SettingsError(name, f"must be a finite number >= 0, got {value}")
        jobs_dir = jobs_dir or os.environ.get("ONNXDREAM_JOBS_DIR", "").strip() or None
        cfg = cls(
            device=device,
            workers=workers or _env_int("ONNXDREAM_WORKERS", None) or _default_workers(device),
            max_queue=(max_queue if max_queue is not None
                       else _env_int("ONNXDREAM_MAX_QUEUE", 16, 0)),
            max_pixels=max_pixels or _env_int("ONNXDREAM_MAX_PIXELS", 16_000_000),
            max_body=int(float(body_mb) * MB),
            max_steps=max_steps or _env_int("ONNXDREAM_MAX_STEPS", 1000),
            job_ttl=float(job_ttl if job_ttl is not None else _env_int("ONNXDREAM_JOB_TTL", 600)),
            cache_size=cache_size or _env_int("ONNXDREAM_CACHE_SIZE", 4),
            cache_mb=cache_mb if cache_mb is not None else budget_from_env(),
            model_paths=_allowed_models(list(model_paths or []) + env_paths),
            trusted_hosts=tuple(hosts),
            docs=bool(docs),
            ort_dir=_ort_dir(ort_dir),
            max_memory_mb=max_memory_mb or memory_budget_from_env(),
            max_video_seconds=float(video_s),
            max_video_body=int(float(video_mb) * MB),
            max_video_disk=int(float(disk_mb) * MB),
            jobs_dir=Path(jobs_dir).expanduser() if jobs_dir else None,
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
            (self.cache_mb >= 1, "cache_mb", "must be at least 1 (MB of compiled graphs)"),
            (all(h and " " not in h and "/" not in h for h in self.trusted_hosts),
             "trusted_hosts", "must be host names like example.com or *.example.com"),
            (self.health_ttl >= 0, "health_ttl", "must be >= 0 seconds"),
            (self.max_memory_mb >= 1, "max_memory_mb", "must be a positive number of MB"),
            (self.max_video_seconds >= 0, "max_video_seconds", "must be >= 0 (0: no videos)"),
            (self.max_video_body >= 1024, "max_video_body", "must be at least 1 KB"),
            (self.max_video_disk >= MB, "max_video_disk", "must be at least 1 MB"),
        ])
        return self


def _first(value, default):
    return value if value is not None else default


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


#: What a loaded GradientModel depends on: (model, the objective's structure (layer, kind,
#: index per term), pre_relu, border). Not the weights: one model serves every weighting.
ModelKey = tuple[str, tuple[tuple[str, str, "int | None"], ...], bool, int]


class Loaded(NamedTuple):
    """A shared GradientModel and what one dream feeds it: its objective and parameters."""

    model: Any  # GradientModel
    objective: Any  # the dream's Objective (its weights, for provenance)
    params: dict[str, np.ndarray]  # gm.params_for(objective): the dream's own, never gm's


class ModelCache:
    """GradientModels keyed by :data:`ModelKey`; thread-safe, bounded LRU.

    The key leaves out the term weights (they are the compiled graph's ``weights`` input): a
    dream with other weights gets the same model and its own parameters (:class:`Loaded`), and
    nothing shared is changed by a request. Compiled graphs go to ``compiled`` (a
    :class:`~onnxdream.graph_cache.CompiledCache` with the configured disk budget).

    One model is built at a time (a compile holds a few hundred MB while it runs); lookups of
    loaded models never wait for a build. A model dropped from the cache while a dream uses it
    lives until that dream ends. Models are named by zoo name or by the file stem of a model
    the operator allowed, never by a path from a request.
    """

    def __init__(self, config: ServerConfig):
        from onnxdream.graph_cache import CompiledCache

        self.config = config
        self.compiled = CompiledCache(budget_mb=config.cache_mb)
        self._lock = threading.Lock()
        self._build_lock = threading.Lock()
        self._models: collections.OrderedDict[ModelKey, Any] = collections.OrderedDict()
        self._infos: dict[str, tuple[Any, dict[str, str]]] = {}  # name -> (ModelInfo, names)

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

    def _read(self, name: str) -> tuple[Any, dict[str, str]]:
        """(ModelInfo, its layer and tensor names) of model ``name``, read once."""
        with self._lock:
            if name in self._infos:
                return self._infos[name]
        from onnxdream.exporters.graph.contract import ModelInfo, load_model, require_dreamable
        from onnxdream.exporters.graph.layers import layer_names
        from onnxdream.gradient import resolve_model_path

        with self._build_lock:
            path = resolve_model_path(self.source(name))
            proto = load_model(path)
            require_dreamable(proto, path.name)  # a raw ONNX file: say how to import it
            info = ModelInfo.load(proto)
            result = (info, layer_names(proto, info.layers))
        with self._lock:
            return self._infos.setdefault(name, result)

    def info(self, name: str):
        """The contract's :class:`~onnxdream.exporters.graph.contract.ModelInfo` of model
        ``name`` (read once)."""
        return self._read(name)[0]

    def layer_names(self, name: str) -> dict[str, str]:
        """Every name a layer of model ``name`` may be given by (the layer table's and the
        tensors') → its tensor, for parsing ``layer`` fields (read once)."""
        return self._read(name)[1]

    def objective(self, settings: DreamSettings):
        """The dream's Objective (layer names checked against the model, weights in range)."""
        from onnxdream.gradient import objective_for

        info, known = self._read(settings.model)
        return objective_for(info, known, list(settings.layers),
                             settings.objective).check_weights()

    def key(self, settings: DreamSettings, objective=None) -> ModelKey:
        objective = objective or self.objective(settings)
        return (settings.model, tuple(map(tuple, objective.structure())),
                bool(settings.pre_relu), int(settings.border))

    def get(self, settings: DreamSettings, *, keep: bool = True) -> Loaded:
        """The shared GradientModel for ``settings`` (built, and cached, on first use) and the
        parameters of this dream's weighting. ``keep=False`` builds one without caching it
        (atlas thumbnails: used once, they must not push the dreams' sessions out), unless it
        is cached already."""
        objective = self.objective(settings)
        key = self.key(settings, objective)
        with self._lock:
            gm = self._models.get(key)
            if gm is not None:
                self._models.move_to_end(key)
                return Loaded(gm, objective, gm.params_for(objective))
        with self._build_lock:
            with self._lock:
                gm = self._models.get(key)
            if gm is None:
                gm = self._build(key, objective)
                if not keep:
                    return Loaded(gm, objective, gm.params_for(objective))
            with self._lock:
                self._models[key] = gm
                self._models.move_to_end(key)
                while len(self._models) > self.config.cache_size:
                    self._models.popitem(last=False)
        return Loaded(gm, objective, gm.params_for(objective))

    def _build(self, key: ModelKey, objective):
        from onnxdream.gradient import GradientModel

        model, _, pre_relu, border = key
        t0 = time.perf_counter()
        gm = GradientModel(self.source(model), objective, pre_relu=pre_relu, border=border,
                           device=self.config.device, threads=self.config.threads,
                           cache=self.compiled)
        if gm.session.fallback_warning:
            log.warning("%s", gm.session.fallback_warning)
        log.info("loaded %s %s on %s in %.1fs", model, gm.objective.describe(), gm.provider,
                 time.perf_counter() - t0)
        return gm

    def layers(self, name: str) -> tuple[list[str], list[str]]:
        """(all layer names, default layers) of model ``name``."""
        info = self.info(name)
        return list(info.layers), list(info.default_layers)

    def loaded(self) -> list[dict[str, Any]]:
        with self._lock:
            items = list(self._models.items())
        return [{"model": k[0], "objective": " + ".join(f"{kind}({layer})" if index is None
                                                        else f"{kind}:{index}({layer})"
                                                        for layer, kind, index in k[1]),
                 "pre_relu": k[2], "provider": gm.provider} for k, gm in items]

    def provider(self) -> str:
        with self._lock:
            for gm in self._models.values():
                return gm.provider
        from onnxdream.session import resolve_providers

        first = resolve_providers(self.config.device)[0]
        return first[0] if isinstance(first, tuple) else first


# ---------------------------------------------------------------------------------------------
# Requests and jobs


class Work:
    """What a job runs: a dream (:class:`DreamRequest`), a video
    (:class:`~onnxdream.videojobs.VideoRequest`) or a model's atlas thumbnails
    (:class:`~onnxdream.atlas_cache.AtlasRequest`). A :class:`Job` reads ``kind``, ``settings``,
    ``fmt``, ``size`` and ``work`` of it; the worker calls :meth:`run`, then
    :meth:`forget_input` once the job has finished and :meth:`release` when its files may go."""

    kind: ClassVar[str] = "work"

    @property
    def work(self) -> float:
        """The cost in pixel-steps, for queue wait estimates (0: unknown)."""
        return 0.0

    def run(self, models: ModelCache, job: Job | None = None) -> bytes | Path:
        raise NotImplementedError

    def forget_input(self) -> None:
        """Drop what the request holds in memory (the job finished: only its result is kept)."""

    def release(self) -> None:
        """Give back what the request holds outside its Job (files); called when the job
        fails, is cancelled, deleted or expires, maybe more than once."""


@dataclass(eq=False)
class DreamRequest(Work):
    """A validated dream: what to run and on which pixels.

    Either the encoded upload (``data``, decoded by the worker when the dream starts, so that
    queued dreams hold kilobytes, not decoded megapixels) or decoded uint8 pixels (``image``);
    both are dropped once the job finishes.
    """

    kind: ClassVar[str] = "image"
    settings: DreamSettings  # validated, seed fixed
    fmt: str  # output format: png, jpeg (jpg) or webp
    image: np.ndarray | None  # uint8 HxWx3
    alpha: np.ndarray | None  # uint8 HxW
    size: tuple[int, int]  # (width, height)
    data: bytes | None = None  # the encoded image, when not decoded yet
    max_pixels: int | None = None  # the decoder's limit for ``data``
    controls: Any = None  # onnxdream.controls.Controls: the guide's and masks' pictures

    def run(self, models: ModelCache, job: Job | None = None) -> bytes:
        """What a worker does with this request (:func:`run_request`); other kinds of work
        (the server's atlas thumbnails) have a ``run`` of their own."""
        return run_request(self, models, job)

    @classmethod
    def from_bytes(cls, settings: DreamSettings, fmt: str, data: bytes | None,
                   max_pixels: int | None, controls: Any = None) -> DreamRequest:
        """From an encoded image, checked from its header only (format, size, the pixel
        limit: ImageError / ImageTooLargeError) and decoded when the dream runs; or, with no
        ``data``, a dream from ``settings.init`` (noise or grey) of ``settings.size``.
        ``controls``: the creative controls' pictures (:class:`~onnxdream.controls.Controls`)."""
        from onnxdream.errors import ImageTooLargeError
        from onnxdream.imageio import image_size

        if data is None:
            size = tuple(settings.size)
            if max_pixels is not None and size[0] * size[1] > max_pixels:
                raise ImageTooLargeError(f"size {size[0]}x{size[1]}", size[0] * size[1],
                                         max_pixels)
        else:
            size = image_size(data, max_pixels=max_pixels)
        return cls(settings=settings, fmt=fmt, image=None, alpha=None, size=size, data=data,
                   max_pixels=max_pixels, controls=controls)

    def forget_input(self) -> None:
        """Drop the pixels (the job finished: only its result is kept)."""
        self.image = self.alpha = self.data = self.controls = None

    def pixels(self) -> tuple[np.ndarray, np.ndarray | None]:
        """(float32 HxWx3 in [0,1], uint8 HxW alpha or None), decoding ``data`` if needed."""
        from onnxdream.imageio import load_image_bytes, to_uint8

        if self.image is not None:
            rgb = self.image.astype(np.float32)
            rgb *= np.float32(1.0 / 255.0)
            return rgb, self.alpha
        if self.data is None:  # a dream without a photo: its start, from the seed
            from onnxdream.controls import init_image

            w, h = self.size
            return init_image(self.settings.init, (h, w), self.settings.seed), None
        loaded = load_image_bytes(self.data, name="the uploaded image",
                                  max_pixels=self.max_pixels)
        self.data = None  # decoded: the bytes are not needed any more
        self.size = loaded.size
        return loaded.rgb, (to_uint8(loaded.alpha) if loaded.alpha is not None else None)

    @property
    def work(self) -> float:
        """The dream's cost in pixel-steps (over its octaves), for queue wait estimates."""
        from onnxdream.resolve import resolve

        w, h = self.size
        # the octaves as the resolver decides them ("auto": for the default native size, the
        # model's is not known yet)
        sizes = resolve(self.settings, h, w).octave_sizes
        return float(sum(a * b for a, b in sizes) * self.settings.steps)


QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"


@dataclass(eq=False)
class Job:
    request: Work
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
    result: bytes | None = None  # an image job's image
    result_path: Path | None = None  # a video job's file (its request owns the folder)
    provider: str | None = None
    stage: str | None = None  # a video job's: "dream", then "encode"
    rate: float | None = None  # a video job's frames dreamed per second
    eta: float | None = None  # a video job's seconds left (its own estimate)
    work: float = 0.0  # pixel-steps (DreamRequest.work), for wait estimates
    cancel: threading.Event = field(default_factory=threading.Event)
    shutdown: bool = False  # cancelled because the server stops, not by its client
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)

    def view(self, position: int | None = None) -> dict[str, Any]:
        now = time.monotonic()
        video = self.request.kind == "video"
        progress = 1.0 if self.state == DONE else (self.done / self.total if self.total else 0.0)
        if video and self.state != DONE:
            progress = min(progress, 0.99)  # the encode comes after the last frame
        eta = None
        if self.state == RUNNING and video:
            eta = None if self.eta is None else round(self.eta, 1)
        elif self.state == RUNNING and self.started is not None and self.done:
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
        if video:
            for key in ("steps_done", "steps_total", "octave", "objective"):
                del out[key]
            out.update(kind="video", frames_done=self.done,
                       frames_total=self.total or self.request.frames,
                       fps=round(self.rate or 0.0, 3),
                       stage=self.stage if self.state == RUNNING else None,
                       frame_rate=round(float(self.request.fps), 3))
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


def run_request(req: DreamRequest, models: ModelCache, job: Job | None = None) -> bytes | Path:
    """Dream ``req`` with a model from ``models`` → the encoded image with its provenance (a
    video request: the path of the dreamed video, inside the request's own folder).

    With a ``job``, progress goes into it and a set ``job.cancel`` stops the dream at the next
    step (:class:`JobCancelled`).
    """
    if req.kind != "image":  # a video (onnxdream.videojobs.VideoRequest): a file comes back
        return req.run(models, job)
    from onnxdream.ascent import dream
    from onnxdream.imageio import encode_image
    from onnxdream.provenance import dream_metadata
    from onnxdream.resolve import resolve

    if job is not None and job.cancel.is_set():
        raise JobCancelled()
    gm, objective, params = models.get(req.settings)
    rgb, alpha = req.pixels()
    config = models.config
    resolved = resolve(req.settings, rgb.shape[0], rgb.shape[1], gm.info, memory=gm.memory,
                       budget_mb=config.dream_memory_mb)  # MemoryBudgetError: 413
    if resolved.steps_total > config.max_steps:  # octaves "auto" are known only now
        raise SettingsError("steps", f"x {resolved.octaves} octaves is {resolved.steps_total} "
                                     f"steps, more than this server's limit of {config.max_steps}")
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
    if controls is not None:
        params = controls.params(gm, req.settings, rgb.shape[:2], base=params)
    out = dream(gm, rgb, resolved, progress, params)
    if job is not None:
        if job.cancel.is_set():
            raise JobCancelled()
        job.done = job.total
    ext = "jpg" if req.fmt in ("jpeg", "jpg") else req.fmt
    meta = dream_metadata(resolved, objective=objective, provider=gm.provider,
                          image="IMAGE", output=f"dream.{ext}",
                          hashes=controls.hashes if controls is not None else None)
    return encode_image(out, alpha, req.fmt, metadata=meta)


class Admission:
    """A place in the queue, held while a request is read, checked and compiled; see
    :meth:`JobManager.admit`."""

    def __init__(self) -> None:
        self.used = False


class JobManager:
    """A fixed pool of worker threads over a bounded FIFO; finished jobs expire.

    At most ``workers + max_queue`` dreams are outstanding (being admitted, queued, or running
    including ones cancelled but not yet stopped); beyond that :meth:`admit` and :meth:`submit`
    raise :class:`QueueFull` with a Retry-After estimate: the work waiting ahead (each dream's
    pixel-steps, see :attr:`DreamRequest.work`) at the rate recent dreams ran.

    A front end calls :meth:`admit` *before* reading, decoding or compiling anything for a
    request, so a full queue costs nothing but the refusal.
    """

    #: seconds per dream assumed before any dream has finished or made progress
    DEFAULT_JOB_SECONDS = 10.0

    def __init__(self, config: ServerConfig, models: ModelCache, *,
                 clock: Callable[[], float] = time.monotonic):
        self.config = config
        self.models = models
        self._clock = clock
        self._cond = threading.Condition()
        self._queue: collections.deque[Job] = collections.deque()
        self._jobs: dict[str, Job] = {}  # tracked jobs by id
        self._running = 0
        self._admitting = 0  # places held by admit() not yet submitted
        self._active: set[Job] = set()  # running now, tracked or not
        self._threads: list[threading.Thread] = []
        self._stopping = False
        self._finished_work: collections.deque[tuple[float, float]] = collections.deque(maxlen=20)

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
        """Cancel everything queued or running (``shutdown`` set on each); wait for the workers."""
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
            for job in self._jobs.values():
                if job.finished is not None:
                    job.request.release()  # results on disk go with the server
            self._cond.notify_all()
            threads = list(self._threads)
        for t in threads:
            if t is not threading.current_thread():
                t.join(timeout)

    # -- API
    @property
    def capacity(self) -> int:
        return self.config.workers + self.config.max_queue

    @contextlib.contextmanager
    def admit(self) -> Iterator[Admission]:
        """Hold a place for a request while it is read and checked (QueueFull / ShuttingDown
        at once when there is none); pass the :class:`Admission` to :meth:`submit`. The place
        is given back if the block ends without submitting (a bad request)."""
        with self._cond:
            self._check_room()
            self._admitting += 1
        ticket = Admission()
        try:
            yield ticket
        finally:
            if not ticket.used:
                with self._cond:
                    self._admitting -= 1
                    ticket.used = True

    def submit(self, request: DreamRequest, *, track: bool,
               admission: Admission | None = None) -> Job:
        """Queue ``request``; ``track`` keeps the job findable by id (:meth:`get`). With an
        ``admission`` from :meth:`admit` its place is used (no second capacity check)."""
        self.start()
        job = Job(request, created=self._clock())
        job.work = request.work
        with self._cond:
            if admission is not None and not admission.used:
                admission.used = True
                self._admitting -= 1
                if self._stopping:
                    raise ShuttingDown()
            else:
                self._check_room()
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
        """Stop ``job`` at its next step (or before it starts) and forget it; a finished job's
        files (a video's folder) are removed now, a running one's when it stops."""
        with self._cond:
            job.cancel.set()
            self._jobs.pop(job.id, None)
            if job.state == QUEUED and job in self._queue:
                self._queue.remove(job)
                self._finish(job, CANCELLED, error="cancelled")
            elif job.finished is not None:
                job.request.release()

    def stats(self) -> dict[str, Any]:
        with self._cond:
            self._sweep()
            return {"queued": len(self._queue), "running": self._running,
                    "admitting": self._admitting, "capacity": self.capacity,
                    "jobs_kept": len(self._jobs)}

    def retry_after(self) -> int:
        """Seconds until a place is likely free (what a 503's Retry-After says)."""
        with self._cond:
            return self._retry_after()

    # -- internals (call with self._cond held)
    def _check_room(self) -> None:
        if self._stopping:
            raise ShuttingDown()
        self._sweep()
        if len(self._queue) + self._running + self._admitting >= self.capacity:
            raise QueueFull(self._retry_after(), self.capacity)

    def _sweep(self) -> None:
        now = self._clock()
        finished = [j for j in self._jobs.values() if j.finished is not None]
        for j in finished:
            if now - j.finished > self.config.job_ttl:
                del self._jobs[j.id]
                j.request.release()
        finished = sorted((j for j in self._jobs.values() if j.finished is not None),
                          key=lambda j: j.finished)
        for j in finished[:max(0, len(finished) - self.config.max_results)]:
            del self._jobs[j.id]
            j.request.release()

    def _rate(self) -> float | None:
        """Pixel-steps per second of one worker: recent finished dreams, else the progress of
        the running ones; None when nothing is known yet."""
        work = sum(w for w, _ in self._finished_work)
        seconds = sum(t for _, t in self._finished_work)
        if not self._finished_work:
            now = self._clock()
            for job in self._active:
                if job.started is not None and job.total and job.done:
                    work += job.work * job.done / job.total
                    seconds += now - job.started
        return work / seconds if work > 0 and seconds > 0 else None

    def _retry_after(self) -> int:
        """The work ahead of a new request (the rest of the running dreams, the queued ones,
        those being admitted) over the recent rate, shared by the workers."""
        running = [j.work * (1 - (j.done / j.total if j.total else 0.0)) for j in self._active]
        queued = [j.work for j in self._queue]
        known = running + queued
        per_job = sum(known) / len(known) if known else 0.0
        ahead = sum(known) + per_job * self._admitting
        rate = self._rate()
        if rate is None or ahead <= 0:
            seconds = self.DEFAULT_JOB_SECONDS * (len(known) + self._admitting)
        else:
            seconds = ahead / rate
        return int(min(3600, max(1, math.ceil(seconds / self.config.workers))))

    def _finish(self, job: Job, state: str, *, error: str | None = None,
                exception: BaseException | None = None,
                result: bytes | Path | None = None) -> None:
        job.state, job.error, job.exception = state, error, exception
        if isinstance(result, Path):
            job.result_path = result
        else:
            job.result = result
        job.finished = self._clock()
        try:
            job.request.forget_input()  # only the result now
            if state != DONE or (job.id not in self._jobs and job.result_path is not None):
                job.request.release()  # failed, cancelled or forgotten: its files go now
        except Exception:  # noqa: BLE001 - a bug here must not kill the worker nor the waiter
            log.exception("job %s: releasing its input failed", job.id)
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
                job.state, job.started = RUNNING, self._clock()
            try:
                data = job.request.run(self.models, job)
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
                    seconds = self._clock() - (job.started or job.created)
                    if seconds > 0:
                        self._finished_work.append((job.work, seconds))
                self._finish(job, **outcome)
                self._cond.notify_all()
