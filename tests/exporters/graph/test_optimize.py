"""The optimised gradient graph computes what the unoptimised one does, with fewer/faster nodes."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from gradcheck import export, session
from onnxdream.exporters.graph import compile_gradient
from onnxdream.exporters.graph.optimize import DEFAULT_PASSES, PASSES, OptimizeReport, optimize

torch.manual_seed(0)


class MiniInception(nn.Module):
    """GoogLeNet's shapes in small: strided 7x7 stem + BN + ReLU, strided and stride-1 max-pools,
    a branch concat, BN with non-trivial statistics."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.b1 = nn.Conv2d(8, 6, 1)
        self.b2 = nn.Conv2d(8, 6, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(6)
        self.b4 = nn.Conv2d(8, 4, 1)
        self.dw = nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=16)
        for bn in (self.bn1, self.bn2):
            with torch.no_grad():
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 2.0)
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.2, 0.2)

    def forward(self, x):
        x = F.max_pool2d(torch.relu(self.bn1(self.stem(x))), 3, 2, ceil_mode=True)
        a = torch.relu(self.b1(x))
        b = torch.relu(self.bn2(self.b2(x)))
        c = torch.relu(self.b4(F.max_pool2d(x, 3, 1, padding=1)))
        y = torch.cat([a, b, c], 1)
        return torch.clamp(self.dw(y), 0, 6)


@pytest.fixture(scope="module")
def mini():
    """Exported without constant folding, so BatchNormalization stays in the graph."""
    import io
    import warnings

    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(MiniInception().eval(), (torch.randn(1, 3, 37, 41),), buf, dynamo=False,
                          opset_version=18, input_names=["image"], output_names=["y"],
                          do_constant_folding=False,
                          dynamic_axes={"image": {0: "batch", 2: "height", 3: "width"}})
    return onnx.load_from_string(buf.getvalue())


def _run(model, x):
    return session(model).run(["objective", "grad"], {"image": x})


def _rel(a, b):
    return float(np.linalg.norm(a - b) / (np.linalg.norm(b) + 1e-30))


@pytest.mark.parametrize("size", [(37, 41), (64, 64), (33, 50)])
@pytest.mark.parametrize("objective", ["mean", "l2", "channel:3"])
def test_same_values(mini, size, objective):
    graph = compile_gradient(mini, ["y"], objective, optimize=False)
    fast = optimize(graph)
    x = np.random.default_rng(1).random((2, 3, *size), dtype=np.float32)
    o0, g0 = _run(graph, x)
    o1, g1 = _run(fast, x)
    np.testing.assert_allclose(o1, o0, rtol=1e-5, atol=1e-7)
    assert _rel(g1, g0) < 1e-5


def test_graph_is_rewritten(mini):
    graph = compile_gradient(mini, ["y"], "mean", optimize=False)
    rep = OptimizeReport()
    fast = optimize(graph, report=rep)
    before = Counter(n.op_type for n in graph.graph.node)
    after = Counter(n.op_type for n in fast.graph.node)
    assert before["BatchNormalization"] == 2 and after["BatchNormalization"] == 0
    assert before["Where"] > 0 and after["Where"] == 0  # Relu/Clip masks: Mul by Cast
    # strided adjoints as stride-1 phase Convs: the dense stem's interleaved by DepthToSpace, the
    # depthwise one's (16 channels) as separate depthwise Convs stacked by Concat + Reshape
    assert before["ConvTranspose"] == 2 and after["ConvTranspose"] == 0
    assert after["DepthToSpace"] == 1
    phase = [n for n in fast.graph.node if n.output[0].startswith("opt/phase_conv")]
    assert sorted(onnx.helper.get_node_attr_value(n, "group") for n in phase) == [1] + [16] * 4
    assert any(n.output[0].startswith("opt/phase_rows") for n in fast.graph.node)
    # the stride-1 pool lost its Indices output (its backward is separable: one more MaxPool,
    # of the rows), the strided one keeps it
    pools = [n for n in fast.graph.node if n.op_type == "MaxPool"]
    assert sorted(len([o for o in n.output if o]) for n in pools) == [1, 1, 2]
    rows = [n for n in pools if n.output[0].startswith("opt/pool_rows")]
    assert len(rows) == 1
    assert list(onnx.helper.get_node_attr_value(rows[0], "kernel_shape"))[0] == 1
    assert after["ScatterElements"] == before["ScatterElements"] - 1
    assert rep.rewrites["batchnorm"] == 2 and rep.rewrites["maxpool"] == 1
    assert rep.rewrites["pool_masks"] == 1  # the stem's Relu -> strided pool (Indices path)
    assert rep.rewrites["strided_conv"] == 2
    onnx.checker.check_model(fast, full_check=True)
    assert all(n.domain in ("", "ai.onnx") for n in fast.graph.node)


def test_activation_masks_read_outputs(mini):
    """Forward Conv outputs feed only their activation (onnxruntime fuses them)."""
    graph = compile_gradient(mini, ["y"], "mean", optimize=False)
    fast = optimize(graph)
    assert "activation_masks" in DEFAULT_PASSES
    x = np.random.default_rng(3).random((1, 3, 40, 44), dtype=np.float32)
    o0, g0 = _run(graph, x)
    o1, g1 = _run(fast, x)
    np.testing.assert_allclose(o1, o0, rtol=1e-5)
    assert _rel(g1, g0) < 1e-5
    consumers = Counter(i for n in fast.graph.node for i in n.input)
    for n in fast.graph.node:
        if n.op_type == "Conv" and not n.output[0].startswith(("grad/", "opt/")):
            assert consumers[n.output[0]] <= 1, n.name
    onnx.checker.check_model(fast, full_check=True)
    assert all(n.domain in ("", "ai.onnx") for n in fast.graph.node)


def test_compile_optimizes_by_default(mini):
    layers = ["y"]
    fast = compile_gradient(mini, layers, "mean")
    plain = compile_gradient(mini, layers, "mean", optimize=False)
    assert Counter(n.op_type for n in fast.graph.node)["BatchNormalization"] == 0
    assert len(fast.graph.node) != len(plain.graph.node)
    assert [o.name for o in fast.graph.output] == ["objective", "grad"]
    assert {p.key for p in fast.metadata_props} == {p.key for p in plain.metadata_props}


@pytest.mark.parametrize("kernel,stride,pad,ceil", [(3, 1, 1, False), (2, 1, 0, False),
                                                     (3, 2, 1, True), (3, 2, 0, True),
                                                     (2, 2, 0, False), (3, 3, 1, True),
                                                     ((2, 3), 1, (1, 1), False),
                                                     ((1, 3), 1, (0, 1), False), (5, 1, 2, False)])
def test_maxpool_backward_with_ties(kernel, stride, pad, ceil):
    """Flat regions make ties at positive values; the first maximum must get the gradient."""
    mod = _Lambda(lambda x, conv: F.max_pool2d(torch.relu(conv(x)), kernel, stride, padding=pad,
                                               ceil_mode=ceil)
                  * torch.linspace(0.5, 2.0, 4).view(1, 4, 1, 1))
    model = export(mod, shape=(1, 3, 17, 19))
    graph = compile_gradient(model, ["y"], "l2", optimize=False)
    fast = _optimize_all_strides(graph)
    x = np.zeros((1, 3, 17, 19), np.float32)
    x[:, :, :9] = 0.7  # flat block -> ties at a positive value
    x[:, :, 9:] = np.random.default_rng(2).random((1, 3, 8, 19), dtype=np.float32)
    o0, g0 = _run(graph, x)
    o1, g1 = _run(fast, x)
    np.testing.assert_allclose(o1, o0, rtol=1e-6)
    np.testing.assert_allclose(g1, g0, rtol=1e-5, atol=1e-9)
    xt = torch.from_numpy(x).requires_grad_(True)
    out = mod(xt)
    (out * out).flatten(1).mean(1).sum().backward()
    np.testing.assert_allclose(g1, xt.grad.numpy(), rtol=1e-4, atol=1e-8)


def _optimize_all_strides(graph):
    """optimize(), with the MaxPool rewrite enabled for strided pools too (off by default)."""
    import onnxdream.exporters.graph.optimize as opt_mod

    original = opt_mod.MAXPOOL_MAX_STRIDE
    opt_mod.MAXPOOL_MAX_STRIDE = 8
    try:
        rep = OptimizeReport()
        out = optimize(graph, report=rep)
    finally:
        opt_mod.MAXPOOL_MAX_STRIDE = original
    assert rep.rewrites["maxpool"] == 1
    assert rep.rewrites["pool_masks"] == 1  # relu -> pool: the mask moved to the pool's output
    return out


class _Lambda(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return self.fn(x, self.conv)


def test_unknown_pass():
    with pytest.raises(ValueError, match="unknown optimisation"):
        optimize(onnx.ModelProto(), passes=["nope"])
    assert list(PASSES)[-1] == "dead_code"


def test_slice_chain_merges_the_adjoint_crops(model_home):
    """EfficientNet-Lite0's explicit Pads before its strided depthwise Convs: the adjoint's crop
    and the Pad's backward crop become one Slice, with the same gradient."""
    from onnxdream.models import resolve_model

    graph = compile_gradient(onnx.load(resolve_model("efficientnet-lite0")), ["blocks.3"],
                             optimize=False)
    rep = OptimizeReport()
    fast = optimize(graph, report=rep)
    assert rep.rewrites["slice_chain"] >= 2
    unmerged = optimize(graph, passes=[p for p in DEFAULT_PASSES if p != "slice_chain"])
    assert _slices_of_slices(unmerged) >= 2 and _slices_of_slices(fast) == 0
    for size in [(64, 64), (67, 93)]:
        x = np.random.default_rng(5).random((1, 3) + size, dtype=np.float32)
        o0, g0 = _run(unmerged, x)
        o1, g1 = _run(fast, x)
        np.testing.assert_allclose(o1, o0, rtol=1e-6)
        assert _rel(g1, g0) < 1e-6 and g1.shape == x.shape


def _slices_of_slices(model) -> int:
    """Slices whose input is a Slice of an interleaved adjoint output (the two crops in a row)."""
    made_by = {o: n for n in model.graph.node for o in n.output}

    def op(name):
        return made_by[name].op_type if name in made_by else None

    return sum(n.op_type == "Slice" and op(n.input[0]) == "Slice" and
               op(made_by[n.input[0]].input[0]) in ("Reshape", "DepthToSpace")
               for n in model.graph.node)


def test_slice_chain_leaves_negative_ends_alone():
    """Slice(Slice(x, 0, -1), 0, -1) is not Slice(x, 0, min(-1, -1)): left as it is."""
    h = onnx.helper
    nodes = [h.make_node("Slice", ["image", "s", "e", "ax"], ["a"]),
             h.make_node("Slice", ["a", "s", "e", "ax"], ["grad"]),
             h.make_node("ReduceMean", ["grad"], ["objective"], keepdims=0)]
    inits = [onnx.numpy_helper.from_array(np.array(v, np.int64), n)
             for n, v in (("s", [0]), ("e", [-1]), ("ax", [3]))]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("image", onnx.TensorProto.FLOAT,
                                                           [1, 3, 4, 6])],
                     [h.make_tensor_value_info("objective", onnx.TensorProto.FLOAT, None),
                      h.make_tensor_value_info("grad", onnx.TensorProto.FLOAT, None)], inits)
    model = h.make_model(g, opset_imports=[h.make_opsetid("", 18)])
    rep = OptimizeReport()
    optimize(model, passes=["slice_chain"], report=rep)
    assert rep.rewrites["slice_chain"] == 0


def test_sums_become_adds(mini):
    graph = compile_gradient(mini, ["y"], "mean", optimize=False)
    assert Counter(n.op_type for n in graph.graph.node)["Sum"] > 0
    fast = optimize(graph)
    assert Counter(n.op_type for n in fast.graph.node)["Sum"] == 0
    x = np.random.default_rng(4).random((2, 3, 41, 37), dtype=np.float32)
    assert _rel(_run(fast, x)[1], _run(graph, x)[1]) < 1e-6
