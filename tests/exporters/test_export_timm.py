"""timm → dreamable model: one CNN, one transformer and one hybrid against torch (logits, layers,
metadata) and their compiled gradients against torch autograd; weights files, pretrained
configs, labels and the one-line errors.

Random weights throughout (no network here); BatchNorm gets non-trivial running statistics and
norm layers random affine parameters. The whole-zoo check is benchmarks/gradient_all_timm.py.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from gradcheck import compare  # noqa: E402
from helpers import run_cli  # noqa: E402
from onnxdream.core.errors import DependencyError, ModelError  # noqa: E402
from onnxdream.exporters import ExportResult, export_timm  # noqa: E402
from onnxdream.exporters import timm as timm_export  # noqa: E402
from onnxdream.exporters.timm import build_timm, timm_data_config  # noqa: E402


def randomize(model, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
            if isinstance(m, (torch.nn.LayerNorm, torch.nn.GroupNorm)) and m.weight is not None:
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=g) - 0.5)
    return model.eval()


def metadata(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


_MULTIPLES: dict[int, tuple | None] = {}


def preprocessed(model, x):
    """The in-graph preprocessing in torch (differentiable: ``x`` may require grad)."""
    cfg = timm_data_config(model)
    mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    x = (x - mean) / std
    if id(model) not in _MULTIPLES:
        _MULTIPLES[id(model)] = timm_export.pad_multiple(model, tuple(cfg["input_size"][1:]))
    multiple = _MULTIPLES[id(model)]
    return x if multiple is None else timm_export.pad_to_multiple(x, multiple)


def torch_logits(model, image: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(preprocessed(model, torch.from_numpy(image))).numpy()


def gradient_error(model, path: Path, layer: str, size) -> float:
    """max|Δ|/max|g| of the compiled gradient of mean(layer) against autograd at ``size``."""
    for m in model.modules():
        if isinstance(getattr(m, "inplace", None), bool):
            m.inplace = False
    seen = {}
    handle = dict(model.named_modules())[layer].register_forward_hook(
        lambda _m, _i, o: seen.__setitem__("o", o))
    try:
        def fn(x):
            model(preprocessed(model, x))
            return seen["o"]

        return compare(None, [size], objective="mean", layers=[layer], batch=1,
                       model=onnx.load(str(path)), torch_fn=fn)
    finally:
        handle.remove()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """name → (torch module, ExportResult), exported once per module."""
    cache: dict[str, tuple] = {}
    root = tmp_path_factory.mktemp("timm")

    def get(name: str, **kwargs):
        if name not in cache:
            model = randomize(timm.create_model(name, exportable=True, **kwargs),
                              seed=len(cache))
            cache[name] = (model, export_timm(name, root / f"{name}.onnx", "none", module=model))
        return cache[name]

    return get


def test_cnn_resnet18(exported):
    model, result = exported("resnet18")
    assert isinstance(result, ExportResult) and result.dynamic_hw, result.notes
    assert result.default_layers == ["layer3"]  # feature_info's last stride-16 stage
    meta = metadata(result.path)
    assert meta["onnxdream.name"] == "resnet18.a1_in1k"
    assert meta["onnxdream.source"] == "timm:resnet18.a1_in1k (weights: none)"
    assert meta["onnxdream.license"] == "Apache-2.0 (timm code); weights: random"
    assert meta["onnxdream.input_size"] == "224"
    assert "mean=[0.485, 0.456, 0.406]" in meta["onnxdream.preprocess"]
    assert "bicubic" in meta["onnxdream.preprocess"]
    labels = json.loads(meta["onnxdream.labels"])
    assert len(labels) == 1000 and labels[:2] == ["tench", "goldfish"]
    layers = json.loads(meta["onnxdream.layers"])
    assert {"layer1.0", "layer3", "layer4.1.conv2", "fc"} <= set(layers)
    assert model.act1.inplace is True  # the caller's module is left as it was
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    for size in [(224, 224), (179, 211)]:
        image = np.random.default_rng(1).random((2, 3, *size), dtype=np.float32)
        (got,) = session.run(["logits"], {"image": image})
        np.testing.assert_allclose(got, torch_logits(model, image), rtol=1e-4, atol=1e-4)
    assert gradient_error(model, result.path, "layer3", (179, 211)) < 1e-4


def test_transformer_vit_runs_at_any_size(exported):
    """A ViT (two blocks, to be quick) with dynamic_img_size: its position embedding is
    resampled in the graph, so it dreams at any size; exported by dynamo."""
    model, result = exported("vit_tiny_patch16_224", depth=2, dynamic_img_size=True,
                             dynamic_img_pad=True)
    assert result.dynamic_hw and result.exporter == "dynamo", result.notes
    assert result.default_layers == ["blocks.1"]  # the block 60% through the feature blocks
    meta = metadata(result.path)
    assert "mean=[0.5, 0.5, 0.5]" in meta["onnxdream.preprocess"]
    layers = json.loads(meta["onnxdream.layers"])
    assert {"blocks.0", "blocks.1.attn", "blocks.1.mlp.fc2", "norm"} <= set(layers)
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    for size in [(224, 224), (179, 211)]:  # 179x211: padded to 192x224, a 12x14 grid
        image = np.random.default_rng(2).random((1, 3, *size), dtype=np.float32)
        (got,) = session.run(["logits"], {"image": image})
        np.testing.assert_allclose(got, torch_logits(model, image), rtol=1e-4, atol=1e-4)
    assert gradient_error(model, result.path, "blocks.1", (179, 211)) < 1e-4


def test_the_vit_dreams_and_predicts(exported, model_home, tmp_path):
    """The exported ViT through the engine: compile, dream (any size), predict (labels)."""
    from helpers import photo

    _, result = exported("vit_tiny_patch16_224", depth=2, dynamic_img_size=True,
                         dynamic_img_pad=True)
    out = tmp_path / "dream.png"
    proc = run_cli("dream", str(photo("chelsea.png")), "--model", str(result.path), "-o",
                   str(out), "--steps", "2", "--octaves", "2", "--seed", "1", "-q",
                   home=model_home)
    assert out.is_file() and "Traceback" not in proc.stderr
    top = json.loads(run_cli("predict", str(photo("chelsea.png")), "--model", str(result.path),
                             "--json", "--top", "3", home=model_home).stdout)
    labels = json.loads(metadata(result.path)["onnxdream.labels"])
    assert [r["label"] for r in top] == [labels[r["index"]] for r in top]


def test_hybrid_convnext_with_channels_last_layers(exported):
    """ConvNeXt: convolutions, and LayerNorm + MLP on channels-last tensors inside each block
    (as in convnext_tiny and up; atto's default conv_mlp stays NCHW), which the metadata marks
    NHWC, so channel objectives pick the right axis."""
    model, result = exported("convnext_atto", conv_mlp=False)
    assert result.dynamic_hw, result.notes
    assert result.default_layers == ["stages.2"]
    meta = metadata(result.path)
    layouts = json.loads(meta["onnxdream.layer_layouts"])
    assert layouts.get("stages.1.blocks.0.norm") == "NHWC"
    assert layouts.get("stages.1.blocks.0.mlp.fc1") == "NHWC"
    assert "stages.1" not in layouts and "stages.1.blocks.0.conv_dw" not in layouts
    assert gradient_error(model, result.path, "stages.2", (179, 211)) < 1e-4
    assert gradient_error(model, result.path, "stages.1.blocks.0.mlp.fc1", (179, 211)) < 1e-4


def test_a_safetensors_weights_file(tmp_path, model_home):
    model = randomize(timm.create_model("resnet18"), seed=7)
    from safetensors.torch import save_file

    file = tmp_path / "finetuned.safetensors"
    save_file(model.state_dict(), str(file))
    out = tmp_path / "r18.onnx"
    proc = run_cli("export", "timm", "resnet18", "--weights", str(file), "-o", str(out),
                   home=model_home, frameworks=True)
    assert "Traceback" not in proc.stderr and "dynamic H/W" in proc.stderr
    assert "default layer layer3" in proc.stderr
    assert metadata(out)["onnxdream.source"] == (
        "timm:resnet18.a1_in1k (weights: finetuned.safetensors)")
    image = np.random.default_rng(3).random((1, 3, 160, 200), dtype=np.float32)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(["logits"], {"image": image})[0],
                               torch_logits(model, image), rtol=1e-4, atol=1e-4)


def test_a_fine_tuned_head_follows_the_file(tmp_path):
    """A model fine-tuned on 10 classes (torch.save, from DataParallel): exported with the
    file's 10-class head and without ImageNet's labels."""
    tuned = randomize(timm.create_model("resnet10t", num_classes=10), seed=8)
    pt = tmp_path / "ten.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in tuned.state_dict().items()}}, pt)
    built, label, head_changed = build_timm("resnet10t", str(pt))
    assert (label, head_changed, built.num_classes) == ("ten.pt", True, 10)
    result = export_timm("resnet10t", tmp_path / "ten.onnx", str(pt))
    image = np.random.default_rng(4).random((1, 3, 150, 170), dtype=np.float32)
    assert "onnxdream.labels" not in metadata(result.path)
    (got,) = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"]).run(
        ["logits"], {"image": image})
    np.testing.assert_allclose(got, torch_logits(tuned, image), rtol=1e-4, atol=1e-4)


def test_pretrained_config_chooses_size_and_preprocessing(tmp_path):
    # resnet18.a3_in1k evaluates at 160 px
    model, label, _ = build_timm("resnet18", "none", pretrained_cfg="a3_in1k")
    assert timm_data_config(model)["input_size"] == (3, 160, 160) and label == "none"
    model, _, _ = build_timm("resnet18.a3_in1k", "none")
    assert model.pretrained_cfg["tag"] == "a3_in1k"
    with pytest.raises(ModelError, match=r"no pretrained config 'a4_in1k'.*did you mean"):
        build_timm("resnet18", "none", pretrained_cfg="a4_in1k")
    with pytest.raises(ModelError, match=r"names the pretrained config 'a1_in1k' but "
                                         r"--pretrained-cfg says 'a3_in1k'"):
        build_timm("resnet18.a1_in1k", "none", pretrained_cfg="a3_in1k")
    with pytest.raises(ModelError, match=r"timm has no model named 'resnet19'.*resnet18"):
        build_timm("resnet19", "none")
    with pytest.raises(ModelError, match=r"unknown weights 'IMAGENET'"):
        build_timm("resnet18", "IMAGENET")
    with pytest.raises(ModelError, match=r"nope.pt' does not exist"):
        build_timm("resnet18", str(tmp_path / "nope.pt"))
    other = tmp_path / "other.pt"
    torch.save(timm.create_model("resnet10t").state_dict(), other)
    with pytest.raises(ModelError, match=r"does not fit timm's resnet18: .*missing key"):
        build_timm("resnet18", str(other))
    assert not list(tmp_path.glob("*.onnx"))


def test_labels_where_timm_has_them():
    from onnxdream.exporters.timm import timm_labels

    model = timm.create_model("vit_tiny_patch16_224.augreg_in21k")  # 21843 classes
    labels = timm_labels(model)
    assert labels is not None and len(labels) == 21843
    assert timm_labels(timm.create_model("resnet18", num_classes=7)) is None


def test_default_weights_without_internet(tmp_path, monkeypatch):
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(*args, **kwargs):
        if kwargs.get("pretrained"):
            raise LocalEntryNotFoundError("cannot find the requested files in the local cache")
        return real(*args, **kwargs)

    real = timm.create_model
    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(ModelError) as info:
        export_timm("resnet18", tmp_path / "r.onnx")
    assert str(info.value) == ("could not download the pretrained weights for resnet18 (no "
                               "internet?); pass --weights none or --weights FILE")
    assert not (tmp_path / "r.onnx").exists()


def test_cli_errors_are_one_line(tmp_path):
    from typer.testing import CliRunner

    from onnxdream.cli.main import app

    result = CliRunner().invoke(app, ["export", "timm", "convnext_atom", "-o",
                                      str(tmp_path / "c.onnx"), "--weights", "none"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.strip().startswith("error: timm has no model named 'convnext_atom'")
    assert "convnext_atto" in result.output


def test_cli_says_why_a_model_is_fixed_size(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from onnxdream.cli.main import app

    def fake(name, out, weights, pretrained_cfg=None, progress=None):
        progress("exporting")
        return ExportResult(Path(out), False, "torchscript", {"a": "layer:a"},
                            ["timm's levit has no dynamic_img_size option",
                             "torch itself cannot run levit at 179×211"], ["a"])

    import onnxdream.exporters

    monkeypatch.setattr(onnxdream.exporters, "export_timm", fake)
    result = CliRunner().invoke(app, ["export", "timm", "levit_128s", "-o",
                                      str(tmp_path / "l.onnx")])
    assert result.exit_code == 0, result.output
    assert "(1 layers, fixed size; default layer a)" in result.output
    assert ("fixed size because: timm's levit has no dynamic_img_size option; torch itself "
            "cannot run levit at 179×211") in result.output


def test_missing_timm_is_a_dependency_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(DependencyError, match=r"onnxdream\[timm\]"):
        timm_export.import_timm()


# a few families the fast tests above do not cover; the whole sweep is
# benchmarks/gradient_all_timm.py (its pass rate is in benchmarks/README.md)
SLOW_MODELS = ["efficientnet_b0", "swin_tiny_patch4_window7_224", "mobilevit_xxs", "levit_128s",
               "eva02_tiny_patch14_224", "coatnet_nano_rw_224", "mixer_s16_224",
               "dla34", "nfnet_l0"]  # padded to multiples of 32; weight standardisation


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("name", SLOW_MODELS)
def test_timm_family_gradient_equals_autograd(name, tmp_path):
    import subprocess

    from helpers import REPO

    script = REPO / "benchmarks" / "gradient_all_timm.py"
    rows = tmp_path / "rows.jsonl"
    proc = subprocess.run([sys.executable, str(script), "--models", name, "--json", str(rows)],
                          capture_output=True, text=True, timeout=1700)
    row = json.loads(rows.read_text().splitlines()[0])
    assert row["status"] == "ok", proc.stdout[-2000:]


def test_weight_standardization_is_frozen_exactly_and_restored():
    from timm.layers import ScaledStdConv2d, ScaledStdConv2dSame, StdConv2d, StdConv2dSame

    from onnxdream.exporters.timm import frozen_weight_standardization

    torch.manual_seed(0)
    net = torch.nn.Sequential(StdConv2d(3, 8, 3), ScaledStdConv2d(8, 8, 3, stride=2, groups=2),
                              StdConv2dSame(8, 4, 3, stride=2, padding="SAME"),
                              ScaledStdConv2dSame(4, 4, 5, padding="SAME", dilation=2)).eval()
    with torch.no_grad():
        for m in net:
            m.weight.mul_(torch.rand(m.weight.shape) + 0.5)
            if getattr(m, "gain", None) is not None:
                m.gain.uniform_(0.5, 1.5)
    x = torch.rand(2, 3, 29, 31)
    with torch.no_grad():
        want = net(x)
        with frozen_weight_standardization(net) as count:
            assert count == 4 and all("forward" in vars(m) for m in net)
            got = net(x)
    assert all("forward" not in vars(m) for m in net)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
