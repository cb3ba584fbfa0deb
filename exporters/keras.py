"""Keras 3 models → dreamable models, exported through Keras' PyTorch backend.

``export_keras("InceptionV3", "inception_v3.onnx")`` builds a ``keras.applications`` network
(without its classifier, with dynamic H/W) or loads a ``.keras`` / legacy ``.h5`` model file, and
hands it to :func:`onnxdream.exporters.torch_export.export_module`. Under ``KERAS_BACKEND=torch``
every Keras layer is a ``torch.nn.Module`` whose ``__call__`` runs torch's hooks, so the layer
outputs are captured exactly as for torchvision, and ``torch.onnx.export`` traces the torch ops
Keras calls. The dreamable-model contract (:mod:`onnxdream.exporters.graph.contract`) holds:
the graph takes RGB [0,1] NCHW and does the model's own preprocessing (``x/127.5-1``, Caffe BGR
mean subtraction, ImageNet mean/std, or ×255 for models that scale inside; see
:mod:`onnxdream.exporters.preprocess`) and the NCHW → NHWC transpose itself. Layer names are Keras
layer names (``mixed4``, ``block4_conv3``, ``block_6_expand_relu``); 4-D channels-last layers are
listed in ``onnxdream.layer_layouts`` so that channel objectives and borders use the right axes.

Users of the TensorFlow backend save their model (``model.save("m.keras")``; the ``.keras``
format is backend-independent) and export the file in an environment with ``onnxdream[keras]``.
keras and torch are imported lazily.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from onnxdream.core.errors import DependencyError, ModelError, OnnxDreamError, closest, first_line
from onnxdream.exporters.graph.contract import FRAMEWORK_KEY, LAYOUTS_KEY, PREPROCESS_KEY
from onnxdream.exporters.preprocess import PREPROCESSING, preprocess_fn
from onnxdream.exporters.torch_export import (
    ExportResult,
    Progress,
    export_errors,
    export_module,
    save_atomic,
    say,
)
from onnxdream.exporters.tracing import odd_size

__all__ = [
    "KerasModel",
    "drop_noop_casts",
    "export_keras",
    "import_keras",
    "keras_applications",
    "load_keras",
    "make_dynamic",
]

INSTALL_HINT = "pip install 'onnxdream[keras]' and set KERAS_BACKEND=torch"
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
# the end of stage 4 of ResNets and DenseNets (like torchvision's layer3 / denseblock3)
_STAGE4 = re.compile(r"^conv4_block\d+_(out|concat)$")


def _normalise(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


# --------------------------------------------------------------------------------------------
# Importing keras with the torch backend
# --------------------------------------------------------------------------------------------


def import_keras() -> Any:
    """Import keras on its PyTorch backend, or raise DependencyError saying what to do.

    If keras is not imported yet, KERAS_BACKEND is set to ``torch`` first; if it was already
    imported with another backend, that cannot be changed in this process.
    """
    try:
        import torch  # noqa: F401
    except ImportError as exc:
        raise DependencyError(f"exporting Keras models needs PyTorch; {INSTALL_HINT}") from exc
    if "keras" not in sys.modules:
        os.environ["KERAS_BACKEND"] = "torch"  # keras reads it once, on its first import
    try:
        import keras
    except ImportError as exc:
        raise DependencyError(f"exporting Keras models needs Keras 3; {INSTALL_HINT}") from exc
    version = getattr(keras, "__version__", "0")
    if int(version.split(".")[0]) < 3:
        raise DependencyError(f"exporting Keras models needs Keras 3 (found {version}); "
                              f"{INSTALL_HINT}")
    backend = keras.backend.backend()
    if backend != "torch":
        raise DependencyError(
            f"keras was already imported with the {backend} backend in this process; exporting "
            "runs on its torch backend: set KERAS_BACKEND=torch before anything imports keras "
            "(or run `onnxdream export keras` in a fresh process)"
        )
    return keras


def keras_applications() -> dict[str, Callable[..., Any]]:
    """{name: builder} for every ``keras.applications`` model (InceptionV3, VGG16, …)."""
    keras = import_keras()
    apps = keras.applications
    return {n: getattr(apps, n) for n in dir(apps)
            if n[:1].isupper() and callable(getattr(apps, n))}


# --------------------------------------------------------------------------------------------
# Building or loading the model
# --------------------------------------------------------------------------------------------


@dataclass
class KerasModel:
    """A Keras model ready to export, and what the export needs to know about it."""

    model: Any
    name: str
    preprocess: str
    source: str
    license: str
    input_size: int | tuple[int, int]
    dynamic: bool
    channels_last: bool
    labels: list[str] | None
    default_layers: list[str]
    notes: list[str]


def _is_file(spec: str) -> bool:
    return spec.lower().endswith((".keras", ".h5", ".hdf5")) or os.sep in spec or Path(
        spec).is_file()


def _check_app(name: str) -> tuple[str, Callable[..., Any]]:
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


def _preprocess_needed(path: Path) -> ModelError:
    return ModelError(
        f"say how {path.name} expects its input: --preprocess tf (x/127.5-1), caffe (BGR minus "
        "the ImageNet mean), torch (ImageNet mean/std), none (0..255; the model scales itself) "
        "or unit ([0,1])"
    )


def _download_error(name: str, exc: BaseException) -> OnnxDreamError:
    text = f"{exc} {exc.__context__ or ''}"
    if "URL fetch failure" in text or "urlopen" in text or isinstance(exc, OSError) or any(
            k in text for k in ("Name or service not known", "Temporary failure", "timed out",
                                "Connection", "HTTP Error")):
        return ModelError(
            f"could not download the ImageNet weights for {name} (no internet?): pass "
            f"--weights none, or --weights FILE with a .weights.h5 file, or put Keras' weights "
            f"file in ~/.keras/models"
        )
    return ModelError(f"could not load the ImageNet weights for {name} ({first_line(exc, 160)})")


def _load_weights(model: Any, path: Path, what: str) -> None:
    if not path.is_file():
        raise ModelError(f"weights file {str(path)!r} does not exist")
    try:
        model.load_weights(str(path))
    except Exception as exc:  # noqa: BLE001 - translated into one sentence
        raise ModelError(f"could not load the weights in {path.name!r} into {what} "
                         f"({first_line(exc)})") from exc


def _input_layout(model: Any) -> tuple[tuple[Any, ...], bool]:
    """(input shape, channels_last) of a one-image-input model; ModelError otherwise."""
    try:
        shape = model.input_shape
    except (AttributeError, ValueError) as exc:
        raise ModelError(
            f"{model.name} has no defined input (a subclassed model that was never built?); "
            "export a functional or Sequential model"
        ) from exc
    if isinstance(shape, list):
        if len(shape) != 1:
            raise ModelError(f"{model.name} has {len(shape)} inputs; a dreamable model takes one "
                             "image")
        shape = shape[0]
    shape = tuple(shape)
    if len(shape) != 4:
        raise ModelError(f"{model.name} takes input of shape {shape}, not an image batch "
                         "(N, H, W, 3)")
    if shape[3] == 3:
        return shape, True
    if shape[1] == 3:
        return shape, False
    raise ModelError(f"{model.name} takes {shape[3]}-channel images (input {shape}); a dreamable "
                     "model takes RGB")


def make_dynamic(model: Any) -> tuple[Any, bool, str | None]:
    """(model, dynamic, note): a copy with an (None, None) spatial input where layers allow it.

    A model with a fixed input size is cloned onto ``Input(shape=(None, None, 3))`` and its
    weights copied over. Layers whose weights depend on the size (``Flatten`` before ``Dense``)
    make the clone fail; the model then keeps its size, and the note says why.
    """
    keras = import_keras()
    shape, channels_last = _input_layout(model)
    spatial = shape[1:3] if channels_last else shape[2:4]
    if all(d is None for d in spatial):
        return model, True, None
    fixed = f"{model.name} keeps its fixed {spatial[0]}×{spatial[1]} input"
    try:
        new_shape = (None, None, 3) if channels_last else (3, None, None)
        clone = keras.models.clone_model(model, input_tensors=keras.Input(shape=new_shape))
        clone.set_weights(model.get_weights())
    except Exception as exc:  # noqa: BLE001 - any failure means "its layers need the size"
        return model, False, f"{fixed}: its layers need that size ({keras_error_line(exc)})"
    # Layers may have been built for the size (NASNet pads its reduction cells by the parity
    # of the build size): the clone must run at that size, and at an odd one too.
    h, w = int(spatial[0]), int(spatial[1])
    for size in ((h, w), (odd_size(h)[0], odd_size(w)[1])):
        try:
            _run_keras(clone, size, channels_last)
        except Exception as exc:  # noqa: BLE001 - translated into the note
            return model, False, (f"{fixed}: its layers were built for that size and fail at "
                                  f"{size[0]}×{size[1]} ({keras_error_line(exc)})")
    return clone, True, f"{model.name} was rebuilt with dynamic H/W (its input was " \
        f"{spatial[0]}×{spatial[1]})"


def keras_error_line(exc: BaseException) -> str:
    """first_line for Keras' errors: no ANSI colours, and the cause after Keras' own wrapper."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    # Keras wraps errors in "Exception encountered when calling X.call()": keep the cause too
    if len(lines) > 1 and lines[0].startswith("Exception encountered"):
        return f"{lines[0]} {lines[1]}"[:200]
    return lines[0][:200] if lines else type(exc).__name__


def _run_keras(model: Any, size: tuple[int, int], channels_last: bool) -> None:
    import torch

    shape = (1, *size, 3) if channels_last else (1, 3, *size)
    with torch.no_grad():
        model(torch.zeros(shape), training=False)


def _native_size(model: Any, name: str, channels_last: bool) -> int | tuple[int, int] | None:
    shape, _ = _input_layout(model)
    h, w = shape[1:3] if channels_last else shape[2:4]
    if h is not None and w is not None:
        return int(h) if h == w else (int(h), int(w))
    return _NATIVE_SIZE.get(_normalise(name))


def _layers(model: Any) -> dict[str, Any]:
    """Every layer, nested models' included, by its Keras name (``outer/inner`` when a name
    occurs more than once). Input layers are left out."""
    keras = import_keras()
    found: list[tuple[str, Any]] = []

    def walk(m: Any, prefix: str) -> None:
        for layer in getattr(m, "layers", []):
            if isinstance(layer, keras.layers.InputLayer):
                continue
            found.append((prefix + layer.name, layer))
            if isinstance(layer, keras.Model):
                walk(layer, prefix + layer.name + "/")

    walk(model, "")
    counts = Counter(layer.name for _, layer in found)
    return {(layer.name if counts[layer.name] == 1 else path): layer for path, layer in found}


def _single_output_rank(layer: Any) -> int | None:
    """The rank of the layer's one symbolic output; None if called several times or unknown."""
    try:
        out = layer.output
    except (AttributeError, ValueError, RuntimeError):
        return None
    if isinstance(out, (list, tuple, dict)):
        return None
    shape = getattr(out, "shape", None)
    return None if shape is None else len(shape)


def _layouts(layers: dict[str, Any], channels_last: bool) -> dict[str, str]:
    """{layer: "NHWC"} for 4-D channels-last layer outputs (the compiler's layer_layouts)."""
    out = {}
    for name, layer in layers.items():
        if _single_output_rank(layer) != 4:
            continue
        fmt = getattr(layer, "data_format", None)
        last = fmt == "channels_last" if fmt in ("channels_last", "channels_first") else \
            channels_last
        if last:
            out[name] = "NHWC"
    return out


def _default_layers(name: str, layers: dict[str, Any]) -> list[str]:
    known = _DEFAULT_LAYERS.get(_normalise(name))
    if known and all(k in layers for k in known):
        return known
    stage4 = [n for n in layers if _STAGE4.match(n)]
    if stage4:
        return [stage4[-1]]
    # ~60% into the network, preferring the blocks' outputs (merges and activations)
    four_d = [n for n, layer in layers.items() if _single_output_rank(layer) == 4]
    merges = [n for n in four_d if type(layers[n]).__name__ in ("Add", "Concatenate")]
    acts = [n for n in four_d if type(layers[n]).__name__ in ("Activation", "ReLU")]
    preferred = merges or acts or four_d
    return [preferred[len(preferred) * 6 // 10]] if preferred else []


def _recommended_layers(layers: dict[str, Any], default: list[str]) -> list[str]:
    """The blocks' outputs (merges, else activations) spread over the middle of the network,
    plus the default layers (:func:`~onnxdream.exporters.graph.layers.recommend_layers`)."""
    from onnxdream.exporters.graph.layers import recommend_layers

    four_d = [n for n, layer in layers.items() if _single_output_rank(layer) == 4]
    merges = [n for n in four_d if type(layers[n]).__name__ in ("Add", "Concatenate")]
    acts = [n for n in four_d if type(layers[n]).__name__ in ("Activation", "ReLU")]
    return recommend_layers(merges or acts or four_d, default, order=list(layers))


def _imagenet_labels() -> list[str]:
    from onnxdream.core.labels import imagenet_labels

    return imagenet_labels()


def _output_units(model: Any) -> int | None:
    try:
        shape = model.output_shape
    except (AttributeError, ValueError):
        return None
    if isinstance(shape, list):
        shape = shape[0]
    return int(shape[-1]) if len(shape) == 2 and shape[-1] is not None else None


def load_keras(
    model: str | os.PathLike[str],
    weights: str | None = None,
    preprocess: str | None = None,
    include_top: bool = False,
    progress: Progress = None,
) -> KerasModel:
    """Build a ``keras.applications`` model by name or load a ``.keras`` / ``.h5`` file.

    ``weights`` for names: ``imagenet`` (default; Keras downloads and caches it), ``none``
    (random init) or a ``.weights.h5`` FILE; for model files: None (the file's own weights) or a
    weights FILE. ``preprocess`` is inferred for application names and required for files.
    Application models are built without their classifier and with dynamic H/W unless
    ``include_top`` (the classifier's logits, needed for class objectives). A model with a fixed
    input size is rebuilt with dynamic H/W where its layers allow it.
    """
    spec = os.fspath(model)
    notes: list[str] = []
    choice = None if weights is None else str(weights)
    if _is_file(spec) and preprocess is None and Path(os.path.expanduser(spec)).is_file():
        path = Path(os.path.expanduser(spec))
        raise _preprocess_needed(path)
    keras = import_keras()
    if _is_file(spec):
        path = Path(os.path.expanduser(spec))
        if not path.is_file():
            raise ModelError(f"model file {spec!r} does not exist")
        if preprocess is None:
            raise _preprocess_needed(path)
        if choice is not None and choice.lower() in ("imagenet", "none", "random"):
            raise ModelError(f"--weights {choice} applies to keras.applications names; a model "
                             "file carries its own weights (or pass --weights FILE)")
        say(progress, f"loading {path.name}")
        try:
            net = keras.saving.load_model(str(path), compile=False, safe_mode=True)
        except Exception as exc:  # noqa: BLE001 - translated into one sentence
            raise ModelError(f"could not load {path.name} as a Keras model "
                             f"({first_line(exc)})") from exc
        if choice is not None:
            say(progress, f"loading weights from {choice}")
            _load_weights(net, Path(os.path.expanduser(choice)), path.name)
        name = net.name or path.stem
        source = f"keras file {path.name}"
        license_text = "weights and code: supplied by the user"
        labels = None
    else:
        name, builder = _check_app(spec)
        module = builder.__module__.rsplit(".", 1)[-1]
        inferred = _PREPROCESS_BY_MODULE.get(module)
        if preprocess is None:
            if inferred is None:
                raise ModelError(f"no known preprocessing for {name}: pass --preprocess")
            preprocess = inferred
        elif inferred is not None and preprocess != inferred:
            notes.append(f"{name} was trained with {inferred!r} preprocessing; using "
                         f"{preprocess!r} as asked")
        choice = "imagenet" if choice is None else choice
        kwargs: dict[str, Any] = {"include_top": include_top}
        if include_top:
            kwargs["classifier_activation"] = None  # logits, not softmax
        else:
            kwargs["input_shape"] = (None, None, 3)
        is_file = choice.lower() not in ("imagenet", "none", "random")
        if is_file and not re.search(r"[./\\]", choice):
            raise ModelError(f"unknown weights {choice!r}: use imagenet, none or a .weights.h5 "
                             "file")
        if choice.lower() == "imagenet":
            say(progress, f"building {name} with Keras' ImageNet weights")
            try:
                net = builder(weights="imagenet", **kwargs)
            except (OnnxDreamError, MemoryError, KeyboardInterrupt):
                raise
            except Exception as exc:  # noqa: BLE001
                raise _download_error(name, exc) from exc
            label = "imagenet"
        else:
            say(progress, f"building {name}")
            try:
                net = builder(weights=None, **kwargs)
            except (OnnxDreamError, MemoryError, KeyboardInterrupt):
                raise
            except Exception as exc:  # noqa: BLE001 - e.g. NASNet, refused on torch by Keras
                raise ModelError(f"Keras cannot build {name} on its torch backend: "
                                 f"{keras_error_line(exc)}") from exc
            label = "none"
            if is_file:
                path = Path(os.path.expanduser(choice))
                say(progress, f"loading weights from {path}")
                _load_weights(net, path, name)
                label = path.name
        source = f"keras.applications.{name} (weights: {label}" + (
            ", with its classifier)" if include_top else ", without its classifier)")
        license_text = CODE_LICENSE + ("; weights: random" if label == "none" else
                                       "; weights: see keras.applications" if label == "imagenet"
                                       else "; weights: supplied by the user")
        labels = _imagenet_labels() if include_top and _output_units(net) == 1000 else None
    if preprocess not in PREPROCESSING:
        raise ModelError(f"unknown --preprocess {preprocess!r}: use one of "
                         f"{', '.join(PREPROCESSING)}")
    net, dynamic, note = make_dynamic(net)
    if note:
        notes.append(note)
    _, channels_last = _input_layout(net)
    size = _native_size(net, name, channels_last) or 224
    layers = _layers(net)
    return KerasModel(net, name, preprocess, source, license_text, size, dynamic,
                      channels_last, labels, _default_layers(name, layers), notes)


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------


def _softmax_head(model: Any) -> Any:
    """The output layer if it applies softmax through an ``activation`` attribute, else None."""
    keras = import_keras()
    layers = getattr(model, "layers", [])
    if not layers:
        return None
    last = layers[-1]
    act = getattr(last, "activation", None)
    if act is not None and act is getattr(keras.activations, "softmax", None):
        return last
    return None


@contextmanager
def _logits_head(model: Any, notes: list[str]) -> Iterator[None]:
    """Export logits rather than probabilities: a softmax output layer is linear meanwhile."""
    keras = import_keras()
    head = _softmax_head(model)
    if head is None:
        yield
        return
    original = head.activation
    head.activation = keras.activations.linear
    notes.append(f"the softmax of {head.name} is left out: the output is logits")
    try:
        yield
    finally:
        head.activation = original


@contextmanager
def traceable_keras_ops() -> Iterator[None]:
    """Make Keras' torch backend trace with symbolic H/W (the TorchScript exporter).

    Keras computes two things in Python from the traced sizes, which the tracer then records as
    runtime shape ops the ONNX exporter cannot take (or freezes at the traced size):

    - ``LayerNormalization`` passes ``normalized_shape`` read off ``x.shape`` to
      ``F.layer_norm``: that is the channel count, constant, so it is made a Python int here
      (ConvNeXt's "Failed to export a node … onnx::Gather").
    - ``padding="same"`` with strides (convolutions, pools) computes its pads with
      ``max(0, …)`` and picks ``F.pad`` or the op's own padding by an ``if`` on their symmetry;
      here the pads are torch ops on the runtime size, always applied by ``F.pad``, as Keras
      does in the asymmetric case (Xception's "Failed to export a node … onnx::Cast").

    Outside tracing both do exactly what Keras does.
    """
    import torch
    import torch.nn.functional as F

    import_keras()
    from keras.src.backend.torch import nn as keras_nn

    layer_norm, same_padding = F.layer_norm, keras_nn._apply_same_padding

    def static_layer_norm(x: Any, normalized_shape: Any, *args: Any, **kwargs: Any) -> Any:
        if torch.jit.is_tracing():
            normalized_shape = tuple(int(d) for d in normalized_shape)
        return layer_norm(x, normalized_shape, *args, **kwargs)

    def traced_same_padding(inputs: Any, kernel_size: Any, strides: Any, data_format: Any,
                            operation_type: str, dilation_rate: Any = 1) -> Any:
        if not torch.jit.is_tracing():
            return same_padding(inputs, kernel_size, strides, data_format, operation_type,
                                dilation_rate)
        nd = inputs.dim() - 2
        dil = [1] * nd if operation_type == "pooling" else (
            [int(dilation_rate)] * nd if isinstance(dilation_rate, int) else list(dilation_rate))
        pads: list[tuple[Any, Any]] = []
        for i in range(nd):
            keff, s = (int(kernel_size[i]) - 1) * dil[i] + 1, int(strides[i])
            if s == 1:  # keff - 1 whatever the size
                pads.append(((keff - 1) // 2, keff - 1 - (keff - 1) // 2))
                continue
            n = torch.as_tensor(inputs.shape[2 + i])
            out = torch.div(n + (s - 1), s, rounding_mode="floor")
            total = torch.clamp((out - 1) * s + keff - n, min=0)
            left = torch.div(total, 2, rounding_mode="floor")
            pads.append((left, total - left))
        if all(isinstance(a, int) and a == b for a, b in pads):
            return inputs, [a for a, _ in pads]
        flat = tuple(p for pair in reversed(pads) for p in pair)
        mode = "replicate" if operation_type == "pooling" else "constant"
        return F.pad(inputs, pad=flat, mode=mode), 0

    F.layer_norm = static_layer_norm
    keras_nn._apply_same_padding = traced_same_padding
    try:
        yield
    finally:
        F.layer_norm = layer_norm
        keras_nn._apply_same_padding = same_padding


def drop_noop_casts(model: Any) -> int:
    """Remove ``Cast`` nodes that cast a float32 tensor to float32; returns how many.

    Keras' torch backend converts every op's inputs to the working dtype, which traces as a
    Cast to FLOAT of an already-float tensor (hundreds in InceptionV3). They cost nothing at
    run time, but they hide a layer's ReLU from ``--pre-relu`` and bloat the gradient graph.
    """
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in (
        *inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)}
    types.update({i.name: i.data_type for i in model.graph.initializer})
    outputs = {o.name for o in model.graph.output}
    rename: dict[str, str] = {}
    keep = []
    for node in model.graph.node:
        to = next((a.i for a in node.attribute if a.name == "to"), None)
        src = node.input[0] if node.input else ""
        src = rename.get(src, src)
        if (node.op_type == "Cast" and to == onnx.TensorProto.FLOAT
                and types.get(src) == onnx.TensorProto.FLOAT and node.output[0] not in outputs):
            rename[node.output[0]] = src
            continue
        keep.append(node)
    if not rename:
        return 0
    for node in keep:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    del model.graph.node[:]
    model.graph.node.extend(keep)
    dropped = set(rename)
    kept_info = [v for v in model.graph.value_info if v.name not in dropped]
    del model.graph.value_info[:]
    model.graph.value_info.extend(kept_info)
    return len(rename)


def _wrap(km: KerasModel) -> Any:
    """An ``nn.Module``: preprocessed NCHW → the Keras model (NHWC inside) → its output."""
    import torch

    class KerasNet(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.keras_model = km.model  # a torch.nn.Module under the torch backend

        def forward(self, x: Any) -> Any:
            if km.channels_last:
                x = x.permute(0, 2, 3, 1)
            y = self.keras_model(x, training=False)
            if isinstance(y, dict):
                y = next(iter(y.values()))
            if isinstance(y, (list, tuple)):
                y = y[0]
            return y

    return KerasNet()


def export_keras(
    model: str | os.PathLike[str] | KerasModel,
    out: str | os.PathLike[str],
    *,
    weights: str | None = None,
    preprocess: str | None = None,
    include_top: bool = False,
    input_size: int | None = None,
    opset: int = 18,
    progress: Progress = None,
) -> ExportResult:
    """Export a ``keras.applications`` model (by name) or a ``.keras``/``.h5`` file at ``out``.

    ``weights``: for names ``imagenet`` (default), ``none`` or a ``.weights.h5`` FILE; for files
    the file's own (default) or a weights FILE. ``preprocess``: tf, caffe, torch, none or unit
    (see ``PREPROCESSING``); inferred for names, required for files. ``include_top`` keeps the
    classifier (its logits become the ``logits`` output). ``model`` may also be a
    :class:`KerasModel` from :func:`load_keras`. ``input_size`` overrides the size the export
    traces and checks at (a model with dynamic H/W only). Returns an :class:`ExportResult`; an
    unexpected failure is an ``ExportError`` naming the model.
    """
    import_keras()
    label = model.name if isinstance(model, KerasModel) else Path(os.fspath(model)).name
    with export_errors(label):
        km = model if isinstance(model, KerasModel) else load_keras(
            model, weights, preprocess, include_top, progress)
        if input_size is not None:
            if not km.dynamic:
                raise ModelError(f"{km.name} has a fixed input size; input_size cannot change it")
            km.input_size = int(input_size)
        return _export(km, out, opset, progress)


def _export(km: KerasModel, out: str | os.PathLike[str], opset: int, progress: Progress
            ) -> ExportResult:
    import onnx

    layers = _layers(km.model)
    layouts = _layouts(layers, km.channels_last)
    has_logits = _output_units(km.model) is not None
    notes = list(km.notes)
    with _logits_head(km.model, notes), traceable_keras_ops():
        for note in notes:
            say(progress, note)
        result = export_module(
            _wrap(km),
            out,
            name=km.name,
            input_size=km.input_size,
            source=km.source,
            license=km.license,
            labels=km.labels,
            default_layers=km.default_layers,
            recommended_layers=_recommended_layers(layers, km.default_layers),
            preprocess=preprocess_fn(km.preprocess),
            layers=layers,
            opset=opset,
            progress=progress,
            dynamic=km.dynamic,
            output_name="logits" if has_logits else "features",
            extra_metadata={
                PREPROCESS_KEY: f"keras {km.preprocess}: {PREPROCESSING[km.preprocess]} "
                                "(inside the graph)",
                LAYOUTS_KEY: json.dumps(layouts),
                FRAMEWORK_KEY: "keras " + str(import_keras().__version__),
            },
        )
    if km.dynamic and not result.dynamic_hw:
        # say why in the command's output, not only in result.notes
        say(progress, f"{km.name} exports with a fixed input size: "
                       + "; ".join(result.notes[-2:]))
    result.notes[:0] = notes
    proto = onnx.load(str(result.path))
    if drop_noop_casts(proto):
        save_atomic(proto, result.path)
    return result
