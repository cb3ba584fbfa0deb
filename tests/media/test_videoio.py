"""Video reading and writing with PyAV (videoio, videowrite): probing, frame selection, the
output kinds, audio copy-through, atomic writes and the typed errors for bad input."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("av")

import videoclip  # noqa: E402
from onnxdream.core.errors import OnnxDreamError  # noqa: E402
from onnxdream.media.videoio import (  # noqa: E402
    VideoError,
    check_video_output,
    even_size,
    open_video,
    output_kind,
    probe,
)
from onnxdream.media.videowrite import VideoWriter, write_video  # noqa: E402


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    return videoclip.make_clip(tmp_path_factory.mktemp("clip") / "clip.mp4")


@pytest.fixture(scope="module")
def clip_frames(clip) -> list[np.ndarray]:
    return list(open_video(clip))


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_probe(clip):
    info = probe(clip)
    assert (info.width, info.height) == videoclip.SIZE
    assert info.fps == Fraction(10) and isinstance(info.fps, Fraction)
    assert info.frames == 20
    assert info.duration == pytest.approx(2.0, abs=0.1)
    assert info.codec == "h264"
    assert info.audio is not None and info.audio.codec == "aac"
    assert info.audio.sample_rate == 44100 and info.audio.channels == 2


def test_read_matches_the_source(clip_frames):
    ref = videoclip.frames()
    assert len(clip_frames) == len(ref)
    errors = [np.abs(a.astype(int) - b).mean() for a, b in zip(clip_frames, ref)]
    assert max(errors) < 6  # H.264 at crf 12 + chroma subsampling


def test_select_start_duration_every_width(clip, clip_frames):
    reader = open_video(clip, start=0.5, duration=1.0, every=2, width=81)
    assert reader.size == (80, 60) and reader.fps == Fraction(5) and reader.expected == 5
    got = list(reader)
    assert len(got) == 5 and got[0].shape == (60, 80, 3)
    full = list(open_video(clip, start=0.5, duration=1.0, every=2))
    # the selected frames are input frames 5, 7, 9, 11, 13
    picks = [int(np.argmin([np.abs(f.astype(int) - g).mean() for g in clip_frames])) for f in full]
    assert picks == [5, 7, 9, 11, 13]


def test_even_size():
    assert even_size(161, 121) == (160, 120)
    assert even_size(1920, 1080, 321) == (320, 180)
    assert even_size(100, 37, 50) == (50, 18)


def test_no_note_for_a_silent_input(tmp_path, clip_frames):
    silent = videoclip.make_clip(tmp_path / "silent.mp4", audio=None, seconds=0.5)
    for name in ("out.gif", "frames/", "out.mp4"):
        assert write_video(tmp_path / name, clip_frames[:3], 10, audio_from=silent).notes == []


@pytest.mark.parametrize("ext", [".mp4", ".webm", ".gif", ""])
def test_round_trip_keeps_count_fps_duration(tmp_path, clip, clip_frames, ext):
    out = tmp_path / f"out{ext}"
    writer = write_video(out, clip_frames, Fraction(10), audio_from=clip)
    assert writer.frames == 20 and leftovers(tmp_path) == []
    if ext == "":
        names = sorted(p.name for p in out.iterdir())
        assert names[0] == "frame_000000.png" and len(names) == 20
        assert writer.notes == ["audio dropped: PNG frames cannot hold sound"]
        return
    info = probe(out)
    assert abs(info.frames - 20) <= 1 and info.fps == Fraction(10)
    assert info.duration == pytest.approx(2.0, abs=0.1)
    back = list(open_video(out))
    err = np.mean([np.abs(a.astype(int) - b).mean() for a, b in zip(back, clip_frames)])
    assert err < (12 if ext == ".gif" else 6)
    if ext == ".mp4":
        assert info.audio is not None and info.audio.codec == "aac" and writer.notes == []
        assert info.audio.duration == pytest.approx(2.0, abs=0.05)
    elif ext == ".webm":
        assert info.audio is not None and info.audio.codec == "opus"
        assert "re-encoded" in writer.notes[0]
    else:
        assert info.audio is None and "dropped" in writer.notes[0]


def audio_seconds(path: Path) -> float:
    import av

    with av.open(str(path)) as c:
        a = c.streams.audio[0]
        return sum(f.samples for f in c.decode(a)) / a.rate


def test_audio_cut_to_the_selection(tmp_path, clip):
    reader = open_video(clip, start=0.5, duration=1.0, every=2)
    out = write_video(tmp_path / "cut.mp4", reader, reader.fps, audio_from=clip,
                      audio_start=0.5, audio_duration=1.0).path
    info = probe(out)
    assert info.frames == 5 and info.fps == Fraction(5)
    assert info.duration == pytest.approx(1.0, abs=0.05)
    assert audio_seconds(out) == pytest.approx(1.0, abs=0.05)  # packet granularity


@pytest.mark.parametrize("codec,container,ext,copied", [
    ("libmp3lame", "mp4", ".mp4", "mp3"),
    ("libopus", "matroska", ".webm", "opus"),
    ("libopus", "matroska", ".mp4", "opus"),
    ("pcm_s16le", "matroska", ".mp4", None),  # PCM in MP4 does not mux: re-encoded to AAC
])
def test_audio_codecs(tmp_path, clip_frames, codec, container, ext, copied):
    src = videoclip.make_clip(tmp_path / "src.mkv", audio=codec, container=container)
    writer = write_video(tmp_path / f"out{ext}", clip_frames, 10, audio_from=src)
    info = probe(writer.path)
    assert info.audio is not None
    if copied:
        assert info.audio.codec == copied and writer.notes == []
    else:
        assert info.audio.codec == "aac" and "re-encoded" in writer.notes[0]
    assert audio_seconds(writer.path) == pytest.approx(2.0, abs=0.06)


def test_odd_frames_become_even(tmp_path, clip_frames):
    frames = [f[:119, :159] for f in clip_frames[:3]]
    writer = write_video(tmp_path / "odd.mp4", frames, 10)
    assert writer.size == (158, 118) and probe(writer.path).size == (158, 118)


# -- bad input ----------------------------------------------------------------------------------


def test_not_a_video(tmp_path):
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"hello world" * 100)
    with pytest.raises(VideoError, match="is not a video"):
        probe(junk)
    with pytest.raises(VideoError, match="no such file"):
        probe(tmp_path / "missing.mp4")
    with pytest.raises(VideoError, match="is a folder"):
        probe(tmp_path)


def test_still_image(tmp_path):
    from PIL import Image

    Image.new("RGB", (16, 16)).save(tmp_path / "x.png")
    with pytest.raises(VideoError, match="still image"):
        open_video(tmp_path / "x.png")


def test_zero_length_video(tmp_path):
    with_audio = videoclip.make_clip(tmp_path / "z1.mkv", n_frames=0, container="matroska")
    with pytest.raises(VideoError, match="no frames"):
        probe(with_audio)
    silent = videoclip.make_clip(tmp_path / "z2.mkv", n_frames=0, audio=None,
                                 container="matroska")
    with pytest.raises(VideoError, match="no frames"):
        probe(silent)
    mp4 = videoclip.make_clip(tmp_path / "z3.mp4", n_frames=0, audio=None)  # mp4 drops the track
    with pytest.raises(VideoError, match="no video stream"):
        probe(mp4)


def test_audio_only(tmp_path):
    m4a = videoclip.make_clip(tmp_path / "tone.m4a", video=False, container="mp4")
    with pytest.raises(VideoError, match="only audio"):
        open_video(m4a)


def test_errors_are_one_line_and_typed(tmp_path):
    with pytest.raises(OnnxDreamError) as info:
        probe(tmp_path / "missing.mp4")
    assert "\n" not in str(info.value) and info.value.exit_code == 2


def test_bad_selection(clip):
    with pytest.raises(VideoError, match="past the end"):
        open_video(clip, start=5)
    with pytest.raises(VideoError, match="every"):
        open_video(clip, every=0)


# -- output paths and atomicity -----------------------------------------------------------------


def test_output_kinds(tmp_path):
    assert output_kind("a.MP4") == "mp4" and output_kind("a.webm") == "webm"
    assert output_kind("a.gif") == "gif" and output_kind("frames") == "png"
    assert output_kind("frames/") == "png"
    with pytest.raises(VideoError, match="unknown video extension '.avi'"):
        output_kind("a.avi")
    with pytest.raises(VideoError, match="does not exist"):
        check_video_output(tmp_path / "nope" / "a.mp4")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(VideoError, match="holds other files"):
        check_video_output(tmp_path / "busy")


@pytest.mark.parametrize("ext", [".mp4", ".gif", ""])
def test_interrupted_write_leaves_nothing(tmp_path, clip, clip_frames, ext):
    out = tmp_path / f"out{ext}"
    write_video(out, clip_frames[:2], 10)
    before = sorted(p.name for p in out.iterdir()) if ext == "" else out.read_bytes()
    with pytest.raises(KeyboardInterrupt), VideoWriter(out, 10, audio_from=clip) as w:
        for f in clip_frames[:5]:
            w.write(f)
        raise KeyboardInterrupt
    after = sorted(p.name for p in out.iterdir()) if ext == "" else out.read_bytes()
    assert after == before and leftovers(tmp_path) == []
    with pytest.raises(VideoError, match="the first was 160x120"), \
            VideoWriter(tmp_path / "new.mp4", 10) as w:
        w.write(clip_frames[0])
        w.write(clip_frames[0][:60])
    assert not (tmp_path / "new.mp4").exists() and leftovers(tmp_path) == []


def test_png_folder_replaced_whole(tmp_path, clip_frames):
    out = tmp_path / "frames"
    write_video(out, clip_frames[:5], 10)
    write_video(out, clip_frames[:3], 10)
    assert sorted(p.name for p in out.iterdir()) == [f"frame_{i:06d}.png" for i in range(3)]
    assert leftovers(tmp_path) == []
