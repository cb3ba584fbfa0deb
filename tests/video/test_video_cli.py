"""`onnxdream video` and `onnxdream zoom` from the command line (subprocesses, the real model).

The synthetic clip of tests/videoclip.py (160x120, 10 fps, 2 s, a 440 Hz tone in AAC) is the
input; dreams use few steps/octaves unless the test is about the dream itself.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("av")
pytest.importorskip("cv2")

from PIL import Image  # noqa: E402

import videoclip  # noqa: E402
from helpers import NO_FRAMEWORKS, photo, run_cli  # noqa: E402
from onnxdream.media.imageio import read_png_metadata  # noqa: E402
from onnxdream.media.videoio import open_video, probe  # noqa: E402

QUICK = ["--steps", "2", "--octaves", "1", "-q"]


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    return videoclip.make_clip(tmp_path_factory.mktemp("clip") / "clip.mp4")


def png_frames(folder: Path) -> list[np.ndarray]:
    return [np.asarray(Image.open(p)) for p in sorted(folder.iterdir())]


def frame_files(work: Path) -> dict[str, int]:
    """Dreamed frames in a work dir: name → mtime (ns)."""
    return {p.name: p.stat().st_mtime_ns for p in work.glob("*.png") if not
            p.name.startswith(".")}


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def test_video_keeps_frames_fps_duration_and_sound(tmp_path, clip, model_home):
    work = tmp_path / "work"
    proc = run_cli("video", str(clip), "-o", str(tmp_path / "out.mp4"), *QUICK, "--work-dir",
                   str(work), "--layer", "0:blocks.5,1s:blocks.9", home=model_home)
    info = probe(tmp_path / "out.mp4")
    assert abs(info.frames - 20) <= 1 and info.fps == Fraction(10)
    assert abs(info.duration - 2.0) <= 0.1 + 1e-9
    assert info.audio is not None and info.audio.codec == "aac"  # copied, not re-encoded
    assert "note:" not in proc.stderr and "wrote" in proc.stderr
    # every dreamed frame carries its provenance, with the command that makes the clip
    frames = sorted(work.glob("*.png"))
    assert len(frames) == 20
    first, last = read_png_metadata(frames[0]), read_png_metadata(frames[-1])
    assert first["onnxdream:command"].startswith(f"onnxdream video {clip} -o ")
    assert "--layer 0:blocks.5,1s:blocks.9" in first["onnxdream:command"]
    assert "--seed" in first["onnxdream:command"]
    assert json.loads(first["onnxdream:layers"]) == ["blocks.5"]
    assert json.loads(last["onnxdream:layers"]) == ["blocks.9"]
    assert last["onnxdream:frame"] == "19" and json.loads(last["onnxdream:resolved"])


def test_gif_and_frames_drop_the_sound_with_a_note(tmp_path, clip, model_home):
    proc = run_cli("video", str(clip), "-o", str(tmp_path / "out.gif"), *QUICK, "--width", "64",
                   "--every", "2", "--duration", "1", home=model_home)
    info = probe(tmp_path / "out.gif")
    assert info.frames == 5 and info.size == (64, 48)
    notes = [ln for ln in proc.stderr.splitlines() if ln.startswith("note:")]
    assert notes == ["note: audio dropped: GIF cannot hold sound"]


def _default_sigint() -> None:
    """In the child: SIGINT's default action, so that Python installs its Ctrl-C handler even
    where this test run inherited SIGINT ignored (as a shell's background job does: Python then
    keeps ignoring it, and the interruption below would never arrive)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _popen(home: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "ONNXDREAM_HOME": str(home), "COLUMNS": "120"}
    return subprocess.Popen([sys.executable, "-c", NO_FRAMEWORKS, *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_sigint)


def test_ctrl_c_then_resume_redoes_no_finished_frame(tmp_path, clip, model_home):
    """A real interruption: SIGINT once 3 frames are on disk; the same command resumes."""
    out, work = tmp_path / "out.mp4", tmp_path / "work"
    # slow enough per frame (~0.3 s) that the run is still going when the signal comes
    args = ["video", str(clip), "-o", str(out), "--steps", "25", "--octaves", "2",
            "--work-dir", str(work)]
    run_cli(*args[:4], "--steps", "1", "--octaves", "1", "--duration", "0.1", "-q",
            home=model_home)  # compile the gradient graph first (cached)
    out.unlink()
    proc = _popen(model_home, *args)
    try:
        deadline = time.monotonic() + 40
        while len(frame_files(work) if work.exists() else {}) < 3:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no frames appeared"
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, stderr
    assert "interrupted:" in stderr and f"frames are kept in {work}" in stderr
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["work"]
    kept = frame_files(work)
    assert 3 <= len(kept) < 20 and not [p for p in work.iterdir() if p.name.startswith(".")]
    again = run_cli(*args, home=model_home)
    assert f"resuming: {len(kept)} of 20 frames already dreamed in {work}" in again.stderr
    assert f"{20 - len(kept)} dreamed" in again.stderr and f"{len(kept)} resumed" in again.stderr
    after = frame_files(work)
    assert len(after) == 20 and all(after[name] == t for name, t in kept.items())
    assert probe(out).frames == 20


def test_flow_makes_the_dream_coherent(tmp_path, clip, model_home):
    """Default model and settings at 160x120, 1 s: the temporal error (mean |out_t -
    warp(out_t-1)| along the input's flow) with --flow is clearly below --no-flow's (measured
    0.62 here; 0.56-0.61 in benchmarks/README.md)."""
    from onnxdream.video.flow import temporal_error

    inputs = list(open_video(clip))[:10]
    errors = {}
    for flag in ("--no-flow", "--flow"):
        run_cli("video", str(clip), "-o", f"{tmp_path / flag}/", flag, "--duration", "1",
                "--seed", "1", "-q", home=model_home)
        errors[flag] = temporal_error(png_frames(tmp_path / flag), inputs)
    ratio = errors["--flow"] / errors["--no-flow"]
    print(f"temporal error: flow {errors['--flow']:.4f}, no flow {errors['--no-flow']:.4f}, "
          f"ratio {ratio:.2f}")
    assert ratio < 0.8


def test_zoom_writes_n_frames(tmp_path, model_home):
    image = photo("chelsea.png")
    w, h = Image.open(image).size
    run_cli("zoom", str(image), "-o", str(tmp_path / "z.mp4"), "--frames", "5", "--width", "96",
            "--zoom", "0:1.02,4:1.1", "--rotate", "1", "--shift", "-2,1", *QUICK,
            home=model_home)
    info = probe(tmp_path / "z.mp4")
    expected_h = 2 * round(h * 96 / w / 2)
    assert info.frames == 5 and info.size == (96, expected_h) and info.fps == Fraction(15)
    run_cli("zoom", str(image), "-o", f"{tmp_path / 'frames'}/", "--frames", "3", "--width",
            "64", "--fps", "8", *QUICK, home=model_home)
    frames = png_frames(tmp_path / "frames")
    assert len(frames) == 3 and all(f.shape == (2 * round(h * 64 / w / 2), 64, 3)
                                    for f in frames)
    assert not list(tmp_path.glob(".*"))  # the default work dirs are gone after success


def test_zoom_help_shows_its_quick_defaults(model_home):
    out = run_cli("zoom", "--help", home=model_home).stdout
    steps = out[out.index("--steps"):out.index("--step-size")]
    octaves = out[out.index("--octaves"):out.index("--octave-scale")]
    step_size = out[out.index("--step-size"):out.index("--jitter")]
    assert "[default: 3]" in steps and "[default: 2]" in octaves and "keyframes" in steps
    assert "[default: 0.004]" in step_size
    assert "Example:" in out and "--frames" in out
    dream = run_cli("dream", "--help", home=model_home).stdout
    assert "[default: 10]" in dream[dream.index("--steps"):dream.index("--step-size")]
    assert "keyframes" not in dream


def test_bad_inputs_get_one_line(tmp_path, clip, model_home):
    (tmp_path / "text.mp4").write_text("not a video at all\n" * 10)
    zero = videoclip.make_clip(tmp_path / "zero.mkv", n_frames=0, container="matroska")
    audio = videoclip.make_clip(tmp_path / "audio.m4a", video=False, container="mp4")
    out = str(tmp_path / "out.mp4")
    cases = {
        "is not a video": ["video", str(tmp_path / "text.mp4"), "-o", out],
        "no frames": ["video", str(zero), "-o", out],
        "has only audio": ["video", str(audio), "-o", out],
        "still image": ["video", str(photo("chelsea.png")), "-o", out],
        "unknown video extension '.avi'": ["video", str(clip), "-o", str(tmp_path / "o.avi")],
        "--blend schedule '0:0.5,3:x': 'x' is not a number": [
            "video", str(clip), "-o", out, "--blend", "0:0.5,3:x"],
        "--step-size schedule '0:0.01,5:50': must be > 0": [
            "video", str(clip), "-o", out, "--step-size", "0:0.01,5:50"],
        "unknown layer 'blockz.9'": [
            "video", str(clip), "-o", out, "--layer", "0:blocks.5,3:blockz.9"],
        "--zoom schedule '0': values must be > 0": [
            "zoom", str(photo("chelsea.png")), "-o", out, "--frames", "3", "--zoom", "0"],
        "--shift must be X,Y": [
            "zoom", str(photo("chelsea.png")), "-o", out, "--frames", "3", "--shift", "3"],
    }
    for expected, argv in cases.items():
        line = one_error_line(run_cli(*argv, home=model_home, check=False))
        assert expected in line, (argv, line)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["audio.m4a", "text.mp4", "zero.mkv"]


def test_missing_video_extra_is_one_line(tmp_path, clip, model_home):
    blocked = NO_FRAMEWORKS.replace("'jax'", "'jax', 'av'")
    env = {**os.environ, "ONNXDREAM_HOME": str(model_home)}
    for argv in (["video", str(clip), "-o", str(tmp_path / "o.mp4")],
                 ["zoom", str(photo("chelsea.png")), "-o", str(tmp_path / "z/"), "--frames",
                  "2"]):
        proc = subprocess.run([sys.executable, "-c", blocked, *argv], capture_output=True,
                              text=True, env=env, timeout=120)
        line = one_error_line(proc)
        assert "pip install 'onnxdream[video]'" in line and argv[0] in line
