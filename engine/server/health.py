"""The server's health: whether it can dream now (``GET /health``)."""

from __future__ import annotations

import math
import threading
import time

import numpy as np

from onnxdream.core.errors import first_line
from onnxdream.exporters.graph.builder import probe_model
from onnxdream.jobs.config import ServerConfig
from onnxdream.runtime.model_cache import ModelCache
from onnxdream.runtime.session import create_session

__all__ = ["HealthCheck"]


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
            session = create_session(probe_model().SerializeToString(),
                                     device=self.config.device, threads=1)
            session.run(["y"], {"x": np.zeros(1, np.float32)})
        except Exception as exc:  # noqa: BLE001 - whatever it is, the server cannot work
            return f"onnxruntime cannot create a session ({first_line(exc, 120)})"
        return None
