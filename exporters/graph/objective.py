"""Objectives: what to maximise at a layer, as small values that add and scale.

``mean`` (mean of the layer output), ``l2`` (mean of squares), ``channel:K`` (mean of channel
K), ``neuron:K`` (channel K at the centre position), ``class:K`` (logit K, before softmax).
Several layers combine as a weighted sum: ``Objective.parse`` and ``LayerSpec.parse`` read the
CLI's spelling; in Python, ``mean("inception4c") + 0.5 * channel("inception4d", 97)`` reads the
same. The term weights are the defaults of the compiled graph's ``weights`` input (see
:mod:`.contract`): one compiled graph serves every weighting of the same terms.

``weighted_channels(layer)`` (Python only) is ``sum_c channel_weights[n, c] * mean(layer[n, c])``
with the per-image ``channel_weights`` a graph input: feature visualisation's one target per
image (a one-hot row is a channel or a class, ``1/C`` everywhere the whole layer).

``guide`` (``guide(layer)``) is the Caffe notebook's guided dream: at each position p of the
layer, the dot product of its feature vector x_p with the best-matching guide feature vector g_j,
``mean_p max_j <x_p, g_j>``; the guide features ``[M, C]`` are the graph input ``guide.<t>``
(the guide image's activations at the same layer), so one compiled graph serves every guide.

Every term on a 4-D feature map reads the compiled graph's region ``mask`` (see
:mod:`.contract`): its positions count in proportion to the mask, resized to the layer.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, replace

import numpy as np

from onnxdream.core.errors import LayerError, ObjectiveError
from onnxdream.exporters.graph.builder import GraphBuilder

#: The largest term weight in magnitude. The ascent normalises the gradient, so a weight only
#: sets the terms' proportions; beyond this a weighted value risks overflowing float32 (3.4e38).
MAX_WEIGHT = 1e6

_SPEC = re.compile(r"^(mean|l2|channel|neuron|class|guide)(?::(-?\d+))?$")
#: Term kinds a region mask applies to (on 4-D feature maps): those that average positions.
MASKED_KINDS = ("mean", "l2", "channel", "guide", "weighted_channels")


@dataclass(frozen=True)
class Term:
    """One weighted term: ``weight * kind(layer, index)``."""

    layer: str
    kind: str = "mean"
    index: int | None = None
    weight: float = 1.0

    def __mul__(self, k: float) -> Objective:
        return Objective((replace(self, weight=self.weight * float(k)),))

    __rmul__ = __mul__

    def __add__(self, other: Term | Objective) -> Objective:
        return Objective((self,)) + other

    def describe(self) -> str:
        kind = self.kind if self.index is None else f"{self.kind}:{self.index}"
        return f"{self.weight:g}*{kind}({self.layer})"


@dataclass(frozen=True)
class Objective:
    """A weighted sum of terms."""

    terms: tuple[Term, ...]

    def __add__(self, other: Term | Objective) -> Objective:
        other_terms = (other,) if isinstance(other, Term) else other.terms
        return Objective(self.terms + other_terms)

    def __mul__(self, k: float) -> Objective:
        return Objective(tuple(replace(t, weight=t.weight * float(k)) for t in self.terms))

    __rmul__ = __mul__

    @property
    def layers(self) -> list[str]:
        return list(dict.fromkeys(t.layer for t in self.terms))

    def describe(self) -> str:
        return " + ".join(t.describe() for t in self.terms)

    def structure(self) -> list[tuple[str, str, int | None]]:
        """The terms without their weights: what a compiled graph depends on."""
        return [(t.layer, t.kind, t.index) for t in self.terms]

    @property
    def weights(self) -> list[float]:
        """The term weights, in term order (the compiled graph's ``weights`` input)."""
        return [t.weight for t in self.terms]

    def check_weights(self) -> Objective:
        """This objective, if every weight is finite and at most :data:`MAX_WEIGHT` in
        magnitude; LayerError (field ``layers``) naming the first that is not."""
        for t in self.terms:
            if not (np.isfinite(t.weight) and abs(t.weight) <= MAX_WEIGHT):
                raise LayerError(f"the weight of layer '{t.layer}' is {t.weight:g}: it must be a "
                                 f"finite number between -{MAX_WEIGHT:g} and {MAX_WEIGHT:g}",
                                 field="layers")
        return self

    @classmethod
    def build(cls, layers: list[LayerSpec | str], objective: str = "mean",
              known: Collection[str] | None = None) -> Objective:
        """From the CLI's spelling: ``--layer NAME[:W]`` (repeatable) and ``--objective SPEC``.

        ``known``: the model's layer names, so that names ending in ``:N`` parse (see
        :meth:`LayerSpec.parse`).
        """
        kind, index = parse_objective(objective)
        if kind == "class":
            # the logits, or the one layer named as the class scores
            specs = [LayerSpec.parse(s, known) if isinstance(s, str) else s for s in layers]
            if len(specs) > 1:
                raise ObjectiveError(f"--objective class:{index} reads one tensor of class "
                                     "scores (the logits); name at most one --layer")
            name = specs[0].name if specs else "logits"
            return Objective((Term(name, "class", index, 1.0),))
        if not layers:
            raise LayerError("name at least one layer (--layer NAME); `onnxdream layers MODEL` "
                             "lists them")
        terms = []
        for spec in layers:
            spec = LayerSpec.parse(spec, known) if isinstance(spec, str) else spec
            terms.append(Term(spec.name, kind, index, spec.weight))
        return cls(tuple(terms))


def mean(layer: str) -> Objective:
    return Objective((Term(layer, "mean"),))


def l2(layer: str) -> Objective:
    return Objective((Term(layer, "l2"),))


def channel(layer: str, k: int) -> Objective:
    return Objective((Term(layer, "channel", int(k)),))


def neuron(layer: str, k: int) -> Objective:
    return Objective((Term(layer, "neuron", int(k)),))


def class_logit(k: int) -> Objective:
    return Objective((Term("logits", "class", int(k)),))


def guide(layer: str) -> Objective:
    """``mean_p max_j <layer[p], guide[j]>``: the guide features are the graph input
    ``guide.<t>`` (see :mod:`.contract`)."""
    return Objective((Term(layer, "guide"),))


def weighted_channels(layer: str) -> Objective:
    """``sum_c channel_weights[n, c] * mean(layer[n, c])``, per image (a graph input)."""
    return Objective((Term(layer, "weighted_channels"),))


@dataclass(frozen=True)
class LayerSpec:
    name: str
    weight: float = 1.0

    @classmethod
    def parse(cls, text: str, known: Collection[str] | None = None) -> LayerSpec:
        """``NAME`` or ``NAME:WEIGHT``; ``known`` are the model's layer names.

        A trailing ``:WEIGHT`` is split off only when it parses as a number AND the whole text
        is not itself a layer name in ``known``. So tf2onnx's tensor names, which end in
        ``:0``, read as layers: ``model/block_1/Relu6:0`` is that layer at weight 1, and
        ``model/block_1/Relu6:0:2`` is it at weight 2. Without ``known`` every numeric suffix is
        a weight. When both readings name layers (the model has ``x`` and ``x:2`` as different
        tensors), LayerError says how to write each; ``known`` may map names to tensors, and
        two names of one tensor are not ambiguous (the whole text wins).
        """
        text = text.strip()
        if not text:
            raise LayerError("empty layer name")
        if ":" not in text:
            return cls(text)
        name, _, w = text.rpartition(":")
        try:
            weight = float(w)
        except ValueError:
            return cls(text)
        if known is not None and text in known:
            if name in known and not _same_tensor(known, name, text):
                raise LayerError(
                    f"layer spec '{text}' is ambiguous: the model has a layer '{text}' and a "
                    f"layer '{name}'; write '{_unused(known, text + ':1', text + ':1.0')}' for "
                    f"layer '{text}' or '{_unused(known, f'{name}:{weight!r}', f'{name}:+{w}')}' "
                    f"for layer '{name}' at weight {w}")
            return cls(text)
        if not name:
            raise LayerError(f"layer spec '{text}' has a weight but no name")
        if not np.isfinite(weight) or abs(weight) > MAX_WEIGHT:
            raise LayerError(f"layer weight in '{text}' must be a finite number between "
                             f"-{MAX_WEIGHT:g} and {MAX_WEIGHT:g}", field="layers")
        return cls(name, weight)


def _same_tensor(known: Collection[str], a: str, b: str) -> bool:
    return isinstance(known, Mapping) and known[a] == known[b]


def _unused(known: Collection[str], *spellings: str) -> str:
    return next((s for s in spellings if s not in known), spellings[-1])


def parse_objective(spec: str) -> tuple[str, int | None]:
    m = _SPEC.match(spec.strip())
    if not m:
        raise ObjectiveError(f"bad objective '{spec}': use mean, l2, channel:K, neuron:K, "
                             "class:K (K a non-negative integer) or guide")
    kind, k = m.group(1), m.group(2)
    if kind in ("mean", "l2", "guide") and k is not None:
        raise ObjectiveError(f"bad objective '{spec}': {kind} takes no index")
    if kind in ("channel", "neuron", "class"):
        if k is None:
            raise ObjectiveError(f"bad objective '{spec}': {kind} needs an index, e.g. {kind}:0")
        if int(k) < 0:
            raise ObjectiveError(f"bad objective '{spec}': the index must be >= 0")
        return kind, int(k)
    return kind, None


def _channel_axis(rank: int, layout: str) -> int:
    # NCHW feature maps and [N, C] vectors: axis 1; channels-last maps (Keras' NHWC) and
    # transformer tokens [N, L, C]: the last axis
    if rank == 4 and layout == "NHWC":
        return 3
    return 2 if rank == 3 else 1


def channel_weights_shape(term: Term, shape: tuple | None, batch, layout: str = "NCHW") -> list:
    """The ``channel_weights`` input's shape for a weighted_channels term on a layer of ``shape``:
    ``[N, C]``, ``[N, C, 1, 1]`` (NCHW) or ``[N, 1, 1, C]`` (NHWC)."""
    rank = len(shape) if shape is not None else 0
    axis = _channel_axis(rank, layout) if rank in (2, 4) else None
    c = shape[axis] if axis is not None else None
    if not isinstance(c, int):
        raise ObjectiveError(f"layer '{term.layer}' has shape {shape}: a visualisation needs "
                             "[N,C] or [N,C,H,W] with a known channel count")
    return [batch] + [c if a == axis else 1 for a in range(1, rank)]


def guide_channels(term: Term, shape: tuple | None, layout: str = "NCHW") -> int:
    """The channel count C of a guide term's layer (its ``guide.<t>`` input is ``[M, C]``)."""
    rank = len(shape) if shape is not None else 0
    c = shape[_channel_axis(rank, layout)] if rank >= 2 else None
    if not isinstance(c, int):
        raise ObjectiveError(f"layer '{term.layer}' has shape {shape}: a guided dream needs a "
                             "layer with a known channel count")
    return c


def emit_term(b: GraphBuilder, term: Term, tensor: str, shape: tuple | None,
              border: int = 0, layout: str = "NCHW", channel_weights: str | None = None,
              guide: str | None = None, mask: str | None = None) -> str:
    """Nodes computing one term's value per image ([N]), unweighted; returns the tensor name.

    ``layout`` is the layer's axis order, "NCHW" (default) or "NHWC" (channels last).
    ``channel_weights`` names the input a weighted_channels term reads, ``guide`` the guide
    features ``[M, C]`` a guide term reads. ``mask``: the region mask at the layer's resolution
    (``[B, 1, h, w]``, or ``[B, h, w, 1]`` for NHWC), multiplying a 4-D layer's positions
    before the reduction (terms of :data:`MASKED_KINDS`). The compiler multiplies the result by
    the term's entry of the ``weights`` input.
    """
    if shape is None:
        raise ObjectiveError(f"the rank of layer '{term.layer}' is unknown")
    rank = len(shape)
    t = tensor
    if border and rank == 4:
        spatial = [1, 2] if layout == "NHWC" else [2, 3]
        t = b.slice(t, [border, border], [-border, -border], spatial)
        if mask is not None:
            mask = b.slice(mask, [border, border], [-border, -border], spatial)
    if mask is not None and rank == 4 and term.kind in MASKED_KINDS and term.kind != "l2":
        # linear in x (guide: max_j <m x, g_j> = m max_j <x, g_j> for m >= 0)
        t = b.mul(t, mask)
    if term.kind == "guide":
        if guide is None:
            raise ObjectiveError("a guide term needs its guide features input")
        # x as [N, C, P] (P positions); guide [M, C] @ x = [N, M, P]: max over M, mean over P
        if rank == 4 and layout == "NHWC":
            t = b.op("Transpose", [t], perm=[0, 3, 1, 2])
        if rank == 4:
            t = b.op("Reshape", [t, b.ints([0, 0, -1])])
        elif rank == 3:
            t = b.op("Transpose", [t], perm=[0, 2, 1])
        elif rank == 2:
            t = b.unsqueeze(t, [2])
        else:
            raise ObjectiveError(f"layer '{term.layer}' has shape {shape}: a guided dream needs "
                                 "[N,C], [N,L,C] or a feature map")
        best = b.op("ReduceMax", [b.op("MatMul", [guide, t]), b.ints([1])], keepdims=0)
        return b.reduce_mean(best, [1], keepdims=0)
    if term.kind == "weighted_channels":
        # C * mean over (C, H, W) of weights * layer = sum_c weights[n, c] * mean_hw(layer[n, c])
        if channel_weights is None:
            raise ObjectiveError("a weighted_channels term needs the channel_weights input")
        channels = shape[_channel_axis(rank, layout)]
        t = b.reduce_mean(b.op("Flatten", [b.mul(t, channel_weights)], axis=1), [1], keepdims=0)
        return b.mul(t, b.scalar(float(channels)))
    if rank == 4 and layout == "NHWC" and term.kind == "neuron":
        t = b.op("Transpose", [t], perm=[0, 3, 1, 2])  # the centre search walks axes 1..
        layout = "NCHW"
    if term.kind in ("channel", "neuron", "class"):
        axis = _channel_axis(rank, layout) if term.kind != "class" else rank - 1
        n = shape[axis]
        if isinstance(n, int) and term.index >= n:
            raise ObjectiveError(f"{term.kind}:{term.index} is out of range for layer "
                                 f"'{term.layer}', which has {n} "
                                 f"{'classes' if term.kind == 'class' else 'channels'} "
                                 f"(0..{n - 1})")
        t = b.op("Gather", [t, b.const(term.index, np.int64)], axis=axis)
        rank -= 1
        if term.kind == "neuron" and rank >= 2:
            for _ in range(rank - 1):  # take the centre along each remaining spatial axis
                size = b.op("Squeeze", [b.dim(t, 1), b.ints([0])])
                centre = b.op("Div", [size, b.const(2, np.int64)])
                t = b.op("Gather", [t, centre], axis=1)
            rank = 1
    elif term.kind == "l2":
        t = b.mul(t, t)
        if mask is not None and rank == 4:
            t = b.mul(t, mask)
    if rank > 1:
        t = b.reduce_mean(b.op("Flatten", [t], axis=1), [1], keepdims=0)
    return t
