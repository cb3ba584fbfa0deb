"""Named dream recipes: the classic DeepDream setups, reproduced on a model the user exported.

``onnxdream dream photo.jpg --model inception_v3.onnx --preset keras-classic`` runs the Keras
example's recipe; any option given explicitly overrides the preset's value. A preset names its
layers, objective, border, schedule and stop rule, and for models whose layer names differ
(BVLC GoogLeNet's ``inception_4c/output`` vs torchvision's ``inception4c``) it lists
alternatives and takes the first set the model has.

Scales: onnxdream steps in RGB [0,1] pixel space. The Keras examples step in InceptionV3's
preprocessed space ``x/127.5 - 1`` ([-1,1], twice as wide), so their step 0.01 is 0.005 here; the
Caffe and TF notebooks step in 0..255 space, so their 1.5 is 1.5/255 ≈ 0.006. Gradients are
normalised before the step, so only the step length needs converting — and a gradient floor
(``grad_floor``: the Keras examples divide by ``max(mean|g|, eps)``), since a gradient with
respect to [0,1] pixels is twice the one with respect to [-1,1] values: keras.io's 1e-6 is 2e-6
here, the classic example's ``K.epsilon()`` (1e-7) is 2e-7.

Known differences from the originals (small, documented rather than hidden):

- The Keras examples' loss per layer is ``sum(x[:, 2:-2, 2:-2, :]²) / size(x)``: the sum over
  the cropped map divided by the *uncropped* size. onnxdream's ``l2`` with border 2 is the mean
  over the cropped map, larger by ``HW / ((H-4)(W-4))`` (e.g. ×1.7 on a 17×17 map), so
  ``max_loss`` trips somewhat earlier. The gradient direction is the same per layer.
- The Keras examples break out of the current octave when the loss exceeds ``max_loss`` and go on
  with the next; onnxdream's ``max_loss`` ends the dream.
- The originals clip nothing during ascent; onnxdream clips to [0,1] after every step.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import asdict, dataclass, field
from types import MappingProxyType
from typing import Any

from onnxdream.core.errors import LayerError, SettingsError, closest, did_you_mean
from onnxdream.settings.options import ASCENT_FIELDS, DreamSettings

__all__ = ["PRESETS", "Preset", "ResolvedPreset", "get_preset", "preset_names", "resolve_preset"]


@dataclass(frozen=True)
class Preset:
    """A dream recipe. ``layers`` holds alternatives (``NAME`` or ``NAME:WEIGHT`` each); the
    first alternative whose layers all exist in the model is used."""

    name: str
    description: str
    model_hint: str  # how to get a model this recipe fits
    layers: tuple[tuple[str, ...], ...]
    objective: str = "mean"
    border: int = 0
    pre_relu: bool = False
    settings: Mapping[str, Any] = field(default_factory=dict)  # DreamSettings fields

    def layers_for(self, available: Collection[str]) -> list[str]:
        """The first alternative whose layers the model has; LayerError naming them otherwise."""
        have = set(available)
        for option in self.layers:
            if all(spec.rsplit(":", 1)[0] in have for spec in option):
                return list(option)
        wanted = " or ".join(", ".join(s.rsplit(":", 1)[0] for s in o) for o in self.layers)
        near = closest(self.layers[0][0].rsplit(":", 1)[0], sorted(have))
        hint = f" (closest here: {', '.join(near)})" if near else ""
        raise LayerError(
            f"preset {self.name} needs layer(s) {wanted}, which this model lacks{hint}; "
            f"{self.model_hint}, or name the layers yourself",
            field="layers",
        )


PRESETS: Mapping[str, Preset] = MappingProxyType({p.name: p for p in [
    Preset(
        name="keras-classic",
        description="the classic Keras example (keras/examples/deep_dream.py): InceptionV3, "
                    "mixed2..mixed5 weighted 0.2/0.5/2.0/1.5, sum of squares without a 2-pixel "
                    "border, 3 octaves x 1.4, 20 steps of 0.01 in [-1,1] space, stop above loss 10",
        model_hint="export InceptionV3 with "
                   "`onnxdream export keras InceptionV3 -o inception_v3.onnx`",
        layers=(("mixed2:0.2", "mixed3:0.5", "mixed4:2.0", "mixed5:1.5"),),
        objective="l2",
        border=2,
        settings={"octaves": 3, "octave_scale": 1.4, "steps": 20, "step_size": 0.005,
                  "jitter": 0, "normalize": "mean-abs", "max_loss": 10.0,
                  # grads / max(mean|grads|, K.epsilon() = 1e-7) in [-1,1] space: 2e-7 here
                  "grad_floor": 2e-7},
    ),
    Preset(
        name="keras-io",
        description="the keras.io Deep Dream example: InceptionV3, mixed4..mixed7 weighted "
                    "1.0/1.5/2.0/2.5, mean of squares without a 2-pixel border, 3 octaves x 1.4, "
                    "20 steps of 0.01 in [-1,1] space, gradient / max(mean|g|, 1e-6), stop "
                    "above loss 15",
        model_hint="export InceptionV3 with "
                   "`onnxdream export keras InceptionV3 -o inception_v3.onnx`",
        layers=(("mixed4:1.0", "mixed5:1.5", "mixed6:2.0", "mixed7:2.5"),),
        objective="l2",
        border=2,
        settings={"octaves": 3, "octave_scale": 1.4, "steps": 20, "step_size": 0.005,
                  "jitter": 0, "normalize": "mean-abs", "max_loss": 15.0,
                  # keras.io: grads / max(mean|grads|, 1e-6) in [-1,1] space, where gradients
                  # are half as large as in onnxdream's [0,1] space: the same floor is 2e-6 here
                  "grad_floor": 2e-6},
    ),
    Preset(
        name="caffe-googlenet",
        description="the original Caffe notebook (google/deepdream): GoogLeNet inception_4c, "
                    "L2 objective, 4 octaves x 1.4, 10 steps of 1.5 in 0..255 space, jitter 32",
        model_hint="export GoogLeNet with `onnxdream export torchvision googlenet -o "
                   "googlenet.onnx` (or use BVLC GoogLeNet from the ONNX model zoo)",
        layers=(("inception4c",), ("inception_4c/output",), ("inception_4c_output",)),
        objective="l2",
        settings={"octaves": 4, "octave_scale": 1.4, "steps": 10, "step_size": 1.5 / 255,
                  "jitter": 32, "normalize": "mean-abs", "max_loss": None},
    ),
    Preset(
        name="tf-notebook",
        description="the TensorFlow DeepDream notebook's channel render: channel 139 of the "
                    "pre-ReLU 3x3 bottleneck of mixed4d, Laplacian-pyramid normalisation, "
                    "4 octaves x 1.4, 10 steps",
        model_hint="the notebook's Inception5h graph names it mixed4d_3x3_bottleneck_pre_relu; "
                   "torchvision's googlenet (`onnxdream export torchvision googlenet`) has the "
                   "same block as inception4d.branch2.0 (other weights, so other features)",
        layers=(("mixed4d_3x3_bottleneck_pre_relu",), ("inception4d.branch2.0",)),
        objective="channel:139",
        pre_relu=True,
        settings={"octaves": 4, "octave_scale": 1.4, "steps": 10, "step_size": 1.0 / 255,
                  "jitter": 32, "normalize": "lapnorm", "max_loss": None},
    ),
]})


def preset_names() -> list[str]:
    return list(PRESETS)


def get_preset(name: str) -> Preset:
    if name in PRESETS:
        return PRESETS[name]
    raise SettingsError("preset", f"{name!r} is unknown{did_you_mean(name, PRESETS)} "
                                  f"(presets: {', '.join(PRESETS)})")


@dataclass(frozen=True)
class ResolvedPreset:
    """A preset's values with the explicit ones laid over them: what the dream will use."""

    layers: list[str]
    objective: str
    border: int
    pre_relu: bool
    settings: dict[str, Any]  # DreamSettings keyword arguments (the ascent fields)
    preset: str | None = None  # the preset's name

    def dream_settings(self, **extra: Any) -> DreamSettings:
        """The DreamSettings of this plan; ``extra`` (model, seed, …) overrides."""
        return DreamSettings(**{"layers": tuple(self.layers), "objective": self.objective,
                                "border": self.border, "pre_relu": self.pre_relu,
                                "preset": self.preset, **self.settings, **extra})


def resolve_preset(
    preset: str | Preset | None,
    model_layers: Collection[str] = (),
    *,
    layers: list[str] | None = None,
    objective: str | None = None,
    border: int | None = None,
    pre_relu: bool | None = None,
    defaults: Mapping[str, Any] | None = None,
    **settings: Any,
) -> ResolvedPreset:
    """Lay the explicit values (those not None) over the preset's, and those over the defaults.

    ``model_layers`` are the model's layer names, needed only when the preset chooses layers
    (``layers`` not given). ``settings`` are DreamSettings fields (octaves, step_size, …);
    ``defaults`` fills what neither sets (DreamSettings' own defaults where it lacks a field).
    """
    unknown = set(settings) - set(ASCENT_FIELDS) - {"seed"}
    if unknown:
        raise TypeError(f"unknown settings {sorted(unknown)}")
    p = get_preset(preset) if isinstance(preset, str) else preset
    base = {k: v for k, v in asdict(DreamSettings()).items() if k in ASCENT_FIELDS}
    base.update(defaults or {})
    if p is not None:
        base.update(p.settings)
    base.update({k: v for k, v in settings.items() if v is not None})
    chosen = list(layers) if layers else (p.layers_for(model_layers) if p is not None else [])
    return ResolvedPreset(
        layers=chosen,
        objective=objective if objective is not None else (p.objective if p else "mean"),
        border=border if border is not None else (p.border if p else 0),
        pre_relu=pre_relu if pre_relu is not None else (p.pre_relu if p else False),
        settings=base,
        preset=p.name if p is not None else None,
    )


def describe(preset: Preset) -> dict[str, Any]:
    """A preset as plain data (for --json listings and the docs)."""
    return {"name": preset.name, "description": preset.description, "layers": preset.layers,
            "objective": preset.objective, "border": preset.border, "pre_relu": preset.pre_relu,
            "settings": dict(preset.settings), "model": preset.model_hint}

