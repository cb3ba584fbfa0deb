"""Dreamed videos as server jobs: the upload on disk, its limits, and the run.

No web framework here (the HTTP layer is :mod:`onnxdream.server.app`). A video job is a
:class:`VideoRequest` in the same :class:`~onnxdream.jobs.queue.JobManager` queue as the photos
(one place per job, taken before anything is read); its worker runs
:func:`onnxdream.video.clip.dream_video` with the server's shared models and reports progress in
frames; its result is a file, not bytes in memory.

Disk. Every video job has a folder (:class:`JobSpace`) inside the server's :class:`WorkArea`
(``ONNXDREAM_JOBS_DIR``, default ``<ONNXDREAM_HOME>/jobs``): the upload is streamed into it,
the dreamed frames and the output are written there. The area holds one folder per server
process, marked live by a lock the process holds, so a folder left by a server that died is
removed when the next one starts. The disk all jobs may use is capped
(``ONNXDREAM_MAX_VIDEO_DISK_MB``): a job *reserves* what it may need before its bytes are
written (the upload: the request's Content-Length; then, once the video is probed, an upper
bound for its frames as PNGs and its output), a job that could never fit is refused (413), one
that does not fit now waits for others to go (503 with Retry-After). A running job that writes
more than it reserved fails. When a job is done its frames and upload are deleted and only the
output stays reserved; its folder is removed when the job is deleted, expires, fails or is
cancelled, and when the server stops.

Limits (:func:`check_video`): the dreamed part of the clip at most ``ONNXDREAM_MAX_VIDEO_SECONDS``
(0 turns videos off), each frame at most the server's pixel limit (a ``width`` downscales it),
``octaves x steps`` of every keyframe within the step limit. Every refusal is one sentence that
names no server path: the upload is "the uploaded video".
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, BinaryIO, ClassVar

from onnxdream.core.errors import (
    DependencyError,
    LayerError,
    OnnxDreamError,
    SettingsError,
    VideoError,
    VideoTooLargeError,
    did_you_mean,
)
from onnxdream.jobs.queue import MB, JobCancelled, JobError, ServerConfig, Work
from onnxdream.settings.build import from_options
from onnxdream.settings.options import DreamSettings, require
from onnxdream.settings.resolve import resolve
from onnxdream.settings.video import VideoOptions

__all__ = ["UPLOAD_NAME", "VIDEO_FORMATS", "JobSpace", "VideoOptions", "VideoRequest",
           "WorkArea", "WorkSpaceFull", "check_video", "disk_estimate", "prepare_video",
           "video_problem"]

log = logging.getLogger("onnxdream.videojobs")

#: Output formats of a video job → media type.
VIDEO_FORMATS = {"mp4": "video/mp4", "webm": "video/webm", "gif": "image/gif"}
#: What messages call the upload (never its path).
UPLOAD_NAME = "the uploaded video"
_SESSION_PREFIX = "server-"
_TRASH = ".trash"
_STALE_UNLOCKED_SECONDS = 24 * 3600.0  # where files cannot be locked (no fcntl)


def video_problem(config: ServerConfig) -> str | None:
    """Why this server cannot dream videos (one sentence), or None when it can."""
    if config.max_video_seconds <= 0:
        return "this server does not dream videos (its operator turned them off)"
    from onnxdream.media.videoio import import_av
    from onnxdream.video.flow import import_cv2

    try:
        import_av()
        import_cv2()
    except DependencyError:
        return ("this server cannot dream videos: it needs PyAV and OpenCV "
                "(pip install 'onnxdream[video]' on the server)")
    return None


# ---------------------------------------------------------------------------------------------
# Disk: the work area and each job's space


class WorkSpaceFull(JobError):
    """The video jobs' disk budget (or the disk) has no room now; retry later."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class _Full(Exception):
    """No room now (raised under the area's lock; becomes WorkSpaceFull outside it)."""


def _mb(nbytes: float) -> str:
    return f"{nbytes / MB:,.1f} MB" if nbytes < 1024 * MB else f"{nbytes / 1024 / MB:,.2f} GB"


def _lock(fh) -> bool:
    """Take an exclusive lock on an open file without waiting; False if another holds it."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: folders are judged by age instead
        return True
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def _tree_size(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


class WorkArea:
    """Where video jobs keep their files, and how much they may keep (see the module
    docstring). Thread-safe; opened on first use (or by :meth:`open` at start-up)."""

    def __init__(self, root: str | os.PathLike, budget: int,
                 retry_after: Callable[[], int] | None = None):
        self.root = Path(root)
        self.budget = int(budget)
        self._retry_after = retry_after or (lambda: 30)
        self._lock = threading.Lock()
        self._used = 0
        self._spaces: set[JobSpace] = set()
        self.session: Path | None = None
        self._lockfile: BinaryIO | None = None

    # -- lifecycle
    def open(self) -> Path:
        """Create this server's folder (removing those of servers that are gone)."""
        with self._lock:
            if self.session is None:
                try:
                    self.root.mkdir(parents=True, exist_ok=True)
                    self.remove_stale()
                    session = Path(tempfile.mkdtemp(prefix=_SESSION_PREFIX, dir=self.root))
                    self._lockfile = open(session / ".lock", "wb")  # noqa: SIM115 - held open
                except OSError as exc:
                    raise OnnxDreamError(f"the server cannot keep video files "
                                         f"({exc.strerror or type(exc).__name__})") from exc
                _lock(self._lockfile)
                self.session = session
            return self.session

    def close(self) -> None:
        """Remove this server's folder and everything in it."""
        with self._lock:
            session, self.session = self.session, None
            lockfile, self._lockfile = self._lockfile, None
            self._spaces.clear()
            self._used = 0
        if session is not None:
            shutil.rmtree(session, ignore_errors=True)
        if lockfile is not None:
            lockfile.close()

    def remove_stale(self) -> list[Path]:
        """Remove the folders of servers that are not running any more; returns them."""
        removed = []
        for d in self.root.iterdir() if self.root.is_dir() else []:
            if not d.name.startswith(_SESSION_PREFIX) or not d.is_dir() or d == self.session:
                continue
            if self._live(d):
                continue
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
            log.info("removed the video files a stopped server left in %s", d.name)
        return removed

    @staticmethod
    def _live(session: Path) -> bool:
        try:
            fh = open(session / ".lock", "rb")  # noqa: SIM115
        except OSError:  # no lock file (yet): a server between mkdtemp and open, or debris
            with contextlib.suppress(OSError):
                return time.time() - session.stat().st_mtime < 60
            return False
        with fh:
            try:
                import fcntl  # noqa: F401
            except ImportError:  # pragma: no cover
                return time.time() - session.stat().st_mtime < _STALE_UNLOCKED_SECONDS
            return not _lock(fh)  # we got the lock: nobody holds it (closing releases it)

    # -- the budget
    @property
    def used(self) -> int:
        """Bytes reserved by the jobs now."""
        with self._lock:
            return self._used

    def new_space(self, reserve: int) -> JobSpace:
        """A new job folder with ``reserve`` bytes reserved (see :meth:`JobSpace.resize`)."""
        session = self.open()
        with self._full():
            with self._lock:
                self._check(reserve, 0)
                path = session / uuid.uuid4().hex
                path.mkdir()
                space = JobSpace(self, path, reserve)
                self._used += reserve
                self._spaces.add(space)
        return space

    @contextlib.contextmanager
    def _full(self):
        """_Full → WorkSpaceFull with a Retry-After, asked for outside our lock (the job
        manager releases spaces while it holds its own)."""
        try:
            yield
        except _Full as exc:
            raise WorkSpaceFull(str(exc), self._retry_after()) from None

    def _check(self, new: int, old: int) -> None:
        """Raise unless a reservation may change from ``old`` to ``new`` bytes (lock held)."""
        if new > self.budget:
            raise VideoTooLargeError(
                f"this video needs up to {_mb(new)} of disk space while it is dreamed, more "
                f"than this server allows for video jobs ({_mb(self.budget)}); send a shorter "
                "clip, or a smaller width")
        grow = new - old
        if grow <= 0:
            return
        if self._used + grow > self.budget:
            raise _Full(f"the server's space for video jobs is full ({_mb(self._used)} of "
                        f"{_mb(self.budget)} in use); retry in a while")
        try:
            free = shutil.disk_usage(self.root).free
        except OSError:
            free = None
        if free is not None and free < grow + 64 * MB:
            raise _Full("the server is short of disk space; retry in a while")

    def _resize(self, space: JobSpace, nbytes: int) -> None:
        with self._full(), self._lock:
            if space not in self._spaces:
                raise VideoError("the job's files are gone")
            self._check(nbytes, space.reserved)
            self._used += nbytes - space.reserved
            space.reserved = nbytes

    def _release(self, space: JobSpace) -> Path | None:
        with self._lock:
            if space not in self._spaces:
                return None
            self._spaces.discard(space)
            self._used -= space.reserved
            space.reserved = 0
            if self.session is None:
                return None
            trash = self.session / _TRASH
            try:
                trash.mkdir(exist_ok=True)
                target = trash / space.path.name
                space.path.rename(target)  # at once: the folder is out of the way
            except OSError:
                target = space.path
        return target


class JobSpace:
    """One video job's folder and the bytes it has reserved."""

    def __init__(self, area: WorkArea, path: Path, reserved: int):
        self.area, self.path, self.reserved = area, path, reserved

    def resize(self, nbytes: int) -> None:
        """Reserve ``nbytes`` in all: VideoTooLargeError if that is more than the whole
        budget, WorkSpaceFull if it does not fit now (a smaller one always fits)."""
        self.area._resize(self, int(nbytes))

    def usage(self) -> int:
        """Bytes its files take on disk now."""
        return _tree_size(self.path)

    def release(self) -> None:
        """Give back the reservation and remove the folder (in the background; idempotent)."""
        target = self.area._release(self)
        if target is not None:
            threading.Thread(target=shutil.rmtree, args=(target,), kwargs={"ignore_errors": True},
                             name="onnxdream-rm", daemon=True).start()


def disk_estimate(upload: int, size: tuple[int, int], frames: int, fmt: str) -> int:
    """An upper bound of the bytes a job writes: the upload, every frame as a PNG (never
    larger than its raw pixels plus the provenance chunks), the output (a GIF's LZW at worst
    1.5 bytes a pixel; H.264/VP9 far below an eighth of the raw pixels) and the audio copied
    into it (at most the upload)."""
    w, h = size
    raw = w * h * 3
    out = frames * (w * h * 3 // 2 if fmt == "gif" else raw // 8) + 64 * 1024
    return int(upload + frames * (raw + 16 * 1024) + out + upload + MB)


# ---------------------------------------------------------------------------------------------
# The request


@dataclass(frozen=True)
class Selection:
    """The frames a job dreams, as probed: output size and rate, count, seconds, audio."""

    size: tuple[int, int]
    fps: Fraction
    frames: int
    seconds: float
    audio: bool


def _unit(value: float) -> str | None:
    return None if 0.0 <= value <= 1.0 else "values must be between 0 and 1"


def check_video(path: Path, options: VideoOptions, config: ServerConfig) -> Selection:
    """Probe the upload and check it against the server's limits.

    Raises:
        VideoError (400: not a video, audio only, no frames), SettingsError (400: a bad
        start/duration/every/width), VideoTooLargeError (413: too long, too many pixels).
    """
    from onnxdream.media.videoio import even_size, probe

    require([(options.start >= 0, "start", "must be >= 0 seconds"),
             (options.duration is None or options.duration > 0, "duration",
              "must be > 0 seconds"),
             (1 <= options.every <= 1000, "every", "must be between 1 and 1000"),
             (options.width is None or 2 <= options.width <= 65536, "width",
              "must be between 2 and 65536 pixels")])
    info = probe(path, name=UPLOAD_NAME)
    if options.start >= info.duration:
        raise SettingsError("start", f"is past the end of {UPLOAD_NAME} ({info.duration:.3g} s)")
    end = info.duration if options.duration is None else min(info.duration,
                                                              options.start + options.duration)
    seconds = end - options.start
    limit = config.max_video_seconds
    if seconds > limit + 0.5 / float(info.fps):
        part = "" if options.duration is None and not options.start else "the chosen part of "
        raise VideoTooLargeError(
            f"{part}{UPLOAD_NAME} is {seconds:.1f} s long, more than this server's limit of "
            f"{limit:g} s; send a shorter clip, or choose a part with start and duration")
    size = even_size(info.width, info.height, options.width)
    w, h = size
    if w * h > config.max_pixels:
        fit = max(2, int(math.sqrt(config.max_pixels * w / h)) // 2 * 2)
        while fit > 2 and math.prod(even_size(w, h, fit)) > config.max_pixels:
            fit -= 2  # the height is rounded to even too
        raise VideoTooLargeError(
            f"{UPLOAD_NAME} has {w}x{h} frames ({w * h:,} pixels), more than this server's "
            f"limit of {config.max_pixels:,}; send a smaller video, or a width of at most {fit}")
    fps = info.fps
    n_in = min(info.frames, math.ceil(end * fps - 1e-6)) - math.ceil(options.start * fps - 1e-6)
    frames = max(1, math.ceil(max(n_in, 1) / options.every))
    return Selection(size, fps / options.every, frames, seconds, info.audio is not None)


def video_settings(values: Mapping[str, Any], layers: list[str], keyed: Mapping[str, str | None],
                   config: ServerConfig) -> tuple[DreamSettings, dict[str, Any]]:
    """Form values → (validated DreamSettings with its seed fixed, the keyframe schedules).

    ``values``: the typed dream fields (model, objective, octaves, seed, …); ``layers``: the
    ``layer`` fields; ``keyed``: ``steps`` and ``step_size`` as given (a value or keyframes,
    :func:`onnxdream.dream.frame.keyframed_settings`). ScheduleError/SettingsError name the field.
    """
    from onnxdream.dream.frame import keyframed_settings
    from onnxdream.settings.options import ASCENT_FIELDS

    first, schedules = keyframed_settings({"layers": layers or None, **keyed})
    given = {k: values.get(k) for k in ("model", "objective", "pre_relu", "seed", *ASCENT_FIELDS)}
    given.update({k: v for k, v in first.items() if k != "layers"})
    settings = from_options(layers=first.get("layers") or None,
                                          **given).with_seed()
    steps = [settings.steps]
    if "steps" in schedules:
        steps += [int(k.value) for k in schedules["steps"].keys]
    octaves = settings.octaves if isinstance(settings.octaves, int) else 1
    if octaves * max(steps) > config.max_steps:
        raise SettingsError("steps", f"x octaves is {octaves * max(steps)} in a frame, more "
                                     f"than this server's limit of {config.max_steps}")
    return settings, schedules


@dataclass(eq=False)
class VideoRequest(Work):
    """A checked video job: what to dream, on which file, with which disk."""

    kind: ClassVar[str] = "video"
    settings: DreamSettings  # validated, seed fixed; a frame's keyframes replace some fields
    schedules: dict[str, Any]  # field -> Schedule (layers, steps, step_size)
    options: VideoOptions
    blend: Any  # a Schedule or None (the default for flow on/off)
    space: JobSpace
    input: Path
    selection: Selection

    @property
    def fmt(self) -> str:
        return self.options.fmt

    @property
    def size(self) -> tuple[int, int]:
        return self.selection.size

    @property
    def fps(self) -> Fraction:
        return self.selection.fps

    @property
    def frames(self) -> int:
        """Frames expected (±1 until they are read)."""
        return self.selection.frames

    @property
    def work(self) -> float:
        """Pixel-steps of the whole clip (for queue wait estimates, as DreamRequest.work): the
        octaves as the resolver decides them at the frame size (``"auto"`` included)."""
        w, h = self.size
        sizes = resolve(self.settings, h, w).octave_sizes
        return float(sum(a * b for a, b in sizes) * self.settings.steps * self.selection.frames)

    def release(self) -> None:
        """Remove the job's folder and give back its disk (idempotent)."""
        self.space.release()

    def _named(self, exc: OnnxDreamError) -> OnnxDreamError:
        """A VideoError with the job's paths replaced by words (the reader names its file)."""
        text = str(exc).replace(str(self.input), UPLOAD_NAME)
        text = text.replace(str(self.space.path), "the job's folder")
        return VideoError(text) if isinstance(exc, VideoError) and text != str(exc) else exc

    def run(self, models, job=None) -> Path:
        """Dream the clip with the shared ``models`` (a
        :class:`~onnxdream.runtime.model_cache.ModelCache`); progress in frames goes into ``job``,
        whose ``cancel`` stops it at the next step. Returns the output file (in the job's folder);
        the frames and upload are removed."""
        from onnxdream.video.clip import dream_video

        out = self.space.path / f"dream.{self.fmt}"
        frames_dir = self.space.path / "frames"
        dream = _SharedDream(models, self.settings, job)
        checked = [0]

        def progress(p) -> None:
            if job is None:
                return
            if job.cancel.is_set():
                raise JobCancelled()
            if p.stage == "start":
                job.total, job.stage = p.total, "dream"
                return
            job.stage = p.stage
            if p.stage == "dream":
                job.done, job.total, job.rate, job.eta = p.done, p.total, p.fps, p.eta
            if p.done >= checked[0] + 10:  # the disk written so far within the reservation
                checked[0] = p.done
                used = self.space.usage()
                if used > self.space.reserved:
                    raise VideoError(f"the job wrote {_mb(used)}, more than the "
                                     f"{_mb(self.space.reserved)} it reserved")

        try:
            result = dream_video(self.input, out, dream, flow=self.options.flow,
                                 blend=self.blend, work_dir=frames_dir,
                                 start=self.options.start, duration=self.options.duration,
                                 every=self.options.every, width=self.options.width,
                                 schedules=self.schedules, dream_key={"seed": self.settings.seed},
                                 progress=progress)
        except OnnxDreamError as exc:
            named = self._named(exc)
            if named is exc:
                raise
            raise named from exc
        shutil.rmtree(frames_dir, ignore_errors=True)
        with contextlib.suppress(OSError):
            self.input.unlink()
        self.space.resize(out.stat().st_size)  # only the output is kept now
        if job is not None:
            job.done = job.total = result.frames
            job.eta = 0.0
        return out


class _SharedDream:
    """``dream_frame`` for :func:`~onnxdream.video.clip.dream_video` on the server's shared models:
    each frame's settings (its keyframes applied) get their GradientModel from the cache, are
    resolved for the frame size and dreamed; a cancelled job stops at the next step."""

    def __init__(self, models, settings: DreamSettings, job):
        self.models, self.settings, self.job = models, settings, job

    def __call__(self, rgb, params):
        from onnxdream.dream.ascent import dream
        from onnxdream.dream.frame import frame_settings

        settings = frame_settings(self.settings, params)
        gm, _, weights = self.models.get(settings)
        resolved = resolve(settings, rgb.shape[0], rgb.shape[1], gm.info)
        job = self.job
        step = None
        if job is not None:
            job.provider = gm.provider

            def step(_p) -> None:
                if job.cancel.is_set():
                    raise JobCancelled()

        return dream(gm, rgb, resolved, step, weights)


def prepare_video(space: JobSpace, upload: Path, options: VideoOptions, values: Mapping[str, Any],
                  layers: list[str], keyed: Mapping[str, str | None], config: ServerConfig,
                  models) -> VideoRequest:
    """The checked job for an upload written to ``upload`` inside ``space``: settings and
    keyframes (400 naming the field), the video probed against the limits (400/413), the layers
    of every keyframe checked and the first frame's model compiled, and the disk it may need
    reserved (413: never fits; 503: not now). Runs in a worker thread (it probes and
    compiles)."""
    from onnxdream.dream.frame import frame_settings
    from onnxdream.settings.schedule import parse_schedule

    if options.fmt not in VIDEO_FORMATS:
        raise SettingsError("format", f"of a video must be {', '.join(VIDEO_FORMATS)}, got "
                                      f"{options.fmt[:20]!r}")
    settings, schedules = video_settings(values, layers, keyed, config)
    blend = (parse_schedule(options.blend, "blend", check=_unit)
             if options.blend is not None else None)
    models.source(settings.model)  # an allowed name, or ModelError
    selection = check_video(upload, options, config)
    for schedule in [*schedules.values(), *([blend] if blend is not None else [])]:
        schedule.frames(selection.fps)  # keys that land on one frame: refused now
    if "layers" in schedules:  # every key's layers exist (its model compiles when it comes)
        info, known = models.info(settings.model), models.layer_names(settings.model)
        for key in schedules["layers"].keys:
            for term in models.objective(frame_settings(settings, {"layers": key.value})).terms:
                if term.layer not in known:
                    raise LayerError(f"unknown layer '{term.layer[:100]}' in the layer "
                                     f"keyframes{did_you_mean(term.layer[:100], info.layers)}",
                                     field="layers")
    space.resize(disk_estimate(upload.stat().st_size, selection.size, selection.frames,
                               options.fmt))  # before the compile: a refusal costs nothing
    models.get(settings)  # the first frame's model: compiled now, within the admission
    return VideoRequest(settings, schedules, options, blend, space, upload, selection)
