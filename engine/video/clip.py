"""Dreamed video with temporal coherence, and the endless zoom; resumable, with the sound kept.

Both loops take the dream as an injected function, ``dream_frame(rgb, params) -> rgb``
(float32 H x W x 3 in [0,1] in and out; ``params`` the frame's keyframed values, see
:mod:`onnxdream.settings.schedule`), so the same loop runs the CPU ascent or the CUDA device loop.
:func:`make_dream_frame` (:mod:`onnxdream.dream.frame`) builds the standard one from one
:class:`~onnxdream.settings.options.DreamSettings` (its seed fixed once, so every frame gets the
same jitter sequence) on ``onnxdream.dream.ascent.dream``; a frame's keyframed ``layers``/``steps``/
``step_size`` replace the settings' own (:func:`frame_settings`).

- :func:`dream_video`: reads the input's frames (:mod:`onnxdream.media.videoio`), blends each with
  the previous frame's dream carried along the optical flow (:mod:`onnxdream.video.flow`;
  ``flow=False`` with ``blend > 0`` is DeepDreamVideo's plain blending, ``blend=0`` dreams each
  frame alone), dreams it, and writes MP4/WebM/GIF/PNG frames with the input's audio.
- :func:`zoom`: the Caffe notebook's feedback loop: dream, zoom about the centre (with
  rotation and shift), dream again.

Resumable. Each dreamed frame is written atomically to the work dir as
``<digest>-<index>.png``, with the provenance of :mod:`onnxdream.settings.provenance` in its PNG
chunks (plus ``onnxdream:frame``, ``onnxdream:digest`` and the frame's keyframed values as
``onnxdream:params``). The digest (16 hex digits of a SHA-256 over canonical JSON) names
everything that changes a frame, and nothing else:

- the dream: for the standard one, :meth:`ResolvedSettings.digest() <onnxdream.settings.resolve.
  ResolvedSettings.digest>` of its settings resolved at the frame size (every DreamSettings
  field, the seed included, and the octave sizes, tile size, jitter and step size the resolver
  chose) together with the model file's fingerprint; for an injected dream, ``dream_key`` or
  its ``digest(height, width)`` method;
- the input's fingerprint (size, first and last MiB; not its name or mtime);
- the frame selection: ``start``, ``every``, ``width`` (video); ``width``, ``fps``, ``shift``
  (zoom: the fps turns keys in seconds into frames);
- the flow options: ``flow`` on/off and its DIS preset (video);
- every schedule's canonical text: ``blend`` (video), ``zoom`` and ``rotate`` (zoom), and any
  keyframed ``layers``/``steps``/``step_size``.

Not in it: the output's path or format, the clip's length (frame i depends only on frames up
to i, so a longer run reuses a shorter one's frames), the device and thread count. Re-running
continues after the last frame on disk; the previous frame's dream is always taken from its
8-bit PNG, so a resumed run gives exactly the frames an uninterrupted one does. Ctrl-C leaves
the work dir valid and no partial output. The default work dir
(``.<output name>.onnxdream/`` beside the output) is removed after success; one passed
explicitly is kept.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from onnxdream.core.atomic import remove_stale_temps
from onnxdream.core.errors import OnnxDreamError, SettingsError
from onnxdream.dream.frame import (  # the standard dream; re-exported as onnxdream.video.clip's API
    StandardDream,
    file_fingerprint,
    frame_settings,
    keyframed_settings,
    make_dream_frame,
    stable_seed,
)
from onnxdream.settings.schedule import Schedule, parse_schedule, values_at
from onnxdream.settings.video import DEFAULT_BLEND, ZOOM_DEFAULTS, VideoOptions

__all__ = [
    "DreamFrame",
    "StandardDream",
    "VideoProgress",
    "VideoResult",
    "ZOOM_DEFAULTS",
    "check_zoom",
    "default_work_dir",
    "dream_video",
    "file_fingerprint",
    "frame_settings",
    "keyframed_settings",
    "make_dream_frame",
    "stable_seed",
    "transform",
    "zoom",
]

#: ``dream_frame(rgb, params) -> rgb``: float32 H x W x 3 in [0,1] in and out. It may also have
#: ``digest(height, width)`` (what identifies it in the work dir's digest, JSON-able) and
#: ``metadata(height, width, params) -> dict[str, str]`` (provenance for each frame's PNG).
DreamFrame = Callable[[np.ndarray, Mapping[str, Any]], np.ndarray]
ProgressFn = Callable[["VideoProgress"], None]


_FRAME_FILE = re.compile(r"([0-9a-f]{16})-(\d{6,})\.png")


# --------------------------------------------------------------------------------------------
# The digest


def _canonical(value: Any) -> Any:
    if isinstance(value, Schedule):
        return value.describe()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {k: _canonical(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, (Fraction, Path)):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return repr(value)


def _run_digest(kind: str, dream: Any, source: str, options: Mapping[str, Any],
                schedules: Mapping[str, Schedule]) -> str:
    """The work dir's digest (see the module docstring for what goes in)."""
    text = json.dumps({"kind": kind, "dream": _canonical(dream), "source": source,
                       "options": _canonical(options), "schedules": _canonical(schedules)},
                      sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _dream_identity(dream_frame: DreamFrame, dream_key: Any, height: int, width: int) -> Any:
    if dream_key is not None:
        return dream_key
    digest = getattr(dream_frame, "digest", None)
    if callable(digest):
        return digest(height, width)
    return getattr(dream_frame, "__qualname__", type(dream_frame).__qualname__)


# --------------------------------------------------------------------------------------------
# Progress, results and the frame store


@dataclass(frozen=True)
class VideoProgress:
    """Where a run stands. Stages: ``"start"`` (once, before the first frame: ``resumed`` is
    the number of this run's frames already in the work dir), ``"dream"`` (after each frame),
    ``"encode"`` (while writing the output: ``done`` counts frames written)."""

    stage: str
    done: int  # frames finished, resumed ones included
    total: int  # frames expected (a video's count is known to ±1 until it is read)
    resumed: int  # frames found in the work dir
    dreamed: int  # frames dreamed by this run
    elapsed: float  # seconds spent dreaming in this run
    work_dir: Path | None = None

    @property
    def fps(self) -> float:
        """Frames dreamed per second in this run (0 before the first)."""
        return self.dreamed / self.elapsed if self.dreamed and self.elapsed > 0 else 0.0

    @property
    def eta(self) -> float | None:
        """Seconds left at the current rate (None until a frame was dreamed)."""
        rate = self.fps
        return max(self.total - self.done, 0) / rate if rate else None


@dataclass(frozen=True)
class VideoResult:
    path: Path
    frames: int
    size: tuple[int, int]  # (w, h)
    fps: Fraction
    resumed: int
    dreamed: int
    digest: str
    work_dir: Path
    notes: tuple[str, ...]


class _FrameStore:
    """Dreamed frames as ``<digest>-<index>.png`` in a work dir, each written atomically with
    its provenance."""

    def __init__(self, work_dir: Path, digest: str, *, prune: bool):
        self.dir, self.digest = work_dir, digest
        try:
            work_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OnnxDreamError(f"cannot use work dir {work_dir}: {exc.strerror or exc}") from exc
        if not work_dir.is_dir():
            raise OnnxDreamError(f"cannot use work dir {work_dir}: it is not a folder")
        remove_stale_temps(work_dir)  # half-written frames of a killed run (kill -9)
        if prune:  # our own default dir: frames of other settings are stale
            for p in work_dir.iterdir():
                m = _FRAME_FILE.fullmatch(p.name)
                if m and m.group(1) != digest:
                    p.unlink(missing_ok=True)

    def path(self, i: int) -> Path:
        return self.dir / f"{self.digest}-{i:06d}.png"

    def count(self, below: int) -> int:
        """Frames of this digest on disk with an index below ``below``."""
        n = 0
        for p in self.dir.iterdir():
            m = _FRAME_FILE.fullmatch(p.name)
            n += bool(m and m.group(1) == self.digest and int(m.group(2)) < below)
        return n

    def load(self, i: int, size: tuple[int, int] | None = None) -> np.ndarray | None:
        """The frame as uint8 RGB, or None when missing, unreadable or of another size."""
        from PIL import Image

        p = self.path(i)
        if not p.exists():
            return None
        try:
            with Image.open(p) as im:
                a = np.asarray(im.convert("RGB"))
        except (OSError, ValueError):
            return None
        if size is not None and (a.shape[1], a.shape[0]) != tuple(size):
            return None
        return a

    def save(self, i: int, rgb: np.ndarray, metadata: Mapping[str, str]) -> np.ndarray:
        """Write frame i; returns it as uint8 (what the next frame builds on)."""
        from onnxdream.media.imageio import to_uint8
        from onnxdream.media.imagewrite import save_image

        q = to_uint8(rgb)
        save_image(self.path(i), q.astype(np.float32) / 255.0, metadata=metadata)
        return q


def default_work_dir(output: str | os.PathLike[str]) -> Path:
    """Where the frames of a run writing ``output`` live unless told otherwise:
    ``.<output name>.onnxdream`` beside it (removed after success)."""
    output = Path(output)
    parent = output.parent if str(output.parent) else Path(".")
    return parent / f".{output.name.rstrip('/') or 'frames'}.onnxdream"


class _Clock:
    def __init__(self, total: int, progress: ProgressFn | None, work_dir: Path):
        self.total, self.progress, self.work_dir = total, progress, work_dir
        self.done = self.resumed = self.dreamed = 0
        self.elapsed = 0.0

    def report(self, stage: str = "dream", resumed: int | None = None) -> None:
        if self.progress is not None:
            self.progress(VideoProgress(stage, self.done, max(self.total, self.done),
                                        self.resumed if resumed is None else resumed,
                                        self.dreamed, self.elapsed, self.work_dir))


def _schedules(schedules: Mapping[str, Schedule | str | float | int] | None,
               **constants: Any) -> dict[str, Schedule]:
    out: dict[str, Schedule] = {}
    for name, value in {**constants, **(schedules or {})}.items():
        if value is None:
            continue
        out[name] = value if isinstance(value, Schedule) else parse_schedule(value, name)
    return out


class _Frames:
    """What both loops share: the store, the clock, the dream call and each frame's
    provenance."""

    def __init__(self, store: _FrameStore, clock: _Clock, dream_frame: DreamFrame,
                 metadata: Mapping[str, str] | None):
        from onnxdream.settings.provenance import PREFIX

        self.store, self.clock, self.dream_frame = store, clock, dream_frame
        self.prefix = PREFIX
        self.extra = dict(metadata or {})
        self.provenance = getattr(dream_frame, "metadata", None)

    def dream(self, i: int, x: np.ndarray, params: Mapping[str, Any]) -> np.ndarray:
        """Dream frame i from input ``x`` and save it; returns the saved uint8 frame."""
        t0 = time.perf_counter()
        dreamed = np.asarray(self.dream_frame(x, params))
        if dreamed.shape != x.shape:
            raise OnnxDreamError(f"dream_frame returned shape {dreamed.shape} for a "
                                 f"{x.shape} frame")
        h, w = x.shape[:2]
        meta = dict(self.provenance(h, w, params)) if callable(self.provenance) else {}
        meta.update({f"{self.prefix}frame": str(i), f"{self.prefix}digest": self.store.digest,
                     f"{self.prefix}params": json.dumps(_canonical(dict(params)),
                                                        sort_keys=True)})
        meta.update(self.extra)
        saved = self.store.save(i, dreamed, meta)
        self.clock.elapsed += time.perf_counter() - t0
        self.clock.dreamed += 1
        return saved

    def encode(self, n: int, output: Path, fps: Fraction,
               **audio: Any) -> tuple[tuple[int, int], list[str]]:
        from onnxdream.media.videowrite import VideoWriter

        store, clock = self.store, self.clock
        with VideoWriter(output, fps, **audio) as writer:
            for i in range(n):
                frame = store.load(i)
                if frame is None:
                    raise OnnxDreamError(f"frame {i} vanished from the work dir {store.dir}")
                writer.write(frame)
                if clock.progress is not None and ((i + 1) % 10 == 0 or i + 1 == n):
                    clock.progress(VideoProgress("encode", i + 1, n, clock.resumed,
                                                 clock.dreamed, clock.elapsed, store.dir))
        return writer.size, writer.notes


def _work(output: Path, work_dir: str | os.PathLike[str] | None, digest: str) -> _FrameStore:
    work = Path(work_dir) if work_dir is not None else default_work_dir(output)
    return _FrameStore(work, digest, prune=work_dir is None)


@contextlib.contextmanager
def _tidy(store: _FrameStore, default: bool) -> Iterator[None]:
    """On failure or Ctrl-C, remove our own default work dir if it holds nothing (the frames
    of a run that stopped midway stay, to resume from)."""
    try:
        yield
    except BaseException:
        if default:
            with contextlib.suppress(OSError):
                store.dir.rmdir()  # only when empty
        raise


# --------------------------------------------------------------------------------------------
# Video


def dream_video(input: str | os.PathLike[str], output: str | os.PathLike[str],
                dream_frame: DreamFrame, *, flow: bool = VideoOptions.flow,
                blend: float | str | Schedule | None = None,
                work_dir: str | os.PathLike[str] | None = None,
                start: float = VideoOptions.start, duration: float | None = VideoOptions.duration,
                every: int = VideoOptions.every, width: int | None = VideoOptions.width,
                schedules: Mapping[str, Schedule | str] | None = None,
                dream_key: Any = None, flow_preset: str | None = None,
                metadata: Mapping[str, str] | None = None,
                progress: ProgressFn | None = None) -> VideoResult:
    """Dream every selected frame of ``input`` into ``output`` (.mp4, .webm, .gif or a folder).

    Args:
        dream_frame: the dream (see the module docstring); gets each frame's scheduled values.
        flow: carry the previous frame's dream along the input's optical flow, masked where
            occluded; False: plain blending with the previous dreamed frame.
        blend: weight of the previous frame's dream, 0 (each frame alone) to 1, or a schedule;
            default ``settings.video.DEFAULT_BLEND`` with flow, 0 without (the naive
            per-frame dream).
        work_dir: where the dreamed frames live (kept); default: a hidden folder beside the
            output (:func:`default_work_dir`), removed after success.
        start, duration, every, width: the frame selection (see ``videoio.open_video``).
        schedules: field → schedule (or its text) for the per-frame values, e.g.
            ``{"layers": "0:blocks.5,120:blocks.9", "step_size": "0:0.004,5s:0.01"}``.
        dream_key: what identifies the dream in the digest (JSON-able); default
            ``dream_frame.digest(height, width)`` (the standard dream has one).
        metadata: extra provenance keys for every frame's PNG (the CLI's command line).

    Raises:
        VideoError, ScheduleError, or what dream_frame raises (frames done so far stay).
    """
    from onnxdream.media.videoio import check_video_output, open_video
    from onnxdream.video.flow import DEFAULT_PRESET, FlowEstimator, coherent_input

    out = Path(output)
    check_video_output(out)
    reader = open_video(input, start=start, duration=duration, every=every, width=width)
    if blend is None:
        blend = DEFAULT_BLEND if flow else 0.0
    scheds = _schedules(schedules, blend=blend)
    for s in scheds.values():
        s.frames(reader.fps)  # positions collide at this fps: fail before any work
    preset = flow_preset or DEFAULT_PRESET
    w, h = reader.size
    digest = _run_digest(
        "video", _dream_identity(dream_frame, dream_key, h, w), file_fingerprint(input),
        {"start": start, "every": every, "width": width, "flow": bool(flow),
         "flow_preset": preset if flow else None}, scheds)
    store = _work(out, work_dir, digest)
    est = FlowEstimator(preset) if flow else None
    clock = _Clock(reader.expected, progress, store.dir)
    clock.report("start", resumed=store.count(reader.expected + 1))
    frames = _Frames(store, clock, dream_frame, metadata)
    prev_in: np.ndarray | None = None
    prev_index: int | None = None
    prev_dream: np.ndarray | None = None  # loaded lazily: only the frame after a gap needs it
    n = 0
    with _tidy(store, work_dir is None):
        for i, frame in enumerate(reader):
            n = i + 1
            if store.load(i, reader.size) is not None:
                clock.resumed += 1
                prev_dream = None
            else:
                params = values_at(scheds, i, reader.fps)
                if prev_in is not None and prev_dream is None:
                    prev_dream = store.load(prev_index, reader.size)
                cur = frame.astype(np.float32) / 255.0
                x = coherent_input(cur, prev_in, None if prev_dream is None else
                                   prev_dream.astype(np.float32) / 255.0,
                                   float(params.get("blend", 0.0)), flow=est)
                prev_dream = frames.dream(i, x, params)
            prev_in, prev_index = frame.astype(np.float32) / 255.0, i
            clock.done = n
            clock.report()
        clock.total = n
        size, notes = frames.encode(n, out, reader.fps, audio_from=input,
                                    audio_start=reader.start, audio_duration=reader.duration)
    if work_dir is None:
        shutil.rmtree(store.dir, ignore_errors=True)
    return VideoResult(out, n, size, reader.fps, clock.resumed, clock.dreamed, digest, store.dir,
                       tuple(notes))


# --------------------------------------------------------------------------------------------
# Zoom


def transform(rgb: np.ndarray, zoom: float = 1.0, rotate: float = 0.0,
              shift: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """Zoom by ``zoom`` about the centre (>1 moves in), rotate ``rotate`` degrees
    counter-clockwise, then move the content by ``shift`` = (x, y) pixels; Lanczos resampling,
    edges mirrored. float32 H x W x 3 in [0,1] in and out."""
    from onnxdream.video.flow import import_cv2

    cv2 = import_cv2()
    if not zoom > 0:
        raise SettingsError("zoom", f"must be > 0, got {zoom}")
    a = np.ascontiguousarray(rgb, dtype=np.float32)
    h, w = a.shape[:2]
    m = cv2.getRotationMatrix2D(((w - 1) / 2.0, (h - 1) / 2.0), float(rotate), float(zoom))
    m[0, 2] += float(shift[0])
    m[1, 2] += float(shift[1])
    out = cv2.warpAffine(a, m, (w, h), flags=cv2.INTER_LANCZOS4,
                         borderMode=cv2.BORDER_REFLECT_101)
    return np.clip(out, 0.0, 1.0, out=out)


def check_zoom(value: float) -> str | None:
    """What is wrong with a zoom factor (for ``parse_schedule(..., check=check_zoom)``)."""
    return None if value > 0 else "values must be > 0 (1.03 moves in 3% a frame)"


def zoom(image: str | os.PathLike[str] | np.ndarray, output: str | os.PathLike[str],
         dream_frame: DreamFrame, frames: int, *, zoom: float | str | Schedule = 1.03,
         rotate: float | str | Schedule = 0.0, shift: tuple[float, float] = (0.0, 0.0),
         fps: Fraction | float = 15, width: int | None = None,
         work_dir: str | os.PathLike[str] | None = None,
         schedules: Mapping[str, Schedule | str] | None = None, dream_key: Any = None,
         metadata: Mapping[str, str] | None = None,
         progress: ProgressFn | None = None) -> VideoResult:
    """The endless zoom: frame 0 is ``image`` dreamed; frame i is frame i-1 transformed
    (:func:`transform` with the frame's ``zoom``/``rotate`` and ``shift``) and dreamed again.
    ``frames`` frames at ``fps`` into ``output`` (.mp4, .webm, .gif or a folder); ``width``
    resizes the image first (aspect kept); sizes are made even. Resumable as
    :func:`dream_video`; the other arguments as there.

    Raises:
        SettingsError (frames, fps, zoom), VideoError, ScheduleError, ImageError, or what
        dream_frame raises (frames done so far stay).
    """
    from onnxdream.media.imageio import load_image, resize
    from onnxdream.media.videoio import check_video_output, even_size

    out = Path(output)
    check_video_output(out)
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
        raise SettingsError("frames", f"must be a whole number >= 1, got {frames}")
    try:
        fps = Fraction(fps).limit_denominator(1_000_000)
    except (TypeError, ValueError) as exc:
        raise SettingsError("fps", f"must be a number, got {fps!r}") from exc
    if fps <= 0:
        raise SettingsError("fps", f"must be > 0, got {fps}")
    if isinstance(image, np.ndarray):
        rgb, source = np.asarray(image, dtype=np.float32), hashlib.sha256(
            np.ascontiguousarray(image).tobytes()).hexdigest()[:16]
    else:
        rgb, source = load_image(image).rgb, file_fingerprint(image)
    h, w = rgb.shape[:2]
    size = even_size(w, h, width)
    if width is not None:
        rgb = resize(rgb, (size[1], size[0]))
    rgb = np.ascontiguousarray(rgb[:size[1], :size[0]])
    zoom_s = zoom if isinstance(zoom, Schedule) else parse_schedule(zoom, "zoom",
                                                                      check=check_zoom)
    scheds = _schedules(schedules, zoom=zoom_s, rotate=rotate)
    for s in scheds.values():
        s.frames(fps)
    digest = _run_digest(
        "zoom", _dream_identity(dream_frame, dream_key, size[1], size[0]), source,
        {"width": width, "shift": [float(v) for v in shift], "fps": fps}, scheds)
    store = _work(out, work_dir, digest)
    clock = _Clock(frames, progress, store.dir)
    clock.report("start", resumed=store.count(frames))
    loop = _Frames(store, clock, dream_frame, metadata)
    prev: np.ndarray | None = None
    with _tidy(store, work_dir is None):
        for i in range(frames):
            if store.load(i, size) is not None:
                clock.resumed += 1
                prev = None
            else:
                params = values_at(scheds, i, fps)
                if i == 0:
                    x = rgb
                else:
                    if prev is None:
                        prev = store.load(i - 1, size)
                    x = transform(prev.astype(np.float32) / 255.0, float(params["zoom"]),
                                  float(params["rotate"]), shift)
                prev = loop.dream(i, x, params)
            clock.done = i + 1
            clock.report()
        out_size, notes = loop.encode(frames, out, fps)
    if work_dir is None:
        shutil.rmtree(store.dir, ignore_errors=True)
    return VideoResult(out, frames, out_size, fps, clock.resumed, clock.dreamed, digest,
                       store.dir, tuple(notes))
