"""Dreams as jobs: a bounded queue of worker threads over a shared model cache.

No web framework here: the HTTP server (:mod:`onnxdream.server.app`) and a batch runner both build
on it. :class:`~onnxdream.jobs.config.ServerConfig` says what is allowed and how much runs at once
(from options and ``ONNXDREAM_*`` variables); :class:`~onnxdream.runtime.model_cache.ModelCache`
holds one GradientModel (one onnxruntime session) per objective *structure* (layers and kinds, not
weights), shared by every job, each dream feeding its own weights; :class:`JobManager` runs
:class:`DreamRequest`\\ s on a fixed pool of threads over a bounded FIFO, with progress,
cancellation and expiry. A front end takes a place
in the queue (:meth:`JobManager.admit`) before it reads, decodes or compiles anything; queued
requests hold the encoded image, which the worker decodes when the dream starts.

Requests have a ``kind``: ``"image"`` (:class:`DreamRequest`, its result the encoded image in
``Job.result``) or ``"video"`` (:class:`onnxdream.jobs.video.VideoRequest`: it runs itself, its
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
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from onnxdream.core.errors import OnnxDreamError, SettingsError
from onnxdream.jobs.config import MB, ServerConfig
from onnxdream.runtime.model_cache import Loaded, ModelCache, ModelKey
from onnxdream.settings.options import DreamSettings

__all__ = ["CANCELLED", "DONE", "FAILED", "MB", "QUEUED", "RUNNING", "SHUTDOWN", "Admission",
           "DreamRequest", "Job", "JobCancelled", "JobError", "JobManager", "Loaded", "ModelCache",
           "ModelKey", "QueueFull", "ServerConfig", "ShuttingDown", "UnknownJob", "run_request"]

log = logging.getLogger("onnxdream.jobs")

SHUTDOWN = "the server is shutting down; retry in a moment"


# ---------------------------------------------------------------------------------------------
# Requests and jobs


class Work:
    """What a job runs: a dream (:class:`DreamRequest`), a video
    (:class:`~onnxdream.jobs.video.VideoRequest`) or a model's atlas thumbnails
    (:class:`~onnxdream.jobs.atlas_cache.AtlasRequest`). A :class:`Job` reads ``kind``,
    ``settings``, ``fmt``, ``size`` and ``work`` of it; the worker calls :meth:`run`, then
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
    controls: Any = None  # onnxdream.dream.controls.Controls: the guide's and masks' pictures
    memory_mb: int | None = None  # the dream's memory budget (None: the machine's default)
    max_steps: int | None = None  # the most steps over all octaves (None: no limit)

    def run(self, models: ModelCache, job: Job | None = None) -> bytes:
        """What a worker does with this request (:func:`run_request`); other kinds of work
        (the server's atlas thumbnails) have a ``run`` of their own."""
        return run_request(self, models, job)

    @classmethod
    def from_bytes(cls, settings: DreamSettings, fmt: str, data: bytes | None,
                   max_pixels: int | None, controls: Any = None, *,
                   memory_mb: int | None = None,
                   max_steps: int | None = None) -> DreamRequest:
        """From an encoded image, checked from its header only (format, size, the pixel
        limit: ImageError / ImageTooLargeError) and decoded when the dream runs; or, with no
        ``data``, a dream from ``settings.init`` (noise or grey) of ``settings.size``.
        ``controls``: the creative controls' pictures
        (:class:`~onnxdream.dream.controls.Controls`); ``memory_mb`` and ``max_steps``: the
        server's limits for this dream (:class:`~onnxdream.jobs.config.ServerConfig`)."""
        from onnxdream.core.errors import ImageTooLargeError
        from onnxdream.media.imageio import image_size

        if data is None:
            size = tuple(settings.size)
            if max_pixels is not None and size[0] * size[1] > max_pixels:
                raise ImageTooLargeError(f"size {size[0]}x{size[1]}", size[0] * size[1],
                                         max_pixels)
        else:
            size = image_size(data, max_pixels=max_pixels)
        return cls(settings=settings, fmt=fmt, image=None, alpha=None, size=size, data=data,
                   max_pixels=max_pixels, controls=controls, memory_mb=memory_mb,
                   max_steps=max_steps)

    def forget_input(self) -> None:
        """Drop the pixels (the job finished: only its result is kept)."""
        self.image = self.alpha = self.data = self.controls = None

    def pixels(self) -> tuple[np.ndarray, np.ndarray | None]:
        """(float32 HxWx3 in [0,1], uint8 HxW alpha or None), decoding ``data`` if needed."""
        from onnxdream.media.imageio import load_image_bytes, to_uint8

        if self.image is not None:
            rgb = self.image.astype(np.float32)
            rgb *= np.float32(1.0 / 255.0)
            return rgb, self.alpha
        if self.data is None:  # a dream without a photo: its start, from the seed
            from onnxdream.dream.controls import init_image

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
        from onnxdream.settings.resolve import resolve

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


def run_request(req: DreamRequest, models: ModelCache, job: Job | None = None) -> bytes:
    """Dream ``req`` with a model from ``models`` → the encoded image with its provenance.

    With a ``job``, progress goes into it and a set ``job.cancel`` stops the dream at the next
    step (:class:`JobCancelled`).
    """
    from onnxdream.dream.ascent import dream
    from onnxdream.media.imagewrite import encode_image
    from onnxdream.settings.provenance import dream_metadata
    from onnxdream.settings.resolve import resolve

    if job is not None and job.cancel.is_set():
        raise JobCancelled()
    gm, objective, params = models.get(req.settings)
    rgb, alpha = req.pixels()
    resolved = resolve(req.settings, rgb.shape[0], rgb.shape[1], gm.info, memory=gm.memory,
                       budget_mb=req.memory_mb)  # MemoryBudgetError: 413
    limit = req.max_steps
    if limit is not None and resolved.steps_total > limit:  # "auto" octaves: known only now
        raise SettingsError("steps", f"x {resolved.octaves} octaves is {resolved.steps_total} "
                                     f"steps, more than this server's limit of {limit}")
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
