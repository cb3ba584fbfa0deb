"""`onnxdream.exporters.export_module`: a user's own nn.Module → dreamable model; the public
surface of `onnxdream.exporters`; one-line errors for whatever goes wrong during an export.

Random weights throughout; the networks are tiny, so each test takes a second or two.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from helpers import REPO, photo, run_cli  # noqa: E402
from onnxdream.core.errors import ModelError  # noqa: E402
from onnxdream.exporters import ExportError, ExportResult, export_module  # noqa: E402

MEAN = np.array([0.485, 0.456, 0.406], np.float32).reshape(1, 3, 1, 1)
STD = np.array([0.229, 0.224, 0.225], np.float32).reshape(1, 3, 1, 1)


class Net(torch.nn.Module):
    """conv → BN → ReLU, a strided conv block, global pool, linear head over 3 classes."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        nn = torch.nn
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(True))
        self.block = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(16, 3)
        bn = self.stem[1]
        bn.running_mean.copy_(torch.randn(8, generator=g) * 0.2)
        bn.running_var.copy_(torch.rand(8, generator=g) + 0.5)

    def forward(self, x):
        return self.head(self.pool(self.block(self.stem(x))).flatten(1))


def metadata(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def test_import_needs_no_framework():
    code = ("import sys\nimport onnxdream.exporters as e, onnxdream.exporters.graph\n"
            "assert 'torch' not in sys.modules and 'keras' not in sys.modules, 'imported'\n"
            "print(sorted(e.__all__))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert "'export_module'" in out and "'ExportResult'" in out


def test_export_module_matches_torch_with_names_labels_and_preprocessing(tmp_path):
    net = Net().eval()
    result = export_module(net, tmp_path / "net.onnx", preprocess="torch", name="net",
                           layers=["block", "stem.2", "stem"], labels=["a", "b", "c"],
                           default_layers=["block"], input_size=(32, 40))
    assert isinstance(result, ExportResult) and result.dynamic_hw, result.notes
    assert Path(result) == result.path == tmp_path / "net.onnx"  # path-like
    assert list(result.layers) == ["stem", "stem.2", "block"]  # module order
    assert result.default_layers == ["block"]
    meta = metadata(result.path)
    assert json.loads(meta["onnxdream.labels"]) == ["a", "b", "c"]
    assert json.loads(meta["onnxdream.default_layers"]) == ["block"]
    assert meta["onnxdream.input_size"] == "40" and meta["onnxdream.input_hw"] == "32x40"
    assert meta["onnxdream.preprocess"].startswith("torch: ")
    assert net.stem[2].inplace is True  # the caller's module is left as it was

    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    for shape in [(1, 3, 32, 40), (2, 3, 53, 29)]:
        image = np.random.default_rng(0).random(shape, dtype=np.float32)
        (got,) = session.run(["logits"], {"image": image})
        with torch.no_grad():
            want = net(torch.from_numpy((image - MEAN) / STD)).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_export_module_defaults_and_a_callable_preprocess(tmp_path):
    result = export_module(Net(), tmp_path / "n.onnx", preprocess=lambda x: x * 2 - 1,
                           input_size=24)
    assert {"stem", "stem.0", "block.1", "head"} <= set(result.layers)
    assert result.default_layers and result.default_layers[0] in result.layers
    meta = metadata(result.path)
    assert meta["onnxdream.name"] == "Net" and "onnxdream.labels" not in meta


def test_recommended_layers_spread_over_the_middle(tmp_path):
    """Blocks of a sequential stage count one by one; vectors and pools are never chosen; the
    default layer is among them; a given list is kept (checked against the layers)."""
    nn = torch.nn

    def block(c_in, c_out, stride=1):
        return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1), nn.ReLU())

    class Deep(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = block(3, 8, 2)
            self.stage1 = nn.Sequential(*[block(8, 8) for _ in range(4)])
            self.stage2 = nn.Sequential(block(8, 16, 2), *[block(16, 16) for _ in range(3)])
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.head = nn.Linear(16, 4)

        def forward(self, x):
            return self.head(self.pool(self.stage2(self.stage1(self.stem(x)))).flatten(1))

    result = export_module(Deep(), tmp_path / "d.onnx", input_size=32)
    # nine blocks (stem, 4 + 4) of weight 1: 30, 45, 60 and 75% of them, then the default
    assert result.default_layers == ["stage2"]
    assert result.recommended_layers == ["stage1.1", "stage1.3", "stage2.0", "stage2.1", "stage2"]
    meta = metadata(result.path)
    assert json.loads(meta["onnxdream.recommended_layers"]) == result.recommended_layers
    result = export_module(Deep(), tmp_path / "e.onnx", input_size=32, default_layers=["stem"],
                           recommended_layers=["stem", "stage2"])
    assert result.recommended_layers == ["stem", "stage2"]
    with pytest.raises(ModelError, match="recommended layer 'stage9'"):
        export_module(Deep(), tmp_path / "f.onnx", recommended_layers=["stage9"])


def test_recommend_layers_rule():
    from onnxdream.exporters.graph.layers import recommend_layers

    names = [f"b{i}" for i in range(10)]
    assert recommend_layers(names) == ["b2", "b4", "b5", "b7"]  # 30, 45, 60, 75% of ten
    assert recommend_layers(names, ["b9"]) == ["b2", "b4", "b5", "b7", "b9"]
    # weights: a heavy block counts for more depth; an unweighted layer after one is preferred
    assert recommend_layers(["a", "act", "b", "c"], weights=[1, 0, 8, 1],
                            depths=(0.1, 0.5)) == ["act", "b"]
    assert recommend_layers([], ["x"]) == ["x"]
    # order places defaults that are not candidates
    assert recommend_layers(["s.0", "s.1"], ["s"], order=["s.0", "s.1", "s"],
                            depths=(0.5,)) == ["s.0", "s"]


def test_export_module_argument_errors(tmp_path):
    out = tmp_path / "x.onnx"
    with pytest.raises(ModelError, match=r"no submodule 'blok'.*did you mean block"):
        export_module(Net(), out, layers=["blok"])
    with pytest.raises(ModelError, match=r"default layer 'head' is not one of Net's layers"):
        export_module(Net(), out, layers=["block"], default_layers=["head"])
    with pytest.raises(ModelError, match=r"2 labels for Net, but it outputs 3 logits"):
        export_module(Net(), out, labels=["a", "b"], input_size=16)
    with pytest.raises(ModelError, match=r"unknown preprocessing 'imagenet'"):
        export_module(Net(), out, preprocess="imagenet")
    with pytest.raises(ModelError, match=r"input_size must be"):
        export_module(Net(), out, input_size=(0, 10))
    with pytest.raises(ModelError, match=r"takes a torch.nn.Module, not a str"):
        export_module("resnet18", out)
    assert not out.exists()


def test_unexpected_exception_is_one_line_naming_the_model(tmp_path):
    class Broken(Net):
        def forward(self, x):
            raise ValueError("version should be set\nsecond line of detail")

    with pytest.raises(ExportError) as info:
        export_module(Broken(), tmp_path / "b.onnx", name="broken-net")
    assert str(info.value) == ("could not export broken-net: ValueError: version should be "
                               "set")
    assert info.value.model == "broken-net" and isinstance(info.value, ModelError)
    assert isinstance(info.value.__cause__, ValueError)
    assert not list(tmp_path.iterdir())


def test_unexpected_exception_in_the_cli_is_a_one_line_error(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from onnxdream.cli.main import app
    from onnxdream.exporters import torchvision as tv_export

    def broken(*args, **kwargs):
        raise RuntimeError("something deep inside torch\nwith a long trace")

    monkeypatch.setattr(tv_export, "build_torchvision", broken)
    result = CliRunner().invoke(app, ["export", "torchvision", "resnet18", "-o",
                                      str(tmp_path / "r.onnx")])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines == ["error: could not export resnet18: RuntimeError: something deep inside "
                     "torch"]


def test_the_example_script_exports_a_model_that_dreams(tmp_path, model_home):
    out = tmp_path / "my_net.onnx"
    subprocess.run([sys.executable, str(REPO / "examples" / "export_my_module.py"), str(out)],
                   check=True, capture_output=True, timeout=120)
    assert json.loads(metadata(out)["onnxdream.default_layers"]) == ["block2"]
    dream = tmp_path / "dream.png"
    run_cli("dream", str(photo("chelsea.png")), "--model", str(out), "-o", str(dream),
            "--steps", "2", "--octaves", "1", home=model_home)
    assert dream.is_file()
