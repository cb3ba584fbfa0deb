"""Helpers for the gradient tests: export a torch module, compile it, compare with autograd."""

from __future__ import annotations

import contextlib
import io
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn as nn
import torch.nn.functional as F

from onnxdream.exporters.graph import compile_gradient


def export(module: torch.nn.Module, shape=(1, 3, 17, 19), dynamic=True,
           opset=18) -> onnx.ModelProto:
    """TorchScript-export ``module`` with input ``image`` and output ``y``."""
    buf = io.BytesIO()
    axes = {"image": {0: "batch", 2: "height", 3: "width"}} if dynamic and len(shape) == 4 else (
        {"image": {0: "batch"}} if dynamic else None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (torch.randn(*shape),), buf, dynamo=False,
                          opset_version=opset, input_names=["image"], output_names=["y"],
                          dynamic_axes=axes)
    return onnx.load_from_string(buf.getvalue())


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    onnx.checker.check_model(model, full_check=True)
    assert all(n.domain in ("", "ai.onnx") for n in model.graph.node), "non-default-domain op"
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def torch_objective(out: torch.Tensor, objective: str) -> torch.Tensor:
    if objective == "l2":
        return (out * out).flatten(1).mean(1)
    if objective == "mean":
        return out.flatten(1).mean(1)
    kind, k = objective.split(":")
    k = int(k)
    if kind == "class":
        return out[:, k]
    axis = 2 if out.dim() == 3 else 1
    ch = out.select(axis, k)
    if kind == "channel":
        return ch.flatten(1).mean(1) if ch.dim() > 1 else ch
    while ch.dim() > 1:  # neuron: the centre of each remaining spatial axis
        ch = ch.select(1, ch.shape[1] // 2)
    return ch


def onnx_decisions(model: onnx.ModelProto, x: np.ndarray) -> dict[str, list[np.ndarray]]:
    """onnxruntime's discrete choices for input ``x``: MaxPool argmax indices and Relu masks.

    Both lists are in node order, which for a traced export is torch's call order.
    """
    m = onnx.ModelProto()
    m.CopyFrom(model)
    fetch: dict[str, list[str]] = {"maxpool": [], "relu": [], "clip": []}
    inferred = onnx.shape_inference.infer_shapes(m)
    types = {v.name: v.type.tensor_type.elem_type for v in (
        *inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)}
    for k, node in enumerate(m.graph.node):
        if node.output[0].startswith("opt/"):
            continue  # added by the optimiser for the backward (e.g. a separable pool's rows)
        if node.op_type == "MaxPool":
            while len(node.output) < 2:
                node.output.append("")
            if not node.output[1]:
                node.output[1] = f"__maxpool_indices_{k}"
            fetch["maxpool"].append(node.output[1])
            m.graph.output.append(onnx.helper.make_tensor_value_info(
                node.output[1], onnx.TensorProto.INT64, None))
        elif node.op_type in ("Relu", "Clip") and types.get(
                node.input[0], onnx.TensorProto.FLOAT) == onnx.TensorProto.FLOAT:
            # (an integer Clip computes a shape, e.g. Keras' runtime "same" pads)
            fetch[node.op_type.lower()].append(node.input[0])
            m.graph.output.append(onnx.helper.make_tensor_value_info(
                node.input[0], onnx.TensorProto.FLOAT, None))
    names = fetch["maxpool"] + fetch["relu"] + fetch["clip"]
    if not names:
        return {"maxpool": [], "relu": [], "clip": []}
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    values = dict(zip(names, sess.run(names, {"image": x})))
    return {"maxpool": [values[n] for n in fetch["maxpool"]],
            "relu": [values[n] > 0 for n in fetch["relu"]],
            "clip": [values[n] for n in fetch["clip"]]}


@contextlib.contextmanager
def shared_decisions(decisions: dict[str, list[np.ndarray]]):
    """Make torch's max_pool2d, relu and hardtanh take the discrete choices onnxruntime took.

    Max pooling and ReLU are discontinuous: where a window's two best entries, or a unit's
    pre-activation and zero, are within float32 rounding of each other, torch and onnxruntime
    (which folds BatchNorm into Conv and sums in another order) can decide differently, and one
    flipped unit moves the gradient of a deep ReLU network by 1e-3 of its maximum over the unit's
    whole receptive field. Sharing the choices keeps the comparison about the gradient rules;
    autograd still differentiates everything else.
    """
    original_pool, original_relu = F.max_pool2d, (torch.relu, torch.relu_)
    original_hardtanh = F.hardtanh
    pools, relus = list(decisions["maxpool"]), list(decisions["relu"])
    clips = list(decisions.get("clip", []))

    # Past the layer, the export pruned the graph: torch's later calls run unshared.
    def pooled(inp, *args, return_indices=False, **kwargs):
        if not pools:
            return original_pool(inp, *args, return_indices=return_indices, **kwargs)
        idx = torch.from_numpy(pools.pop(0))
        n, c, h, w = inp.shape
        local = idx - (torch.arange(n * c).view(n, c, 1, 1) * h * w)
        out = inp.flatten(2).gather(2, local.flatten(2)).view(idx.shape)
        return (out, local) if return_indices else out

    def relu(inp):
        if not relus:
            return original_relu[0](inp)
        mask = torch.from_numpy(relus.pop(0))
        assert mask.shape == inp.shape, "torch's relu calls do not follow the ONNX node order"
        return inp * mask

    def hardtanh(inp, min_val=-1.0, max_val=1.0, inplace=False):  # ReLU6, Hardtanh
        if not clips:
            return original_hardtanh(inp, min_val, max_val)
        pre = torch.from_numpy(clips.pop(0))
        assert pre.shape == inp.shape, "torch's clip calls do not follow the ONNX node order"
        inside = (pre > min_val) & (pre < max_val)
        return torch.where(inside, inp, torch.where(pre >= max_val, max_val, min_val))

    F.max_pool2d = pooled
    F.hardtanh = hardtanh
    torch.relu = torch.relu_ = relu
    try:
        yield
    finally:
        F.max_pool2d = original_pool
        F.hardtanh = original_hardtanh
        torch.relu, torch.relu_ = original_relu


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


def compare(module, sizes, objective="l2", layers=("y",), torch_fn=None, batch=2, seed=0,
            channels=3, model=None, **compile_kw):
    """Relative error of the compiled gradient vs autograd, worst over ``sizes``."""
    model = model if model is not None else export(
        module, (1, channels) + tuple(sizes[0]) if len(sizes[0]) == 2 else (1,) + tuple(sizes[0]))
    grad_model = compile_gradient(model, list(layers), objective, **compile_kw)
    sess = session(grad_model)
    worst = 0.0
    gen = torch.Generator().manual_seed(seed)
    for size in sizes:
        shape = (batch, channels) + tuple(size) if len(size) == 2 else (batch,) + tuple(size)
        x = torch.rand(*shape, generator=gen, requires_grad=True)
        # decisions from the compiled graph itself: the forward onnxruntime really ran
        with shared_decisions(onnx_decisions(grad_model, x.detach().numpy())):
            out = torch_fn(x) if torch_fn is not None else module(x)
        obj = torch_objective(out, objective)
        obj.sum().backward()
        got_obj, got_grad = sess.run(None, {"image": x.detach().numpy()})
        assert got_grad.shape == x.shape
        np.testing.assert_allclose(got_obj, obj.detach().numpy(), rtol=1e-4, atol=1e-5)
        worst = max(worst, relative_error(got_grad, x.grad.numpy()))
    return worst


class _ContiguousGrad(torch.autograd.Function):
    """Identity (a copy, so that later in-place ops may modify it) whose backward makes the
    incoming gradient contiguous."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g.contiguous()


@contextlib.contextmanager
def contiguous_batchnorm_grads(model: torch.nn.Module):
    """Work around a torch bug in the reference: on the CPU (torch 2.14), an eval-mode
    BatchNorm's backward is wrong (relative error ~1) for a batch of one when the gradient
    reaching its output is not contiguous, as after ``flatten(2).transpose(1, 2)`` into tokens
    (XCiT's patch embedding). Each BatchNorm's output passes its gradient on contiguous while
    this lasts."""
    handles = [m.register_forward_hook(lambda _m, _i, out: _ContiguousGrad.apply(out))
               for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class Lambda(nn.Module):
    """A module computing ``fn(x, *mods)``: a one-op network for the per-op tests, its
    parameters (``mods``) registered so that torch.onnx exports them."""

    def __init__(self, fn, *mods):
        super().__init__()
        self.fn = fn
        self.mods = nn.ModuleList(mods)

    def forward(self, x):
        return self.fn(x, *self.mods)
