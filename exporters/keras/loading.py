"""Loading a Keras model to export: a ``keras.applications`` network built by name, or a
``.keras`` / legacy ``.h5`` file, rebuilt with dynamic H/W where its layers allow it
(:func:`load_keras` → :class:`KerasModel`)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from onnxdream.core.errors import ModelError, OnnxDreamError, first_line
from onnxdream.core.labels import imagenet_labels
from onnxdream.exporters.keras.applications import (
    CODE_LICENSE,
    application_preprocess,
    application_size,
    find_application,
)
from onnxdream.exporters.keras.backend import import_keras, keras_error_line
from onnxdream.exporters.keras.layers import default_layers, keras_layers, output_units
from onnxdream.exporters.preprocess import PREPROCESSING
from onnxdream.exporters.torch_export import Progress, say
from onnxdream.exporters.tracing import odd_size


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
    return application_size(name)


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
        name, builder = find_application(spec)
        inferred = application_preprocess(builder)
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
        labels = imagenet_labels() if include_top and output_units(net) == 1000 else None
    if preprocess not in PREPROCESSING:
        raise ModelError(f"unknown --preprocess {preprocess!r}: use one of "
                         f"{', '.join(PREPROCESSING)}")
    net, dynamic, note = make_dynamic(net)
    if note:
        notes.append(note)
    _, channels_last = _input_layout(net)
    size = _native_size(net, name, channels_last) or 224
    layers = keras_layers(net)
    return KerasModel(net, name, preprocess, source, license_text, size, dynamic,
                      channels_last, labels, default_layers(name, layers), notes)
