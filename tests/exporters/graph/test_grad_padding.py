"""Gradient rules for implicit padding: Conv/ConvTranspose/pools with ``auto_pad`` and Pad's
edge/reflect/wrap modes, on tiny native ONNX graphs, checked against torch autograd.

tf2onnx writes ``auto_pad=SAME_UPPER`` when a TensorFlow model has a dynamic size, and Keras'
torch backend pads pooling inputs in ``edge`` mode; torch exports neither, so the graphs are
written by hand here and the torch references do the padding explicitly (ONNX's formula:
out = ceil(in / stride), total = max(0, (out-1)*stride + keff - in), the odd pixel at the end
for SAME_UPPER). The sizes are odd and even, so both branches of the runtime pads run from one
compiled graph.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import helper, numpy_helper

from gradcheck import compare, session
from onnxdream.exporters.graph import compile_gradient

SIZES = [(17, 19), (16, 20), (9, 8)]
TOL = 1e-4


def model(nodes, inits=(), opset=18, channels=3):
    image = helper.make_tensor_value_info("image", onnx.TensorProto.FLOAT,
                                          ["batch", channels, "height", "width"])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)
    g = helper.make_graph(nodes, "t", [image], [y], list(inits))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def same_pads(n: int, k: int, s: int, d: int, mode: str) -> tuple[int, int]:
    keff = (k - 1) * d + 1
    total = max(0, (math.ceil(n / s) - 1) * s + keff - n)
    small, big = total // 2, total - total // 2
    return (small, big) if mode == "SAME_UPPER" else (big, small)


def pad_same(x, k, s, d, mode, value=0.0):
    (ht, hb), (wl, wr) = (same_pads(x.shape[2], k, s, d, mode),
                          same_pads(x.shape[3], k, s, d, mode))
    return F.pad(x, (wl, wr, ht, hb), value=value)


def weights(shape, seed=0):
    return np.random.default_rng(seed).normal(0, 0.5, shape).astype(np.float32)


# onnxruntime runs no Conv with both dilations and SAME padding ("Dilation not supported for
# AutoPadType::SAME_UPPER"), so dilation is covered by the pools and the explicit-pads tests.
CONV_CASES = [  # (auto_pad, kernel, stride, dilation, group, out channels)
    ("SAME_UPPER", 3, 2, 1, 1, 4),
    ("SAME_LOWER", 3, 2, 1, 1, 4),
    ("SAME_UPPER", 4, 2, 1, 1, 4),
    ("SAME_LOWER", 4, 2, 1, 1, 4),
    ("SAME_UPPER", 3, 1, 1, 1, 4),
    ("SAME_LOWER", 4, 1, 1, 1, 4),
    ("SAME_UPPER", 5, 3, 1, 1, 4),
    ("SAME_UPPER", 1, 2, 1, 1, 4),   # kernel < stride: even sizes need no padding at all
    ("SAME_UPPER", 3, 2, 1, 3, 3),   # depthwise (group = C)
    ("SAME_LOWER", 5, 2, 1, 3, 6),   # depthwise with a channel multiplier
    ("SAME_UPPER", 3, 1, 1, 3, 3),
    ("VALID", 3, 2, 1, 1, 4),
]


@pytest.mark.parametrize("auto_pad,k,s,d,group,m", CONV_CASES,
                         ids=[f"{c[0]}-k{c[1]}s{c[2]}d{c[3]}g{c[4]}" for c in CONV_CASES])
def test_conv_auto_pad(auto_pad, k, s, d, group, m):
    w = weights((m, 3 // group, k, k))
    bias = weights((m,), 1)
    nodes = [helper.make_node("Conv", ["image", "w", "b"], ["y"], auto_pad=auto_pad,
                              strides=[s, s], dilations=[d, d], group=group)]
    onnx_model = model(nodes, [numpy_helper.from_array(w, "w"), numpy_helper.from_array(bias, "b")])
    wt, bt = torch.from_numpy(w), torch.from_numpy(bias)

    def ref(x):
        xp = x if auto_pad == "VALID" else pad_same(x, k, s, d, auto_pad)
        return F.conv2d(xp, wt, bt, stride=s, dilation=d, groups=group)

    assert compare(None, SIZES, model=onnx_model, torch_fn=ref) < TOL


def test_conv_auto_pad_static_input_size():
    """A fixed-size model: the pads are computed at compile time (no runtime shape ops)."""
    w = weights((4, 3, 3, 3))
    nodes = [helper.make_node("Conv", ["image", "w"], ["y"], auto_pad="SAME_UPPER",
                              strides=[2, 2])]
    onnx_model = model(nodes, [numpy_helper.from_array(w, "w")])
    dims = onnx_model.graph.input[0].type.tensor_type.shape.dim
    dims[2].Clear()
    dims[2].dim_value = 16
    dims[3].Clear()
    dims[3].dim_value = 17
    wt = torch.from_numpy(w)
    grad = compile_gradient(onnx_model, ["y"], "l2", optimize=False)
    # 16 rows need 1 pad row (at the end), 17 columns 2 (one each side)
    (ct,) = [n for n in grad.graph.node if n.op_type == "ConvTranspose"]
    assert list(next(a.ints for a in ct.attribute if a.name == "pads")) == [0, 1, 0, 0]
    assert compare(None, [(16, 17)], model=onnx_model,
                   torch_fn=lambda x: F.conv2d(pad_same(x, 3, 2, 1, "SAME_UPPER"), wt,
                                               stride=2)) < TOL


CONV_T_CASES = [  # (auto_pad, kernel, stride, output_padding, dilation)
    ("SAME_UPPER", 3, 2, 0, 1), ("SAME_LOWER", 3, 2, 0, 1), ("SAME_UPPER", 4, 2, 0, 1),
    ("SAME_LOWER", 5, 3, 1, 1), ("SAME_UPPER", 5, 3, 1, 1), ("SAME_UPPER", 3, 1, 0, 1),
    ("SAME_LOWER", 3, 2, 1, 2), ("VALID", 3, 2, 1, 1),
]


@pytest.mark.parametrize("auto_pad,k,s,op,d", CONV_T_CASES,
                         ids=[f"{c[0]}-k{c[1]}s{c[2]}op{c[3]}d{c[4]}" for c in CONV_T_CASES])
def test_conv_transpose_auto_pad(auto_pad, k, s, op, d):
    w = weights((3, 2, k, k))
    nodes = [helper.make_node("ConvTranspose", ["image", "w"], ["y"], auto_pad=auto_pad,
                              strides=[s, s], output_padding=[op, op], dilations=[d, d])]
    onnx_model = model(nodes, [numpy_helper.from_array(w, "w")])
    wt = torch.from_numpy(w)
    total = (k - 1) * d + 1 + op - s
    head = total // 2 if auto_pad == "SAME_UPPER" else total - total // 2

    def ref(x):
        full = F.conv_transpose2d(x, wt, stride=s, output_padding=op, dilation=d)
        if auto_pad == "VALID":
            return full
        h, w_ = x.shape[2] * s, x.shape[3] * s
        return full[:, :, head:head + h, head:head + w_]

    assert compare(None, SIZES, model=onnx_model, torch_fn=ref) < TOL


def ort_pool_pads(n: int, k: int, s: int, mode: str) -> tuple[int, int]:
    """onnxruntime's SAME pads for pools: from the undilated kernel (the ONNX spec says the
    dilated one). The MaxPool rule reads the argmax from the forward, so it holds either way."""
    return same_pads(n, k, s, 1, mode)


def window_max(x, k, s, d=1):
    """Max pooling without F.max_pool2d (gradcheck shares F.max_pool2d's argmax with
    onnxruntime, which would index the unpadded input)."""
    return torch.max_pool2d(x, k, s, 0, d)


POOL_CASES = [  # (auto_pad, kernel, stride, dilation)
    ("SAME_UPPER", 3, 2, 1), ("SAME_LOWER", 3, 2, 1), ("SAME_UPPER", 2, 2, 1),
    ("SAME_UPPER", 3, 1, 1), ("SAME_LOWER", 2, 1, 1), ("SAME_UPPER", 3, 2, 2),
    ("VALID", 3, 2, 1),
]


@pytest.mark.parametrize("auto_pad,k,s,d", POOL_CASES,
                         ids=[f"{c[0]}-k{c[1]}s{c[2]}d{c[3]}" for c in POOL_CASES])
def test_maxpool_auto_pad(auto_pad, k, s, d):
    nodes = [helper.make_node("MaxPool", ["image"], ["y"], auto_pad=auto_pad,
                              kernel_shape=[k, k], strides=[s, s], dilations=[d, d])]

    def ref(x):
        if auto_pad == "VALID":
            return window_max(x, k, s, d)
        (t, b), (left, r) = (ort_pool_pads(n, k, s, auto_pad) for n in x.shape[2:])
        return window_max(F.pad(x, (left, r, t, b), value=-math.inf), k, s, d)

    assert compare(None, SIZES, model=model(nodes), torch_fn=ref) < TOL


def test_maxpool_same_stride1_uses_the_separable_backward():
    """The optimiser's stride-1 MaxPool backward (no Indices) takes SAME pads too."""
    nodes = [helper.make_node("MaxPool", ["image"], ["y"], auto_pad="SAME_UPPER",
                              kernel_shape=[3, 2], strides=[1, 1])]
    onnx_model = model(nodes)
    grad = compile_gradient(onnx_model, ["y"], "l2")
    pools = [n for n in grad.graph.node if n.op_type == "MaxPool"]
    assert all(len([o for o in n.output if o]) == 1 for n in pools)
    assert not any(n.op_type == "ScatterElements" for n in grad.graph.node)

    def ref(x):
        return window_max(F.pad(x, (0, 1, 1, 1), value=-math.inf), (3, 2), 1)

    assert compare(None, SIZES, model=onnx_model, torch_fn=ref) < TOL


AVG_CASES = [  # (auto_pad, kernel, stride, count_include_pad)
    ("SAME_UPPER", 3, 2, 0), ("SAME_LOWER", 3, 2, 0), ("SAME_UPPER", 2, 2, 0),
    ("SAME_UPPER", 3, 1, 0), ("SAME_LOWER", 4, 1, 0), ("SAME_UPPER", 3, 2, 1),
    ("SAME_LOWER", 4, 3, 1), ("VALID", 3, 2, 0),
]


@pytest.mark.parametrize("auto_pad,k,s,include", AVG_CASES,
                         ids=[f"{c[0]}-k{c[1]}s{c[2]}i{c[3]}" for c in AVG_CASES])
def test_avgpool_auto_pad(auto_pad, k, s, include):
    nodes = [helper.make_node("AveragePool", ["image"], ["y"], auto_pad=auto_pad,
                              kernel_shape=[k, k], strides=[s, s], count_include_pad=include)]

    def ref(x):
        if auto_pad == "VALID":
            return F.avg_pool2d(x, k, s)
        total = F.avg_pool2d(pad_same(x, k, s, 1, auto_pad), k, s, divisor_override=1)
        if include:
            return total / (k * k)
        count = F.avg_pool2d(pad_same(torch.ones_like(x), k, s, 1, auto_pad), k, s,
                             divisor_override=1)
        return total / count

    assert compare(None, SIZES, model=model(nodes), torch_fn=ref) < TOL


# -- Pad modes ----------------------------------------------------------------------------------

TORCH_MODE = {"edge": "replicate", "reflect": "reflect", "wrap": "circular"}


def torch_pad(x, pads, mode):
    """ONNX Pad on [N,C,H,W] with pads [0,0,t,l,0,0,b,r]: negative pads crop first (as
    onnxruntime does), then the mode pads the cropped tensor."""
    t, left, b, r = pads[2], pads[3], pads[6], pads[7]
    x = x[:, :, max(-t, 0):x.shape[2] - max(-b, 0), max(-left, 0):x.shape[3] - max(-r, 0)]
    t, left, b, r = (max(v, 0) for v in (t, left, b, r))
    if mode == "wrap":  # torch's circular padding wraps once; ONNX's as often as needed
        rows = torch.arange(-t, x.shape[2] + b) % x.shape[2]
        cols = torch.arange(-left, x.shape[3] + r) % x.shape[3]
        return x[:, :, rows][:, :, :, cols]
    return F.pad(x, (left, r, t, b), mode=TORCH_MODE[mode])


PAD_CASES = [  # (mode, pads [0,0,t,l,0,0,b,r])
    ("edge", [0, 0, 1, 2, 0, 0, 3, 1]),
    ("edge", [0, 0, 0, 1, 0, 0, 1, 0]),   # Keras' pooling pads: one side only
    ("edge", [0, 0, 2, -1, 0, 0, -1, 3]),
    ("reflect", [0, 0, 1, 2, 0, 0, 3, 1]),
    ("reflect", [0, 0, 4, 0, 0, 0, 0, 5]),
    ("reflect", [0, 0, -2, 1, 0, 0, 2, -1]),
    ("wrap", [0, 0, 1, 2, 0, 0, 3, 1]),
    ("wrap", [0, 0, -2, 1, 0, 0, 2, -1]),
    ("wrap", [0, 0, 11, 0, 0, 0, 2, 19]),  # more than one turn
]


@pytest.mark.parametrize("mode,pads", PAD_CASES, ids=[f"{c[0]}{c[1][2:4]}{c[1][6:]}"
                                                      for c in PAD_CASES])
def test_pad_modes_static(mode, pads):
    w = weights((4, 3, 3, 3))
    nodes = [helper.make_node("Pad", ["image", "pads"], ["p"], mode=mode),
             helper.make_node("Conv", ["p", "w"], ["y"], strides=[2, 2])]
    onnx_model = model(nodes, [numpy_helper.from_array(np.array(pads, np.int64), "pads"),
                               numpy_helper.from_array(w, "w")], opset=19)
    wt = torch.from_numpy(w)
    assert compare(None, SIZES, model=onnx_model,
                   torch_fn=lambda x: F.conv2d(torch_pad(x, pads, mode), wt, stride=2)) < TOL


@pytest.mark.parametrize("mode", ["edge", "reflect", "wrap", "constant"])
def test_pad_modes_runtime_pads_and_axes(mode):
    """pads computed from the input's shape (H mod 3, W mod 4 and 2 - W mod 2), on axes [3, 2]."""
    nodes = [
        helper.make_node("Shape", ["image"], ["shape"]),
        helper.make_node("Slice", ["shape", "two", "four"], ["hw"]),
        helper.make_node("Mod", ["hw", "mods"], ["hw_mod"]),
        helper.make_node("Gather", ["hw_mod", "one"], ["w_mod"], axis=0),
        helper.make_node("Gather", ["hw_mod", "zero"], ["h_mod"], axis=0),
        helper.make_node("Sub", ["two", "w_mod"], ["w_end"]),
        # axes [3, 2]: pads = [w_begin, h_begin, w_end, h_end]
        helper.make_node("Concat", ["w_mod", "h_mod", "w_end", "one"], ["pads"], axis=0),
        helper.make_node("Pad", ["image", "pads", "", "axes"], ["y"], mode=mode),
    ]
    ints = {"two": [2], "four": [4], "mods": [3, 4], "one": [1], "zero": [0], "axes": [3, 2]}
    onnx_model = model(nodes, [numpy_helper.from_array(np.array(v, np.int64), k)
                               for k, v in ints.items()], opset=19)

    def ref(x):
        h, w = x.shape[2:]
        pads = [0, 0, h % 3, w % 4, 0, 0, 1, 2 - w % 4]
        if mode == "constant":
            return F.pad(x, (pads[3], pads[7], pads[2], pads[6]))
        return torch_pad(x, pads, mode)

    assert compare(None, SIZES + [(12, 13)], model=onnx_model, torch_fn=ref) < TOL


def test_unsupported_auto_pad_names_the_node():
    nodes = [helper.make_node("Conv", ["image", "w"], ["y"], name="stem", auto_pad="SAME_MIDDLE")]
    onnx_model = model(nodes, [numpy_helper.from_array(weights((2, 3, 3, 3)), "w")])
    from onnxdream.core.errors import UnsupportedOpError

    with pytest.raises(UnsupportedOpError, match="Conv node 'stem'.*SAME_MIDDLE"):
        compile_gradient(onnx_model, ["y"])


def test_same_pads_run_in_one_graph_at_many_sizes():
    """One compiled graph, strided SAME Conv → SAME MaxPool → SAME AveragePool, 1..2 px odd."""
    w = weights((4, 3, 3, 3))
    nodes = [helper.make_node("Conv", ["image", "w"], ["c"], auto_pad="SAME_UPPER", strides=[2, 2]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("MaxPool", ["r"], ["m"], auto_pad="SAME_UPPER", kernel_shape=[3, 3],
                              strides=[2, 2]),
             helper.make_node("AveragePool", ["m"], ["y"], auto_pad="SAME_LOWER",
                              kernel_shape=[2, 2], strides=[2, 2])]
    onnx_model = model(nodes, [numpy_helper.from_array(w, "w")])
    sess = session(compile_gradient(onnx_model, ["y"], "l2"))
    for h, w_ in [(1, 1), (2, 3), (31, 30), (64, 65)]:
        obj, grad = sess.run(None, {"image": np.random.default_rng(h).random(
            (1, 3, h, w_), np.float32)})
        assert grad.shape == (1, 3, h, w_) and np.isfinite(grad).all()


def test_receptive_field_through_edge_pads():
    from onnxdream.exporters.graph.receptive_field import receptive_field

    w = weights((4, 3, 3, 3))
    nodes = [helper.make_node("Pad", ["image", "pads"], ["p"], mode="edge"),
             helper.make_node("MaxPool", ["p"], ["m"], kernel_shape=[3, 3], strides=[2, 2]),
             helper.make_node("Conv", ["m", "w"], ["y"], auto_pad="SAME_UPPER")]
    inits = [numpy_helper.from_array(np.array([0, 0, 0, 0, 0, 0, 1, 1], np.int64), "pads"),
             numpy_helper.from_array(w, "w")]
    assert receptive_field(model(nodes, inits), "y") == (1 + 1 + 2 + 2 * 2, 2)
    nodes[0] = helper.make_node("Pad", ["image", "pads"], ["p"], mode="wrap")
    assert receptive_field(model(nodes, inits), "y") is None
