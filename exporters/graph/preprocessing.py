"""In-graph preprocessing for imported models: [0,1] RGB → what a foreign network expects.

:func:`parse_preprocess` reads the ``--preprocess`` spec of ``onnxdream import onnx``; the result
is a :class:`Preprocess` (``x * scale``, optional RGB→BGR swap, then ``(x - mean) / std`` per
channel) that :meth:`Preprocess.emit` writes into the graph with the :class:`GraphBuilder`. The
named ones mean exactly what :data:`onnxdream.exporters.preprocess.PREPROCESSING` means for the
torch and Keras exporters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from onnxdream.core.errors import SettingsError
from onnxdream.exporters.graph.builder import GraphBuilder
from onnxdream.exporters.preprocess import CAFFE_MEAN_BGR, IMAGENET_MEAN, IMAGENET_STD  # no torch

#: ITU-R 601 luma: how a one-channel network sees the RGB image (as PIL's ``convert("L")``)
LUMA = (0.299, 0.587, 0.114)

PREPROCESS_HELP = (
    "How the network expects its pixels: tf (x*2-1: [-1,1]), torch (ImageNet mean/std on [0,1]), "
    "caffe (BGR, 0..255 minus the ImageNet mean), none (0..255), unit ([0,1] as is), or "
    "mean=M,M,M:std=S,S,S[:scale=255][:bgr]: x*scale, swapped to BGR with :bgr, then "
    "(x - mean) / std per input channel, in the network's channel order (B,G,R with :bgr), as "
    "the preprocessing code you copy them from lists them")


@dataclass(frozen=True)
class Preprocess:
    """``y[c] = (x[perm[c]] * scale - mean[c]) / std[c]``, ``perm`` BGR when ``bgr``."""

    spec: str  # as given (a name or the mean=…:std=… form)
    scale: float = 1.0
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    bgr: bool = False

    def describe(self) -> str:
        """What it does, for the model's ``onnxdream.preprocess`` metadata and the summary."""
        if self.spec in DESCRIPTIONS:
            return f"{self.spec}: {DESCRIPTIONS[self.spec]}"
        x = f"x*{_num(self.scale)}" if self.scale != 1 else "x"
        if any(m != 0 for m in self.mean):
            x = f"({x} - {_nums(self.mean)})"
        if any(s != 1 for s in self.std):
            x = f"{x} / {_nums(self.std)}"
        return f"{self.spec}: {x}{', BGR' if self.bgr else ''} (x: RGB in [0,1])"

    def per_channel(self, channels: int) -> tuple[np.ndarray, np.ndarray]:
        """(multiplier, offset), each ``[1, C, 1, 1]``: ``y = x * multiplier + offset``."""
        mean = _expand(self.mean, channels, "mean")
        std = _expand(self.std, channels, "std")
        mul = np.asarray([self.scale / s for s in std], np.float32).reshape(1, channels, 1, 1)
        add = np.asarray([-m / s for m, s in zip(mean, std)], np.float32).reshape(1, channels, 1, 1)
        return mul, add

    def emit(self, b: GraphBuilder, x: str, channels: int) -> str:
        """Append the nodes that map ``x`` (NCHW RGB in [0,1]) to the network's scale (still
        NCHW, ``channels`` 3 or 1); returns the output name (``x`` itself when nothing to do).

        A channel swap or the grey conversion is one 1x1 Conv that also scales and shifts
        (spatially pointwise, so tiling stays exact); otherwise a Mul and an Add."""
        mul, add = self.per_channel(channels)
        if channels == 1 or self.bgr:
            if channels == 1 and self.bgr:
                raise SettingsError("preprocess", "cannot swap to BGR: the network takes one "
                                    "channel (grey)")
            weight = np.zeros((channels, 3, 1, 1), np.float32)
            for c in range(channels):
                if channels == 1:
                    weight[0, :, 0, 0] = np.asarray(LUMA, np.float32) * mul.reshape(-1)[0]
                else:
                    weight[c, 2 - c if self.bgr else c, 0, 0] = mul.reshape(-1)[c]
            return b.op("Conv", [x, b.const(weight, hint="preprocess_weight"),
                                 b.const(add.reshape(-1), hint="preprocess_bias")],
                        hint="preprocessed", kernel_shape=[1, 1])
        if not np.all(mul == 1):
            x = b.mul(x, b.const(mul if np.unique(mul).size > 1 else mul.reshape(-1)[0],
                                 hint="prescale"))
        if np.any(add != 0):
            x = b.op("Add", [x, b.const(add if np.unique(add).size > 1 else add.reshape(-1)[0],
                                        hint="preshift")])
        return x

    def apply(self, rgb01: np.ndarray) -> np.ndarray:
        """The same in numpy, on ``[N, 3, H, W]`` RGB in [0,1] (tests, references)."""
        x = np.asarray(rgb01, np.float64)
        channels = 3
        if self.bgr:
            x = x[:, ::-1]
        mean = np.asarray(_expand(self.mean, channels, "mean")).reshape(1, -1, 1, 1)
        std = np.asarray(_expand(self.std, channels, "std")).reshape(1, -1, 1, 1)
        return (x * self.scale - mean) / std


DESCRIPTIONS = {
    "tf": "x*2 - 1, RGB in [-1,1]",
    "torch": "(x - ImageNet mean) / ImageNet std, RGB",
    "caffe": "BGR, x*255 minus the ImageNet mean [103.939, 116.779, 123.68]",
    "none": "x*255, RGB in 0..255",
    "unit": "x, RGB in [0,1] as it is",
}

NAMED: dict[str, Preprocess] = {
    # PREPROCESSING["tf"]: x*255/127.5 - 1
    "tf": Preprocess("tf", 1.0, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    # PREPROCESSING["torch"]: RGB, (x - ImageNet mean) / ImageNet std on [0,1]
    "torch": Preprocess("torch", 1.0, IMAGENET_MEAN, IMAGENET_STD),
    # PREPROCESSING["caffe"]: BGR, x*255 minus the ImageNet mean (given in BGR order)
    "caffe": Preprocess("caffe", 255.0, CAFFE_MEAN_BGR, (1.0, 1.0, 1.0), bgr=True),
    # PREPROCESSING["none"]: RGB x*255
    "none": Preprocess("none", 255.0),
    # PREPROCESSING["unit"]: [0,1] as it is
    "unit": Preprocess("unit"),
}


def parse_preprocess(spec: str) -> Preprocess:
    """A :class:`Preprocess` from a name in :data:`NAMED` or ``mean=…:std=…[:scale=S][:bgr]``
    (any of the parts; values separated by commas); SettingsError(field="preprocess")."""
    text = (spec or "").strip()
    if text.lower() in NAMED:
        return NAMED[text.lower()]
    if not text:
        raise SettingsError("preprocess", f"is empty: use one of {', '.join(NAMED)} or "
                            "mean=R,G,B:std=R,G,B[:scale=255][:bgr]")
    values: dict[str, tuple[float, ...]] = {}
    bgr = False
    for part in text.split(":"):
        part = part.strip()
        if part.lower() == "bgr":
            bgr = True
            continue
        if part.lower() == "rgb":
            continue
        key, eq, val = part.partition("=")
        key = key.strip().lower()
        if not eq or key not in ("mean", "std", "scale"):
            raise SettingsError("preprocess", f"{spec!r} is not a preprocessing: use one of "
                                f"{', '.join(NAMED)} or mean=M,M,M:std=S,S,S[:scale=255][:bgr] "
                                f"(part {part!r} is neither mean=, std=, scale= nor bgr)")
        if key in values:
            raise SettingsError("preprocess", f"{spec!r} gives {key}= twice")
        try:
            nums = tuple(float(v) for v in val.split(","))
        except ValueError:
            raise SettingsError("preprocess", f"{spec!r}: {key}= takes numbers separated by "
                                f"commas, not {val!r}") from None
        if not all(math.isfinite(v) for v in nums):
            raise SettingsError("preprocess", f"{spec!r}: {key}= must be finite numbers")
        if key == "scale" and len(nums) != 1:
            raise SettingsError("preprocess", f"{spec!r}: scale= takes one number")
        if len(nums) not in (1, 3):
            raise SettingsError("preprocess", f"{spec!r}: {key}= takes 1 or 3 numbers, not "
                                f"{len(nums)}")
        if key in ("std", "scale") and any(v == 0 for v in nums):
            raise SettingsError("preprocess", f"{spec!r}: {key}= must not be 0")
        values[key] = nums
    if not values and not bgr:
        raise SettingsError("preprocess", f"{spec!r} is not a preprocessing: use one of "
                            f"{', '.join(NAMED)} or mean=M,M,M:std=S,S,S[:scale=255][:bgr]")
    return Preprocess(text, values.get("scale", (1.0,))[0], values.get("mean", (0.0,)),
                      values.get("std", (1.0,)), bgr)


def _expand(values: tuple[float, ...], channels: int, what: str) -> tuple[float, ...]:
    if len(values) == channels:
        return values
    if len(values) == 1:
        return values * channels
    raise SettingsError("preprocess", f"gives {len(values)} {what} values but the network takes "
                        f"{channels} channel{'s' if channels != 1 else ''}")


def _num(v: float) -> str:
    return f"{v:g}"


def _nums(values: tuple[float, ...]) -> str:
    if len(set(values)) == 1:
        return _num(values[0])
    return "[" + ", ".join(_num(v) for v in values) + "]"
