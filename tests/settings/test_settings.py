"""Settings, the resolver, provenance, the atomic writer and the error helpers: one owner each.

Fast, in-process checks (no dream is computed): defaults come from one place, validation names
fields and the CLI/server turn them into their own names, the recorded command parses back into
the same settings, the resolver reproduces the octave rule, the atomic writer leaves nothing
half-written.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from onnxdream.cli.common import DreamOptions, with_dream_options
from onnxdream.core.errors import (
    ImageError,
    ImageTooLargeError,
    LayerError,
    OnnxDreamError,
    SettingsError,
    did_you_mean,
    first_line,
)
from onnxdream.settings.build import from_options
from onnxdream.settings.options import DreamSettings, VisualizeSettings, octave_sizes
from onnxdream.settings.provenance import resolved_metadata

# -- one default per setting ------------------------------------------------------------------


def test_one_default_step_size_everywhere():
    from onnxdream.settings.options import DEFAULT_STEP_SIZE
    from onnxdream.settings.presets import resolve_preset
    from onnxdream.settings.resolve import resolve

    # None: the model's recommended step size, else DEFAULT_STEP_SIZE (decided by the resolver)
    assert DreamSettings().step_size is None and DEFAULT_STEP_SIZE == 0.006
    assert resolve_preset(None).dream_settings().step_size is None
    assert from_options(step_size=None).step_size is None
    assert resolve(DreamSettings(), 64, 64).step_size == 0.006
    from onnxdream.cli.main import app

    result = CliRunner().invoke(app, ["dream", "--help"], env={"COLUMNS": "200"})
    text = " ".join(result.output.replace("│", " ").split())  # unwrapped
    assert "[default: the model's recommendation (`onnxdream models` shows it), else 0.006]" \
        in text


def test_server_form_defaults_are_the_settings_defaults():
    pytest.importorskip("fastapi")
    from onnxdream.jobs.config import ServerConfig
    from onnxdream.server.form import build_settings

    s = build_settings({"seed": 1}, [], ServerConfig())
    assert s == DreamSettings(seed=1)


# -- validation names fields; front ends name them their way ---------------------------------


@pytest.mark.parametrize("kwargs,field", [
    ({"step_size": 0}, "step_size"), ({"octaves": 13}, "octaves"), ({"tile_size": 10}, "tile_size"),
    ({"normalize": "l1"}, "normalize"), ({"seed": -1}, "seed"), ({"border": -1}, "border"),
    ({"layers": ("",)}, "layers"), ({"grad_floor": 0.0}, "grad_floor"),
    ({"grad_floor": -1e-6}, "grad_floor"), ({"grad_floor": float("inf")}, "grad_floor"),
    ({"grad_floor": float("nan")}, "grad_floor"), ({"grad_floor": "1e-6"}, "grad_floor"),
])
def test_validation_raises_settings_error_with_field(kwargs, field):
    with pytest.raises(SettingsError) as info:
        DreamSettings(**kwargs).validate()
    assert info.value.field == field
    assert str(info.value).startswith(f"{field} ") and "--" not in str(info.value)


@pytest.mark.parametrize("argv,needle", [
    (["dream", "x.png", "--step-size", "0"], "error: --step-size must be > 0 and <= 10"),
    (["dream", "x.png", "--octave-scale", "9"], "error: --octave-scale must be > 1 and <= 4"),
    (["dream", "x.png", "--preset", "keras-clasic"], "did you mean 'keras-classic'"),
    (["dream", "x.png", "--grad-floor", "0"], "error: --grad-floor must be a finite number > 0"),
    (["visualize", "--class", "1", "--param", "dct"], "error: --param must be one of fft, pixel"),
])
def test_cli_names_the_flag(argv, needle, tmp_path):
    from onnxdream.cli.main import app

    result = CliRunner().invoke(app, [*argv, "-o", str(tmp_path / "o.png")])
    out = result.output + (getattr(result, "stderr", "") or "")
    assert result.exit_code == 2, out
    assert needle in out and "Traceback" not in out
    assert not (tmp_path / "o.png").exists()


def test_server_form_takes_grad_floor():
    pytest.importorskip("fastapi")
    from onnxdream.jobs.config import ServerConfig
    from onnxdream.server.form import ApiError, build_settings, parse_fields

    fields = parse_fields([("image", _upload()), ("grad-floor", "1e-6")]).fields
    assert fields == {"grad_floor": 1e-6}
    assert build_settings(fields, [], ServerConfig()).grad_floor == 1e-6
    with pytest.raises(ApiError, match="'grad_floor' must be a finite number"):
        parse_fields([("image", _upload()), ("grad_floor", "inf")])
    with pytest.raises(SettingsError) as info:
        build_settings({"grad_floor": -1.0}, [], ServerConfig())
    assert info.value.field == "grad_floor"


def _upload():
    from onnxdream.server.formstream import FilePart

    return FilePart("image", "x.png", "image/png", 1, bytearray(b"x"))


def test_server_names_the_form_field():
    pytest.importorskip("fastapi")
    from onnxdream.jobs.queue import QueueFull, UnknownJob
    from onnxdream.server.app import refusal

    err = refusal(SettingsError("layers", "must be layer names"))
    assert (err.status, err.message) == (400, "layer must be layer names")
    err = refusal(SettingsError("step_size", "must be > 0 and <= 10"))
    assert err.message == "step_size must be > 0 and <= 10"
    err = refusal(ImageTooLargeError("the uploaded image", 60_000, 50_000))
    assert err.status == 413
    assert err.message == ("the uploaded image has 60,000 pixels, more than the limit of 50,000; "
                           "send a smaller image")
    assert refusal(ImageError("the uploaded image is empty")).status == 400
    assert refusal(LayerError("unknown layer 'x'")).status == 400
    full = refusal(QueueFull(7, 3))
    assert full.status == 503 and full.headers == {"Retry-After": "7"}
    assert refusal(UnknownJob("abc", 600)).status == 404
    assert refusal(RuntimeError("boom")).status == 500


def test_jobs_need_no_web_framework():
    code = ("import sys\n"
            "for m in ('fastapi', 'starlette', 'uvicorn'):\n"
            "    sys.modules[m] = None\n"
            "import onnxdream.jobs.queue as j\n"
            "print(j.JobManager.__name__, j.ServerConfig().workers)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["JobManager", "1"]


# -- presets and options ----------------------------------------------------------------------


def test_from_options_lays_explicit_over_preset_over_defaults():
    asked = []

    def layers_of(model):
        asked.append(model)
        return [f"mixed{i}" for i in range(11)]

    s = from_options(model="inception.onnx", preset="keras-classic", steps=5,
                                   layers_of=layers_of)
    assert asked == ["inception.onnx"]
    assert s.layers == ("mixed2:0.2", "mixed3:0.5", "mixed4:2.0", "mixed5:1.5")
    assert (s.objective, s.border, s.preset, s.steps, s.octaves, s.step_size) == (
        "l2", 2, "keras-classic", 5, 3, 0.005)
    # layers given: the model's layers are never read
    s = from_options(preset="keras-classic", layers=["mixed7"], layers_of=None)
    assert s.layers == ("mixed7",) and s.objective == "l2"
    with pytest.raises(TypeError):
        from_options(strength=3)


def test_a_new_command_gets_the_dream_options():
    """What `video`, `zoom`, `batch` do: declare `options`, get one validated DreamSettings."""
    app = typer.Typer()
    seen = {}

    @app.command()
    @with_dream_options
    def zoom(image: Path, options: DreamOptions = None, frames: int = 3):
        seen["settings"], seen["frames"], seen["image"] = options.settings(), frames, image

    @app.command()
    def other():  # two commands: zoom is a subcommand
        pass

    result = CliRunner().invoke(app, ["zoom", "x.png", "--steps", "3", "--layer", "blocks.9:2",
                                      "--step-size", "0.01", "--frames", "5"])
    assert result.exit_code == 0, result.output
    assert seen["settings"] == DreamSettings(steps=3, layers=("blocks.9:2",), step_size=0.01)
    assert (seen["frames"], seen["image"]) == (5, Path("x.png"))
    help_text = CliRunner().invoke(app, ["zoom", "--help"], env={"COLUMNS": "200"}).output
    assert help_text.index("--model") < help_text.index("--seed") < help_text.index("--frames")


def test_command_defaults_and_keyframed_options():
    """zoom's own defaults sit below a preset and explicit options; keyframed options come back
    as schedules, their first key in the settings."""
    app = typer.Typer()
    seen = {}

    @app.command()
    @with_dream_options(defaults={"steps": 5, "octaves": 2}, schedules=("layer", "steps",
                                                                          "step_size"))
    def zoom(options: DreamOptions = None):
        seen["settings"], seen["schedules"] = options.settings(), options.schedules()

    @app.command()
    def other():
        pass

    def run(*argv):
        result = CliRunner().invoke(app, ["zoom", *argv])
        assert result.exit_code == 0, result.output
        return seen["settings"], {k: v.describe() for k, v in seen["schedules"].items()}

    assert run() == (DreamSettings(steps=5, octaves=2), {})
    assert run("--steps", "7", "--step-size", "0.01") == (
        DreamSettings(steps=7, octaves=2, step_size=0.01), {})
    settings, schedules = run("--layer", "0:blocks.5+blocks.6:0.5,2s:blocks.9", "--steps",
                              "0:3,10:6")
    assert settings == DreamSettings(steps=3, octaves=2, layers=("blocks.5", "blocks.6:0.5"))
    assert schedules == {"layers": "0:blocks.5+blocks.6:0.5,2s:blocks.9", "steps": "0:3,10:6"}
    assert run("--layer", "blocks.5", "--layer", "blocks.9:2")[0].layers == (
        "blocks.5", "blocks.9:2")
    preset = from_options(preset="caffe-googlenet", layers=["x"],
                                        defaults={"steps": 5, "octaves": 2})
    assert (preset.steps, preset.octaves) == (10, 4)  # the preset's recipe wins
    help_text = CliRunner().invoke(app, ["zoom", "--help"], env={"COLUMNS": "200"}).output
    assert "steps per octave. In a clip, keyframes" in help_text and "[default: 5]" in help_text
    bad = CliRunner().invoke(app, ["zoom", "--steps", "0:3,10:0"])
    assert isinstance(bad.exception, SettingsError) and bad.exception.field == "steps"
    assert "must be between 1 and 10000" in str(bad.exception)


def _parse_dream(argv: list[str]) -> DreamSettings:
    """argv (as to_argv writes it) → the DreamSettings the CLI would build from it."""
    from onnxdream.cli.common import DREAM_OPTION_NAMES, DreamOptions
    from onnxdream.cli.main import app

    group = typer.main.get_command(app)
    assert argv[0] == "dream"
    ctx = group.commands["dream"].make_context("dream", list(argv[1:]))
    return DreamOptions({k: ctx.params[k] for k in DREAM_OPTION_NAMES}).settings()


@pytest.mark.parametrize("settings", [
    DreamSettings(seed=3),
    DreamSettings(model="my.onnx", layers=("a:0.5", "b"), objective="l2", pre_relu=True, border=2,
                  octaves=3, octave_scale=1.7, steps=7, step_size=1.5 / 255, jitter=0,
                  tile_size=0, seed=0, normalize="lapnorm", max_loss=10.0),
    DreamSettings(seed=1, grad_floor=2e-6, normalize="std"),
])
def test_to_argv_parses_back_to_the_same_settings(settings):
    argv = settings.to_argv("in put.png", "out.png")
    assert argv[:4] == ["dream", "in put.png", "-o", "out.png"]
    assert _parse_dream(argv) == settings


def test_visualize_to_argv():
    from onnxdream.dream.visualize import Target

    targets = [Target("class", "logits", 130, "flamingo"), Target("channel", "blocks.9", 12),
               Target("layer", "blocks.5")]
    argv = VisualizeSettings(seed=4, decorrelate=False).to_argv(
        model="m", targets=targets, output="v.png", grid=True)
    assert argv[:5] == ["visualize", "-o", "v.png", "--model", "m"]
    joined = " ".join(argv)
    assert "--class 130 --channel blocks.9:12 --layer blocks.5 --size 224 --steps 128 --seed 4" \
        in joined and "--no-decorrelate" in argv and argv[-1] == "--grid"


# -- the resolver -----------------------------------------------------------------------------


def _old_octave_sizes(h, w, octaves, scale):  # ascent.py before the move, verbatim
    sizes = [(h, w)]
    for _ in range(octaves - 1):
        nh, nw = round(sizes[-1][0] / scale), round(sizes[-1][1] / scale)
        if min(nh, nw) < 32:
            break
        sizes.append((nh, nw))
    return sizes


@pytest.mark.parametrize("h,w,octaves,scale", [(300, 451, 4, 1.4), (96, 128, 4, 1.4),
                                               (4096, 4096, 12, 1.1), (33, 500, 3, 2.0)])
def test_resolver_reproduces_the_octave_rule(h, w, octaves, scale):
    from onnxdream.settings.resolve import resolve

    s = DreamSettings(octaves=octaves, octave_scale=scale, steps=3, seed=1)
    r = resolve(s, h, w)
    assert list(r.octave_sizes) == _old_octave_sizes(h, w, octaves, scale)
    assert octave_sizes(h, w, octaves, scale) == _old_octave_sizes(h, w, octaves, scale)
    assert r.steps_total == len(r.octave_sizes) * 3 and r.octaves == len(r.octave_sizes)
    # no memory profile: the tile as asked, none (0) where the image fits in one
    tile = 0 if max(h, w) <= s.tile_size else s.tile_size
    assert (r.tile_size, r.jitter, r.step_size) == (tile, s.jitter, 0.006)
    meta = json.loads(resolved_metadata(r)["onnxdream:resolved"])
    assert meta["octave_sizes"] == [list(x) for x in r.octave_sizes]


def test_visualize_octaves_use_the_same_rule():
    s = VisualizeSettings(size=224, octaves=3, steps=100)
    assert s.octave_sizes() == [h for h, _ in reversed(_old_octave_sizes(224, 224, 3, 1.4))]


def test_digest_covers_what_decides_the_result():
    from onnxdream.settings.resolve import resolve

    s = DreamSettings(seed=1)
    d = resolve(s, 100, 120).digest()
    assert d == resolve(DreamSettings(seed=1), 100, 120).digest() and len(d) == 64
    for other in (resolve(DreamSettings(seed=2), 100, 120), resolve(s, 100, 121),
                  resolve(DreamSettings(seed=1, layers=("blocks.9",)), 100, 120),
                  resolve(DreamSettings(seed=1, step_size=0.01), 100, 120),
                  resolve(DreamSettings(seed=1, grad_floor=1e-6), 100, 120)):
        assert other.digest() != d


def test_model_geometry_of_the_zoo_model(model_home):
    from onnxdream.exporters.graph.contract import ModelInfo
    from onnxdream.models import resolve_model

    g = ModelInfo.load(resolve_model("efficientnet-lite0"))
    assert tuple(g.native_size) == (224, 224) and g.dynamic_hw


# -- provenance -------------------------------------------------------------------------------


def test_dream_metadata_keys_and_command():
    from onnxdream.exporters.graph.objective import Objective
    from onnxdream.settings.provenance import dream_metadata
    from onnxdream.settings.resolve import resolve

    s = DreamSettings(seed=9, max_loss=3.0, octaves=4)
    objective = Objective.build(["blocks.5"], "mean")  # what the model's default layer gives
    meta = dream_metadata(resolve(s, 64, 80), objective=objective, provider="CPU",
                          image="a b.png", output="o.png")
    assert meta["onnxdream:model"] == "efficientnet-lite0"
    assert meta["onnxdream:objective"] == "1*mean(blocks.5)"
    assert json.loads(meta["onnxdream:layers"]) == ["blocks.5"]
    assert meta["onnxdream:step_size"] == "0.006" and meta["onnxdream:max_loss"] == "3.0"
    assert meta["onnxdream:seed"] == "9" and meta["onnxdream:preset"] == ""
    assert json.loads(meta["onnxdream:resolved"])["octaves"] == 3  # 64, 46, 33 px
    assert meta["onnxdream:octaves"] == "3"  # as it ran; what was asked is kept apart
    assert json.loads(meta["onnxdream:requested"])["octaves"] == 4
    command = meta["onnxdream:command"]
    assert command.startswith("onnxdream dream 'a b.png' -o o.png --model efficientnet-lite0 "
                              "--layer blocks.5:1 ")
    import shlex

    assert _parse_dream(shlex.split(command)[1:]) == DreamSettings(  # the step size as used
        layers=("blocks.5:1",), seed=9, max_loss=3.0, octaves=3, step_size=0.006)
    assert meta["onnxdream:grad_floor"] == ""  # none: mean|g| + 1e-8
    floored = dream_metadata(resolve(DreamSettings(seed=9, grad_floor=2e-6), 64, 80),
                             objective=objective, provider="CPU")
    assert floored["onnxdream:grad_floor"] == "2e-06"
    assert "--grad-floor 2e-06" in floored["onnxdream:command"]


# -- the atomic writer ------------------------------------------------------------------------


def test_write_atomic_bytes_and_writer(tmp_path):
    from onnxdream.core.atomic import write_atomic

    p = write_atomic(tmp_path / "a.bin", b"hello")
    assert p.read_bytes() == b"hello"
    mask = os.umask(0)
    os.umask(mask)
    assert p.stat().st_mode & 0o777 == 0o666 & ~mask

    def two_files(tmp: Path) -> None:  # a model and its external data, as onnx.save writes them
        tmp.write_bytes(b"model")
        (tmp.parent / "m.onnx.data").write_bytes(b"weights")

    write_atomic(tmp_path / "m.onnx", two_files)
    assert (tmp_path / "m.onnx").read_bytes() == b"model"
    assert (tmp_path / "m.onnx.data").read_bytes() == b"weights"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["a.bin", "m.onnx", "m.onnx.data"]


@pytest.mark.parametrize("how", ["bytes", "writer"])
def test_write_atomic_failure_leaves_the_old_file(tmp_path, monkeypatch, how):
    from onnxdream.core import atomic

    target = tmp_path / "keep.txt"
    target.write_bytes(b"old")

    def no_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic.os, "replace", no_replace)
    with pytest.raises(OSError, match="No space"):
        atomic.write_atomic(target, b"new" if how == "bytes" else
                            (lambda tmp: tmp.write_bytes(b"new")))
    assert target.read_bytes() == b"old"
    assert [x.name for x in tmp_path.iterdir()] == ["keep.txt"]


def test_atomic_target_file_and_folder(tmp_path):
    from onnxdream.core.atomic import AtomicTarget

    with AtomicTarget(tmp_path / "v.mp4") as t:  # an incremental writer's file
        t.tmp.write_bytes(b"video")
        assert not (tmp_path / "v.mp4").exists()
    assert (tmp_path / "v.mp4").read_bytes() == b"video"
    old = tmp_path / "frames"
    old.mkdir()
    (old / "frame_000000.png").write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt), AtomicTarget(old, directory=True) as t:
        (t.tmp / "frame_000000.png").write_bytes(b"half")
        raise KeyboardInterrupt
    assert [x.name for x in old.iterdir()] == ["frame_000000.png"]
    assert (old / "frame_000000.png").read_bytes() == b"old"
    with AtomicTarget(old, directory=True) as t:  # a folder replaces the old folder whole
        (t.tmp / "frame_000001.png").write_bytes(b"new")
    assert [x.name for x in old.iterdir()] == ["frame_000001.png"]
    assert sorted(x.name for x in tmp_path.iterdir()) == ["frames", "v.mp4"]


def test_remove_stale_temps(tmp_path):
    from onnxdream.core.atomic import remove_stale_temps

    old = tmp_path / ".x.png.abc.tmp"
    old.write_bytes(b"")
    os.utime(old, (0, 0))
    fresh = tmp_path / ".y.png.def.tmp"
    fresh.write_bytes(b"")
    keep = tmp_path / "z.tmp"
    keep.write_bytes(b"")
    os.utime(keep, (0, 0))
    assert remove_stale_temps(tmp_path) == 1
    assert sorted(x.name for x in tmp_path.iterdir()) == [".y.png.def.tmp", "z.tmp"]


def test_encode_image_matches_save_image(tmp_path):
    import numpy as np

    from onnxdream.media.imageio import read_metadata
    from onnxdream.media.imagewrite import encode_image, save_image

    rgb = np.random.default_rng(0).random((20, 30, 3), dtype=np.float32)
    alpha = np.linspace(0, 1, 600, dtype=np.float32).reshape(20, 30)
    meta = {"onnxdream:x": "1"}
    for ext in ("png", "jpg", "webp"):
        out = save_image(tmp_path / f"a.{ext}", rgb, alpha, metadata=meta)
        assert encode_image(rgb, alpha, ext, metadata=meta) == out.read_bytes()
        assert read_metadata(out) == meta  # JPEG and WebP: the XMP packet
    with pytest.raises(ImageError, match="gif"):
        encode_image(rgb, format="gif")


# -- error helpers ----------------------------------------------------------------------------


def test_did_you_mean_and_first_line():
    assert did_you_mean("keras-clasic", ["keras-classic", "keras-io"]) == \
        "; did you mean 'keras-classic', 'keras-io'?"
    assert did_you_mean("zzz", ["abc"]) == ""
    assert first_line(ValueError("first\nsecond"), 3) == "fir"
    assert first_line(ValueError("")) == "ValueError"
    e = OnnxDreamError("x", field="model")
    assert e.field == "model" and OnnxDreamError("y").field is None
