"""torchvision classifiers → dreamable models.

``export_torchvision("googlenet", "googlenet.onnx")`` builds the network as torchvision's
pretrained weights expect it (e.g. GoogLeNet's ``transform_input``, ViT-H/14's 518 px), loads the
weights (torchvision's download, none, or a user's state_dict file) and hands it to
:func:`onnxdream.exporters.torch_export.export_module`. Layer names are module paths from
``named_modules()``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from onnxdream.core.errors import DependencyError, ModelError, OnnxDreamError, closest, first_line
from onnxdream.exporters.torch_export import (
    ExportResult,
    Progress,
    export_errors,
    export_module,
    say,
)
from onnxdream.exporters.tracing import import_torch
from onnxdream.exporters.weights import load_weights_file

__all__ = ["build_torchvision", "export_torchvision", "torchvision_models"]

CODE_LICENSE = "BSD-3-Clause (torchvision code)"

# Well-known DeepDream layers; other models get a layer ~60% into the trunk.
_DEFAULT_LAYERS: dict[str, str] = {
    "googlenet": "inception4c",
    "inception_v3": "Mixed_6b",
    "alexnet": "features.9",
}
_DEFAULT_LAYER_PATTERNS: list[tuple[str, str]] = [
    (r"^(resnet|resnext|wide_resnet)\d", "layer3"),
    (r"^densenet", "features.denseblock3"),
    (r"^shufflenet", "stage3"),
    (r"^regnet", "trunk_output.block3"),
]


def _import_torchvision() -> Any:
    import_torch()
    try:
        import torchvision
    except ImportError as exc:  # pragma: no cover
        raise DependencyError(
            'exporting torchvision models needs torchvision, which is not installed; install '
            'onnxdream[torch] (pip install "onnxdream[torch]")'
        ) from exc
    return torchvision


def torchvision_models() -> list[str]:
    """Names of torchvision's ImageNet classifiers (``list_models(module=torchvision.models)``)."""
    tv = _import_torchvision()
    return list(tv.models.list_models(module=tv.models))


def _check_name(name: str) -> str:
    names = torchvision_models()
    if name in names:
        return name
    lowered = {n.lower(): n for n in names}
    if name.lower() in lowered:
        return lowered[name.lower()]
    near = closest(name, names)
    hint = f"; did you mean {', '.join(near)}?" if near else "; see list_models()"
    raise ModelError(f"torchvision has no classification model named {name!r}{hint}")


class _NoLoad(dict):  # type: ignore[type-arg]
    """A stand-in state_dict: the builder's load_state_dict call does nothing with it."""


@contextmanager
def _skip_weight_loading() -> Iterator[None]:
    """Let a torchvision builder configure the model for its weights without loading them."""
    torch = import_torch()
    from torchvision.models._api import WeightsEnum

    original_get = WeightsEnum.get_state_dict
    original_load = torch.nn.Module.load_state_dict

    def get_state_dict(self: Any, *args: Any, **kwargs: Any) -> dict:  # type: ignore[type-arg]
        return _NoLoad()

    def load_state_dict(self: Any, state_dict: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(state_dict, _NoLoad):
            return None
        return original_load(self, state_dict, *args, **kwargs)

    WeightsEnum.get_state_dict = get_state_dict  # type: ignore[method-assign]
    torch.nn.Module.load_state_dict = load_state_dict  # type: ignore[method-assign]
    try:
        yield
    finally:
        WeightsEnum.get_state_dict = original_get  # type: ignore[method-assign]
        torch.nn.Module.load_state_dict = original_load  # type: ignore[method-assign]


def _load_file_weights(model: Any, name: str, path: Path) -> None:
    # keys of modules the pretrained layout drops (GoogLeNet's aux1/aux2 are None)
    load_weights_file(model, f"torchvision's {name}", path,
                      ignore=lambda k: getattr(model, k.split(".")[0], 0) is None)


def _download_error(name: str, exc: BaseException) -> OnnxDreamError:
    import http.client
    import socket
    import urllib.error

    text = str(exc)
    if isinstance(exc, urllib.error.HTTPError):
        return ModelError(
            f"could not download the pretrained weights for {name} (HTTP {exc.code}); "
            f"pass --weights none or --weights FILE"
        )
    if isinstance(exc, (urllib.error.URLError, socket.gaierror, socket.timeout,
                        http.client.HTTPException, ConnectionError, TimeoutError)):
        return ModelError(
            f"could not download the pretrained weights for {name} (no internet?); "
            f"pass --weights none or --weights FILE"
        )
    if "hash" in text.lower() or "PytorchStreamReader" in text or "invalid load key" in text:
        return ModelError(
            f"the cached pretrained weights for {name} are corrupt ({first_line(exc, 120)});"
            f" delete them from ~/.cache/torch/hub/checkpoints and retry"
        )
    return ModelError(f"could not load the pretrained weights for {name} ({text[:160]})")


def build_torchvision(
    name: str, weights: str = "DEFAULT", progress: Progress = None
) -> tuple[Any, str, Any]:
    """(eval-mode nn.Module, weights label, weights enum entry) for a torchvision classifier.

    The module is configured as torchvision's DEFAULT (or named) weights expect, whatever
    ``weights`` is: "DEFAULT" or a weights name such as "IMAGENET1K_V2" (downloaded by torchvision),
    "none" (random init) or a path to a ``torch.save``'d state_dict or a ``.safetensors`` file.
    """
    tv = _import_torchvision()
    name = _check_name(name)
    enum = tv.models.get_model_weights(name)
    choice = str(weights)
    named = {m.upper(): m for m in enum.__members__}
    if choice.upper() in ("DEFAULT", *named) and not Path(choice).is_file():
        entry = enum.DEFAULT if choice.upper() == "DEFAULT" else enum[named[choice.upper()]]
        label = "DEFAULT" if choice.upper() == "DEFAULT" else entry.name
        say(progress, f"loading torchvision's pretrained {name} ({entry.name})")
        try:
            model = tv.models.get_model(name, weights=entry, progress=progress is not None)
        except (OnnxDreamError, MemoryError, KeyboardInterrupt):
            raise
        except Exception as exc:  # noqa: BLE001 - translated into one sentence
            raise _download_error(name, exc) from exc
        return model.eval(), label, entry
    entry = enum.DEFAULT
    with _skip_weight_loading():
        model = tv.models.get_model(name, weights=entry)
    if choice.lower() in ("none", "random"):
        # built with the default init (googlenet/inception_v3 skip their own init for weights)
        return model.eval(), "none", entry
    path = Path(os.path.expanduser(choice))
    if not path.exists() and not re.search(r"[./\\]", choice):
        raise ModelError(
            f"unknown weights {choice!r} for {name}: use DEFAULT, none, a file path, "
            f"or one of {', '.join(enum.__members__)}"
        )
    say(progress, f"loading weights from {path}")
    _load_file_weights(model, name, path)
    return model.eval(), path.name, entry


def _default_layers(name: str, model: Any, layer_paths: list[str]) -> list[str] | None:
    torch = import_torch()
    if name in _DEFAULT_LAYERS:
        return [_DEFAULT_LAYERS[name]]
    for pattern, layer in _DEFAULT_LAYER_PATTERNS:
        if re.match(pattern, name) and layer in layer_paths:
            return [layer]
    if name.startswith("vgg"):  # the last layer before the 4th max-pool (vgg16: features.22)
        pools = [i for i, m in enumerate(model.features) if isinstance(m, torch.nn.MaxPool2d)]
        if len(pools) >= 4:
            return [f"features.{pools[3] - 1}"]
    return None  # export_module picks one ~60% into the trunk


def export_torchvision(
    name: str,
    out: str | os.PathLike[str],
    weights: str = "DEFAULT",
    *,
    opset: int = 18,
    progress: Progress = None,
    module: Any = None,
) -> ExportResult:
    """Export torchvision's classifier ``name`` as a dreamable model at ``out``.

    ``weights``: "DEFAULT" (torchvision's pretrained weights, downloaded and cached by torchvision),
    another weights name of the model ("IMAGENET1K_V1" …), "none" (random init) or a path to a
    state_dict saved with ``torch.save`` (possibly under a 'state_dict' or 'model' key).
    ``progress``, if given, is called with short status lines (and enables the download bar).
    ``module``, if given, is exported instead of building one (tests use it to set weights); it
    must have the architecture of torchvision's ``name``. Returns an :class:`ExportResult`; an
    unexpected failure is an ``ExportError`` naming the model.
    """
    with export_errors(name):
        return _export(name, out, weights, opset, progress, module)


def _export(name: str, out: str | os.PathLike[str], weights: str, opset: int,
            progress: Progress, module: Any) -> ExportResult:
    tv = _import_torchvision()
    name = _check_name(name)
    if module is None:
        module, label, entry = build_torchvision(name, weights, progress)
    else:
        label, entry = str(weights), tv.models.get_model_weights(name).DEFAULT
    crop = entry.transforms().crop_size
    size = int(crop[0] if isinstance(crop, (list, tuple)) else crop)
    paths = [p for p, _ in module.named_modules() if p]
    if label == "none":
        license_text = CODE_LICENSE + "; weights: random"
    elif label == "DEFAULT" or label in entry.__class__.__members__:
        license_text = CODE_LICENSE + "; weights: see torchvision"
    else:
        license_text = CODE_LICENSE + "; weights: supplied by the user"
    return export_module(
        module,
        out,
        name=name,
        input_size=size,
        source=f"torchvision:{name} (weights: {label})",
        license=license_text,
        labels=list(entry.meta["categories"]),
        default_layers=_default_layers(name, module, paths),
        opset=opset,
        progress=progress,
    )
