"""Presets: the classic recipes as defaults that explicit options override; keras-classic end to
end on an InceptionV3 exported from Keras (random weights, no download)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from onnxdream.core.errors import LayerError, OnnxDreamError
from onnxdream.settings.presets import PRESETS, get_preset, resolve_preset

INCEPTION_LAYERS = [f"mixed{i}" for i in range(11)] + ["conv2d", "activation"]


def test_keras_classic_recipe():
    plan = resolve_preset("keras-classic", INCEPTION_LAYERS)
    assert plan.layers == ["mixed2:0.2", "mixed3:0.5", "mixed4:2.0", "mixed5:1.5"]
    assert (plan.objective, plan.border, plan.pre_relu) == ("l2", 2, False)
    s = plan.dream_settings(seed=1)
    assert (s.octaves, s.octave_scale, s.steps, s.max_loss, s.normalize, s.jitter) == (
        3, 1.4, 20, 10.0, "mean-abs", 0)
    assert s.step_size == pytest.approx(0.005)  # 0.01 in [-1,1] space is 0.005 in [0,1]


def test_keras_io_recipe():
    plan = resolve_preset("keras-io", INCEPTION_LAYERS)
    assert plan.layers == ["mixed4:1.0", "mixed5:1.5", "mixed6:2.0", "mixed7:2.5"]
    assert plan.settings["max_loss"] == 15.0 and plan.border == 2
    # keras.io divides by max(mean|g|, 1e-6) in [-1,1] space: 2e-6 for [0,1] gradients
    assert plan.dream_settings().grad_floor == pytest.approx(2e-6)
    assert resolve_preset("keras-io", INCEPTION_LAYERS, grad_floor=1e-3).settings[
        "grad_floor"] == 1e-3
    # the classic example's K.epsilon() (1e-7) likewise; the notebooks add 1e-8 instead
    assert resolve_preset("keras-classic", INCEPTION_LAYERS).settings["grad_floor"] == \
        pytest.approx(2e-7)
    assert all(resolve_preset(name, INCEPTION_LAYERS + ["inception4c", "inception4d.branch2.0"]
                              ).dream_settings().grad_floor is None
               for name in PRESETS if not name.startswith("keras"))


def test_explicit_values_override_the_preset():
    plan = resolve_preset("keras-classic", INCEPTION_LAYERS, layers=["mixed7"], objective="mean",
                          border=0, steps=5, step_size=0.02, max_loss=3.0)
    assert plan.layers == ["mixed7"]
    assert (plan.objective, plan.border) == ("mean", 0)
    assert (plan.settings["steps"], plan.settings["step_size"], plan.settings["max_loss"]) == (
        5, 0.02, 3.0)
    assert plan.settings["octaves"] == 3  # not overridden: the preset's


def test_no_preset_uses_the_defaults_given():
    plan = resolve_preset(None, layers=None, defaults={"step_size": 0.006, "octaves": 4})
    assert plan.layers == [] and plan.objective == "mean" and plan.border == 0
    assert plan.settings["step_size"] == 0.006 and plan.settings["octaves"] == 4


def test_caffe_googlenet_picks_the_models_spelling():
    assert resolve_preset("caffe-googlenet", ["inception4c", "inception4d"]).layers == [
        "inception4c"]
    assert resolve_preset("caffe-googlenet", ["inception_4c/output"]).layers == [
        "inception_4c/output"]
    s = resolve_preset("caffe-googlenet", ["inception4c"]).dream_settings()
    assert (s.octaves, s.steps, s.jitter) == (4, 10, 32)
    assert s.step_size == pytest.approx(1.5 / 255)


def test_tf_notebook_is_a_pre_relu_channel_with_lapnorm():
    plan = resolve_preset("tf-notebook", ["inception4d.branch2.0"])
    assert plan.layers == ["inception4d.branch2.0"]
    assert (plan.objective, plan.pre_relu, plan.settings["normalize"]) == (
        "channel:139", True, "lapnorm")


def test_missing_layers_and_unknown_presets_are_clear_errors():
    with pytest.raises(LayerError, match="export keras InceptionV3"):
        resolve_preset("keras-classic", ["blocks.5", "blocks.9"])
    with pytest.raises(OnnxDreamError, match="keras-classic"):
        get_preset("keras-clasic")


def test_every_preset_validates():
    for name, preset in PRESETS.items():
        layers = [s.rsplit(":", 1)[0] for s in preset.layers[0]]
        resolve_preset(name, layers).dream_settings(seed=0).validate()


# -- end to end ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keras_inception(tmp_path_factory):
    pytest.importorskip("torch")
    os.environ.setdefault("KERAS_BACKEND", "torch")
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "torch":  # pragma: no cover
        pytest.skip("needs KERAS_BACKEND=torch")
    from onnxdream.exporters import export_keras

    keras.utils.set_random_seed(0)
    out = tmp_path_factory.mktemp("keras") / "inception_v3.onnx"
    result = export_keras("InceptionV3", out, weights="none", input_size=107)
    assert result.dynamic_hw
    return out


def test_keras_classic_end_to_end(keras_inception, model_home):
    from onnxdream.dream.ascent import dream
    from onnxdream.runtime.gradient import GradientModel

    plan = resolve_preset("keras-classic", INCEPTION_LAYERS)
    settings = plan.dream_settings(seed=0, tile_size=0)
    gm = GradientModel(keras_inception, plan.layers, plan.objective, pre_relu=plan.pre_relu,
                       border=plan.border, device="cpu")
    assert gm.objective.describe() == (
        "0.2*l2(mixed2) + 0.5*l2(mixed3) + 2*l2(mixed4) + 1.5*l2(mixed5)")
    rng = np.random.default_rng(0)
    # the smallest octave (224/1.4² = 114 px) still leaves mixed5 a 5×5 map: 1×1 inside the border
    rgb = np.clip(0.5 + 0.1 * rng.standard_normal((224, 240, 3)), 0, 1).astype(np.float32)
    seen = []
    out = dream(gm, rgb, settings, lambda p: seen.append((p.octave, p.step, p.size, p.objective)))
    assert out.shape == rgb.shape and np.isfinite(out).all()
    assert not np.allclose(out, rgb)
    octaves = sorted({o for o, *_ in seen})
    assert octaves == [1, 2, 3]  # 114 → 160 → 224 px, 20 steps each
    assert len(seen) == 60
    sizes = [next(s for o, _, s, _ in seen if o == k) for k in octaves]
    assert sizes == sorted(sizes)  # smallest first
    for k in octaves:
        objs = [v for o, _, _, v in seen if o == k]
        assert objs[-1] > 1.5 * objs[0], f"octave {k}: {objs[0]:.3g} → {objs[-1]:.3g}"
        assert np.mean(np.diff(objs) > 0) > 0.9  # the objective rises step after step
    firsts = [next(v for o, _, _, v in seen if o == k) for k in octaves]
    lasts = [[v for o, _, _, v in seen if o == k][-1] for k in octaves]
    assert lasts[-1] > 10 * firsts[0]
    # detail re-injection: each octave starts from the dreamed detail of the one before, so its
    # first objective is well above the previous octave's first (the undreamed photo's)
    assert firsts[0] < firsts[1] < firsts[2], firsts


def test_keras_classic_max_loss_stops(keras_inception, model_home):
    from onnxdream.dream.ascent import dream
    from onnxdream.runtime.gradient import GradientModel

    plan = resolve_preset("keras-classic", INCEPTION_LAYERS)
    gm = GradientModel(keras_inception, plan.layers, plan.objective, border=plan.border,
                       device="cpu")
    rgb = np.random.default_rng(1).uniform(0.3, 0.7, (160, 170, 3)).astype(np.float32)
    first = float(gm(np.ascontiguousarray(rgb.transpose(2, 0, 1)[None]))[0][0])
    seen = []
    settings = plan.dream_settings(seed=0, tile_size=0, octaves=1, max_loss=first * 1.2)
    dream(gm, rgb, settings, lambda p: seen.append(p.objective))
    assert 1 < len(seen) < 20 and seen[-1] > first * 1.2


def test_cli_preset_with_override(keras_inception, model_home, tmp_path):
    from helpers import photo, run_cli
    from onnxdream.media.imageio import read_metadata

    out = tmp_path / "dream.png"
    run_cli("dream", str(photo("chelsea.png")), "-o", str(out), "--model", str(keras_inception),
            "--preset", "keras-classic", "--steps", "2", "--octaves", "1", "--seed", "3", "-q",
            home=model_home)  # dreams without torch or keras importable
    meta = read_metadata(out)
    assert meta["onnxdream:preset"] == "keras-classic"
    assert json.loads(meta["onnxdream:layers"]) == ["mixed2", "mixed3", "mixed4", "mixed5"]
    assert meta["onnxdream:border"] == "2"
    assert meta["onnxdream:steps"] == "2" and meta["onnxdream:octaves"] == "1"  # overridden
    assert meta["onnxdream:grad_floor"] == "2e-07"  # the preset's
    assert "--grad-floor 2e-07" in meta["onnxdream:command"]
    assert float(meta["onnxdream:step_size"]) == pytest.approx(0.005)  # the preset's
    assert meta["onnxdream:max_loss"] == "10.0"
    assert "--border 2" in meta["onnxdream:command"]
