"""The ``keras.applications`` table: the builders by name, and what onnxdream knows of each
(its preprocessing, its native input size, its well-known DeepDream layers)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from onnxdream.core.errors import ModelError, closest
from onnxdream.exporters.keras.backend import import_keras

CODE_LICENSE = "Apache-2.0 (Keras code)"

# keras.applications module → preprocessing (keras.src.applications.<module>.preprocess_input)
_PREPROCESS_BY_MODULE: dict[str, str] = {
    "inception_v3": "tf", "xception": "tf", "inception_resnet_v2": "tf", "mobilenet": "tf",
    "mobilenet_v2": "tf", "resnet_v2": "tf", "nasnet": "tf",
    "vgg16": "caffe", "vgg19": "caffe", "resnet": "caffe",
    "densenet": "torch",
    # built with include_preprocessing=True (their default): Rescaling/Normalization inside
    "efficientnet": "none", "efficientnet_v2": "none", "convnext": "none",
    "mobilenet_v3": "none", "regnet": "none", "resnet_rs": "none",
}

# Native (ImageNet) input sizes; everything else is 224.
_NATIVE_SIZE: dict[str, int] = {
    "inceptionv3": 299, "xception": 299, "inceptionresnetv2": 299, "nasnetlarge": 331,
    "efficientnetb1": 240, "efficientnetb2": 260, "efficientnetb3": 300, "efficientnetb4": 380,
    "efficientnetb5": 456, "efficientnetb6": 528, "efficientnetb7": 600,
    "efficientnetv2b1": 240, "efficientnetv2b2": 260, "efficientnetv2b3": 300,
    "efficientnetv2s": 384, "efficientnetv2m": 480, "efficientnetv2l": 480,
}

# Well-known DeepDream layers (the Keras example's InceptionV3 layers, VGG's conv4_3 …)
_DEFAULT_LAYERS: dict[str, list[str]] = {
    "inceptionv3": ["mixed4"],
    "vgg16": ["block4_conv3"],
    "vgg19": ["block4_conv4"],
    "mobilenetv2": ["block_12_add"],
    "xception": ["block8_sepconv3_act"],
}


def _normalise(name: str) -> str:
    """A model name without case or punctuation: ``InceptionV3`` and ``inception_v3`` match."""
    return re.sub(r"[^a-z0-9]", "", name.lower())


def keras_applications() -> dict[str, Callable[..., Any]]:
    """{name: builder} for every ``keras.applications`` model (InceptionV3, VGG16, …)."""
    keras = import_keras()
    apps = keras.applications
    return {n: getattr(apps, n) for n in dir(apps)
            if n[:1].isupper() and callable(getattr(apps, n))}


def find_application(name: str) -> tuple[str, Callable[..., Any]]:
    """(the real name, the builder) of application ``name`` (any case or punctuation);
    ModelError with the closest names if there is none."""
    apps = keras_applications()
    by_norm = {_normalise(n): n for n in apps}
    if name in apps:
        return name, apps[name]
    if _normalise(name) in by_norm:
        real = by_norm[_normalise(name)]
        return real, apps[real]
    near = closest(name, sorted(apps))
    hint = f"; did you mean {', '.join(near)}?" if near else (
        f"; available: {', '.join(sorted(apps))}")
    raise ModelError(f"keras.applications has no model named {name!r} and no file {name!r} "
                     f"exists{hint}")


def application_preprocess(builder: Callable[..., Any]) -> str | None:
    """The preprocessing a ``keras.applications`` builder's model was trained with (see
    :data:`onnxdream.exporters.preprocess.PREPROCESSING`), None if not known."""
    return _PREPROCESS_BY_MODULE.get(builder.__module__.rsplit(".", 1)[-1])


def application_size(name: str) -> int | None:
    """The native (ImageNet) input side of application ``name`` where it is not 224."""
    return _NATIVE_SIZE.get(_normalise(name))


def application_layers(name: str) -> list[str] | None:
    """The well-known DeepDream layers of application ``name``, if it has any."""
    return _DEFAULT_LAYERS.get(_normalise(name))
