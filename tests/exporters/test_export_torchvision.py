"""torchvision → dreamable model: logits, layer tensors, metadata, weights handling, errors.

Random weights throughout (no network here); BatchNorm gets non-trivial running statistics so
that folding BN into Conv is really exercised.
"""

from __future__ import annotations

import json
import sys
import urllib.error
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from helpers import run_cli  # noqa: E402
from onnxdream.core.errors import DependencyError, ModelError, OnnxDreamError  # noqa: E402
from onnxdream.exporters import ExportResult, torch_export, tracing  # noqa: E402
from onnxdream.exporters.torchvision import build_torchvision, export_torchvision  # noqa: E402

MEAN = np.array([0.485, 0.456, 0.406], np.float32).reshape(1, 3, 1, 1)
STD = np.array([0.229, 0.224, 0.225], np.float32).reshape(1, 3, 1, 1)

# model → layers whose values are checked against torch forward hooks (in-place ops included)
MODELS = {
    "googlenet": ["inception4c", "inception4c.branch2.1.bn", "conv1"],
    "resnet18": ["layer1.0", "layer1.0.relu", "layer2.1.bn2", "layer3"],
    "squeezenet1_1": ["features.3", "features.3.squeeze_activation", "features.0"],
    "mobilenet_v3_small": ["features.1", "features.4.block.2", "features.9"],
    "alexnet": ["avgpool", "features.1", "classifier.5"],
}


def randomize_bn(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
            with torch.no_grad():
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
    return model.eval()


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    assert got.shape == want.shape, (got.shape, want.shape)
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-6))


def torch_forward(model, image: np.ndarray, layers=()) -> tuple[np.ndarray, dict]:
    seen: dict[str, np.ndarray] = {}
    modules = dict(model.named_modules())
    handles = [
        modules[p].register_forward_hook(
            lambda _m, _i, o, p=p: seen.__setitem__(p, o.detach().clone().numpy())
        )
        for p in layers
    ]
    try:
        with torch.no_grad():
            x = torch.from_numpy((image - MEAN) / STD)
            logits = model(x).numpy()
    finally:
        for h in handles:
            h.remove()
    return logits, seen


def metadata(path: Path) -> dict[str, str]:
    model = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """name → (torch module, onnx path, ExportResult), exported once per module."""
    cache: dict[str, tuple] = {}
    root = tmp_path_factory.mktemp("tv")

    def get(name: str):
        if name not in cache:
            model, _, _ = build_torchvision(name, "none")
            randomize_bn(model, seed=len(cache))
            result = export_torchvision(
                name, root / f"{name}.onnx", weights="none", module=model
            )
            cache[name] = (model, result.path, result)
        return cache[name]

    return get


@pytest.mark.parametrize("name", list(MODELS))
def test_logits_match_torch_at_native_and_odd_size(exported, name):
    model, path, result = exported(name)
    assert result.dynamic_hw, result.notes
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    assert [o.name for o in session.get_outputs()] == ["logits"]
    shape = session.get_inputs()[0].shape
    assert shape[1] == 3 and shape[0] == "batch" and shape[2:] == ["height", "width"]
    rng = np.random.default_rng(1)
    for size in [(224, 224), (179, 211)]:
        image = rng.random((2, 3, *size), dtype=np.float32)
        (got,) = session.run(["logits"], {"image": image})
        want, _ = torch_forward(model, image)
        assert got.shape == (2, 1000)
        assert rel_err(got, want) < 1e-4, size


@pytest.mark.parametrize("name", list(MODELS))
def test_layer_tensors_exist_and_match_hooks(exported, name):
    model, path, _ = exported(name)
    meta = metadata(path)
    layers = json.loads(meta["onnxdream.layers"])
    graph = onnx.load(str(path)).graph
    produced = {o for n in graph.node for o in n.output}
    assert layers and all(t in produced for t in layers.values())
    paths = [p for p, _ in model.named_modules() if p]
    assert list(layers) == [p for p in paths if p in layers]  # module order
    for layer in MODELS[name]:
        assert layer in layers, layer
    for layer in json.loads(meta["onnxdream.default_layers"]):
        assert layer in layers

    # expose a few layer tensors as outputs and compare with torch hooks
    probe = onnx.load(str(path))
    for layer in MODELS[name]:
        probe.graph.output.append(onnx.ValueInfoProto(name=layers[layer]))
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    image = np.random.default_rng(2).random((1, 3, 179, 211), dtype=np.float32)
    outputs = session.run([layers[p] for p in MODELS[name]], {"image": image})
    _, want = torch_forward(model, image, MODELS[name])
    for layer, got in zip(MODELS[name], outputs):
        assert rel_err(got, want[layer]) < 1e-4, layer


def test_metadata(exported):
    model, path, _ = exported("googlenet")
    meta = metadata(path)
    assert meta["onnxdream.format"] == "1"
    assert meta["onnxdream.name"] == "googlenet"
    assert meta["onnxdream.source"] == "torchvision:googlenet (weights: none)"
    assert meta["onnxdream.license"].startswith("BSD-3-Clause")
    assert meta["onnxdream.input_size"] == "224"
    assert meta["onnxdream.dynamic_hw"] == "1"
    assert json.loads(meta["onnxdream.default_layers"]) == ["inception4c"]
    # the recommended layers: inception modules spread over the middle, the default among them
    assert json.loads(meta["onnxdream.recommended_layers"]) == [
        "inception4a", "inception4b", "inception4c", "inception4d", "inception4e"]
    labels = json.loads(meta["onnxdream.labels"])
    assert len(labels) == 1000 and labels[0] == "tench"
    layers = json.loads(meta["onnxdream.layers"])
    assert "inception4c" in layers and "aux1" not in layers  # pretrained layout: no aux heads
    # the caller's module is left as it was (in-place flags, pools)
    assert model.transform_input is True


def test_module_is_restored_after_export(exported):
    model, _, _ = exported("resnet18")
    assert model.relu.inplace is True
    model, _, _ = exported("alexnet")
    assert isinstance(model.avgpool, torch.nn.AdaptiveAvgPool2d)


@pytest.mark.parametrize("size", [(224, 224), (179, 211), (13, 6), (5, 9), (1, 1)])
def test_dynamic_adaptive_avg_pool_equals_torch(size):
    x = torch.randn(2, 4, *size)
    for out in [(6, 6), 7, (3, 1), (None, 2)]:
        ref = torch.nn.AdaptiveAvgPool2d(out)
        mine = tracing.make_dynamic_adaptive_avg_pool(ref)
        assert torch.allclose(mine(x), ref(x), atol=1e-6), (size, out)


def test_weights_file_round_trip(tmp_path):
    model, _, _ = build_torchvision("resnet18", "none")
    randomize_bn(model, seed=7)
    file = tmp_path / "finetuned.pt"
    wrapped = {f"module.{k}": v for k, v in model.state_dict().items()}  # as DataParallel saves
    torch.save({"epoch": 3, "state_dict": wrapped}, file)
    result = export_torchvision("resnet18", tmp_path / "r18.onnx", weights=str(file))
    assert isinstance(result, ExportResult) and result.dynamic_hw
    out = result.path
    assert out == tmp_path / "r18.onnx" and out.is_file()
    assert metadata(out)["onnxdream.source"] == "torchvision:resnet18 (weights: finetuned.pt)"
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    image = np.random.default_rng(3).random((1, 3, 224, 224), dtype=np.float32)
    (got,) = session.run(["logits"], {"image": image})
    want, _ = torch_forward(model, image)
    assert rel_err(got, want) < 1e-4
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_mnasnet_weights_file_keeps_module_versions(tmp_path, model_home):
    """torch.save(state_dict) keeps each module's version in ``_metadata``, which MNASNet's
    loader needs (it died with "ValueError: version should be set to 1 or 2 instead of None")."""
    model, _, _ = build_torchvision("mnasnet1_0", "none")
    randomize_bn(model, seed=5)
    file, out = tmp_path / "my.pt", tmp_path / "mnasnet.onnx"
    torch.save(model.state_dict(), file)
    proc = run_cli("export", "torchvision", "mnasnet1_0", "--weights", str(file), "-o", str(out),
                   home=model_home, frameworks=True)
    assert "Traceback" not in proc.stderr and "dynamic H/W" in proc.stderr
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    image = np.random.default_rng(6).random((1, 3, 160, 200), dtype=np.float32)
    (got,) = session.run(["logits"], {"image": image})
    want, _ = torch_forward(model, image)
    assert rel_err(got, want) < 1e-4

    # without _metadata (a plain dict) the model's own versions apply; DataParallel's
    # "module." prefix is dropped from the versions' keys too
    want_state = model.state_dict()
    for variant in (dict(want_state), {"state_dict": torch.nn.DataParallel(model).state_dict()}):
        torch.save(variant, file)
        loaded, _, _ = build_torchvision("mnasnet1_0", str(file))
        got_state = loaded.state_dict()
        assert all(torch.equal(got_state[k], v) for k, v in want_state.items())


def test_bad_weights_files(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        export_torchvision("resnet18", tmp_path / "a.onnx", weights=str(tmp_path / "nope.pt"))
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(ModelError, match="could not read 'corrupt.pt'"):
        export_torchvision("resnet18", tmp_path / "a.onnx", weights=str(corrupt))
    other = tmp_path / "squeeze.pt"
    torch.save(torchvision.models.squeezenet1_1().state_dict(), other)
    with pytest.raises(ModelError, match=r"does not fit torchvision's resnet18: \d+ missing key"):
        export_torchvision("resnet18", tmp_path / "a.onnx", weights=str(other))
    wrong_shape = tmp_path / "ten_classes.pt"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), wrong_shape)
    with pytest.raises(ModelError, match=r"fc.weight \[10, 512\]"):
        export_torchvision("resnet18", tmp_path / "a.onnx", weights=str(wrong_shape))
    with pytest.raises(ModelError, match="unknown weights 'IMAGENET9K'"):
        export_torchvision("resnet18", tmp_path / "a.onnx", weights="IMAGENET9K")
    assert not (tmp_path / "a.onnx").exists()


def test_default_weights_without_internet(tmp_path, monkeypatch):
    from torchvision.models._api import WeightsEnum

    def offline(self, *args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(WeightsEnum, "get_state_dict", offline)
    with pytest.raises(OnnxDreamError) as info:
        export_torchvision("googlenet", tmp_path / "g.onnx")
    message = str(info.value)
    assert message == (
        "could not download the pretrained weights for googlenet (no internet?); "
        "pass --weights none or --weights FILE"
    )
    assert not (tmp_path / "g.onnx").exists()


def test_unknown_name_lists_close_matches(tmp_path):
    with pytest.raises(ModelError, match=r"no classification model named 'resnet51'.*resnet50"):
        export_torchvision("resnet51", tmp_path / "x.onnx", weights="none")


def test_missing_torch_is_a_dependency_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(DependencyError, match=r"onnxdream\[torch\]"):
        tracing.import_torch()


def test_vit_exports_with_fixed_size(tmp_path):
    model, _, _ = build_torchvision("vit_b_16", "none")
    result = export_torchvision(
        "vit_b_16", tmp_path / "vit.onnx", weights="none", module=model
    )
    meta = metadata(result.path)
    assert meta["onnxdream.dynamic_hw"] == "0"
    assert meta["onnxdream.input_size"] == "224"
    layers = json.loads(meta["onnxdream.layers"])
    assert "encoder.layers.encoder_layer_6" in layers
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    image = np.random.default_rng(4).random((2, 3, 224, 224), dtype=np.float32)
    (got,) = session.run(["logits"], {"image": image})
    want, _ = torch_forward(model, image)
    assert rel_err(got, want) < 1e-4


def test_large_models_keep_weights_beside_the_file(exported, tmp_path, monkeypatch):
    _, path, _ = exported("squeezenet1_1")
    monkeypatch.setattr(torch_export, "EXTERNAL_DATA_THRESHOLD", 1000)
    out = torch_export.save_atomic(onnx.load(str(path)), tmp_path / "big.onnx")
    assert (tmp_path / "big.onnx.data").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data"]
    image = np.random.default_rng(5).random((1, 3, 64, 80), dtype=np.float32)
    cpu = ["CPUExecutionProvider"]
    a = ort.InferenceSession(str(out), providers=cpu).run(None, {"image": image})
    b = ort.InferenceSession(str(path), providers=cpu).run(None, {"image": image})
    np.testing.assert_array_equal(a[0], b[0])


def _all_models() -> list[str]:
    return list(torchvision.models.list_models(module=torchvision.models))


@pytest.mark.slow
@pytest.mark.timeout(1800)  # the largest (vit_h_14, regnet_y_128gf) take minutes
@pytest.mark.parametrize("name", _all_models())
def test_every_torchvision_model_exports(name, tmp_path):
    """export_module probes onnxruntime against torch itself; here: it succeeds, with metadata."""
    result = export_torchvision(name, tmp_path / f"{name}.onnx", weights="none")
    meta = metadata(result.path)
    assert meta["onnxdream.dynamic_hw"] == ("1" if result.dynamic_hw else "0")
    assert json.loads(meta["onnxdream.default_layers"])[0] in result.layers
    assert len(json.loads(meta["onnxdream.labels"])) == 1000
