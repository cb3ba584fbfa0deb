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

import json
import time

import numpy as np
import onnx
import pytest

from gradcheck import onnx_decisions, relative_error, session
from kerascheck import keras, keras_gradient, keras_shared_decisions, random_keras_model, torch
from onnxdream.core.errors import ModelError
from onnxdream.exporters import export_keras
from onnxdream.exporters.graph import compile_gradient

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
