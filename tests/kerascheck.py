"""Keras 3 (torch backend) as the reference for exported Keras models: random models with
non-trivial BatchNorm, the preprocessing written independently of the exporter, and the
gradient by torch autograd through the Keras model with onnxruntime's discrete decisions.

Importing this skips the importing test module (with the reason) without Keras or torch, or when
Keras runs on another backend (``KERAS_BACKEND`` is set to ``torch`` here unless already set).

Discrete decisions (ReLU masks, MaxPool argmax, Clip/ReLU6 ranges) are shared between
onnxruntime and torch as in ``gradcheck.shared_decisions``: Keras' ops reach torch through
``torch.nn.functional`` (``F.relu`` → ``torch.relu``, ``F.max_pool2d``, ``F.relu6``), and the
exported graph does the same ops in the same order, so onnxruntime's choices can be handed to the
torch forward.
"""

from __future__ import annotations

import contextlib
import os

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "torch")
keras = pytest.importorskip("keras")
torch = pytest.importorskip("torch")
if keras.backend.backend() != "torch":  # pragma: no cover
    pytest.skip("these tests need KERAS_BACKEND=torch", allow_module_level=True)

import torch.nn.functional as F  # noqa: E402

from gradcheck import shared_decisions  # noqa: E402

CAFFE_MEAN_BGR = torch.tensor([103.939, 116.779, 123.68]).view(1, 3, 1, 1)
REFERENCE_PREPROCESS = {  # written independently of the exporter's graph version
    "tf": lambda x: x / 0.5 - 1.0,
    "caffe": lambda x: x[:, [2, 1, 0]] * 255.0 - CAFFE_MEAN_BGR,
    "none": lambda x: x * 255.0,
}


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
