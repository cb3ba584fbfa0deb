"""A user's weights file → a PyTorch module's parameters, with errors that say what does not fit.

The torch exporters (torchvision, timm) take ``--weights FILE``: a state_dict saved with
``torch.save`` (possibly under a ``state_dict``/``model``/``state_dict_ema`` key, possibly from
DataParallel with ``module.`` prefixes) or a ``.safetensors`` file. :func:`read_state_dict` reads
one, keeping ``torch.save``'s ``_metadata`` (each module's version: MNASNet's versioned loader
refuses a state dict without it); :func:`load_weights_file` checks it against a model and loads
it. torch is imported lazily.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from onnxdream.core.errors import DependencyError, ModelError, first_line
from onnxdream.exporters.tracing import import_torch

__all__ = ["SAFETENSORS_SUFFIXES", "load_weights_file", "mismatches", "read_state_dict"]

SAFETENSORS_SUFFIXES = (".safetensors",)
# keys under which training scripts nest the model's state_dict, in the order tried
_NESTED = ("state_dict", "model_state_dict", "model", "state_dict_ema", "model_ema")


def _read_safetensors(path: Path) -> Mapping[str, Any]:
    try:
        from safetensors.torch import load_file
    except ImportError as exc:  # pragma: no cover - timm and torchvision users mostly have it
        raise DependencyError(f"reading {path.name!r} needs the safetensors package "
                              "(pip install safetensors)") from exc
    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # noqa: BLE001 - a corrupt or truncated file
        raise ModelError(f"could not read {path.name!r} as a safetensors file "
                         f"({first_line(exc, 160)})") from exc


def read_state_dict(path: Path) -> OrderedDict[str, Any]:
    """The tensors of a state_dict file, with its ``_metadata`` (module versions) kept."""
    torch = import_torch()
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"weights file {str(path)!r} does not exist")
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        data: Any = _read_safetensors(path)
    else:
        try:
            data = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - corrupt zip, pickle refused, truncated file …
            raise ModelError(
                f"could not read {path.name!r} as a PyTorch state_dict saved by torch.save "
                f"({first_line(exc, 160)})"
            ) from exc
    for key in _NESTED:
        if isinstance(data, Mapping) and isinstance(data.get(key), Mapping):
            data = data[key]
            break
    if not isinstance(data, Mapping) or not data:
        raise ModelError(
            f"{path.name!r} does not hold a state_dict (a dict of parameter name → tensor), "
            f"but a {type(data).__name__}"
        )
    tensors = OrderedDict((k, v) for k, v in data.items() if isinstance(v, torch.Tensor))
    if not tensors:
        raise ModelError(f"{path.name!r} holds a dict without tensors, not a state_dict")
    # torch.save keeps each module's version in state_dict()._metadata; versioned loaders need
    # it (MNASNet refuses a state dict without one)
    metadata = dict(getattr(data, "_metadata", None) or {})
    if all(k.startswith("module.") for k in tensors):  # saved from DataParallel/DDP
        tensors = OrderedDict((k[len("module."):], v) for k, v in tensors.items())
        metadata = {k[len("module."):]: v for k, v in metadata.items()
                    if k.startswith("module.")} | {"": metadata.get("module", {})}
    tensors._metadata = metadata  # type: ignore[attr-defined]
    return tensors


def mismatches(model: Any, state: Mapping[str, Any],
               ignore: Callable[[str], bool] = lambda key: False) -> list[str]:
    """What keeps ``state`` from loading into ``model``: one phrase per kind of problem.

    ``ignore(key)`` says which of the file's keys that the model lacks are harmless (modules the
    model's configuration leaves out, such as GoogLeNet's auxiliary heads).
    """
    own = model.state_dict()
    unexpected = [k for k in state if k not in own and not ignore(k)]
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    wrong = [
        f"{k} {list(state[k].shape)} (needs {list(own[k].shape)})"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s) such as {', '.join(missing[:3])}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s) such as {', '.join(unexpected[:3])}")
    if wrong:
        problems.append(f"{len(wrong)} shape mismatch(es) such as {', '.join(wrong[:2])}")
    return problems


def load_weights_file(model: Any, what: str, path: Path,
                      state: OrderedDict[str, Any] | None = None,
                      ignore: Callable[[str], bool] = lambda key: False) -> None:
    """Load the weights file ``path`` (or its already read ``state``) into ``model``.

    ``what`` names the architecture in the error ("torchvision's resnet18"): a ModelError lists
    the missing and unexpected keys and the shape mismatches when the file does not fit.
    """
    state = read_state_dict(path) if state is None else state
    problems = mismatches(model, state, ignore)
    if problems:
        raise ModelError(f"weights file {Path(path).name!r} does not fit {what}: "
                         + "; ".join(problems))
    own = model.state_dict()
    fitting = OrderedDict((k, v) for k, v in state.items() if k in own)
    # the file's module versions where it has them, the model's own for the rest
    fitting._metadata = {**own._metadata, **state._metadata}  # type: ignore[attr-defined]
    model.load_state_dict(fitting, strict=False)
