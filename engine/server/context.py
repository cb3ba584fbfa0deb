"""What the routes of one app share: its configuration, model cache, job queue, video work area,
atlas store, health check, error responses, and whether it dreams videos."""

from __future__ import annotations

from dataclasses import dataclass

from onnxdream.jobs.atlas_cache import AtlasStore
from onnxdream.jobs.config import ServerConfig
from onnxdream.jobs.queue import JobManager
from onnxdream.jobs.video import WorkArea
from onnxdream.runtime.model_cache import ModelCache
from onnxdream.server.errors import Errors
from onnxdream.server.health import HealthCheck

__all__ = ["ServerContext"]


@dataclass
class ServerContext:
    """One app's shared parts (made by :func:`onnxdream.server.app.create_app`)."""

    config: ServerConfig
    models: ModelCache
    jobs: JobManager
    area: WorkArea  # where video jobs keep their files, within the disk budget
    atlas: AtlasStore
    health: HealthCheck
    errors: Errors
    video_unavailable: str | None  # None: this server dreams videos; else why not
