"""The video and zoom loops: resume, schedules, progress, the output, temporal coherence."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("av")
cv2 = pytest.importorskip("cv2")

from PIL import Image  # noqa: E402

import videoclip  # noqa: E402
from onnxdream.core.errors import OnnxDreamError  # noqa: E402
from onnxdream.media.videoio import open_video, probe  # noqa: E402
from onnxdream.settings.options import DreamSettings  # noqa: E402
from onnxdream.video.clip import (  # noqa: E402
    dream_video,
    frame_settings,
    transform,
    zoom,
)
from onnxdream.video.flow import temporal_error  # noqa: E402


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    return videoclip.make_clip(tmp_path_factory.mktemp("clip") / "clip.mp4")


@pytest.fixture(scope="module")
def inputs(clip) -> list[np.ndarray]:
    return list(open_video(clip))


class StandIn:
    """A cheap deterministic dream: amplifies the image's fine texture with a saturating gain,
    so small input differences (codec noise) grow into different patterns, as DeepDream's do.
    Records the params of each call; raises after ``fail_after`` calls."""

    def __init__(self, fail_after: int | None = None):
        self.calls: list[dict] = []
        self.fail_after = fail_after

    def digest(self, height: int, width: int) -> str:
        return "stand-in"

    def __call__(self, x: np.ndarray, params) -> np.ndarray:
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise RuntimeError("interrupted")
        self.calls.append(dict(params))
        high = x - cv2.blur(x, (5, 5))
        return np.clip(x + 0.1 * np.tanh(high / 0.01), 0.0, 1.0)


def png_frames(folder: Path) -> list[np.ndarray]:
    return [np.asarray(Image.open(p)) for p in sorted(folder.iterdir())]


def test_resume_redoes_no_finished_frame(tmp_path, clip):
    work = tmp_path / "work"
    broken = StandIn(fail_after=7)
    with pytest.raises(RuntimeError, match="interrupted"):
        dream_video(clip, tmp_path / "out", broken, work_dir=work)
    assert not (tmp_path / "out").exists()
    assert len(list(work.glob("*.png"))) == 7 and not list(work.glob(".*"))
    again = StandIn()
    result = dream_video(clip, tmp_path / "out", again, work_dir=work)
    assert len(again.calls) == 13 and result.resumed == 7 and result.dreamed == 13
    assert result.frames == 20 and work.exists()  # an explicit work dir is kept
    # exactly the frames an uninterrupted run makes (the next frame builds on the 8-bit PNG)
    whole = dream_video(clip, tmp_path / "whole", StandIn())
    assert all(np.array_equal(a, b) for a, b in zip(png_frames(result.path),
                                                    png_frames(whole.path)))
    assert not whole.work_dir.exists()  # the default work dir is removed after success


def test_changed_settings_redo_every_frame(tmp_path, clip):
    first = dream_video(clip, tmp_path / "a", StandIn(), work_dir=tmp_path / "w", duration=0.5)
    other = StandIn()
    second = dream_video(clip, tmp_path / "b", other, work_dir=tmp_path / "w", duration=0.5,
                         dream_key="another dream")
    assert first.digest != second.digest and len(other.calls) == 5
    longer = StandIn()
    third = dream_video(clip, tmp_path / "c", longer, work_dir=tmp_path / "w", duration=1.0)
    assert third.digest == first.digest and len(longer.calls) == 5  # frames 0-4 reused


def test_output_keeps_count_fps_duration_audio(tmp_path, clip):
    seen = []
    result = dream_video(clip, tmp_path / "out.mp4", StandIn(), progress=seen.append)
    info = probe(result.path)
    assert abs(info.frames - 20) <= 1 and info.fps == Fraction(10)
    assert info.duration == pytest.approx(2.0, abs=0.1)
    assert info.audio is not None and info.audio.codec == "aac" and result.notes == ()
    dream = [p for p in seen if p.stage == "dream"]
    assert [p.done for p in dream] == list(range(1, 21)) and dream[-1].total == 20
    assert dream[-1].fps > 0 and dream[-1].eta == 0 and dream[5].eta > 0
    assert seen[-1].stage == "encode"


def test_selection_and_schedules(tmp_path, clip):
    dream = StandIn()
    result = dream_video(clip, tmp_path / "out.mp4", dream, start=0.5, every=2, width=80,
                         schedules={"layers": "0:a,0.4s:b", "step_size": "0:0.01,4:0.02"})
    assert result.frames == 8 and result.fps == Fraction(5) and result.size == (80, 60)
    assert [c["layers"] for c in dream.calls] == ["a", "a", "b", "b", "b", "b", "b", "b"]
    assert [round(c["step_size"], 4) for c in dream.calls[:6]] == [
        0.01, 0.0125, 0.015, 0.0175, 0.02, 0.02]
    assert all(c["blend"] == 0.6 for c in dream.calls)
    info = probe(result.path)
    assert info.frames == 8 and info.duration == pytest.approx(1.5, abs=0.2)


def test_no_flow_defaults_to_each_frame_alone(tmp_path, clip, inputs):
    dream = StandIn()
    result = dream_video(clip, tmp_path / "out", dream, flow=False, duration=0.3)
    assert all(c["blend"] == 0.0 for c in dream.calls)
    expected = [dream(f.astype(np.float32) / 255, {}) for f in inputs[:3]]
    got = png_frames(result.path)
    assert all(np.abs(g.astype(int) - np.rint(e * 255)).max() <= 1 for g, e in zip(got, expected))


def test_flow_makes_the_stand_in_coherent(tmp_path, clip, inputs):
    outputs = {}
    for name, kwargs in {"naive": {"flow": False}, "flow": {"flow": True}}.items():
        result = dream_video(clip, tmp_path / name, StandIn(), **kwargs)
        outputs[name] = temporal_error(png_frames(result.path), inputs)
    assert outputs["flow"] < 0.7 * outputs["naive"], outputs


def test_bad_input_fails_before_any_dream(tmp_path, clip):
    dream = StandIn()
    with pytest.raises(OnnxDreamError, match="unknown video extension"):
        dream_video(clip, tmp_path / "out.avi", dream)
    with pytest.raises(OnnxDreamError, match="not a video"):
        (tmp_path / "x.mp4").write_bytes(b"nope" * 100)
        dream_video(tmp_path / "x.mp4", tmp_path / "out.mp4", dream)
    with pytest.raises(OnnxDreamError, match="blend schedule"):
        dream_video(clip, tmp_path / "out.mp4", dream, blend="0:0.5,x")
    assert dream.calls == []


def test_frame_settings():
    s = DreamSettings(seed=3)
    assert frame_settings(s, {"steps": 3, "step_size": 0.02, "blend": 0.5}) == DreamSettings(
        seed=3, steps=3, step_size=0.02)
    assert frame_settings(s, {"layers": "blocks.5+ blocks.9:0.5"}).layers == (
        "blocks.5", "blocks.9:0.5")
    assert frame_settings(s, {}) is s


def test_keyframed_settings():
    """What the CLI's keyframed options and the server's form fields go through."""
    from onnxdream.core.errors import ScheduleError, SettingsError
    from onnxdream.video.clip import keyframed_settings

    first, schedules = keyframed_settings({
        "layers": ["0:blocks.5+blocks.9:0.5,2s:blocks.9"], "steps": "7",
        "step_size": "0:0.004,10:0.01"})
    assert first == {"layers": ["blocks.5", "blocks.9:0.5"], "steps": 7, "step_size": 0.004}
    assert {k: v.describe() for k, v in schedules.items()} == {
        "layers": "0:blocks.5+blocks.9:0.5,2s:blocks.9", "step_size": "0:0.004,10:0.01"}
    assert keyframed_settings({"layers": ["blocks.5", "blocks.9:2"], "steps": None}) == (
        {"layers": ["blocks.5", "blocks.9:2"]}, {})
    with pytest.raises(ScheduleError, match="steps schedule '0:3,9:0': must be between") as e:
        keyframed_settings({"steps": "0:3,9:0"})
    assert isinstance(e.value, SettingsError) and e.value.field == "steps"
    with pytest.raises(ScheduleError, match="in one value"):
        keyframed_settings({"layers": ["0:a,5:b", "c"]})


def test_digest_follows_what_changes_a_frame(tmp_path, clip):
    """Same run, same digest; a blend, a schedule, the flow or the frame selection: another."""
    def digest(**kwargs):
        return dream_video(clip, tmp_path / "out", StandIn(), duration=0.2, **kwargs).digest

    base = digest()
    assert digest() == base and digest(work_dir=tmp_path / "w") == base
    others = [digest(blend=0.5), digest(flow=False), digest(every=2), digest(width=80),
              digest(schedules={"step_size": "0:0.01,5:0.02"}), digest(dream_key="other")]
    assert len({base, *others}) == 7


# -- zoom -----------------------------------------------------------------------------------


def test_transform():
    img = videoclip.texture(60, 80, seed=4)
    np.testing.assert_allclose(transform(img), img, atol=1e-5)
    dot = np.zeros((61, 81, 3), np.float32)
    dot[30, 60] = 1.0  # 20 px right of the centre (40, 30)
    moved = transform(dot, zoom=1.5)
    assert np.unravel_index(moved[..., 0].argmax(), moved.shape[:2]) == (30, 70)
    turned = transform(dot, rotate=90)  # counter-clockwise: right of centre → above it
    assert np.unravel_index(turned[..., 0].argmax(), turned.shape[:2]) == (10, 40)
    shifted = transform(dot, shift=(-5, 3))
    assert np.unravel_index(shifted[..., 0].argmax(), shifted.shape[:2]) == (33, 55)


@pytest.mark.parametrize("ext", ["", ".mp4"])
def test_zoom_writes_n_frames(tmp_path, ext):
    image = (videoclip.scene(0, 81, 61) * 255).astype(np.uint8)
    Image.fromarray(image).save(tmp_path / "in.png")
    dream = StandIn()
    seen = []
    result = zoom(tmp_path / "in.png", tmp_path / f"zoom{ext}", dream, 6, zoom="0:1.05,5:1.1",
                  rotate=2, progress=seen.append)
    assert result.frames == 6 and result.size == (80, 60) and len(dream.calls) == 6
    assert [round(c["zoom"], 3) for c in dream.calls] == [1.05, 1.06, 1.07, 1.08, 1.09, 1.1]
    if ext:
        info = probe(result.path)
        assert info.frames == 6 and info.size == (80, 60) and info.fps == Fraction(15)
    else:
        frames = png_frames(result.path)
        assert len(frames) == 6 and all(f.shape == (60, 80, 3) for f in frames)
    assert [p.done for p in seen if p.stage == "dream"] == list(range(1, 7))


def test_zoom_resumes(tmp_path):
    image = videoclip.scene(0)
    with pytest.raises(RuntimeError):
        zoom(image, tmp_path / "z", StandIn(fail_after=3), 5, work_dir=tmp_path / "w")
    again = StandIn()
    result = zoom(image, tmp_path / "z", again, 5, work_dir=tmp_path / "w")
    assert len(again.calls) == 2 and result.resumed == 3
    whole = zoom(image, tmp_path / "z2", StandIn(), 5)
    assert all(np.array_equal(a, b) for a, b in zip(png_frames(result.path),
                                                    png_frames(whole.path)))


# -- the real model -------------------------------------------------------------------------


@pytest.mark.slow
def test_real_dream_is_more_coherent_with_flow(tmp_path, clip, inputs, model_home):
    """Default model and settings, 10 frames at 160x120: flow vs the naive per-frame dream
    (measured 0.59 at blend 0.6 on 20 frames; see benchmarks/bench_video.py)."""
    from onnxdream.video.clip import make_dream_frame

    dream = make_dream_frame(DreamSettings(seed=1))
    errors = {}
    for flow in (False, True):
        result = dream_video(clip, tmp_path / f"out-{flow}", dream, flow=flow, duration=1.0)
        assert result.frames == 10
        errors[flow] = temporal_error(png_frames(result.path), inputs[:10])
    ratio = errors[True] / errors[False]
    print(f"temporal error: flow {errors[True]:.4f}, no flow {errors[False]:.4f}, "
          f"ratio {ratio:.2f}")
    assert ratio < 0.8


def test_standard_dream_follows_the_layer_schedule(tmp_path, model_home):
    from onnxdream.media.imageio import read_png_metadata
    from onnxdream.settings.resolve import resolve
    from onnxdream.video.clip import make_dream_frame

    settings = DreamSettings(octaves=1, steps=2)
    dream = make_dream_frame(settings, threads=1)
    assert dream.settings.seed is not None  # fixed once: every frame gets the same jitter
    # the digest is the resolver's, with the model file's fingerprint
    resolved = resolve(dream.settings, 48, 64, dream.gradient_model(dream.settings).info)
    assert dream.digest(48, 64)["resolved"] == resolved.digest()
    assert dream.digest(48, 64) != dream.digest(48, 80)
    x = videoclip.scene(0, 64, 48)
    a = dream(x, {"layers": "blocks.5"})
    b = dream(x, {"layers": "blocks.9+blocks.5:0.5", "steps": 1})
    dream(x, {})  # the model's default layer
    assert a.shape == b.shape == x.shape and not np.allclose(a, b)
    assert len(dream._models) == 2  # the last two gradient models stay open
    layered = frame_settings(dream.settings, {"layers": "blocks.9+blocks.5:0.5"})
    assert [t.layer for t in dream.gradient_model(layered).objective.terms] == [
        "blocks.9", "blocks.5"]
    # each frame's PNG carries the provenance, with the frame's keyframed values
    image = Image.fromarray((x * 255).astype(np.uint8))
    image.save(tmp_path / "in.png")
    result = zoom(tmp_path / "in.png", tmp_path / "z", dream, 2, work_dir=tmp_path / "w",
                  schedules={"layers": "0:blocks.5,1:blocks.9"},
                  metadata={"onnxdream:command": "onnxdream zoom ..."})
    meta = read_png_metadata(sorted((tmp_path / "w").glob("*-000001.png"))[0])
    assert meta["onnxdream:frame"] == "1" and meta["onnxdream:digest"] == result.digest
    assert json.loads(meta["onnxdream:layers"]) == ["blocks.9"]
    assert json.loads(meta["onnxdream:params"])["layers"] == "blocks.9"
    assert meta["onnxdream:command"] == "onnxdream zoom ..." and meta["onnxdream:seed"] == str(
        dream.settings.seed)
