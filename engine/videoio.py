"""Reading and writing the videos that get dreamed, with PyAV (FFmpeg's libraries in a wheel).

No ``ffmpeg`` binary is needed: PyAV (the ``[video]`` extra) decodes anything FFmpeg reads and
encodes the outputs below. Frames travel as uint8 RGB arrays, H x W x 3.

- :func:`probe` reads a file's video facts (:class:`VideoInfo`: size, frame rate as a
  :class:`~fractions.Fraction`, frame count, duration, audio stream) without decoding pictures.
- :func:`open_video` selects frames (``start``/``duration`` in seconds, every ``every``-th frame,
  resized to ``width`` keeping the aspect ratio) and yields them; its :class:`VideoReader` knows
  the output size, frame rate (``fps / every``) and expected count before the first frame.
- :class:`VideoWriter` writes what :func:`output_kind` reads from the extension: ``.mp4``
  (H.264/libx264, yuv420p, ``+faststart``: plays in every browser and player), ``.webm``
  (VP9), ``.gif`` (one global 256-colour palette) or a folder of numbered PNGs (a path without
  an extension, or ending in ``/``). Sizes are made even (yuv420p needs it) by dropping the last
  row/column.

Audio. The input's audio stream (the part under the selected frames) is copied packet by packet,
no re-encode, when the output container takes its codec (:data:`REMUX_CODECS`, measured with
this PyAV wheel); otherwise it is re-encoded (AAC in MP4, Opus in WebM) and a note says so; GIF
and PNG folders have no audio (a note says it was dropped). ``VideoWriter.notes`` holds the notes.

Atomic output. A file is written to a temporary name in the target's directory and moved into
place with :func:`os.replace` when complete; a PNG folder is built beside the target and renamed
over it. An error or Ctrl-C leaves no partial output and the previous one, if any, untouched.

Variable frame rate inputs are read at their average rate; rotation metadata (phone videos) is
not applied.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from onnxdream.errors import DependencyError, OnnxDreamError

__all__ = [
    "AudioInfo",
    "OUTPUT_KINDS",
    "REMUX_CODECS",
    "VideoError",
    "VideoInfo",
    "VideoReader",
    "VideoWriter",
    "check_video_output",
    "even_size",
    "open_video",
    "output_kind",
    "probe",
    "write_video",
]


class VideoError(OnnxDreamError):
    """A video cannot be read (not a video, no frames, audio only) or an output not written."""


#: Output extension → kind. A path without an extension (or ending in a separator) is a folder
#: of numbered PNGs ("png").
OUTPUT_KINDS = {".mp4": "mp4", ".webm": "webm", ".gif": "gif"}

#: Audio codecs copied into each container without re-encoding (measured: each remuxes with this
#: wheel and plays back; vorbis-in-MP4 and PCM-in-MP4 mux in FFmpeg but few players take them).
REMUX_CODECS = {
    "mp4": frozenset({"aac", "mp3", "ac3", "eac3", "alac", "opus", "flac"}),
    "webm": frozenset({"opus", "vorbis"}),
}
#: Encoder used when the audio codec cannot be copied.
AUDIO_ENCODERS = {"mp4": "aac", "webm": "libopus"}

_FORMATS = {"mp4": "mp4", "webm": "webm"}
_STILL_FORMATS = re.compile(r"(_pipe|^image2)$")
FRAME_NAME = "frame_{:06d}.png"
_FRAME_RE = re.compile(r"frame_\d{6,}\.png")


def _av():
    try:
        import av
    except ImportError as exc:  # pragma: no cover - the [video] extra is missing
        raise DependencyError(
            "video needs PyAV: pip install 'onnxdream[video]'") from exc
    av.logging.set_level(av.logging.PANIC)  # errors come back as exceptions; no stderr noise
    return av


def _first_line(exc: BaseException) -> str:
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


def _open_input(path: str | os.PathLike[str]):
    av = _av()
    p = Path(path)
    if not p.exists():
        raise VideoError(f"{p}: no such file")
    if p.is_dir():
        raise VideoError(f"{p} is a folder, not a video")
    try:
        return av.open(str(p), "r")
    except av.error.EOFError as exc:
        raise VideoError(f"{p} has no frames (an empty or truncated file)") from exc
    except av.error.FFmpegError as exc:
        raise VideoError(f"{p} is not a video FFmpeg can read ({_first_line(exc)})") from exc


def _video_stream(container, p: Path):
    if not container.streams.video:
        if container.streams.audio:
            raise VideoError(f"{p} has only audio: a video needs pictures")
        raise VideoError(f"{p} has no video stream (no frames)")
    if _STILL_FORMATS.search(container.format.name.split(",")[0]):
        raise VideoError(f"{p} is a still image, not a video (use `onnxdream dream` or `zoom`)")
    return container.streams.video[0]


def _stream_fps(vs) -> Fraction:
    for rate in (vs.average_rate, vs.guessed_rate, vs.base_rate):
        if rate:
            return Fraction(rate).limit_denominator(1_000_000)
    return Fraction(25)


def _count_packets(container, vs) -> int:
    return sum(1 for pkt in container.demux(vs) if pkt.size)


def probe(path: str | os.PathLike[str]) -> VideoInfo:
    """The video facts of ``path`` (no pictures decoded).

    Raises:
        VideoError: missing file, not a video, audio only, a still image, or no frames.
    """
    p = Path(path)
    with contextlib.closing(_open_input(p)) as c:
        vs = _video_stream(c, p)
        fps = _stream_fps(vs)
        try:
            frames = vs.frames or _count_packets(c, vs)
        except _av().error.FFmpegError as exc:
            raise VideoError(f"cannot read {p}: {_first_line(exc)}") from exc
        if frames <= 0 or not vs.codec_context.width:
            raise VideoError(f"{p} has a video stream with no frames")
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
        av = _av()
        p = self.info.path
        fps = self.info.fps
        half = 0.5 / float(fps)
        w, h = self.size
        with contextlib.closing(_open_input(p)) as c:
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
                raise VideoError(f"cannot decode {p}: {_first_line(exc)}") from exc
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
# Writing


def output_kind(path: str | os.PathLike[str]) -> str:
    """"mp4", "webm", "gif", or "png" (a folder of numbered PNGs) from the path's extension."""
    s = os.fspath(path)
    p = Path(s)
    if s.endswith(("/", os.sep)) or p.is_dir() or not p.suffix:
        return "png"
    kind = OUTPUT_KINDS.get(p.suffix.lower())
    if kind is None:
        raise VideoError(f"cannot write {p}: unknown video extension {p.suffix!r} (use "
                         f"{', '.join(OUTPUT_KINDS)}, or a folder name for numbered PNGs)")
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


def _umask() -> int:
    from onnxdream.imageio import _umask as umask

    return umask()


@dataclass
class _AudioSource:
    path: Path
    start: float
    duration: float | None


class VideoWriter:
    """Write uint8 RGB frames (H x W x 3) to ``path`` atomically; use as a context manager.

    ``audio_from`` copies the audio of that file between ``audio_start`` and
    ``audio_start + audio_duration`` seconds (relative to its first video frame), cut to the
    video's length. ``notes`` lists what happened to the audio (re-encoded, dropped).
    ``quality`` is the CRF for MP4 (libx264, lower is better) and WebM (VP9).
    """

    def __init__(self, path: str | os.PathLike[str], fps: Fraction | float, *,
                 audio_from: str | os.PathLike[str] | None = None, audio_start: float = 0.0,
                 audio_duration: float | None = None, quality: int | None = None,
                 max_gif_bytes: int = 1 << 30):
        self.path = Path(path)
        self.kind = check_video_output(path)
        self.fps = Fraction(fps).limit_denominator(1_000_000)
        if self.fps <= 0:
            raise VideoError(f"frame rate must be > 0, got {fps}")
        self.notes: list[str] = []
        self.frames = 0
        self.size: tuple[int, int] | None = None  # (w, h) after the first frame
        self._audio = (_AudioSource(Path(audio_from), float(audio_start), audio_duration)
                       if audio_from is not None else None)
        self._quality = quality
        self._max_gif_bytes = max_gif_bytes
        self._tmp: Path | None = None
        self._out = None  # PyAV output container
        self._vstream = None
        self._gif: list = []
        self._gif_bytes = 0
        self._audio_pump: _AudioPump | None = None
        self._closed = False
        parent = self.path.parent if str(self.path.parent) else Path(".")
        try:
            if self.kind == "png":
                self._tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", suffix=".part",
                                                  dir=parent))
            else:
                fd, name = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".part",
                                            dir=parent)
                os.close(fd)
                self._tmp = Path(name)
        except OSError as exc:
            raise VideoError(f"cannot write {self.path}: {exc.strerror or exc}") from exc
        if self._audio is not None and self.kind in ("gif", "png"):
            self.notes.append(f"audio dropped: {'GIF' if self.kind == 'gif' else 'PNG frames'} "
                              "cannot hold sound")
            self._audio = None

    # -- context management -------------------------------------------------------------------
    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def abort(self) -> None:
        """Drop everything written so far (the target is left as it was)."""
        self._closed = True
        if self._audio_pump is not None:
            self._audio_pump.close()
        if self._out is not None:
            with contextlib.suppress(Exception):
                self._out.close()
            self._out = None
        self._gif = []
        if self._tmp is not None:
            if self._tmp.is_dir():
                shutil.rmtree(self._tmp, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    self._tmp.unlink()
            self._tmp = None

    # -- frames -------------------------------------------------------------------------------
    def write(self, rgb: np.ndarray) -> None:
        if self._closed:
            raise VideoError(f"{self.path}: writer is closed")
        a = np.asarray(rgb)
        if a.ndim != 3 or a.shape[2] != 3 or a.dtype != np.uint8:
            raise VideoError(f"cannot write {self.path}: frames must be uint8 H x W x 3, got "
                             f"{a.dtype} {a.shape}")
        try:
            self._write(a)
        except BaseException:
            self.abort()
            raise

    def _write(self, a: np.ndarray) -> None:
        if self.size is None:
            self.size = even_size(a.shape[1], a.shape[0])
            self._start()
        w, h = self.size
        a = a[:h, :w]
        if a.shape[:2] != (h, w):
            raise VideoError(f"cannot write {self.path}: frame {self.frames} is "
                             f"{a.shape[1]}x{a.shape[0]}, the first was {w}x{h}")
        if self.kind == "png":
            from PIL import Image

            Image.fromarray(np.ascontiguousarray(a)).save(
                self._tmp / FRAME_NAME.format(self.frames), format="PNG", compress_level=4)
        elif self.kind == "gif":
            from PIL import Image

            self._gif_bytes += a.nbytes
            if self._gif_bytes > self._max_gif_bytes:
                raise VideoError(f"cannot write {self.path}: a GIF this long and large does not "
                                 "fit in memory; use a smaller width, or MP4/WebM")
            self._gif.append(Image.fromarray(np.ascontiguousarray(a)))
        else:
            av = _av()
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(a), format="rgb24")
            frame = frame.reformat(format="yuv420p", dst_colorspace="ITU709")
            frame.pts = self.frames
            try:
                for pkt in self._vstream.encode(frame):
                    self._out.mux(pkt)
                if self._audio_pump is not None:
                    self._audio_pump.pump(float((self.frames + 1) / self.fps))
            except av.error.FFmpegError as exc:
                raise VideoError(f"cannot write {self.path}: {_first_line(exc)}") from exc
        self.frames += 1

    def _start(self) -> None:
        if self.kind in ("gif", "png"):
            return
        av = _av()
        w, h = self.size
        try:
            out = av.open(str(self._tmp), "w", format=_FORMATS[self.kind],
                          options={"movflags": "+faststart"} if self.kind == "mp4" else {})
            self._out = out
            if self.kind == "mp4":
                crf = 20 if self._quality is None else self._quality
                vs = out.add_stream("libx264", rate=self.fps,
                                    options={"crf": str(crf), "preset": "medium"})
            else:
                crf = 32 if self._quality is None else self._quality
                vs = out.add_stream("libvpx-vp9", rate=self.fps,
                                    options={"crf": str(crf), "b": "0", "deadline": "good",
                                             "cpu-used": "4", "row-mt": "1"})
            vs.width, vs.height, vs.pix_fmt = w, h, "yuv420p"
            cc = vs.codec_context
            cc.colorspace = cc.color_primaries = cc.color_trc = 1  # BT.709, as converted
            cc.color_range = 1  # limited ("TV") range: what players assume
            cc.time_base = Fraction(1, 1) / self.fps
            self._vstream = vs
            if self._audio is not None:
                self._audio_pump = _AudioPump(self._audio, out, self.kind, self.notes)
        except av.error.FFmpegError as exc:
            raise VideoError(f"cannot write {self.path}: {_first_line(exc)}") from exc

    # -- finishing ----------------------------------------------------------------------------
    def close(self) -> Path:
        """Finish the file and move it into place; returns the path."""
        if self._closed:
            return self.path
        try:
            if self.frames == 0:
                raise VideoError(f"cannot write {self.path}: no frames")
            if self.kind == "gif":
                self._finish_gif()
            elif self.kind in ("mp4", "webm"):
                av = _av()
                try:
                    for pkt in self._vstream.encode(None):
                        self._out.mux(pkt)
                    if self._audio_pump is not None:
                        self._audio_pump.pump(float(self.frames / self.fps), final=True)
                    self._out.close()
                except av.error.FFmpegError as exc:
                    raise VideoError(f"cannot write {self.path}: {_first_line(exc)}") from exc
                self._out = None
            self._commit()
        except BaseException:
            self.abort()
            raise
        self._closed = True
        return self.path

    def _finish_gif(self) -> None:
        from PIL import Image, features

        frames, self._gif = self._gif, []
        # one palette for the whole clip from a mosaic of up to 16 frames: no palette flicker,
        # and frames that share it store only what changed
        pick = frames[:: max(1, len(frames) // 16)][:16]
        w, h = pick[0].size
        scale = max(1, round(math.sqrt(w * h * len(pick) / 1_000_000)))
        tw, th = max(1, w // scale), max(1, h // scale)
        mosaic = Image.new("RGB", (tw * len(pick), th))
        for i, im in enumerate(pick):
            mosaic.paste(im.resize((tw, th), Image.Resampling.BOX), (i * tw, 0))
        method = (Image.Quantize.LIBIMAGEQUANT if features.check("libimagequant")
                  else Image.Quantize.MEDIANCUT)
        palette = mosaic.quantize(colors=256, method=method)
        quantized = [im.quantize(palette=palette, dither=Image.Dither.NONE) for im in frames]
        # GIF delays are in centiseconds: spread the rounding so the total duration is kept
        cs = [round(100 * (i + 1) / self.fps) - round(100 * i / self.fps)
              for i in range(len(quantized))]
        if min(cs) < 2:
            self.notes.append(f"GIF frame delays under 20 ms ({float(self.fps):g} fps) play "
                              "slowly in browsers; use --every or MP4")
        with open(self._tmp, "wb") as fh:
            quantized[0].save(fh, format="GIF", save_all=True, append_images=quantized[1:],
                              duration=[10 * c for c in cs], loop=0, optimize=False)

    def _commit(self) -> None:
        tmp, target = self._tmp, self.path
        if self.kind == "png":
            os.chmod(tmp, 0o777 & ~_umask())
            if target.exists():
                check_video_output(target)  # still only numbered frames
                old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old",
                                            dir=tmp.parent))
                os.replace(target, old / "frames")
                os.replace(tmp, target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, target)
        else:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            with contextlib.suppress(OSError):
                mode = (os.stat(target).st_mode & 0o777) if target.exists() else (
                    0o666 & ~_umask())
                os.chmod(tmp, mode)
            os.replace(tmp, target)
        self._tmp = None


class _AudioPump:
    """Audio of one input, cut to a time range, interleaved into an output as frames arrive:
    packets copied when the container takes the codec, else decoded and re-encoded."""

    def __init__(self, src: _AudioSource, out, kind: str, notes: list[str]):
        av = _av()
        self.input = _open_input(src.path)
        try:
            self.stream = self.input.streams.audio[0] if self.input.streams.audio else None
            if self.stream is None:
                self.close()
                return
            vs = self.input.streams.video
            origin = 0.0
            if vs and vs[0].start_time is not None and vs[0].time_base:
                origin = float(vs[0].start_time * vs[0].time_base)
            self.origin, self.start = origin, src.start
            self.end = math.inf if src.duration is None else src.start + src.duration
            self.tb = self.stream.time_base
            desc = self.stream.codec_context.codec.canonical_name  # mp3, not mp3float
            self.copy = desc in REMUX_CODECS[kind] and desc in out.supported_codecs
            if self.copy:
                self.ostream = out.add_stream_from_template(self.stream)
            else:
                enc = AUDIO_ENCODERS[kind]
                rate = self.stream.rate or 48000
                if enc == "libopus" and rate not in (8000, 12000, 16000, 24000, 48000):
                    rate = 48000
                self.ostream = out.add_stream(enc, rate=rate)
                self.ostream.layout = "mono" if self.stream.channels == 1 else "stereo"
                self.ostream.bit_rate = 160_000
                self.resampler = av.AudioResampler(
                    format=self.ostream.codec_context.codec.audio_formats[0].name,
                    layout=self.ostream.layout.name, rate=rate)
                self.samples = 0
                notes.append(f"audio re-encoded: {desc} cannot be copied into "
                             f"{kind.upper()} ({enc.removeprefix('lib')} instead)")
            if src.start > 0:
                self.input.seek(int((origin + src.start) / self.tb), stream=self.stream,
                                backward=True)
            self.packets = self.input.demux(self.stream)
            self.pending = None
            self.out = out
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.input is not None:
            with contextlib.suppress(Exception):
                self.input.close()
            self.input = None
        self.stream = None

    def pump(self, until: float, final: bool = False) -> None:
        """Write the audio up to ``until`` seconds of output time (all of it when final, cut
        at ``until``)."""
        if self.stream is None:
            return
        limit = min(until, self.end - self.start)
        while True:
            pkt = self.pending or next(self.packets, None)
            self.pending = None
            if pkt is None:
                break
            if pkt.pts is None or pkt.size == 0:
                continue
            t = float(pkt.pts * self.tb) - self.origin - self.start  # output time
            dur = float(pkt.duration * self.tb) if pkt.duration else 0.0
            if t + dur <= 0:
                continue  # wholly before the selection
            if t >= limit:
                if final:
                    break
                self.pending = pkt  # belongs after the next video frame
                return
            if self.copy:
                shift = round((self.origin + self.start) / self.tb)
                pkt.pts -= shift
                if pkt.dts is not None:
                    pkt.dts -= shift
                pkt.stream = self.ostream
                self.out.mux(pkt)
            else:
                for frame in pkt.decode():
                    self._encode(frame)
        if final:
            if not self.copy:
                self._encode(None)
            self.close()

    def _encode(self, frame) -> None:
        frames = self.resampler.resample(frame)
        for f in frames:
            f.pts = self.samples
            f.time_base = Fraction(1, f.sample_rate)
            self.samples += f.samples
            for pkt in self.ostream.encode(f):
                self.out.mux(pkt)
        if frame is None:
            for pkt in self.ostream.encode(None):
                self.out.mux(pkt)


def write_video(path: str | os.PathLike[str], frames: Iterable[np.ndarray],
                fps: Fraction | float, **kwargs) -> VideoWriter:
    """Write ``frames`` (uint8 RGB) to ``path``; keyword arguments as :class:`VideoWriter`.
    Returns the closed writer (``.frames``, ``.size``, ``.notes``)."""
    with VideoWriter(path, fps, **kwargs) as writer:
        for frame in frames:
            writer.write(frame)
    return writer
