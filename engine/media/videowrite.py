"""Writing dreamed videos with PyAV: MP4, WebM, GIF or a folder of PNGs, atomically, with the
input's sound.

:class:`VideoWriter` writes what :func:`~onnxdream.media.videoio.output_kind` reads from the
extension: ``.mp4`` (H.264/libx264, yuv420p, BT.709, ``+faststart``: plays in every browser and
player), ``.webm`` (VP9), ``.gif`` (one global 256-colour palette, delays kept to the centisecond)
or a folder of numbered PNGs. Sizes are made even (yuv420p needs it) by dropping the last
row/column.

Audio. The input's audio stream (the part under the selected frames) is copied packet by packet,
no re-encode, when the output container takes its codec (:data:`REMUX_CODECS`, measured with
this PyAV wheel: benchmarks/bench_video.py); otherwise it is re-encoded (AAC in MP4, Opus in
WebM) and a note says so; GIF and PNG folders have no audio (a note says it was dropped).
``VideoWriter.notes`` holds the notes for the caller to show.

Atomic output (:class:`onnxdream.core.atomic.AtomicTarget`). A file is written to a temporary name
in the target's directory and moved into place when complete; a PNG folder is built beside the
target and renamed over it. An error or Ctrl-C leaves no partial output and the previous one, if
any, untouched.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from onnxdream.core.atomic import AtomicTarget
from onnxdream.core.errors import VideoError
from onnxdream.media.videoio import (
    FRAME_NAME,
    check_video_output,
    even_size,
    ffmpeg_message,
    import_av,
    open_container,
)

__all__ = ["AUDIO_ENCODERS", "REMUX_CODECS", "VideoWriter", "write_video"]

#: Audio codecs copied into each container without re-encoding (measured: each remuxes with this
#: wheel and plays back; vorbis-in-MP4 and PCM-in-MP4 mux in FFmpeg but few players take them).
REMUX_CODECS = {
    "mp4": frozenset({"aac", "mp3", "ac3", "eac3", "alac", "opus", "flac"}),
    "webm": frozenset({"opus", "vorbis"}),
}
#: Encoder used when the audio codec cannot be copied.
AUDIO_ENCODERS = {"mp4": "aac", "webm": "libopus"}

_FORMATS = {"mp4": "mp4", "webm": "webm"}


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
        self._target: AtomicTarget | None = None
        self._out = None  # PyAV output container
        self._vstream = None
        self._gif: list = []
        self._gif_bytes = 0
        self._audio_pump: _AudioPump | None = None
        self._closed = False
        if self._audio is not None and self.kind in ("gif", "png") and _has_audio(audio_from):
            self.notes.append(f"audio dropped: {'GIF' if self.kind == 'gif' else 'PNG frames'} "
                              "cannot hold sound")
        if self.kind in ("gif", "png"):
            self._audio = None
        try:  # last: nothing above may fail once the temporary file exists
            self._target = AtomicTarget(self.path, directory=self.kind == "png")
        except OSError as exc:
            raise VideoError(f"cannot write {self.path}: {exc.strerror or exc}") from exc

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
        if self._target is not None:
            self._target.abort()
            self._target = None

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
                self._target.tmp / FRAME_NAME.format(self.frames), format="PNG", compress_level=4)
        elif self.kind == "gif":
            from PIL import Image

            self._gif_bytes += a.nbytes
            if self._gif_bytes > self._max_gif_bytes:
                raise VideoError(f"cannot write {self.path}: a GIF this long and large does not "
                                 "fit in memory; use a smaller width, or MP4/WebM")
            self._gif.append(Image.fromarray(np.ascontiguousarray(a)))
        else:
            av = import_av()
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(a), format="rgb24")
            frame = frame.reformat(format="yuv420p", dst_colorspace="ITU709")
            frame.pts = self.frames
            try:
                for pkt in self._vstream.encode(frame):
                    self._out.mux(pkt)
                if self._audio_pump is not None:
                    self._audio_pump.pump(float((self.frames + 1) / self.fps))
            except av.error.FFmpegError as exc:
                raise VideoError(f"cannot write {self.path}: {ffmpeg_message(exc)}") from exc
        self.frames += 1

    def _start(self) -> None:
        if self.kind in ("gif", "png"):
            return
        av = import_av()
        w, h = self.size
        try:
            out = av.open(str(self._target.tmp), "w", format=_FORMATS[self.kind],
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
            raise VideoError(f"cannot write {self.path}: {ffmpeg_message(exc)}") from exc

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
                av = import_av()
                try:
                    for pkt in self._vstream.encode(None):
                        self._out.mux(pkt)
                    if self._audio_pump is not None:
                        self._audio_pump.pump(float(self.frames / self.fps), final=True)
                    self._out.close()
                except av.error.FFmpegError as exc:
                    raise VideoError(f"cannot write {self.path}: {ffmpeg_message(exc)}") from exc
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
        with open(self._target.tmp, "wb") as fh:
            quantized[0].save(fh, format="GIF", save_all=True, append_images=quantized[1:],
                              duration=[10 * c for c in cs], loop=0, optimize=False)

    def _commit(self) -> None:
        if self.kind == "png" and self.path.exists():
            check_video_output(self.path)  # still only numbered frames: safe to replace
        try:
            self._target.commit()
        except OSError as exc:
            raise VideoError(f"cannot write {self.path}: {exc.strerror or exc}") from exc
        self._target = None


def _has_audio(path: str | os.PathLike[str]) -> bool:
    with contextlib.closing(open_container(path)) as c:
        return bool(c.streams.audio)


class _AudioPump:
    """Audio of one input, cut to a time range, interleaved into an output as frames arrive:
    packets copied when the container takes the codec, else decoded and re-encoded."""

    def __init__(self, src: _AudioSource, out, kind: str, notes: list[str]):
        av = import_av()
        self.input = open_container(src.path)
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
