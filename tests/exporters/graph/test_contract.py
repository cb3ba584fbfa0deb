"""The dreamable-model contract: metadata written and read back, objective parameters at run time.

The parameters (``weights``, ``channel_weights``, spatial ones such as the reserved ``mask``)
are graph inputs with same-named defaults: a caller overrides them, the optimiser never folds
them, the tiler cuts spatial ones per tile and the step graphs roll them with the image.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from helpers import tiny_classifier
from onnxdream.core.errors import LayerError, ModelError
from onnxdream.exporters.graph import compile_gradient
from onnxdream.exporters.graph.builder import GraphBuilder
from onnxdream.exporters.graph.contract import (
    CHANNEL_WEIGHTS,
    INPUT_HW_KEY,
    LABELS_KEY,
    MASK,
    WEIGHTS,
    ModelInfo,
    graph_params,
    param_input,
    write_metadata,
)
from onnxdream.exporters.graph.objective import channel, l2, mean, weighted_channels
from onnxdream.runtime.session import create_session


def tiny(with_metadata: bool = True) -> onnx.ModelProto:
    """image → Conv → Relu → GlobalAveragePool → Flatten → MatMul → logits."""
    model = tiny_classifier()
    if with_metadata:
        write_metadata(model, name="tiny", layers={"conv": "conv", "act": "act"},
                       default_layers=["act"], input_size=(96, 128), dynamic_hw=True,
                       labels=list("abcde"), layouts={"conv": "NCHW"}, source="a test",
                       license="MIT")
    return model


def run(graph: onnx.ModelProto, x: np.ndarray, **params) -> tuple[np.ndarray, np.ndarray]:
    sess = create_session(graph.SerializeToString(), device="cpu", threads=1)
    return tuple(sess.run(["objective", "grad"], {"image": x, **params}))


def _x(n=2, h=11, w=13) -> np.ndarray:
    return np.random.default_rng(1).random((n, 3, h, w), dtype=np.float32)


# -- metadata ---------------------------------------------------------------------------------


def test_metadata_written_is_read_back():
    info = ModelInfo.load(tiny())
    assert info.name == "tiny" and info.source == "a test" and info.license == "MIT"
    assert info.layers == {"conv": "conv", "act": "act", "logits": "logits"}
    assert info.default_layers == ["act"] and info.require_default_layers() == ["act"]
    assert info.labels == list("abcde")
    assert info.native_size == (96, 128) and info.metadata[INPUT_HW_KEY] == "96x128"
    assert info.dynamic_hw and info.has_logits
    assert info.layout("conv") == "NCHW" and info.layout("act") == "NCHW"
    assert list(info.metadata)[:2] == ["onnxdream.format", "onnxdream.name"]


def test_a_model_without_metadata_still_has_layers():
    info = ModelInfo.load(tiny(with_metadata=False))
    assert {"conv", "act", "logits"} <= set(info.layers)
    assert info.labels is None and info.native_size == (224, 224) and info.dynamic_hw
    with pytest.raises(LayerError, match="names no default layer"):
        info.require_default_layers()


def test_logits_are_checked_in_one_place():
    model = tiny()
    model.graph.output[0].name = "features"
    model.graph.node[-1].output[0] = "features"
    info = ModelInfo.load(model)
    assert not info.has_logits
    with pytest.raises(ModelError, match="tiny has no 'logits' output, so it cannot classify "
                                         r"\(outputs: features\)"):
        info.require_logits("it cannot classify")
    with pytest.raises(ModelError, match="class objectives do not apply"):
        compile_gradient(model, [], "class:1")


def test_bad_metadata_json_names_the_key():
    model = tiny()
    for p in model.metadata_props:
        if p.key == LABELS_KEY:
            p.value = "[not json"
    with pytest.raises(ModelError, match=LABELS_KEY):
        ModelInfo.load(model)


def test_zoo_model_follows_the_contract(model_home):
    from onnxdream.runtime.opening import resolve_model_path

    info = ModelInfo.load(resolve_model_path("efficientnet-lite0"))
    assert info.name == "efficientnet-lite0" and info.has_logits and info.dynamic_hw
    assert info.native_size == (224, 224) and len(info.labels) == 1000
    assert list(info.layers)[:2] == ["stem", "blocks.0"] and info.default_layers
    assert info.metadata["onnxdream.builder_version"]


# -- the weights input ------------------------------------------------------------------------


def test_term_weights_are_a_runtime_input():
    """One compiled graph serves every weighting: feeding weights equals compiling them in."""
    plain = compile_gradient(tiny(), mean("conv") + l2("act"))
    weighted = compile_gradient(tiny(), 0.5 * mean("conv") + 3.0 * l2("act"))
    p = graph_params(plain)[WEIGHTS]
    assert p.shape == (2,) and not p.spatial and p.default.tolist() == [1.0, 1.0]
    assert graph_params(weighted)[WEIGHTS].default.tolist() == [0.5, 3.0]
    x = _x()
    want = run(weighted, x)
    got = run(plain, x, weights=np.array([0.5, 3.0], np.float32))
    for a, b in zip(got, want):
        assert np.array_equal(a, b)  # the same float operations, bit for bit
    # nothing folded the default away (the optimiser treats graph inputs as variables)
    o1, g1 = run(plain, x)
    o2, g2 = run(plain, x, weights=np.array([2.0, 2.0], np.float32))
    np.testing.assert_allclose(o2, 2 * o1, rtol=1e-6)
    np.testing.assert_allclose(g2, 2 * g1, rtol=1e-6)


def test_gradient_models_share_one_compiled_graph(model_home):
    from onnxdream.runtime.gradient import GradientModel
    from onnxdream.runtime.graph_cache import CompiledCache

    def cached():
        return {p.name for p in CompiledCache().directory.glob("efficientnet-lite0-*.onnx")}

    a = GradientModel("efficientnet-lite0", ["blocks.2:2"], device="cpu", threads=1)
    before = cached()
    b = GradientModel("efficientnet-lite0", ["blocks.2:0.5"], device="cpu", threads=1)
    assert cached() == before  # the weights are not part of the cache key
    assert a.params[WEIGHTS].tolist() == [2.0] and b.params[WEIGHTS].tolist() == [0.5]
    x = _x(1, 64, 48)
    (oa, ga), (ob, gb) = a(x), b(x)
    np.testing.assert_allclose(oa, 4 * ob, rtol=1e-6)
    np.testing.assert_allclose(ga, 4 * gb, rtol=1e-6, atol=1e-12)


def test_weighted_channels_is_the_compilers_term():
    graph = compile_gradient(tiny(), weighted_channels("act"))
    p = graph_params(graph)[CHANNEL_WEIGHTS]
    assert p.shape == ("batch", 4, 1, 1) and np.allclose(p.default, 0.25)
    x = _x(n=4)
    rows = np.eye(4, dtype=np.float32).reshape(4, 4, 1, 1)
    obj, grad = run(graph, x, channel_weights=rows)
    for k in range(4):
        want_o, want_g = run(compile_gradient(tiny(), channel("act", k)), x[k:k + 1])
        np.testing.assert_allclose(obj[k], want_o[0], rtol=1e-5)
        np.testing.assert_allclose(grad[k], want_g[0], rtol=1e-4, atol=1e-7)
    # the default is the layer mean
    np.testing.assert_allclose(run(graph, x)[0], run(compile_gradient(tiny(), ["act"]), x)[0],
                               rtol=1e-5)
    with pytest.raises(Exception, match="at most one weighted_channels"):
        compile_gradient(tiny(), weighted_channels("act") + weighted_channels("conv"))


# -- spatial parameters -----------------------------------------------------------------------


def masked_graph() -> onnx.ModelProto:
    """A hand-made 'compiled' graph with a spatial parameter: objective = mean(mask * x^2) / 2
    per image, so grad = mask * x / (3 H W)."""
    b = GraphBuilder(prefix="t")
    sq = b.mul(b.mul("image", "image"), MASK)
    b.op("Mul", [b.reduce_mean(b.op("Flatten", [sq], axis=1), [1], keepdims=0), b.scalar(0.5)],
         out="objective")
    count = b.cast(b.op("ReduceProd", [b.slice(b.shape("image"), [1], [4], [0])], keepdims=0),
                   onnx.TensorProto.FLOAT)
    b.op("Div", [b.mul("image", MASK), count], out="grad")
    image = helper.make_tensor_value_info("image", onnx.TensorProto.FLOAT,
                                          ["batch", 3, "height", "width"])
    vi, default = param_input(MASK, np.ones((1, 1, 1, 1), np.float32), ["n", 1, "h", "w"])
    graph = helper.make_graph(
        b.nodes, "masked", [image, vi],
        [helper.make_tensor_value_info("objective", onnx.TensorProto.FLOAT, ["batch"]),
         helper.make_tensor_value_info("grad", onnx.TensorProto.FLOAT,
                                       ["batch", 3, "height", "width"])],
        b.initializers + [default])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_tiles_cut_spatial_parameters_like_the_image():
    from onnxdream.runtime.gradient import GradientModel, TileInfo

    h, w = 70, 90
    img = np.random.default_rng(3).random((3, h, w), dtype=np.float32)
    mask = np.random.default_rng(4).random((1, 1, h, w), dtype=np.float32)
    assert graph_params(masked_graph())[MASK].spatial
    gm = GradientModel.__new__(GradientModel)
    gm.session = create_session(masked_graph().SerializeToString(), device="cpu", threads=1)
    gm.params, gm.border, gm.info = {MASK: mask}, 0, ModelInfo.load(masked_graph())
    gm.objective, gm.tile_info = mean("any"), TileInfo(1, 1)
    want = mask[0] * img / (3 * h * w)
    for shift in [(0, 0), (5, -7), (33, 41)]:
        _, untiled = gm.gradient(img, 0, shift)
        _, tiled = gm.gradient(img, 32, shift)
        np.testing.assert_allclose(untiled, want, rtol=1e-6)
        np.testing.assert_allclose(tiled, want, rtol=1e-5)


@pytest.mark.parametrize("static", [False, True])
def test_step_graphs_roll_spatial_parameters_with_the_image(static):
    from onnxdream.runtime.device_loop import DeviceAscent

    h, w, step = 20, 24, 0.01
    img = np.random.default_rng(5).random((3, h, w), dtype=np.float32)
    mask = np.random.default_rng(6).random((1, 1, h, w), dtype=np.float32)
    dev = DeviceAscent(masked_graph(), device="cpu", threads=1, static_shapes=static,
                       params={MASK: mask})
    got = dev.run(img.copy(), 1, step, iter([(3, -5)]))
    g = mask[0] * img / (3 * h * w)  # rolled, masked, unrolled: the mask stays on its pixels
    want = np.clip(img + step * g / (np.abs(g).mean() + 1e-8), 0, 1)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # without params the graph's default (ones) is fed
    plain = DeviceAscent(masked_graph(), device="cpu", threads=1, static_shapes=static)
    g1 = img / (3 * h * w)
    np.testing.assert_allclose(plain.run(img.copy(), 1, step, iter([(3, -5)])),
                               np.clip(img + step * g1 / (np.abs(g1).mean() + 1e-8), 0, 1),
                               rtol=1e-5, atol=1e-6)
