"""Keras 3 models (torch backend) → dreamable models: export, metadata, gradient parity.

Every model is built with random weights (no downloads), its BatchNormalization statistics made
non-trivial, saved with ``model.save`` into tmp_path and exported *from the file*, so the path a
user takes (``onnxdream export keras model.keras --preprocess …``) is the one tested. The
compiled gradient is compared with torch autograd through the same in-memory Keras model (Keras
calls torch ops under the torch backend), with the preprocessing written independently here.

Discrete decisions (ReLU masks, MaxPool argmax, Clip/ReLU6 ranges) are shared between
onnxruntime and torch as in ``gradcheck.shared_decisions``: Keras' ops reach torch through
``torch.nn.functional`` (``F.relu`` → ``torch.relu``, ``F.max_pool2d``, ``F.relu6``), and the
exported graph does the same ops in the same order, so onnxruntime's choices can be handed to the
torch forward. Without it a unit whose pre-activation is within float32 rounding of a kink (BN is
a separate Sub/Mul/Add chain in Keras' graph and onnxruntime fuses and reorders it) can flip and
move the gradient by ~1e-4 of its maximum over its receptive field; with it the comparison is
about the gradient rules, and autograd still differentiates everything else.
"""

from __future__ import annotations

import contextlib
import json
import os
import time

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "torch")
keras = pytest.importorskip("keras")
torch = pytest.importorskip("torch")
if keras.backend.backend() != "torch":  # pragma: no cover
    pytest.skip("these tests need KERAS_BACKEND=torch", allow_module_level=True)

import onnx  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from gradcheck import onnx_decisions, relative_error, session, shared_decisions  # noqa: E402
from onnxdream.core.errors import ModelError  # noqa: E402
from onnxdream.exporters import export_keras  # noqa: E402
from onnxdream.exporters.graph import compile_gradient  # noqa: E402

CAFFE_MEAN_BGR = torch.tensor([103.939, 116.779, 123.68]).view(1, 3, 1, 1)
REFERENCE_PREPROCESS = {  # written independently of the exporter's graph version
    "tf": lambda x: x / 0.5 - 1.0,
    "caffe": lambda x: x[:, [2, 1, 0]] * 255.0 - CAFFE_MEAN_BGR,
    "none": lambda x: x * 255.0,
}

# (application, preprocessing, export size, [(layers, objective, border)], image size)
CASES = [
    ("InceptionV3", "tf", 107, [(["mixed4"], "l2", 0),
                                (["mixed4:2.0", "mixed5:1.5"], "l2", 2)], (163, 197)),
    ("VGG16", "caffe", 96, [(["block4_conv3"], "channel:7", 0),
                            (["block4_conv3"], "l2", 1)], (163, 197)),
    ("MobileNetV3Small", "none", 96, [(["expanded_conv_7_add"], "l2", 0)], (163, 197)),
    ("EfficientNetB0", "none", 96, [(["block5c_add"], "mean", 0)], (163, 197)),
    ("ResNet50V2", "tf", 96, [(["conv4_block6_out"], "l2", 1)], (163, 197)),
]


def random_keras_model(name: str):
    """keras.applications ``name`` with random weights and non-trivial BN statistics."""
    keras.utils.set_random_seed(0)
    model = getattr(keras.applications, name)(weights=None, include_top=False,
                                               input_shape=(None, None, 3))
    randomise_batchnorm(model)
    return model


def randomise_batchnorm(model, seed=0):
    """Non-trivial BatchNorm statistics and affines (the default ones make BN an identity)."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            for v in layer.weights:
                kind = v.path.rsplit("/", 1)[-1]
                low, high = {"gamma": (0.5, 1.5), "beta": (-0.5, 0.5),
                             "moving_mean": (-0.5, 0.5), "moving_variance": (0.5, 2.0)}[kind]
                v.assign(rng.uniform(low, high, v.shape).astype("float32"))


@contextlib.contextmanager
def keras_shared_decisions(decisions):
    """gradcheck.shared_decisions, plus ``F.relu6`` (Keras' ReLU6 → ONNX Clip(0, 6))."""
    original_relu6 = F.relu6

    def relu6(inp, inplace=False):
        return F.hardtanh(inp, 0.0, 6.0)

    F.relu6 = relu6
    try:
        with shared_decisions(decisions):
            yield
    finally:
        F.relu6 = original_relu6


def torch_term(out: torch.Tensor, objective: str, border: int) -> torch.Tensor:
    """The objective on an NHWC layer output, as the compiler defines it."""
    if border:
        out = out[:, border:-border, border:-border, :]
    if objective == "l2":
        return (out * out).flatten(1).mean(1)
    if objective == "mean":
        return out.flatten(1).mean(1)
    kind, k = objective.split(":")
    assert kind == "channel"
    return out[..., int(k)].flatten(1).mean(1)


def keras_gradient(model, preprocess, specs, objective, border, x):
    """(objective [N], d objective / d x) by autograd through the Keras model."""
    terms = [(s.split(":")[0], float(s.split(":")[1]) if ":" in s else 1.0) for s in specs]
    captured = {}
    handles = [model.get_layer(name).register_forward_hook(
        lambda _m, _i, out, name=name: captured.__setitem__(name, out)) for name, _ in terms]
    try:
        x = x.clone().requires_grad_(True)
        model(REFERENCE_PREPROCESS[preprocess](x).permute(0, 2, 3, 1), training=False)
        obj = sum(w * torch_term(captured[name], objective, border) for name, w in terms)
        obj.sum().backward()
    finally:
        for h in handles:
            h.remove()
    return obj.detach().numpy(), x.grad.numpy()


@pytest.mark.timeout(600)  # 35-120 s each on 2 busy cores: exporting Keras traces every op
@pytest.mark.parametrize("name,preprocess,export_size,checks,size", CASES,
                         ids=[c[0] for c in CASES])
def test_gradient_equals_keras_autograd(tmp_path, name, preprocess, export_size, checks, size):
    t0 = time.perf_counter()
    model = random_keras_model(name)
    path = tmp_path / f"{name}.keras"
    model.save(path)
    result = export_keras(path, tmp_path / f"{name}.onnx", preprocess=preprocess,
                          input_size=export_size)
    assert result.dynamic_hw, result.notes
    proto = onnx.load(str(result.path))
    meta = {p.key: p.value for p in proto.metadata_props}
    layouts = json.loads(meta["onnxdream.layer_layouts"])
    t_export = time.perf_counter() - t0
    x = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(1))
    report = []
    for specs, objective, border in checks:
        assert all(layouts[s.split(":")[0]] == "NHWC" for s in specs)
        grad_model = compile_gradient(proto, specs, objective, border=border)
        sess = session(grad_model)
        got_obj, got_grad = sess.run(None, {"image": x.numpy()})
        with keras_shared_decisions(onnx_decisions(grad_model, x.numpy())):
            want_obj, want_grad = keras_gradient(model, preprocess, specs, objective, border, x)
        np.testing.assert_allclose(got_obj, want_obj, rtol=1e-4, atol=1e-6)
        err = relative_error(got_grad, want_grad)
        report.append(f"{'+'.join(specs)} {objective} border {border}: {err:.2e}")
        assert err <= 1e-4, f"{name} {specs} {objective}: relative error {err:.2e}"
    print(f"{name}: export {t_export:.1f}s, total {time.perf_counter() - t0:.1f}s; "
          + "; ".join(report))


def test_file_needs_preprocessing(tmp_path):
    model = keras.Sequential([keras.Input((None, None, 3)), keras.layers.Conv2D(4, 3)])
    path = tmp_path / "tiny.keras"
    model.save(path)
    with pytest.raises(ModelError, match="--preprocess"):
        export_keras(path, tmp_path / "tiny.onnx")


def test_unknown_application_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match="InceptionV3"):
        export_keras("InceptionV4", tmp_path / "x.onnx", weights="none")
