"""What a dream server allows and how much it runs at once: :class:`ServerConfig`, from explicit
options, then ``ONNXDREAM_*`` environment variables, then defaults (the README's table lists the
variables). No web framework here: the job queue (:mod:`onnxdream.jobs.queue`) and the server both
read it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from onnxdream.core.env import env_int
from onnxdream.core.errors import ModelError, SettingsError
from onnxdream.runtime.graph_cache import CompiledCache
from onnxdream.runtime.model_cache import ModelCache
from onnxdream.settings.memory import budget_from_env as memory_budget_from_env
from onnxdream.settings.options import require

__all__ = ["MB", "ServerConfig"]

MB = 1024 * 1024



def _check_device(device: str) -> None:
    """Fail at start-up, not on the first request: onnxruntime missing, or no CUDA for cuda."""
    from onnxdream.core.errors import DeviceError
    from onnxdream.runtime.session import available_devices

    if device == "cuda" and "cuda" not in available_devices():
        raise DeviceError("device cuda: this onnxruntime has no CUDA provider; install "
                          "onnxdream[gpu] and a CUDA driver, or use the cpu device",
                          field="device")


def _default_workers(device: str) -> int:
    from onnxdream.runtime.session import available_devices, default_threads

    if device == "cuda" or (device == "auto" and "cuda" in available_devices()):
        return 2  # one overlaps the host-side work (resize, normalise) of the other
    return 1 if default_threads() < 8 else 2


def _ort_dir(given: str | os.PathLike | None) -> Path | None:
    """onnxruntime-web's files for the browser path: ``given`` or ``$ONNXDREAM_ORT_DIR`` (checked
    now: a wrong folder fails at start), else None (the page's browser path is off)."""
    from onnxdream.browser.site import ORT_DIR_ENV, find_ort_dir

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
    # video jobs (onnxdream.jobs.video): 0 seconds turns them off
    max_video_seconds: float = 60.0  # longest clip (the selected part) a job may dream
    max_video_body: int = 256 * MB  # largest request body carrying a video
    max_video_disk: int = 4096 * MB  # disk all video jobs together may hold
    jobs_dir: Path | None = None  # where video jobs keep their files (default: <home>/jobs)
    # onnxruntime-web's dist/ folder: the page's "dream in this browser" (onnxdream.browser.site);
    # None: off
    ort_dir: Path | None = None
    max_memory_mb: int = 4096  # for all the dreams running at once (ONNXDREAM_MAX_MEMORY_MB)

    def model_cache(self) -> ModelCache:
        """The server's model cache: its device, threads and cache size, the compiled-graph
        cache under its disk budget, and only the zoo and the allowed files as models."""
        return ModelCache(device=self.device, threads=self.threads, size=self.cache_size,
                          compiled=CompiledCache(budget_mb=self.cache_mb),
                          allowed=self.model_paths)

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
        from onnxdream.runtime.graph_cache import budget_from_env

        device = (device or os.environ.get("ONNXDREAM_DEVICE", "").strip() or "auto").lower()
        if device not in ("auto", "cpu", "cuda"):
            raise SettingsError("device", f"must be auto, cpu or cuda, got {device!r}")
        _check_device(device)
        env_paths = [p for p in os.environ.get("ONNXDREAM_MODEL_PATHS", "").split(os.pathsep) if p]
        body_mb = max_body_mb if max_body_mb is not None else env_int("ONNXDREAM_MAX_BODY_MB", 32)
        if not math.isfinite(body_mb) or body_mb <= 0:
            raise SettingsError("max_body", f"must be a positive number of MB, got {body_mb}")
        if job_ttl is not None and not math.isfinite(job_ttl):
            raise SettingsError("job_ttl", "must be a finite number of seconds")
        hosts = trusted_hosts or [h.strip() for h in os.environ.get(
            "ONNXDREAM_TRUSTED_HOSTS", "").split(",") if h.strip()]
        video_s = _first(max_video_seconds, env_int("ONNXDREAM_MAX_VIDEO_SECONDS", 60, minimum=0))
        video_mb = _first(max_video_mb, env_int("ONNXDREAM_MAX_VIDEO_MB", 256))
        disk_mb = _first(max_video_disk_mb, env_int("ONNXDREAM_MAX_VIDEO_DISK_MB", 4096))
        for name, value in (("max_video_seconds", video_s), ("max_video_body", video_mb),
                            ("max_video_disk", disk_mb)):
            if not math.isfinite(value) or value < 0:
                raise SettingsError(name, f"must be a finite number >= 0, got {value}")
        jobs_dir = jobs_dir or os.environ.get("ONNXDREAM_JOBS_DIR", "").strip() or None
        cfg = cls(
            device=device,
            workers=workers or env_int("ONNXDREAM_WORKERS", None) or _default_workers(device),
            max_queue=(max_queue if max_queue is not None
                       else env_int("ONNXDREAM_MAX_QUEUE", 16, minimum=0)),
            max_pixels=max_pixels or env_int("ONNXDREAM_MAX_PIXELS", 16_000_000),
            max_body=int(float(body_mb) * MB),
            max_steps=max_steps or env_int("ONNXDREAM_MAX_STEPS", 1000),
            job_ttl=float(job_ttl if job_ttl is not None else env_int("ONNXDREAM_JOB_TTL", 600)),
            cache_size=cache_size or env_int("ONNXDREAM_CACHE_SIZE", 4),
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
