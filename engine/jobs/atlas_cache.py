"""The server's layer thumbnails: each recommended layer's dream of the bundled example, computed
once per model in the background and kept on disk.

``GET /models/{name}/atlas`` asks :meth:`AtlasStore.status`: the thumbnails already on disk, and
for the missing ones an :class:`AtlasRequest` queued on the server's
:class:`~onnxdream.jobs.queue.JobManager` (so it shares the worker limit and the queue bound with
dreams, and steps aside between thumbnails when a dream waits); the page polls and shows
thumbnails as they arrive. Each thumbnail is one cell of :func:`onnxdream.dream.atlas.dream_atlas`
(the bundled example, ``cell`` pixels square, default settings with the model's recommended
step size, seed 0), written atomically as ``<home>/atlas/<digest>/<layer>.png`` where the
digest covers the model file's bytes, the settings and the picture, so a new model or new
settings never reuse old thumbnails. At most :data:`KEEP` such folders are kept (the least
recently written are removed). No FastAPI here; the routes are in :mod:`onnxdream.server.app`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

from onnxdream.core.errors import OnnxDreamError
from onnxdream.jobs.queue import (
    DONE,
    FAILED,
    QUEUED,
    RUNNING,
    Job,
    JobCancelled,
    JobManager,
    ModelCache,
    QueueFull,
    Work,
)
from onnxdream.settings.options import DreamSettings

__all__ = ["ATLAS_VERSION", "CELL", "KEEP", "AtlasRequest", "AtlasStore", "ThumbnailMissing",
           "layer_file"]

log = logging.getLogger("onnxdream.atlas")

#: Bump when the thumbnails' recipe changes: part of the digest.
ATLAS_VERSION = "1"
#: Side of a thumbnail in pixels (each is dreamed at this size).
CELL = 160
#: Atlas folders kept under the model home (one per model file and recipe).
KEEP = 16
#: Seconds before a failed atlas is tried again.
RETRY_FAILED_S = 300.0

_SAFE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,79}")
_digests: dict[tuple[str, int, int], str] = {}


class ThumbnailMissing(OnnxDreamError):
    """No such thumbnail (yet): not a recommended layer, or not computed."""


def layer_file(layer: str) -> str:
    """The file stem of ``layer``'s thumbnail: the name itself when it is a safe file name,
    else a sanitised prefix and a hash of the name (tf2onnx names have ``/`` and ``:``)."""
    if _SAFE.fullmatch(layer) and not layer.endswith("."):
        return layer
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", layer).strip("-.")[:40] or "layer"
    return f"{stem}-{hashlib.sha256(layer.encode('utf-8')).hexdigest()[:10]}"


def _file_digest(path: Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _digests:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _digests[key] = h.hexdigest()
    return _digests[key]


@dataclass
class _Entry:
    """What the store knows of one model: where its thumbnails go, and which layers."""

    folder: Path
    version: str  # 12 hex digits of the digest, for cache-busting URLs
    layers: list[str]
    job: Job | None = None
    failed_at: float | None = None


@dataclass(eq=False)
class AtlasRequest(Work):
    """A job computing a model's missing thumbnails (run by the JobManager's workers)."""

    settings: DreamSettings  # model = the server's name for it; seed fixed
    layers: list[str]  # the missing ones
    folder: Path
    cell: int
    #: True when other work waits: the job then stops after the cell at hand (the page asks
    #: again and queues the rest behind that work), so thumbnails never hold up a dream long
    yield_to: Callable[[], bool] | None = None
    fmt: str = "png"
    size: tuple[int, int] = field(init=False)

    def __post_init__(self):
        self.size = (self.cell, self.cell)

    @property
    def work(self) -> float:
        """Pixel-steps of the missing thumbnails (for the queue's wait estimates)."""
        s = self.settings
        octaves = s.octaves if isinstance(s.octaves, int) else 2
        return float(self.cell * self.cell * s.steps * octaves * len(self.layers))

    def run(self, models: ModelCache, job: Job | None = None) -> bytes:
        from onnxdream.core.atomic import write_atomic
        from onnxdream.dream.atlas import EXAMPLE, dream_atlas, start_image
        from onnxdream.media.imagewrite import encode_image
        from onnxdream.settings.provenance import atlas_metadata
        from onnxdream.settings.resolve import resolve

        start = start_image(EXAMPLE, "photo", self.cell)
        infos = []

        def make(cell_settings: DreamSettings):
            gm = models.get(cell_settings, keep=False).model
            infos.append(gm)
            return gm

        def progress(p) -> None:
            if job is not None:
                if job.cancel.is_set():
                    raise JobCancelled()
                job.done, job.total = p.done, p.total

        def store(_i: int, layer: str, image: np.ndarray) -> None:
            gm = infos[-1]
            resolved = resolve(replace(self.settings, layers=(layer,)), self.cell, self.cell,
                               gm.info)
            meta = atlas_metadata(resolved, layers=[layer], cell=self.cell, init="photo",
                                  provider=gm.provider)
            self.folder.mkdir(parents=True, exist_ok=True)
            write_atomic(self.folder / f"{layer_file(layer)}.png",
                         encode_image(image, None, "png", metadata=meta))
            infos.clear()  # the session can go
            done.append(layer)
            if self.yield_to is not None and self.yield_to():
                raise _YieldWorker()

        done: list[str] = []
        try:
            dream_atlas(self.settings.model, start, self.layers, self.settings,
                        progress=progress, on_cell=store, gradient_model=make)
        except _YieldWorker:
            pass
        return json.dumps(done).encode("utf-8")


class _YieldWorker(Exception):
    """Stops an atlas job between cells when dreams are waiting."""


class AtlasStore:
    """Thumbnails of each model's recommended layers, on disk, computed through ``jobs``."""

    def __init__(self, models: ModelCache, jobs: JobManager, *, cell: int = CELL,
                 settings: DreamSettings | None = None, root: Path | None = None,
                 keep: int = KEEP):
        self.models, self.jobs, self.cell, self.keep = models, jobs, cell, keep
        self.settings = settings or DreamSettings(seed=0)
        self._root = root
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}

    @property
    def root(self) -> Path:
        from onnxdream.models import model_home

        return self._root or model_home() / "atlas"

    # -- what a model has
    def _entry(self, name: str) -> _Entry:
        """The entry of model ``name`` (loaded once: a model file is read here)."""
        with self._lock:
            entry = self._entries.get(name)
        if entry is not None:
            return entry
        from onnxdream.dream.atlas import EXAMPLE
        from onnxdream.runtime.opening import resolve_model_path

        info = self.models.info(name)
        path = resolve_model_path(self.models.source(name))
        recipe = json.dumps([ATLAS_VERSION, self.cell, _file_digest(EXAMPLE),
                             {k: v for k, v in vars(self.settings).items() if k != "model"}],
                            sort_keys=True, default=str)
        digest = hashlib.sha256(f"{_file_digest(path)}\0{recipe}".encode()).hexdigest()
        entry = _Entry(self.root / digest[:24], digest[:12], list(info.recommended_layers))
        with self._lock:
            return self._entries.setdefault(name, entry)

    def _url(self, name: str, entry: _Entry, layer: str) -> str:
        return (f"/models/{quote(name, safe='')}/atlas/{quote(layer_file(layer), safe='')}.png"
                f"?v={entry.version}")

    def status(self, name: str) -> tuple[int, dict[str, Any], dict[str, str]]:
        """(HTTP status, body, headers) of ``GET /models/{name}/atlas``: 200 when every
        thumbnail is on disk, else 202 with the ones there so far, having queued the rest.
        ModelError for a model the server does not offer; a failed computation raises its
        exception (the server maps its type to a status)."""
        entry = self._entry(name)
        have = {layer: (entry.folder / f"{layer_file(layer)}.png").is_file()
                for layer in entry.layers}
        rows = [{"layer": layer, "url": self._url(name, entry, layer) if ok else None}
                for layer, ok in have.items()]
        body: dict[str, Any] = {"model": name, "cell": self.cell, "layers": rows}
        missing = [layer for layer, ok in have.items() if not ok]
        if not missing:
            return 200, {**body, "state": DONE, "progress": 1.0}, {}
        with self._lock:
            job = entry.job
            if job is not None and job.state == FAILED and job.exception is not None:
                if time.monotonic() - (entry.failed_at or 0.0) < RETRY_FAILED_S:
                    raise job.exception
            if job is None or job.state not in (QUEUED, RUNNING):
                request = AtlasRequest(replace(self.settings, model=name), missing,
                                       entry.folder, self.cell,
                                       yield_to=lambda: self.jobs.stats()["queued"] > 0)
                try:
                    job = entry.job = self.jobs.submit(request, track=False)
                except QueueFull as exc:
                    return 202, {**body, "state": "waiting", "progress": 0.0}, {
                        "Retry-After": str(exc.retry_after)}
                job.future.add_done_callback(lambda f, e=entry: self._finished(e, f.result()))
                self._prune(entry.folder)
        progress = job.done / job.total if job.total else 0.0
        return 202, {**body, "state": job.state, "progress": round(progress, 3)}, {
            "Retry-After": "2"}

    def _finished(self, entry: _Entry, job: Job) -> None:
        if job.state == FAILED:
            entry.failed_at = time.monotonic()
            log.warning("atlas thumbnails failed: %s", job.error)

    def thumbnail(self, name: str, stem: str) -> Path:
        """The thumbnail file ``stem``.png of model ``name``; ThumbnailMissing if it is not
        one of the model's recommended layers or not computed yet."""
        entry = self._entry(name)
        stems = {layer_file(layer) for layer in entry.layers}
        path = entry.folder / f"{stem}.png"
        if stem not in stems or not path.is_file():
            raise ThumbnailMissing(f"no thumbnail '{stem[:80]}' of {name} (yet): GET "
                                   f"/models/{name}/atlas computes them")
        return path

    def _prune(self, keep_folder: Path) -> None:
        """Keep at most ``keep`` atlas folders: drop the least recently written."""
        try:
            folders = [p for p in self.root.iterdir() if p.is_dir() and p != keep_folder]
        except OSError:
            return
        folders.sort(key=lambda p: p.stat().st_mtime, reverse=True)
        for old in folders[max(0, self.keep - 1):]:
            shutil.rmtree(old, ignore_errors=True)
