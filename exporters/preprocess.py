"""How the [0,1] RGB image becomes a network's input, as torch code traced into the graph.

A dreamable model takes RGB in [0,1] and does its network's preprocessing itself (the contract in
:mod:`onnxdream.exporters.graph.contract`). The exporters trace one of these functions in front of
the network: :data:`PREPROCESSING` names the conventions that pretrained classifiers use, and
:func:`preprocess_fn` gives the torch function for one. torch is imported lazily.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from onnxdream.core.errors import ModelError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)

# How each preprocessing maps RGB in [0,1] to what the network expects (see preprocess_fn).
PREPROCESSING: dict[str, str] = {
    "tf": "x*255/127.5 - 1, RGB (Inception, Xception, MobileNet v1/v2, ResNet v2, NASNet)",
    "caffe": "BGR, x*255 minus the ImageNet mean [103.939, 116.779, 123.68] (VGG, ResNet v1)",
    "torch": "RGB, (x - ImageNet mean) / ImageNet std on [0,1] (DenseNet)",
    "none": "RGB x*255: the model scales its input itself (EfficientNet, ConvNeXt, MobileNetV3)",
    "unit": "RGB x in [0,1] as it is",
}


def imagenet_preprocess(x: Any) -> Any:
    """[0,1] RGB → ImageNet mean/std normalised (torchvision's convention)."""
    import torch

    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def preprocess_fn(kind: str) -> Callable[[Any], Any]:
    """[0,1] RGB NCHW torch tensor → the network's input scale (still NCHW) for ``kind``, one of
    :data:`PREPROCESSING`'s names; ModelError for another."""
    import torch

    if kind == "tf":
        return lambda x: x * 2.0 - 1.0
    if kind == "caffe":
        # one 1x1 Conv: the BGR swap, ×255 and the mean subtraction at once
        weight = torch.zeros(3, 3, 1, 1)
        for out_ch, in_ch in enumerate((2, 1, 0)):
            weight[out_ch, in_ch] = 255.0
        bias = -torch.tensor(CAFFE_MEAN_BGR)
        return lambda x: torch.nn.functional.conv2d(x, weight.to(x.dtype), bias.to(x.dtype))
    if kind == "torch":
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        return lambda x: (x - mean.to(x.dtype)) / std.to(x.dtype)
    if kind == "none":
        return lambda x: x * 255.0
    if kind == "unit":
        return lambda x: x
    raise ModelError(f"unknown preprocessing {kind!r}: use one of {', '.join(PREPROCESSING)}")
