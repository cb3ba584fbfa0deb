"""Keras applications that used to export only at a fixed size: Xception and ConvNeXtTiny built
by name with random weights (``onnxdream export keras Xception --weights none``), exported with
dynamic H/W, compiled at late layers and compared with torch autograd through the same Keras
model (Keras 3 on its torch backend, tests/kerascheck.py), as in test_export_keras.py; and a
model whose layers were built for its input size (like NASNet), which keeps that size and says
why.

Keras pads the input of every strided ``padding="same"`` pool in ``edge`` mode, by amounts that
depend on the size, so the dynamic graph carries ``Pad(mode=edge)`` nodes with runtime pads;
the fast test is one Xception entry block built from the same layers, the whole network is
``slow``.
"""

from __future__ import annotations

import time

import numpy as np
import onnx  # noqa: E402
import pytest

from gradcheck import onnx_decisions, relative_error, session
from kerascheck import keras, keras_gradient, keras_shared_decisions, randomise_batchnorm, torch
from onnxdream.exporters.graph import compile_gradient  # noqa: E402
from onnxdream.exporters.keras import export_keras, load_keras  # noqa: E402


def check(km, tmp_path, checks, size, export_size, preprocess="tf", edge_pads=True):
    """Export ``km``, then for each (layers, objective) compare the compiled gradient."""
    t0 = time.perf_counter()
    result = export_keras(km, tmp_path / f"{km.name}.onnx", input_size=export_size)
    assert result.dynamic_hw, result.notes
    proto = onnx.load(str(result.path))
    pads = {a.s.decode() for n in proto.graph.node if n.op_type == "Pad"
            for a in n.attribute if a.name == "mode"}
    assert ("edge" in pads) == edge_pads, pads
    x = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(1))
    report = []
    for specs, objective in checks:
        grad_model = compile_gradient(proto, specs, objective)
        got_obj, got_grad = session(grad_model).run(None, {"image": x.numpy()})
        with keras_shared_decisions(onnx_decisions(grad_model, x.numpy())):
            want_obj, want_grad = keras_gradient(km.model, preprocess, specs, objective, 0, x)
        np.testing.assert_allclose(got_obj, want_obj, rtol=1e-4, atol=1e-6)
        err = relative_error(got_grad, want_grad)
        report.append(f"{'+'.join(specs)} {objective}: {err:.2e}")
        assert err <= 1e-4, f"{specs} {objective}: relative error {err:.2e}"
    print(f"{km.name}: {time.perf_counter() - t0:.1f}s; " + "; ".join(report))
    return result


def entry_block():
    """Xception's entry flow in miniature: strided Conv, SeparableConvs, same-padded MaxPool
    (an edge Pad), the strided 1x1 residual, BN and ReLU."""
    layers = keras.layers
    keras.utils.set_random_seed(0)
    inp = keras.Input((None, None, 3))
    x = layers.Conv2D(8, 3, strides=2, use_bias=False, name="block1_conv1")(inp)
    x = layers.BatchNormalization(name="block1_conv1_bn")(x)
    x = layers.Activation("relu", name="block1_conv1_act")(x)
    residual = layers.Conv2D(16, 1, strides=2, padding="same", use_bias=False)(x)
    residual = layers.BatchNormalization()(residual)
    x = layers.SeparableConv2D(16, 3, padding="same", use_bias=False, name="block2_sepconv1")(x)
    x = layers.BatchNormalization(name="block2_sepconv1_bn")(x)
    x = layers.Activation("relu", name="block2_sepconv2_act")(x)
    x = layers.SeparableConv2D(16, 3, padding="same", use_bias=False, name="block2_sepconv2")(x)
    x = layers.BatchNormalization(name="block2_sepconv2_bn")(x)
    x = layers.MaxPooling2D(3, strides=2, padding="same", name="block2_pool")(x)
    x = layers.add([x, residual], name="add")
    x = layers.SeparableConv2D(24, 3, padding="same", use_bias=False, name="block3_sepconv1")(x)
    x = layers.BatchNormalization(name="block3_sepconv1_bn")(x)
    return keras.Model(inp, x, name="xception_entry")


def test_xception_entry_block(tmp_path):
    from onnxdream.exporters.keras import KerasModel

    net = entry_block()
    randomise_batchnorm(net)
    km = KerasModel(net, "xception_entry", "tf", "test", "test", 64, True, True, None,
                    ["add"], [])
    check(km, tmp_path, [(["block3_sepconv1_bn"], "l2"), (["add", "block2_sepconv2_bn:0.5"],
                                                          "mean")], (45, 52), 64)


@pytest.mark.slow
def test_whole_xception(tmp_path):
    km = load_keras("Xception", weights="none")
    randomise_batchnorm(km.model)
    check(km, tmp_path, [(["block4_sepconv2_bn"], "l2"), (["block13_sepconv2_bn"], "l2"),
                         (["block8_sepconv3_act:2", "block12_sepconv1_act"], "mean")],
          (96, 109), 96)


def test_convnext_tiny(tmp_path):
    """LayerNormalization, depthwise 7x7, Dense, GELU, LayerScale; at dynamic H/W."""
    km = load_keras("ConvNeXtTiny", weights="none")
    rng = np.random.default_rng(0)
    for layer in km.model.layers:  # LayerScale starts at 1e-6: make the blocks count
        if type(layer).__name__ == "LayerScale" or isinstance(
                layer, keras.layers.LayerNormalization):
            for v in layer.weights:
                v.assign(rng.uniform(0.5, 1.5, v.shape).astype("float32"))
    check(km, tmp_path, [(["convnext_tiny_stage_1_block_2_layer_scale"], "l2")], (75, 86), 64,
          preprocess="none", edge_pads=False)


def test_layers_built_for_their_size_keep_it_and_say_why(tmp_path):
    """NASNet pads its reduction cells by the parity of the size it was built for: a dynamic
    clone runs only at some sizes. Built here in miniature (ZeroPadding2D from the build size's
    parity, as keras.applications' correct_pad does), saved and exported from the file."""
    from onnxdream.exporters.keras import make_dynamic

    layers = keras.layers
    inp = keras.Input((32, 32, 3))
    a = layers.Conv2D(4, 3, strides=2)(layers.ZeroPadding2D(((0, 1), (0, 1)))(inp))  # n // 2
    b = layers.Conv2D(4, 1, strides=2)(inp)  # (n + 1) // 2
    net = keras.Model(inp, layers.add([a, b]), name="parity")
    _, dynamic, note = make_dynamic(net)
    assert not dynamic
    assert "keeps its fixed 32×32 input" in note and "fail at 27×31" in note, note
    path = tmp_path / "parity.keras"
    net.save(path)
    messages = []
    result = export_keras(path, tmp_path / "parity.onnx", preprocess="unit",
                                 progress=messages.append)
    assert not result.dynamic_hw
    assert any("keeps its fixed 32×32 input" in m for m in messages), messages
