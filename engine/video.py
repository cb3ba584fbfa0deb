"""Dreamed video with temporal coherence, and the endless zoom; resumable, with the sound kept.

Both loops take the dream as an injected function, ``dream_frame(rgb, params) -> rgb``
(float32 H x W x 3 in [0,1] in and out; ``params`` the frame's keyframed values, see
:mod:`onnxdream.schedule`), so the same loop runs the CPU ascent or the CUDA device loop
(:func:`make_dream_frame` builds the standard one from ``onnxdream.ascent.dream``).

- :func:`dream_video`: reads the input's frames (:mod:`onnxdream.videoio`), blends each with
  the previous frame's dream carried along the optical flow (:mod:`onnxdream.flow`; ``flow=False``
  with ``blend > 0`` is DeepDreamVideo's plain blending, ``blend=0`` dreams each frame alone),
  dreams it, and writes MP4/WebM/GIF/PNG frames with the input's audio.
- :func:`zoom`: the Caffe notebook's feedback loop: dream, zoom about the centre (with
  rotation and shift), dream again.

Resumable. Each dreamed frame is written atomically to the work dir as
``<digest>-<index>.png``, where the digest (:func:`settings_digest`) covers everything that
changes a frame: the dream (``dream_key``), the input's fingerprint, the frame selection, the
flow/blend and the schedules (not the output path or format, nor the clip's length: frame i
depends only on frames up to i, so a longer run reuses a shorter one's frames). Re-running
continues after the last frame on disk; the previous frame's dream is always taken from its
8-bit PNG, so a resumed run gives exactly the frames an uninterrupted one does. Ctrl-C leaves
the work dir valid and no partial output. The default work dir
(``.<output name>.onnxdream/`` beside the output) is removed after success; one passed
explicitly is kept.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from onnxdream.errors import OnnxDreamError
from onnxdream.schedule import Schedule, parse_schedule, values_at

__all__ = [
    "DreamFrame",
    "VideoProgress",
    "VideoResult",
    "ZOOM_DEFAULTS",
    "dream_video",
    "frame_settings",
    "make_dream_frame",
    "settings_digest",
    "transform",
    "zoom",
]

#: ``dream_frame(rgb, params) -> rgb``: float32 H x W x 3 in [0,1] in and out.
DreamFrame = Callable[[np.ndarray, Mapping[str, Any]], np.ndarray]
ProgressFn = Callable[["VideoProgress"], None]

#: Suggested dream settings for zoom frames: few steps, so each frame is quick and the feedback
#: loop (not one frame's ascent) does the work.
ZOOM_DEFAULTS = {"steps": 5, "octaves": 2}

_FRAME_FILE = re.compile(r"([0-9a-f]{16})-(\d{6,})\.png")


# --------------------------------------------------------------------------------------------
# (a) settings: the digest and the per-frame dream settings


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


def settings_digest(*parts: Any) -> str:
    """16 hex digits naming everything that decides the dreamed frames.

    ``parts``: dataclasses (e.g. the dream settings with their seed fixed), mappings, schedules,
    numbers, strings; canonicalised (sorted keys, exact floats) and hashed with SHA-256.
    """
    text = json.dumps([_canonical(p) for p in parts], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def file_fingerprint(path: str | os.PathLike[str]) -> str:
    """A cheap content fingerprint: size + the first and last MiB (not the name or mtime)."""
    p = Path(path)
    size = p.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(p, "rb") as fh:
        h.update(fh.read(1 << 20))
        if size > 2 << 20:
            fh.seek(-(1 << 20), os.SEEK_END)
            h.update(fh.read())
    return h.hexdigest()[:16]


def frame_settings(base, params: Mapping[str, Any]):
    """The dream settings for one frame: ``base`` (a DreamSettings) with the frame's scheduled
    ``steps`` / ``step_size`` applied."""
    change = {k: params[k] for k in ("steps", "step_size") if k in params}
    if "steps" in change:
        change["steps"] = int(change["steps"])
    return dataclasses.replace(base, **change) if change else base


# --------------------------------------------------------------------------------------------
# (b) the per-frame dream


class StandardDream:
    """``dream_frame`` for :func:`dream_video`/:func:`zoom` on ``onnxdream.ascent.dream``.

    The frame's ``layers`` value (``"blocks.5+blocks.9:0.5"``) picks the gradient model; the
    last two are kept open (a schedule that cuts between layers does not recompile). ``key``
    describes it for :func:`settings_digest`.
    """

    def __init__(self, model: str, settings, *, layers: list[str] | None = None,
                 objective: str = "mean", pre_relu: bool = False, border: int = 0,
                 device: str = "auto", threads: int | None = None):
        self.model, self.layers = model, list(layers or [])
        self.settings = settings.validate().with_seed()  # one seed: the same jitter per frame
        self.objective, self.pre_relu, self.border = objective, pre_relu, border
        self.device, self.threads = device, threads
        self._models: collections.OrderedDict[tuple[str, ...], Any] = collections.OrderedDict()

    @property
    def key(self) -> dict[str, Any]:
        return {"model": self.model, "layers": self.layers, "objective": self.objective,
                "pre_relu": self.pre_relu, "border": self.border, "settings": self.settings}

    def gradient_model(self, layers: tuple[str, ...]):
        from onnxdream.gradient import GradientModel

        gm = self._models.get(layers)
        if gm is None:
            gm = GradientModel(self.model, list(layers), self.objective, pre_relu=self.pre_relu,
                               border=self.border, device=self.device, threads=self.threads)
            self._models[layers] = gm
            while len(self._models) > 2:
                self._models.popitem(last=False)
        self._models.move_to_end(layers)
        return gm

    def __call__(self, rgb: np.ndarray, params: Mapping[str, Any]) -> np.ndarray:
        from onnxdream.ascent import dream

        layers = params.get("layers")
        names = tuple(layers.split("+")) if layers else tuple(self.layers)
        return dream(self.gradient_model(names), rgb, frame_settings(self.settings, params))


def make_dream_frame(model: str = "efficientnet-lite0", settings=None, **kwargs) -> StandardDream:
    """The standard ``dream_frame``: ``onnxdream.ascent.dream`` with ``settings`` (a
    DreamSettings; its seed is fixed here), per-frame ``layers``/``steps``/``step_size`` from the
    schedules; other keyword arguments as :class:`StandardDream`."""
    if settings is None:
        from onnxdream.ascent import DreamSettings

        settings = DreamSettings()
    return StandardDream(model, settings, **kwargs)


# --------------------------------------------------------------------------------------------
# Progress, results and the frame store


@dataclass(frozen=True)
class VideoProgress:
    stage: str  # "dream" or "encode"
    done: int  # frames finished, resumed ones included
    total: int  # frames expected (a video's count is known to ±1 until it is read)
    resumed: int  # frames found in the work dir
    dreamed: int  # frames dreamed by this run
    elapsed: float  # seconds spent dreaming in this run

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
    """Dreamed frames as ``<digest>-<index>.png`` in a work dir, each written atomically."""

    def __init__(self, work_dir: Path, digest: str, *, prune: bool):
        self.dir, self.digest = work_dir, digest
        try:
            work_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OnnxDreamError(f"cannot use work dir {work_dir}: {exc.strerror or exc}") from exc
        if prune:  # our own default dir: frames of other settings are stale
            for p in work_dir.iterdir():
                m = _FRAME_FILE.fullmatch(p.name)
                if m and m.group(1) != digest:
                    p.unlink(missing_ok=True)

    def path(self, i: int) -> Path:
        return self.dir / f"{self.digest}-{i:06d}.png"

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

    def save(self, i: int, rgb: np.ndarray) -> np.ndarray:
        """Write frame i; returns it as uint8 (what the next frame builds on)."""
        from onnxdream.imageio import save_image, to_uint8

        q = to_uint8(rgb)
        save_image(self.path(i), q.astype(np.float32) / 255.0)
        return q


def _default_work_dir(output: Path) -> Path:
    parent = output.parent if str(output.parent) else Path(".")
    return parent / f".{output.name.rstrip('/') or 'frames'}.onnxdream"


class _Clock:
    def __init__(self, total: int, progress: ProgressFn | None):
        self.total, self.progress = total, progress
        self.done = self.resumed = self.dreamed = 0
        self.elapsed = 0.0

    def report(self, stage: str = "dream") -> None:
        if self.progress is not None:
            self.progress(VideoProgress(stage, self.done, max(self.total, self.done),
                                        self.resumed, self.dreamed, self.elapsed))


def _schedules(schedules: Mapping[str, Schedule | str | float | int] | None,
               **constants: Any) -> dict[str, Schedule]:
    out: dict[str, Schedule] = {}
    for name, value in {**constants, **(schedules or {})}.items():
        if value is None:
            continue
        out[name] = value if isinstance(value, Schedule) else parse_schedule(value, name)
    return out


def _encode(store: _FrameStore, n: int, output: Path, fps: Fraction, clock: _Clock,
            **audio: Any) -> tuple[tuple[int, int], list[str]]:
    from onnxdream.videowrite import VideoWriter

    with VideoWriter(output, fps, **audio) as writer:
        for i in range(n):
            frame = store.load(i)
            if frame is None:
                raise OnnxDreamError(f"frame {i} vanished from the work dir {store.dir}")
            writer.write(frame)
            if clock.progress is not None and (i + 1) % 10 == 0:
                clock.progress(VideoProgress("encode", i + 1, n, clock.resumed, clock.dreamed,
                                             clock.elapsed))
    return writer.size, writer.notes


# --------------------------------------------------------------------------------------------
# Video


def dream_video(input: str | os.PathLike[str], output: str | os.PathLike[str],
                dream_frame: DreamFrame, *, flow: bool = True,
                blend: float | str | Schedule | None = None,
                work_dir: str | os.PathLike[str] | None = None, start: float = 0.0,
                duration: float | None = None, every: int = 1, width: int | None = None,
                schedules: Mapping[str, Schedule | str] | None = None,
                dream_key: Any = None, flow_preset: str | None = None,
                progress: ProgressFn | None = None) -> VideoResult:
    """Dream every selected frame of ``input`` into ``output`` (.mp4, .webm, .gif or a folder).

    Args:
        dream_frame: the dream (see the module docstring); gets each frame's scheduled values.
        flow: carry the previous frame's dream along the input's optical flow, masked where
            occluded; False: plain blending with the previous dreamed frame.
        blend: weight of the previous frame's dream, 0 (each frame alone) to 1, or a schedule;
            default ``flow.DEFAULT_BLEND`` with flow, 0 without (the naive per-frame dream).
        work_dir: where the dreamed frames live (kept); default: a hidden folder beside the
            output, removed after success.
        start, duration, every, width: the frame selection (see ``videoio.open_video``).
        schedules: field → schedule (or its text) for the per-frame values, e.g.
            ``{"layers": "0:blocks.5,120:blocks.9", "step_size": "0:0.004,5s:0.01"}``.
        dream_key: what identifies the dream's settings in the digest; default
            ``dream_frame.key`` (set by :func:`make_dream_frame`).

    Raises:
        VideoError, ScheduleError, or what dream_frame raises (frames done so far stay).
    """
    from onnxdream.flow import DEFAULT_BLEND, DEFAULT_PRESET, FlowEstimator, coherent_input
    from onnxdream.videoio import check_video_output, open_video

    out = Path(output)
    check_video_output(out)
    reader = open_video(input, start=start, duration=duration, every=every, width=width)
    if blend is None:
        blend = DEFAULT_BLEND if flow else 0.0
    scheds = _schedules(schedules, blend=blend)
    for s in scheds.values():
        s.frames(reader.fps)  # positions collide at this fps: fail before any work
    preset = flow_preset or DEFAULT_PRESET
    key = dream_key if dream_key is not None else getattr(dream_frame, "key", None)
    digest = settings_digest(
        "video", key if key is not None else getattr(dream_frame, "__qualname__", "dream"),
        file_fingerprint(input), {"start": start, "every": every, "width": width,
                                  "flow": bool(flow), "flow_preset": preset if flow else None},
        scheds)
    work = Path(work_dir) if work_dir is not None else _default_work_dir(out)
    store = _FrameStore(work, digest, prune=work_dir is None)
    est = FlowEstimator(preset) if flow else None
    clock = _Clock(reader.expected, progress)
    prev_in: np.ndarray | None = None
    prev_index: int | None = None
    prev_dream: np.ndarray | None = None  # loaded lazily: only the frame after a gap needs it
    n = 0
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
            t0 = time.perf_counter()
            dreamed = np.asarray(dream_frame(x, params))
            if dreamed.shape != x.shape:
                raise OnnxDreamError(f"dream_frame returned shape {dreamed.shape} for a "
                                     f"{x.shape} frame")
            prev_dream = store.save(i, dreamed)
            clock.elapsed += time.perf_counter() - t0
            clock.dreamed += 1
        prev_in, prev_index = frame.astype(np.float32) / 255.0, i
        clock.done = n
        clock.report()
    clock.total = n
    size, notes = _encode(store, n, out, reader.fps, clock, audio_from=input,
                          audio_start=reader.start, audio_duration=reader.duration)
    clock.report("encode")
    if work_dir is None:
        shutil.rmtree(work, ignore_errors=True)
    return VideoResult(out, n, size, reader.fps, clock.resumed, clock.dreamed, digest, work,
                       tuple(notes))


# --------------------------------------------------------------------------------------------
# Zoom


def transform(rgb: np.ndarray, zoom: float = 1.0, rotate: float = 0.0,
              shift: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """Zoom by ``zoom`` about the centre (>1 moves in), rotate ``rotate`` degrees
    counter-clockwise, then move the content by ``shift`` = (x, y) pixels; Lanczos resampling,
    edges mirrored. float32 H x W x 3 in [0,1] in and out."""
    from onnxdream.flow import _cv2

    cv2 = _cv2()
    if not zoom > 0:
        raise OnnxDreamError(f"zoom must be > 0, got {zoom}")
    a = np.ascontiguousarray(rgb, dtype=np.float32)
    h, w = a.shape[:2]
    m = cv2.getRotationMatrix2D(((w - 1) / 2.0, (h - 1) / 2.0), float(rotate), float(zoom))
    m[0, 2] += float(shift[0])
    m[1, 2] += float(shift[1])
    out = cv2.warpAffine(a, m, (w, h), flags=cv2.INTER_LANCZOS4,
                         borderMode=cv2.BORDER_REFLECT_101)
    return np.clip(out, 0.0, 1.0, out=out)


def zoom(image: str | os.PathLike[str] | np.ndarray, output: str | os.PathLike[str],
         dream_frame: DreamFrame, frames: int, *, zoom: float | str | Schedule = 1.03,
         rotate: float | str | Schedule = 0.0, shift: tuple[float, float] = (0.0, 0.0),
         fps: Fraction | float = 15, width: int | None = None,
         work_dir: str | os.PathLike[str] | None = None,
         schedules: Mapping[str, Schedule | str] | None = None, dream_key: Any = None,
         progress: ProgressFn | None = None) -> VideoResult:
    """The endless zoom: frame 0 is ``image`` dreamed; frame i is frame i-1 transformed
    (:func:`transform` with the frame's ``zoom``/``rotate`` and ``shift``) and dreamed again.
    ``frames`` frames at ``fps`` into ``output`` (.mp4, .webm, .gif or a folder); ``width``
    resizes the image first (aspect kept); sizes are made even. Resumable as
    :func:`dream_video`."""
    from onnxdream.imageio import load_image, resize
    from onnxdream.videoio import check_video_output, even_size

    out = Path(output)
    check_video_output(out)
    if frames < 1:
        raise OnnxDreamError(f"frames must be >= 1, got {frames}")
    fps = Fraction(fps).limit_denominator(1_000_000)
    if fps <= 0:
        raise OnnxDreamError(f"fps must be > 0, got {fps}")
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
    scheds = _schedules(schedules, zoom=zoom, rotate=rotate)
    for s in scheds.values():
        s.frames(fps)
    key = dream_key if dream_key is not None else getattr(dream_frame, "key", None)
    digest = settings_digest(
        "zoom", key if key is not None else getattr(dream_frame, "__qualname__", "dream"),
        source, {"width": width, "shift": [float(v) for v in shift], "fps": fps}, scheds)
    work = Path(work_dir) if work_dir is not None else _default_work_dir(out)
    store = _FrameStore(work, digest, prune=work_dir is None)
    clock = _Clock(frames, progress)
    prev: np.ndarray | None = None
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
            t0 = time.perf_counter()
            dreamed = np.asarray(dream_frame(x, params))
            if dreamed.shape != x.shape:
                raise OnnxDreamError(f"dream_frame returned shape {dreamed.shape} for a "
                                     f"{x.shape} frame")
            prev = store.save(i, dreamed)
            clock.elapsed += time.perf_counter() - t0
            clock.dreamed += 1
        clock.done = i + 1
        clock.report()
    out_size, notes = _encode(store, frames, out, fps, clock)
    clock.report("encode")
    if work_dir is None:
        shutil.rmtree(work, ignore_errors=True)
    return VideoResult(out, frames, out_size, fps, clock.resumed, clock.dreamed, digest, work,
                       tuple(notes))
