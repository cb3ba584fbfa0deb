"""Reading the videos that get dreamed, with PyAV (FFmpeg's libraries in a wheel).

No ``ffmpeg`` binary is needed: PyAV (the ``[video]`` extra) decodes anything FFmpeg reads.
Frames travel as uint8 RGB arrays, H x W x 3.

- :func:`probe` reads a file's video facts (:class:`VideoInfo`: size, frame rate as a
  :class:`~fractions.Fraction`, frame count, duration, audio stream) without decoding pictures.
- :func:`open_video` selects frames (``start``/``duration`` in seconds, every ``every``-th frame,
  resized to ``width`` keeping the aspect ratio) and yields them; its :class:`VideoReader` knows
  the output size, frame rate (``fps / every``) and expected count before the first frame.
- :func:`output_kind` / :func:`check_video_output`: what an output path will be (``.mp4``,
  ``.webm``, ``.gif``, or a folder of numbered PNGs: a path without an extension or ending in
  ``/``), checked before any work. Writing is :mod:`onnxdream.media.videowrite`.

Every problem a user can cause (not a video, no frames, audio only, a still image, an unknown
extension) is a :class:`VideoError` with a one-line message.

Variable frame rate inputs are read at their average rate; rotation metadata (phone videos) is
not applied.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from onnxdream.core.errors import (  # VideoError: importable from here too
    DependencyError,
    VideoError,
)

__all__ = [
    "FRAME_NAME",
    "OUTPUT_KINDS",
    "AudioInfo",
    "VideoError",
    "VideoInfo",
    "VideoReader",
    "check_video_output",
    "even_size",
    "ffmpeg_message",
    "import_av",
    "open_container",
    "open_video",
    "output_kind",
    "probe",
]


#: Output extension → kind. A path without an extension (or ending in a separator) is a folder
#: of numbered PNGs ("png").
OUTPUT_KINDS = {".mp4": "mp4", ".webm": "webm", ".gif": "gif"}

_STILL_FORMATS = re.compile(r"(_pipe|^image2)$")
FRAME_NAME = "frame_{:06d}.png"
_FRAME_RE = re.compile(r"frame_\d{6,}\.png")


def import_av():
    """The ``av`` module (quiet: FFmpeg's errors come back as exceptions); DependencyError
    naming the ``[video]`` extra when PyAV is missing."""
    try:
        import av
    except ImportError as exc:  # pragma: no cover - the [video] extra is missing
        raise DependencyError(
            "video needs PyAV: pip install 'onnxdream[video]'") from exc
    av.logging.set_level(av.logging.PANIC)  # errors come back as exceptions; no stderr noise
    return av


def ffmpeg_message(exc: BaseException) -> str:
    """A PyAV/FFmpeg error's message on one line (its ``strerror`` when it has one)."""
    text = (getattr(exc, "strerror", None) or str(exc)).strip() or type(exc).__name__
    return text.splitlines()[0]


# --------------------------------------------------------------------------------------------
# Probing


@dataclass(frozen=True)
class AudioInfo:
    codec: str  # FFmpeg's codec name: aac, mp3, opus, ...
    sample_rate: int
    channels: int
    duration: float | None  # seconds


@dataclass(frozen=True)
class VideoInfo:
    path: Path
    width: int
    height: int
    fps: Fraction  # average frame rate
    frames: int  # frame count (from the container, else counted from packets)
    duration: float  # seconds
    codec: str
    start_time: float  # the first frame's time stamp, seconds (timestamps are made relative)
    audio: AudioInfo | None

    @property
    def size(self) -> tuple[int, int]:
        """(width, height)."""
        return self.width, self.height


def open_container(path: str | os.PathLike[str], *, name: str | None = None):
    """``av.open(path)`` for reading, with VideoError for a missing file, a folder, an empty
    file or one FFmpeg cannot read. Messages call the file ``name`` (default: its path)."""
    av = import_av()
    p = Path(path)
    label = name or str(p)
    if not p.exists():
        raise VideoError(f"{label}: no such file")
    if p.is_dir():
        raise VideoError(f"{label} is a folder, not a video")
    try:
        return av.open(str(p), "r")
    except av.error.EOFError as exc:
        raise VideoError(f"{label} has no frames (an empty or truncated file)") from exc
    except av.error.FFmpegError as exc:
        raise VideoError(f"{label} is not a video FFmpeg can read ({ffmpeg_message(exc)})"
                         ) from exc


def _video_stream(container, label: str):
    if not container.streams.video:
        if container.streams.audio:
            raise VideoError(f"{label} has only audio: a video needs pictures")
        raise VideoError(f"{label} has no video stream (no frames)")
    if _STILL_FORMATS.search(container.format.name.split(",")[0]):
        raise VideoError(f"{label} is a still image, not a video (use `onnxdream dream` or "
                         "`zoom`)")
    return container.streams.video[0]


def _stream_fps(vs) -> Fraction:
    for rate in (vs.average_rate, vs.guessed_rate, vs.base_rate):
        if rate:
            return Fraction(rate).limit_denominator(1_000_000)
    return Fraction(25)


def _count_packets(container, vs) -> int:
    return sum(1 for pkt in container.demux(vs) if pkt.size)


def probe(path: str | os.PathLike[str], *, name: str | None = None) -> VideoInfo:
    """The video facts of ``path`` (no pictures decoded); messages call the file ``name``
    (default: its path; the server says "the uploaded video").

    Raises:
        VideoError: missing file, not a video, audio only, a still image, or no frames.
    """
    p = Path(path)
    label = name or str(p)
    with contextlib.closing(open_container(p, name=name)) as c:
        vs = _video_stream(c, label)
        fps = _stream_fps(vs)
        try:
            frames = vs.frames or _count_packets(c, vs)
        except import_av().error.FFmpegError as exc:
            raise VideoError(f"cannot read {label}: {ffmpeg_message(exc)}") from exc
        if frames <= 0 or not vs.codec_context.width:
            raise VideoError(f"{label} has a video stream with no frames")
        tb = vs.time_base
        start = float(vs.start_time * tb) if vs.start_time is not None and tb else 0.0
        duration = float(vs.duration * tb) if vs.duration and tb else float(frames / fps)
        audio = None
        if c.streams.audio:
            a = c.streams.audio[0]
            adur = float(a.duration * a.time_base) if a.duration and a.time_base else None
            audio = AudioInfo(a.codec_context.codec.canonical_name, int(a.rate or 0),
                              int(a.channels or 0), adur)
        return VideoInfo(p, vs.codec_context.width, vs.codec_context.height, fps, int(frames),
                         duration, vs.codec_context.codec.canonical_name, start, audio)


# --------------------------------------------------------------------------------------------
# Reading


def even_size(width: int, height: int, target_width: int | None = None) -> tuple[int, int]:
    """(w, h) both even: ``target_width`` keeping the aspect ratio, or the size itself."""
    if target_width is not None:
        if target_width < 2:
            raise VideoError(f"width must be at least 2 pixels, got {target_width}")
        w = target_width - target_width % 2
        h = max(2, 2 * round(height * w / width / 2))
        return w, h
    return max(2, width - width % 2), max(2, height - height % 2)


class VideoReader:
    """Selected frames of a video as uint8 RGB arrays; use :func:`open_video`."""

    def __init__(self, path: str | os.PathLike[str], *, start: float = 0.0,
                 duration: float | None = None, every: int = 1, width: int | None = None):
        if start < 0:
            raise VideoError(f"start must be >= 0 seconds, got {start}")
        if duration is not None and duration <= 0:
            raise VideoError(f"duration must be > 0 seconds, got {duration}")
        if every < 1:
            raise VideoError(f"every must be >= 1, got {every}")
        self.info = probe(path)
        if start >= self.info.duration:
            raise VideoError(f"start {start:g}s is past the end of {self.info.path} "
                             f"({self.info.duration:.3g}s)")
        self.start, self.every = float(start), int(every)
        end = self.info.duration if duration is None else min(self.info.duration,
                                                             start + duration)
        self.end = end
        self.size = even_size(self.info.width, self.info.height, width)  # (w, h)
        self.resize = self.size != (self.info.width, self.info.height) and width is not None
        self.fps = self.info.fps / self.every  # output frame rate
        fps = self.info.fps
        n_in = min(self.info.frames, math.ceil(end * fps - 1e-6)) - math.ceil(start * fps - 1e-6)
        self.expected = max(1, math.ceil(max(n_in, 1) / self.every))  # ±1 frame

    @property
    def duration(self) -> float:
        """Length of the selection in seconds."""
        return self.end - self.start

    def __iter__(self) -> Iterator[np.ndarray]:
        av = import_av()
        p = self.info.path
        fps = self.info.fps
        half = 0.5 / float(fps)
        w, h = self.size
        with contextlib.closing(open_container(p)) as c:
            vs = c.streams.video[0]
            origin = self.info.start_time
            try:
                if self.start > 0:
                    c.seek(int((origin + self.start) / vs.time_base), stream=vs, backward=True)
                selected = 0
                decoded = 0
                for frame in c.decode(vs):
                    t = (frame.time - origin) if frame.time is not None else decoded / float(fps)
                    decoded += 1
                    if t < self.start - half:
                        continue
                    if t >= self.end - half:
                        break
                    selected += 1
                    if (selected - 1) % self.every:
                        continue
                    if self.resize:
                        frame = frame.reformat(width=w, height=h, format="rgb24",
                                               interpolation="AREA")
                        rgb = frame.to_ndarray()
                    else:
                        rgb = frame.to_ndarray(format="rgb24")[:h, :w]
                    yield np.ascontiguousarray(rgb)
            except av.error.FFmpegError as exc:
                raise VideoError(f"cannot decode {p}: {ffmpeg_message(exc)}") from exc
        if not selected:
            raise VideoError(f"{p}: no frames between {self.start:g}s and {self.end:g}s")


def open_video(path: str | os.PathLike[str], *, start: float = 0.0,
               duration: float | None = None, every: int = 1,
               width: int | None = None) -> VideoReader:
    """Frames of ``path`` from ``start`` seconds for ``duration`` seconds, every ``every``-th,
    resized to ``width`` (even, aspect kept; height even too). Iterating yields uint8 RGB
    arrays; ``reader.fps`` is the output rate (input fps / every), ``reader.expected`` the frame
    count (±1), ``reader.size`` (w, h).

    Raises:
        VideoError: as :func:`probe`, or a bad selection.
    """
    return VideoReader(path, start=start, duration=duration, every=every, width=width)


# --------------------------------------------------------------------------------------------
# Output paths


def output_kind(path: str | os.PathLike[str]) -> str:
    """"mp4", "webm", "gif", or "png" (a folder of numbered PNGs) from the path's extension."""
    s = os.fspath(path)
    p = Path(s)
    if s.endswith(("/", os.sep)) or p.is_dir() or not p.suffix:
        return "png"
    kind = OUTPUT_KINDS.get(p.suffix.lower())
    if kind is None:
        raise VideoError(f"cannot write {p}: unknown video extension {p.suffix!r} (use "
                         f"{', '.join(OUTPUT_KINDS)}, or a folder for numbered PNGs: end it "
                         "with /)")
    return kind


def check_video_output(path: str | os.PathLike[str]) -> str:
    """Check an output path before any work: known kind, existing parent, and a folder target
    that is empty or holds only numbered frames. Returns the kind."""
    kind = output_kind(path)
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise VideoError(f"cannot write {p}: folder {parent} does not exist")
    if kind == "png" and p.exists():
        if not p.is_dir():
            raise VideoError(f"cannot write frames to {p}: it is a file")
        stray = [e.name for e in p.iterdir() if not _FRAME_RE.fullmatch(e.name)]
        if stray:
            raise VideoError(f"cannot write frames to {p}: the folder holds other files "
                             f"({stray[0]}); give an empty or new folder")
    elif kind != "png" and p.is_dir():
        raise VideoError(f"cannot write {p}: it is a folder")
    return kind
