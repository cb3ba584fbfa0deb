"""The Resize gradient rule against torch autograd.

Two kinds of reference: torch's own ``F.interpolate`` through its ONNX export (nearest,
bilinear with and without align_corners, bicubic; scale factors, fixed sizes and sizes read
off another tensor at run time), and, for the modes torch does not export, an independent
torch transcription of the ONNX spec (per axis: the original coordinate in float32 as the
spec writes it, then a gather — autograd differentiates the gathers and the weights).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import helper, numpy_helper

from gradcheck import Lambda, compare, relative_error, session
from onnxdream.core.errors import UnsupportedOpError
from onnxdream.exporters.graph import compile_gradient

SIZES = [(9, 11), (8, 6)]
TOL = 1e-4


def conv(cin, cout, k=3, **kw):
    c = nn.Conv2d(cin, cout, k, **kw)
    with torch.no_grad():
        c.weight.normal_(0, 0.5)
    return c


torch.manual_seed(0)
TORCH_CASES = {
    "nearest_x2": Lambda(lambda x: F.interpolate(x, scale_factor=2, mode="nearest")),
    "nearest_x3_down": Lambda(lambda x: F.interpolate(x, scale_factor=(1 / 3, 0.5),
                                                      mode="nearest")),
    "nearest_size": Lambda(lambda x: F.interpolate(x, size=(13, 7), mode="nearest")),
    "bilinear_x2": Lambda(lambda x: F.interpolate(x, scale_factor=2, mode="bilinear")),
    "bilinear_x1.7": Lambda(lambda x: F.interpolate(x, scale_factor=(1.7, 2.4), mode="bilinear")),
    "bilinear_down": Lambda(lambda x: F.interpolate(x, scale_factor=0.6, mode="bilinear")),
    "bilinear_align_corners": Lambda(
        lambda x: F.interpolate(x, scale_factor=2.5, mode="bilinear", align_corners=True)),
    "bilinear_size": Lambda(lambda x: F.interpolate(x, size=(5, 17), mode="bilinear")),
    "bicubic_x2": Lambda(lambda x: F.interpolate(x, scale_factor=2, mode="bicubic")),
    "bicubic_align_corners": Lambda(
        lambda x: F.interpolate(x, size=(12, 5), mode="bicubic", align_corners=True)),
    # a feature pyramid's top-down path: the coarse map resized to the fine one's runtime size
    "fpn_size_of_other_tensor": Lambda(
        lambda x, a, b: a(x) + F.interpolate(b(x), size=a(x).shape[2:], mode="nearest"),
        conv(3, 4, 3, padding=1), conv(3, 4, 3, stride=2, padding=1)),
    "fpn_bilinear": Lambda(
        lambda x, a, b: torch.relu(a(x)) * F.interpolate(b(x), size=a(x).shape[2:],
                                                          mode="bilinear"),
        conv(3, 4, 3, padding=1), conv(3, 4, 3, stride=2)),
}


@pytest.mark.parametrize("name", sorted(TORCH_CASES))
def test_resize_matches_autograd(name):
    err = compare(TORCH_CASES[name], SIZES)
    assert err < TOL, f"{name}: relative error {err:.2e}"


# -- native ONNX Resize against the spec --------------------------------------------------------


def original_coordinate(ctm: str, n_in: int, n_out: int, scale: np.float32) -> np.ndarray:
    """x_original for every output index, in float32 as onnxruntime computes it."""
    j = np.arange(n_out, dtype=np.float32)
    f = np.float32
    if ctm == "half_pixel":
        return (j + f(0.5)) / scale - f(0.5)
    if ctm == "pytorch_half_pixel":
        return (j + f(0.5)) / scale - f(0.5) if n_out > 1 else np.zeros(n_out, np.float32)
    if ctm == "asymmetric":
        return j / scale
    if ctm == "align_corners":
        return (j * f(n_in - 1) / f(n_out - 1)) if n_out > 1 else np.zeros(n_out, np.float32)
    if ctm == "half_pixel_symmetric":
        adjustment = f(n_out) / (scale * f(n_in))
        center = f(n_in) / f(2)
        offset = center * (f(1) - adjustment)
        return offset + (j + f(0.5)) / scale - f(0.5)
    raise ValueError(ctm)


def nearest_index(x: np.ndarray, mode: str, n_in: int) -> np.ndarray:
    frac = x - np.floor(x)
    if mode == "round_prefer_floor":
        i = np.where(frac == 0.5, np.floor(x), np.round(x))
    elif mode == "round_prefer_ceil":
        i = np.where(frac == 0.5, np.ceil(x), np.round(x))
    elif mode == "floor":
        i = np.floor(x)
    else:
        i = np.ceil(x)
    return np.clip(i, 0, n_in - 1).astype(np.int64)


def resize_axis(t: torch.Tensor, axis: int, n_out: int, scale: float, mode: str, ctm: str,
                nearest_mode: str) -> torch.Tensor:
    n_in = t.shape[axis]
    x = original_coordinate(ctm, n_in, n_out, np.float32(scale))
    if mode == "nearest":
        return t.index_select(axis, torch.from_numpy(nearest_index(x, nearest_mode, n_in)))
    x = np.clip(x, 0, n_in - 1)
    i0 = np.minimum(np.floor(x), n_in - 1).astype(np.int64)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w = torch.from_numpy((x - i0).astype(np.float32))
    shape = [1] * t.dim()
    shape[axis] = n_out
    w = w.view(shape)
    return (t.index_select(axis, torch.from_numpy(i0)) * (1 - w)
            + t.index_select(axis, torch.from_numpy(i1)) * w)


def resize_model(mode, ctm, nearest_mode, scales=None, sizes_hw=None, runtime=False, opset=19):
    """image → Resize(scales | sizes) → y, with scales or sizes constant or computed at run
    time (the image's H, W plus 3 and plus 5)."""
    inits, nodes = [], []
    attrs = dict(mode=mode, coordinate_transformation_mode=ctm, nearest_mode=nearest_mode)
    if runtime:
        i64 = {"two": [2], "four": [4], "plus": [3, 5], "nc": [1, 1]}
        inits += [numpy_helper.from_array(np.array(v, np.int64), k) for k, v in i64.items()]
        nodes += [helper.make_node("Shape", ["image"], ["shape"]),
                  helper.make_node("Slice", ["shape", "two", "four"], ["hw"]),
                  helper.make_node("Add", ["hw", "plus"], ["hw2"])]
        if scales is None:
            nodes += [helper.make_node("Slice", ["shape", "zero", "two"], ["n_c"]),
                      helper.make_node("Concat", ["n_c", "hw2"], ["sizes"], axis=0)]
            inits.append(numpy_helper.from_array(np.array([0], np.int64), "zero"))
            nodes.append(helper.make_node("Resize", ["image", "", "", "sizes"], ["y"], **attrs))
        else:  # scales (H + 3) / H, (W + 5) / W
            nodes += [helper.make_node("Cast", ["hw2"], ["hw2f"], to=1),
                      helper.make_node("Cast", ["hw"], ["hwf"], to=1),
                      helper.make_node("Div", ["hw2f", "hwf"], ["s_hw"]),
                      helper.make_node("Concat", ["ones", "s_hw"], ["scales"], axis=0)]
            inits.append(numpy_helper.from_array(np.ones(2, np.float32), "ones"))
            nodes.append(helper.make_node("Resize", ["image", "", "scales"], ["y"], **attrs))
    elif scales is not None:
        inits.append(numpy_helper.from_array(np.array([1, 1, *scales], np.float32), "scales"))
        nodes.append(helper.make_node("Resize", ["image", "", "scales"], ["y"], **attrs))
    else:
        inits.append(numpy_helper.from_array(np.array(sizes_hw, np.int64), "sizes"))
        nodes.append(helper.make_node("Resize", ["image", "", "", "sizes"], ["y"], axes=[2, 3],
                                      **attrs))
    image = helper.make_tensor_value_info("image", onnx.TensorProto.FLOAT,
                                          ["batch", 3, "height", "width"])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)
    g = helper.make_graph(nodes, "t", [image], [y], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def spec_reference(mode, ctm, nearest_mode, scales=None, sizes_hw=None, runtime=False):
    def ref(x):
        h, w = x.shape[2:]
        if runtime and scales is None:
            plan = [(h + 3, np.float32(h + 3) / np.float32(h)),
                    (w + 5, np.float32(w + 5) / np.float32(w))]
        elif runtime:
            s = [np.float32(np.float32(h + 3) / np.float32(h)),
                 np.float32(np.float32(w + 5) / np.float32(w))]
            plan = [(int(np.floor(np.float32(n) * sc)), sc) for n, sc in zip((h, w), s)]
        elif scales is not None:
            plan = [(int(np.floor(np.float32(n) * np.float32(sc))), sc)
                    for n, sc in zip((h, w), scales)]
        else:
            plan = [(o, np.float32(o) / np.float32(n)) for n, o in zip((h, w), sizes_hw)]
        for axis, (n_out, scale) in zip((2, 3), plan):
            x = resize_axis(x, axis, n_out, scale, mode, ctm, nearest_mode)
        return x
    return ref


SPEC_CASES = [  # (mode, coordinate_transformation_mode, nearest_mode, scales, sizes, runtime)
    ("linear", "asymmetric", "floor", (2.0, 1.5), None, False),
    ("linear", "pytorch_half_pixel", "floor", (0.5, 3.0), None, False),
    ("linear", "half_pixel_symmetric", "floor", (1.7, 0.6), None, False),
    ("linear", "half_pixel", "floor", None, (13, 4), False),
    ("linear", "align_corners", "floor", None, (1, 9), False),
    ("linear", "half_pixel", "floor", None, None, True),
    ("linear", "asymmetric", "floor", (1, 1), None, True),
    ("nearest", "half_pixel", "round_prefer_floor", (2.0, 3.0), None, False),
    ("nearest", "half_pixel", "round_prefer_ceil", (1.5, 0.5), None, False),
    ("nearest", "asymmetric", "round_prefer_floor", (2.0, 2.5), None, False),
    ("nearest", "asymmetric", "round_prefer_ceil", (2.0, 0.75), None, False),
    ("nearest", "asymmetric", "ceil", (3.0, 1.25), None, False),
    ("nearest", "align_corners", "round_prefer_floor", None, (15, 4), False),
    ("nearest", "pytorch_half_pixel", "floor", (0.4, 2.2), None, False),
    ("nearest", "half_pixel_symmetric", "round_prefer_ceil", (1.3, 2.0), None, False),
    ("nearest", "asymmetric", "floor", None, None, True),
    ("nearest", "half_pixel", "round_prefer_floor", (1, 1), None, True),
]


@pytest.mark.parametrize("mode,ctm,nearest_mode,scales,sizes,runtime", SPEC_CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[2]}-{c[3] or c[4] or 'runtime'}"
                              f"{'-runtime' if c[5] else ''}" for c in SPEC_CASES])
def test_resize_against_the_spec(mode, ctm, nearest_mode, scales, sizes, runtime):
    m = resize_model(mode, ctm, nearest_mode, scales, sizes, runtime)
    ref = spec_reference(mode, ctm, nearest_mode, scales, sizes, runtime)
    err = compare(None, SIZES, model=m, torch_fn=ref)
    assert err < TOL, f"relative error {err:.2e}"


def test_identity_axes_cost_nothing():
    """Axes with scale 1 (N, C) get no interpolation matrix."""
    grad = compile_gradient(TORCH_EXPORT_X2(), ["y"], "l2")
    resizes = _resizes(grad)
    assert len(resizes) == 3  # the forward and one probe per spatial axis
    assert len([n for n in grad.graph.node if n.op_type == "MatMul"]) == 2


def TORCH_EXPORT_X2(name="bilinear_x2"):
    from gradcheck import export

    return export(TORCH_CASES[name])


def test_integer_nearest_upsampling_sums_blocks():
    """torch's nearest x2 (asymmetric, floor): no interpolation matrix, no MatMul."""
    grad = compile_gradient(TORCH_EXPORT_X2("nearest_x2"), ["y"], "l2")
    ops = [n.op_type for n in grad.graph.node]
    assert len(_resizes(grad)) == 1 and "MatMul" not in ops and "ReduceSum" in ops


def _resizes(grad):
    """The Resize nodes of the network and its gradient (not the one fitting the objective's
    region mask to the layer, see compiler._region_mask)."""
    return [n for n in grad.graph.node
            if n.op_type == "Resize" and "layer_mask" not in n.output[0]]


def test_tf_crop_and_resize_is_a_clear_error():
    m = resize_model("linear", "tf_crop_and_resize", "floor", (2.0, 2.0))
    m.graph.node[0].name = "upsample"
    with pytest.raises(UnsupportedOpError, match="Resize node 'upsample'.*tf_crop_and_resize"):
        compile_gradient(m, ["y"])


@pytest.mark.parametrize("mode", ["linear", "cubic"])
def test_antialias_is_the_adjoint_of_the_forward(mode):
    """antialias=1 (onnxruntime's filter is not torch's): the oracle is the forward itself.

    The forward's matrix A comes from pushing every basis image through onnxruntime; for the
    l2 objective mean(y²) the gradient is 2/M·AᵀAx.
    """
    m = resize_model(mode, "half_pixel", "floor", (0.45, 0.7))
    m.graph.node[0].attribute.append(helper.make_attribute("antialias", 1))
    forward = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    grad_sess = session(compile_gradient(m, ["y"], "l2"))
    for h, w in SIZES:
        n = 3 * h * w
        basis = np.eye(n, dtype=np.float32).reshape(n, 3, h, w)
        a = forward.run(None, {"image": basis})[0].reshape(n, -1).T.astype(np.float64)
        x = np.random.default_rng(h).random((2, 3, h, w), np.float32)
        _, got = grad_sess.run(None, {"image": x})
        ax = a @ x.reshape(2, -1).T.astype(np.float64)
        want = (2.0 / a.shape[0] * (a.T @ ax)).T.reshape(x.shape)
        assert relative_error(got, want) < TOL


def test_receptive_field_through_an_upsampling():
    from gradcheck import export
    from onnxdream.exporters.graph.receptive_field import receptive_field

    m = export(Lambda(lambda x, a: F.interpolate(a(x), scale_factor=2, mode="bilinear"),
                      conv(3, 4, 3, stride=4)))
    assert receptive_field(m, "y") == (3 + 4, 2)
