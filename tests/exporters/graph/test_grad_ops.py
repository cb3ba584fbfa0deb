"""Per-op gradient rules on tiny graphs, checked against torch autograd."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import helper, numpy_helper

from gradcheck import Lambda, compare
from onnxdream.exporters.graph import compile_gradient

torch.manual_seed(0)
ODD = [(17, 19), (23, 30)]
TOL = 1e-4


def conv(*a, **k):
    c = nn.Conv2d(*a, **k)
    with torch.no_grad():
        c.weight.normal_(0, 0.5)
    return c


def _assign_rows(x, c):
    """``y[:, :, 1:] = f(y[:, :, 1:])`` on a copy: exported as ScatterND."""
    y = c(x).clone()
    y[:, 1:3, 1:] = torch.tanh(y[:, 1:3, 1:] * 2) + y[:, :2, :-1]
    return y * y


CASES = {
    "conv_stride2_odd": Lambda(lambda x, c: c(x), conv(3, 5, 3, stride=2, padding=1)),
    "conv_stride2_k4_pad0": Lambda(lambda x, c: c(x), conv(3, 4, 4, stride=2)),
    "conv_stride3_k5": Lambda(lambda x, c: c(x), conv(3, 4, 5, stride=3, padding=2)),
    "conv_asym_kernel": Lambda(lambda x, c: c(x), conv(3, 4, (1, 7), padding=(0, 3))),
    "conv_grouped": Lambda(lambda x, c, d: d(c(x)), conv(3, 6, 3, padding=1),
                           conv(6, 8, 3, padding=1, groups=2)),
    "conv_depthwise_stride2": Lambda(lambda x, c, d: d(c(x)), conv(3, 6, 1),
                                     conv(6, 6, 5, stride=2, padding=2, groups=6)),
    "conv_dilated": Lambda(lambda x, c: c(x), conv(3, 4, 3, padding=2, dilation=2)),
    "conv_dilated_stride2": Lambda(lambda x, c: c(x), conv(3, 4, 3, stride=2, padding=1,
                                                            dilation=2)),
    "relu_bn": Lambda(lambda x, c, bn: bn(torch.relu(c(x))), conv(3, 4, 3),
                      nn.BatchNorm2d(4)),
    "maxpool_overlap": Lambda(lambda x, c: F.max_pool2d(c(x), 3, 2), conv(3, 4, 1)),
    "maxpool_ceil_pad": Lambda(lambda x, c: F.max_pool2d(c(x), 3, 2, padding=1, ceil_mode=True),
                               conv(3, 4, 1)),
    "maxpool_s1": Lambda(lambda x, c: F.max_pool2d(c(x), 3, 1, padding=1), conv(3, 4, 1)),
    "avgpool_incl_pad": Lambda(lambda x: F.avg_pool2d(x, 3, 2, padding=1,
                                                      count_include_pad=True)),
    "avgpool_excl_pad": Lambda(lambda x: F.avg_pool2d(x, 3, 2, padding=1,
                                                      count_include_pad=False)),
    "avgpool_ceil": Lambda(lambda x: F.avg_pool2d(x, 3, 2, ceil_mode=True)),
    "avgpool_ceil_pad_excl": Lambda(lambda x: F.avg_pool2d(x, 3, 2, padding=1, ceil_mode=True,
                                                           count_include_pad=False)),
    "global_avgpool": Lambda(lambda x, c: F.adaptive_avg_pool2d(c(x), 1) * c(x), conv(3, 4, 3)),
    "add_mul_div_broadcast": Lambda(
        lambda x, c: (c(x) + x.mean(1, keepdim=True)) * x[:, :1] / (1.5 + c(x).mean((2, 3),
                                                                                    keepdim=True)),
        conv(3, 4, 1)),
    "sub_neg_pow_sqrt": Lambda(lambda x: torch.sqrt(1 + (x - 0.5) ** 2) - x ** 3),
    "exp_log_tanh": Lambda(lambda x: torch.tanh(torch.exp(x) * torch.log(x + 1))),
    "concat": Lambda(lambda x, a, b: torch.cat([a(x), torch.relu(b(x)), x], 1),
                     conv(3, 2, 3, padding=1), conv(3, 5, 1)),
    "split_slice": Lambda(lambda x: torch.cat([x[:, :, 2:-3, 1:], x[:, :, :5, :-1] * 2], 2)),
    "sigmoid_silu": Lambda(lambda x, c: F.silu(c(x)) + torch.sigmoid(x).mean(1, keepdim=True),
                           conv(3, 4, 3, padding=1)),
    "clip_relu6": Lambda(lambda x, c: F.relu6(c(x) * 3), conv(3, 4, 3)),
    "hardswish_hardsigmoid": Lambda(lambda x, c: F.hardswish(c(x) * 4) * F.hardsigmoid(c(x) * 4),
                                    conv(3, 4, 3)),
    "leaky_elu": Lambda(lambda x, c: F.leaky_relu(c(x), 0.1) + F.elu(c(x)), conv(3, 4, 3)),
    "gelu_erf": Lambda(lambda x, c: F.gelu(c(x)), conv(3, 4, 3)),
    "gelu_tanh": Lambda(lambda x, c: F.gelu(c(x), approximate="tanh"), conv(3, 4, 3)),
    "pad_constant": Lambda(lambda x, c: c(F.pad(x, (1, 2, 0, 3))), conv(3, 4, 3, stride=2)),
    "conv_transpose": Lambda(lambda x, c, t: t(c(x)), conv(3, 4, 3, stride=2),
                             nn.ConvTranspose2d(4, 3, 3, stride=2, padding=1, output_padding=1)),
    "normalize_reducel2": Lambda(lambda x, c: F.normalize(c(x), dim=1) * c(x), conv(3, 4, 3)),
    "softplus_abs_reciprocal": Lambda(
        lambda x, c: F.softplus(c(x)) + torch.abs(c(x)) * torch.reciprocal(1.5 + x.mean(1, True)),
        conv(3, 4, 3, padding=1)),
    "strided_slice_patch_merging": Lambda(
        lambda x, c: torch.cat([c(x)[:, :, 0::2, 0::2][..., :8, :8],
                                c(x)[:, :, 1::2, 0::2][..., :8, :8],
                                c(x)[:, :, 2::3, 1::3][..., :5, :5].mean((2, 3), keepdim=True)
                                .expand(-1, -1, 8, 8)], 1),
        conv(3, 4, 3, padding=1)),
    "einsum": Lambda(lambda x, c, d: torch.einsum("bchw,bdhw->bcd", c(x), d(x)).unsqueeze(-1)
                     + torch.einsum("bchw->bhwc", c(x)).mean((1, 2))[..., None, None],
                     conv(3, 4, 3), conv(3, 5, 3)),
    "pixel_shuffle_depth_to_space_crd": Lambda(
        lambda x, c, d: d(F.pixel_shuffle(c(x), 2) * F.pixel_shuffle(c(x), 2).mean(1, True)),
        conv(3, 8, 3, padding=1), conv(2, 3, 3, stride=2)),
    "slice_assignment_scatter_nd": Lambda(_assign_rows, conv(3, 4, 3, padding=1)),
    # x[..., -1:] and x[..., :1] have size 1 though the sliced axis is dynamic: their
    # gradients must be summed over the broadcast (EfficientViT's linear attention)
    "last_column_broadcast": Lambda(
        lambda x, c: (c(x)[..., :-1] / (c(x)[..., -1:] ** 2 + 1)
                      + c(x)[:, :, :1, 1:] * c(x)[..., 1:]),
        conv(3, 4, 3, padding=1)),
    "logsoftmax_sum_maximum": Lambda(
        lambda x, c: torch.log_softmax(c(x), 1) * torch.maximum(c(x), x.sum(1, keepdim=True)),
        conv(3, 4, 3, padding=1)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_rule_matches_autograd(name):
    err = compare(CASES[name], ODD)
    assert err < TOL, f"{name}: relative error {err:.2e}"


class Tokens(nn.Module):
    """A transformer-ish block: patchify, LayerNorm, attention (MatMul, Softmax), MLP (Gemm)."""

    def __init__(self, dim=8):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.ln = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.fc = nn.Linear(dim, 10)

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)  # N, L, C
        t = torch.cat([self.cls.expand(t.shape[0], -1, -1), t], 1)
        q, k, v = self.qkv(self.ln(t)).chunk(3, dim=-1)
        a = torch.softmax(q @ k.transpose(1, 2) / 3.0, dim=-1)
        t = t + a @ v
        return self.fc(F.gelu(t[:, 0]))


def test_attention_block_matmul_softmax_layernorm_gemm_gather():
    m = Tokens()
    err = compare(m, [(16, 20), (24, 12)], objective="class:3")
    assert err < TOL
    err = compare(m, [(16, 20)], objective="l2")
    assert err < TOL


def test_gemm_transposes_and_flatten():
    m = Lambda(lambda x, c, fc: fc(torch.flatten(c(x), 1)), conv(3, 2, 3, stride=2),
               nn.Linear(2 * 8 * 9, 7))
    assert compare(m, [(17, 19)], objective="l2") < TOL


def test_transpose_reshape_channel_shuffle():
    def shuffle(x, c):
        y = c(x)
        n, ch, h, w = y.shape
        return y.view(n, 2, ch // 2, h, w).transpose(1, 2).reshape(n, ch, h, w) * torch.arange(
            ch, dtype=torch.float32).view(1, ch, 1, 1)
    assert compare(Lambda(shuffle, conv(3, 6, 3)), ODD) < TOL


def _onnx_model(nodes, inits=(), out_shape=None, opset=18):
    image = helper.make_tensor_value_info("image", onnx.TensorProto.FLOAT,
                                          ["batch", 3, "height", "width"])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, out_shape)
    g = helper.make_graph(nodes, "t", [image], [y], list(inits))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def test_native_onnx_ops_against_torch():
    """Ops torch does not export as such: InstanceNorm, ReduceMax, Max, Where, GlobalMaxPool."""
    rng = np.random.default_rng(0)
    scale = rng.normal(size=3).astype(np.float32)
    bias = rng.normal(size=3).astype(np.float32)
    nodes = [
        helper.make_node("InstanceNormalization", ["image", "s", "b"], ["n"], epsilon=1e-5),
        helper.make_node("GlobalMaxPool", ["n"], ["gm"]),
        helper.make_node("ReduceMax", ["image", "ax"], ["rm"], keepdims=1),
        helper.make_node("Max", ["n", "rm"], ["mx"]),
        helper.make_node("Greater", ["image", "half"], ["cond"]),
        helper.make_node("Where", ["cond", "mx", "gm"], ["w"]),
        helper.make_node("Mul", ["w", "n"], ["y"]),
    ]
    inits = [numpy_helper.from_array(scale, "s"), numpy_helper.from_array(bias, "b"),
             numpy_helper.from_array(np.array([1], np.int64), "ax"),
             numpy_helper.from_array(np.array(0.5, np.float32), "half")]
    model = _onnx_model(nodes, inits)

    def ref(x):
        n = F.instance_norm(x, weight=torch.from_numpy(scale), bias=torch.from_numpy(bias),
                            eps=1e-5)
        gm = n.amax((2, 3), keepdim=True)
        rm = x.amax(1, keepdim=True)
        mx = torch.maximum(n, rm)
        return torch.where(x > 0.5, mx, gm) * n

    assert compare(None, ODD, model=model, torch_fn=ref) < TOL


def test_lrn_native():
    """The ONNX LRN op (Caffe GoogLeNet), against its formula written in torch."""
    nodes = [helper.make_node("LRN", ["image"], ["y"], size=3, alpha=0.3, beta=0.75, bias=1.5)]
    model = _onnx_model(nodes)

    def ref(x):
        sq = F.pad(x * x, (0, 0, 0, 0, 1, 1))
        s = sum(sq[:, i:i + 3] for i in range(3))
        return x / (1.5 + 0.3 / 3 * s) ** 0.75

    assert compare(None, ODD, model=model, torch_fn=ref) < TOL


def test_batchnorm_native_node():
    rng = np.random.default_rng(1)
    p = {k: rng.uniform(0.5, 2, 3).astype(np.float32) for k in ("s", "b", "m", "v")}
    nodes = [helper.make_node("BatchNormalization", ["image", "s", "b", "m", "v"], ["bn"],
                              epsilon=1e-3),
             helper.make_node("Mul", ["bn", "bn"], ["y"])]
    model = _onnx_model(nodes, [numpy_helper.from_array(v, k) for k, v in p.items()])
    t = {k: torch.from_numpy(v) for k, v in p.items()}

    def ref(x):
        y = F.batch_norm(x, t["m"], t["v"], t["s"], t["b"], False, 0.0, 1e-3)
        return y * y

    assert compare(None, ODD, model=model, torch_fn=ref) < TOL


def test_objectives_channel_neuron_weighted_layers():
    m = Lambda(lambda x, c: c(x), conv(3, 6, 3, padding=1))
    for obj in ("channel:4", "neuron:2", "mean"):
        assert compare(m, ODD, objective=obj) < TOL


def test_one_graph_serves_every_size_and_batch():
    m = Lambda(lambda x, c: F.max_pool2d(torch.relu(c(x)), 3, 2), conv(3, 4, 3, stride=2))
    assert compare(m, [(9, 9), (64, 33), (100, 7)], batch=1) < TOL
    assert compare(m, [(31, 31)], batch=3) < TOL


def test_control_flow_on_the_path_is_an_error_not_a_dropped_path():
    # torch exports local_response_norm with an If on the data path; the If has no rule
    from gradcheck import export
    from onnxdream.core.errors import UnsupportedOpError

    m = Lambda(lambda x, c: F.local_response_norm(c(x), 5), conv(3, 8, 1))
    with pytest.raises(UnsupportedOpError, match=r"no gradient rule for op If .*layer 'y'"):
        compile_gradient(export(m), ["y"])


def test_depth_to_space_dcr_space_to_depth_gather_nd_native():
    """DepthToSpace in DCR mode (TensorFlow's), SpaceToDepth and GatherND, written as ONNX,
    against the same rearrangements in torch."""
    rng = np.random.default_rng(1)
    w = rng.normal(size=(12, 3, 3, 3)).astype(np.float32)
    idx = np.array([[1, 0], [0, 2], [1, 2], [1, 0]], np.int64)  # (n, c) pairs, one twice
    nodes = [
        helper.make_node("Conv", ["image", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("DepthToSpace", ["c"], ["d"], blocksize=2, mode="DCR"),
        helper.make_node("SpaceToDepth", ["d"], ["s"], blocksize=2),
        helper.make_node("Mul", ["s", "c"], ["sc"]),
        helper.make_node("GatherND", ["sc", "idx"], ["y"]),
    ]
    model = _onnx_model(nodes, [numpy_helper.from_array(w, "w"),
                                numpy_helper.from_array(idx, "idx")])

    def ref(x):
        c = F.conv2d(x, torch.from_numpy(w), padding=1)
        n, ch, h, wd = c.shape
        d = c.view(n, 2, 2, ch // 4, h, wd).permute(0, 3, 4, 1, 5, 2).reshape(n, ch // 4, 2 * h,
                                                                              2 * wd)
        s = d.view(n, ch // 4, h, 2, wd, 2).permute(0, 3, 5, 1, 2, 4).reshape(n, ch, h, wd)
        sc = s * c
        return sc[torch.from_numpy(idx[:, 0]), torch.from_numpy(idx[:, 1])]

    assert compare(None, ODD, model=model, torch_fn=ref) < TOL


def test_batchnorm_then_tokens_against_fixed_autograd():
    """BatchNorm, then flatten + transpose into tokens (XCiT's patch embedding). torch's own
    eval-mode BatchNorm backward gets this wrong on the CPU for a batch of one (the incoming
    gradient is then channels-last; torch 2.14): the reference passes it on contiguous."""
    from gradcheck import contiguous_batchnorm_grads

    bn = nn.BatchNorm2d(4).eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
    weights = torch.randn(4)
    m = Lambda(lambda x, c, bn: torch.tanh(bn(c(x)).flatten(2).transpose(1, 2)) * weights,
               conv(3, 4, 3, stride=2), bn)
    with contiguous_batchnorm_grads(m):
        assert compare(m, ODD, objective="l2", batch=1) < TOL
