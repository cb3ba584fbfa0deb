"""``onnxdream video`` and ``onnxdream zoom``: dreamed video and the endless zoom from the command
line (the library is :mod:`onnxdream.video.clip`).

Both take the ``[dream options]`` of ``onnxdream dream`` (:func:`~onnxdream.cli.common.
with_dream_options`); ``--layer``, ``--steps`` and ``--step-size`` also accept keyframes
(``"0:blocks.5,120:blocks.9"``, ``12.5s``), as do ``--blend`` and zoom's ``--zoom``/``--rotate``.
The options are read as schedule text; :class:`~onnxdream.cli.common.DreamOptions` turns them
into one DreamSettings (the first key's values) and the schedules that change them per frame.
Zoom's own defaults (:data:`onnxdream.video.clip.ZOOM_DEFAULTS`: few steps and octaves) show in its
``--help``.

Output on stderr: a progress bar over frames with frames/s and ETA (``--quiet``: none), a
"resuming: …" line when frames of an earlier run are found, a line per note (audio re-encoded
or dropped) and the result. Ctrl-C exits 130 with the frames kept in the work dir and no
output written; a user's mistake is one line and exit 2.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any

import typer

from onnxdream.cli.common import (
    DeviceOpt,
    DreamOptions,
    QuietOpt,
    app,
    err,
    flag_for,
    user_errors,
    warn,
    with_dream_options,
)
from onnxdream.core.errors import DependencyError, SettingsError
from onnxdream.settings.video import DEFAULT_BLEND, ZOOM_DEFAULTS, VideoOptions

#: The [dream options] that take keyframes in a clip.
KEYFRAMED = ("layer", "steps", "step_size")

KEYS_HELP = ("Keyframes: FRAME:VALUE or SECONDSs:VALUE, comma-separated (numbers ramp between "
             "keys).")


#: --work-dir of video and zoom
WorkDirOpt = Annotated[Path | None, typer.Option(
    help="Keep the dreamed frames here, also after success. Default: .OUT.onnxdream beside "
    "OUT, removed after success. Either way the same command resumes from it.",
    show_default=False)]


def _require_video_extra(command: str) -> None:
    """DependencyError naming the [video] extra unless PyAV and OpenCV both import."""
    from onnxdream.media.videoio import import_av
    from onnxdream.video.flow import import_cv2

    try:
        import_av()
        import_cv2()
    except DependencyError:
        raise DependencyError(f"`onnxdream {command}` needs PyAV and OpenCV: "
                              "pip install 'onnxdream[video]'") from None


def _unit(value: float) -> str | None:
    return None if 0.0 <= value <= 1.0 else "values must be between 0 and 1"


def _shift(text: str) -> tuple[float, float]:
    try:
        x, y = (float(v) for v in text.split(","))
    except ValueError:
        raise SettingsError("shift", f"must be X,Y in pixels per frame (e.g. 2,-1), got "
                                     f"{text!r}") from None
    return x, y


def _without(argv: list[str], flag: str) -> list[str]:
    """argv without ``flag`` and the value after it, wherever it appears."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == flag:
            skip = True
        else:
            out.append(a)
    return out


def _argv(command: str, source: Path, output: Path, settings, schedules: Mapping[str, Any],
          extra: list[str]) -> list[str]:
    """The command line that makes the same clip: every dream setting spelled out (seed
    included), keyframed options as their schedules, then the command's own options."""
    argv = [command] + settings.to_argv(str(source), str(output))[1:]
    for field, schedule in schedules.items():
        flag = flag_for(field)
        argv = _without(argv, flag) + [flag, schedule.describe()]
    return argv + extra


# -- progress ---------------------------------------------------------------------------------


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "-:--"
    s = int(round(seconds))
    h, m = divmod(s // 60, 60)
    return f"{h}:{m:02d}:{s % 60:02d}" if h else f"{m}:{s % 60:02d}"


class _Frames:
    """The progress callback: a rich bar over frames (frames/s and ETA of this run's dreamed
    frames, not counting resumed ones), the resume line, and what was done when Ctrl-C came."""

    def __init__(self, bar):
        self.bar, self.task, self.last = bar, None, None  # the bar shows from the first frame

    def __call__(self, p) -> None:
        self.last = p
        if p.stage == "start":
            if p.resumed:
                typer.echo(f"resuming: {p.resumed} of {p.total} frames already dreamed in "
                           f"{p.work_dir}", err=True)
            if self.bar is not None:
                self.bar.start()
                self.task = self.bar.add_task("dreaming", total=p.total, info="")
            return
        if self.bar is None:
            return
        if p.stage == "dream":
            rate = f"{p.fps:.2f} frames/s" if p.fps else "first frame"
            self.bar.update(self.task, completed=p.done, total=p.total,
                            info=f"{rate}  ETA {_clock(p.eta)}")
        else:
            self.bar.update(self.task, description="encoding", completed=p.done, total=p.total,
                            info="")


@contextlib.contextmanager
def _progress(quiet: bool) -> Iterator[_Frames]:
    """A :class:`_Frames` callback with a bar (none when quiet); Ctrl-C inside becomes exit 130
    and a line saying what was kept."""
    bar = None
    if not quiet:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                       MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                       TimeElapsedColumn(), console=Console(stderr=True))
    frames = _Frames(bar)
    try:
        try:
            yield frames
        finally:
            if frames.task is not None:
                bar.stop()
    except KeyboardInterrupt:
        p = frames.last
        if p is not None and p.work_dir is not None and p.done:
            err(f"interrupted: {p.done} of {p.total} frames are kept in {p.work_dir}; run the "
                "same command to resume (no output was written)")
        else:
            err("interrupted; no output was written")
        raise typer.Exit(130) from None


def _report(result, seconds: float, seed: int) -> None:
    for note in result.notes:  # audio re-encoded or dropped, GIF timing: one line each
        typer.echo(f"note: {note}", err=True)
    w, h = result.size
    length = result.frames / result.fps
    done = f"{result.dreamed} dreamed in {_clock(seconds)}"
    if result.dreamed:
        done += f" ({result.dreamed / seconds:.2f} frames/s)" if seconds > 0 else ""
    if result.resumed:
        done += f", {result.resumed} resumed"
    typer.echo(f"wrote {result.path} ({result.frames} frames, {w}x{h}, {float(result.fps):g} "
               f"fps, {float(length):.1f}s; {done}; seed {seed})", err=True)


def _dream(options: DreamOptions, device: str, source: Path, *run: Any):
    """The standard dream of the [dream options] and its keyframes, checked before any frame.
    Without --seed the seed comes from the settings, the input and the run's options, so the
    same command run again resumes."""
    from onnxdream.video.clip import file_fingerprint, make_dream_frame, stable_seed

    schedules = options.schedules()
    settings = stable_seed(options.settings(), file_fingerprint(source),
                           {k: s.describe() for k, s in schedules.items()}, *run)
    dream = make_dream_frame(settings, device=device)
    layers = schedules.get("layers")
    gm = dream.prepare([k.value for k in layers.keys] if layers is not None else [])
    if gm.session.fallback_warning:
        warn(gm.session.fallback_warning)
    return settings, schedules, dream


# -- video ------------------------------------------------------------------------------------


@app.command()
@with_dream_options(schedules=KEYFRAMED)
def video(
    source: Annotated[Path, typer.Argument(
        metavar="IN", help="The video to dream on: anything FFmpeg reads (MP4, MOV, MKV, WebM, "
        "AVI, animated GIF, …).", show_default=False)],
    output: Annotated[Path, typer.Option(
        "-o", "--output", help="Where to write, by extension: .mp4 (H.264: plays everywhere), "
        ".webm (VP9), .gif, or a folder of numbered PNGs (a name ending in /). Frame rate and "
        "duration are kept, and the sound is copied into MP4/WebM.", show_default=False)],
    options: DreamOptions = None,
    flow: Annotated[bool, typer.Option(
        "--flow/--no-flow", help="Carry each frame's dream into the next along the input's "
        "optical flow, so the patterns move with the objects instead of flickering; "
        "--no-flow dreams each frame alone (with --blend: plain blending, which smears).")]
        = VideoOptions.flow,
    blend: Annotated[str | None, typer.Option(
        help="How much of the previous frame's dream goes into the next, 0 to 1 (more: "
        "steadier, but detail piles up). " + KEYS_HELP + " E.g. `0:0.3,5s:0.8`.  \\[default: "
        f"{DEFAULT_BLEND:g} with --flow, 0 with --no-flow]", show_default=False)] = None,
    width: Annotated[int | None, typer.Option(
        help="Resize to this width first (height follows; both made even). Smaller is much "
        "faster: 320 dreams ~4x faster than 640.  \\[default: the input's]",
        show_default=False)] = None,
    start: Annotated[float, typer.Option(
        help="Start this many seconds into IN.")] = VideoOptions.start,
    duration: Annotated[float | None, typer.Option(
        help="Dream this many seconds.  \\[default: to the end]", show_default=False)] = None,
    every: Annotated[int, typer.Option(
        help="Take every N-th frame (the output's frame rate is IN's divided by N).")]
        = VideoOptions.every,
    work_dir: WorkDirOpt = None,
    device: DeviceOpt = "auto",
    quiet: QuietOpt = False,
):
    """Dream on a video: the patterns follow the motion, and the sound is kept.

    Frame by frame, each dreamed on top of the previous frame's dream carried along the optical
    flow. Interrupted (Ctrl-C)? Run the same command again: it resumes where it stopped.

    Example:  onnxdream video clip.mp4 -o dream.mp4 --width 480 --layer "0:blocks.5,10s:blocks.9"
    """
    with user_errors(), _progress(quiet) as progress:
        _require_video_extra("video")
        from onnxdream.media.videoio import check_video_output, probe
        from onnxdream.settings.provenance import command, key
        from onnxdream.settings.schedule import parse_schedule
        from onnxdream.video.clip import dream_video

        blend_s = parse_schedule(blend, "blend", check=_unit) if blend is not None else None
        check_video_output(output)
        probe(source)  # not a video, audio only, …: before the model loads
        extra = ["--flow" if flow else "--no-flow"]
        extra += ["--blend", blend_s.describe()] if blend_s is not None else []
        extra += ["--width", str(width)] if width is not None else []
        extra += ["--start", f"{start:g}"] if start else []
        extra += ["--duration", f"{duration:g}"] if duration is not None else []
        extra += ["--every", str(every)] if every != 1 else []
        settings, schedules, dream = _dream(options, device, source, "video",
                                            *_without(extra, "--duration"))
        argv = _argv("video", source, output, settings, schedules, extra)
        t0 = time.perf_counter()
        result = dream_video(source, output, dream, flow=flow, blend=blend_s, work_dir=work_dir,
                             start=start, duration=duration, every=every, width=width,
                             schedules=schedules, metadata={key("command"): command(argv)},
                             progress=progress)
    _report(result, time.perf_counter() - t0, settings.seed)


# -- zoom -------------------------------------------------------------------------------------


@app.command("zoom")
@with_dream_options(defaults=ZOOM_DEFAULTS, schedules=KEYFRAMED)
def zoom_cmd(
    image: Annotated[Path, typer.Argument(metavar="IMAGE", help="The picture to start from.",
                                          show_default=False)],
    output: Annotated[Path, typer.Option(
        "-o", "--output", help="Where to write, by extension: .mp4, .webm, .gif, or a folder "
        "of numbered PNGs (a name ending in /).", show_default=False)],
    frames: Annotated[int, typer.Option(
        help="How many frames to make (at --fps: 150 frames at 15 fps are 10 seconds).",
        show_default=False)],
    options: DreamOptions = None,
    zoom: Annotated[str, typer.Option(
        help="Zoom per frame about the centre: 1.03 moves in 3% a frame, below 1 moves out. "
        + KEYS_HELP + " E.g. `0:1.01,60:1.05`.")] = "1.03",
    rotate: Annotated[str, typer.Option(
        help="Degrees to turn per frame, counter-clockwise (negative: clockwise). "
        + KEYS_HELP)] = "0",
    shift: Annotated[str, typer.Option(
        help="X,Y: pixels the picture moves per frame, after zooming and turning (e.g. 2,-1: "
        "right and up).")] = "0,0",
    fps: Annotated[float, typer.Option(help="Frames per second of the output.")] = 15.0,
    width: Annotated[int | None, typer.Option(
        help="Resize IMAGE to this width first (height follows; both made even).  "
        "\\[default: the image's]", show_default=False)] = None,
    work_dir: WorkDirOpt = None,
    device: DeviceOpt = "auto",
    quiet: QuietOpt = False,
):
    """The endless zoom: dream, zoom in a little, dream again, … written as a video.

    Starts from IMAGE; each frame is the last one zoomed (and turned, and shifted) and dreamed
    again. Few steps per frame by default, so each frame is quick and the loop does the work.
    Resumable like `onnxdream video`.

    Example:  onnxdream zoom cat.jpg -o zoom.mp4 --frames 150 --zoom 1.04 --rotate 0.5
    """
    with user_errors(), _progress(quiet) as progress:
        _require_video_extra("zoom")
        from onnxdream.media.imageio import load_image
        from onnxdream.media.videoio import check_video_output
        from onnxdream.settings.provenance import command, key
        from onnxdream.settings.schedule import parse_schedule
        from onnxdream.video import clip as videolib

        check_video_output(output)
        if frames < 1:
            raise SettingsError("frames", f"must be >= 1, got {frames}")
        zoom_s = parse_schedule(zoom, "zoom", check=videolib.check_zoom)
        rotate_s = parse_schedule(rotate, "rotate")
        offset = _shift(shift)
        load_image(image)  # not an image: before the model loads
        extra = ["--frames", str(frames), "--zoom", zoom_s.describe(), "--rotate",
                 rotate_s.describe(), "--shift", shift, "--fps", f"{fps:g}"]
        extra += ["--width", str(width)] if width is not None else []
        settings, schedules, dream = _dream(options, device, image, "zoom",
                                            *_without(extra, "--frames"))
        argv = _argv("zoom", image, output, settings, schedules, extra)
        t0 = time.perf_counter()
        result = videolib.zoom(image, output, dream, frames, zoom=zoom_s, rotate=rotate_s,
                               shift=offset, fps=fps, width=width, work_dir=work_dir,
                               schedules=schedules,
                               metadata={key("command"): command(argv)},
                               progress=progress)
    _report(result, time.perf_counter() - t0, settings.seed)
