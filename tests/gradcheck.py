"""Helpers for the gradient tests: export a torch module, compile it, compare with autograd."""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import torch

from onnxdream.exporters.graph import compile_gradient


def export(module: torch.nn.Module, shape=(1, 3, 17, 19), dynamic=True, opset=18) -> onnx.ModelProto:
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
        out = torch_fn(x) if torch_fn is not None else module(x)
        obj = torch_objective(out, objective)
        obj.sum().backward()
        got_obj, got_grad = sess.run(None, {"image": x.detach().numpy()})
        assert got_grad.shape == x.shape
        np.testing.assert_allclose(got_obj, obj.detach().numpy(), rtol=1e-4, atol=1e-5)
        worst = max(worst, relative_error(got_grad, x.grad.numpy()))
    return worst
