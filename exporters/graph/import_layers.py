"""The layers of an imported model (:mod:`.importer`): which tensors, their short names, and
the default layer.

A layer is a float tensor of rank 4 (a feature map) or 3 (a transformer's tokens) that the
network computes from the image downstream of one of its learned ops, other than a view
(reshape, transpose, …) of another. Long path-like tensor names get short aliases
(:func:`layer_aliases`); :func:`default_layer` picks one about 60% into the network.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import onnx

from onnxdream.exporters.graph.ops import FLOAT_TYPES, NON_DIFFERENTIABLE, node_inputs

#: ops that carry learned weights: a tensor is a layer only downstream of one of them
LEARNED = {"Conv", "ConvTranspose", "MatMul", "Gemm", "Einsum", "BatchNormalization",
           "InstanceNormalization", "LayerNormalization", "GroupNormalization", "Attention",
           "MultiHeadAttention", "ConvInteger", "MatMulInteger", "QLinearConv", "QLinearMatMul"}
#: ops whose output is another view of their input: not listed as layers of their own
VIEWS = {"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Identity", "Cast",
         "Dropout", "Expand"}
#: ops that produce NCHW whatever their input was
CHANNELS_FIRST = {"Conv", "ConvTranspose", "MaxPool", "AveragePool", "LpPool",
                  "GlobalAveragePool", "GlobalMaxPool", "BatchNormalization",
                  "InstanceNormalization", "LRN", "Resize", "Upsample", "DepthToSpace",
                  "SpaceToDepth", "GroupNormalization"}
ACTIVATIONS = {"Relu", "Clip", "LeakyRelu", "PRelu", "Elu", "Selu", "Sigmoid", "HardSigmoid",
               "HardSwish", "Gelu", "Tanh", "Softplus", "Mish", "Swish", "Celu"}
MERGES = {"Add", "Sum", "Concat"}  # with two or more inputs from the image
DEFAULT_DEPTH = 0.6  # the default layer: this far into the network, by learned ops


@dataclass(frozen=True)
class LayerScan:
    """The float tensors the network computes from the image, with what the defaults need."""

    order: list[str]  # layer tensors in network order
    op: dict[str, str]  # tensor -> producing op
    shapes: dict[str, tuple]
    depth: dict[str, int]  # learned ops upstream
    layouts: dict[str, str]  # tensor -> "NHWC" for channels-last ones
    merges: set[str]  # outputs of Add/Sum/Concat of two or more image-dependent tensors
    feature_maps: set[str]  # rank-4 tensors whose axes are known to be N, C, H, W (any order)
    total_depth: int


def scan_layers(model: onnx.ModelProto, image: str, shapes: dict, dtypes: dict,
                wrapper: set[str] = frozenset()) -> LayerScan:
    """Every float tensor of rank 4 or 3 downstream of a learned op on the image's path,
    except views (:data:`VIEWS`) and the ``wrapper``'s own tensors (the preprocessing)."""
    reach: set[str] = {image}
    depth: dict[str, int] = {image: 0}
    learned: set[str] = set()
    axes: dict[str, str] = {image: "NCHW"}  # what each rank-4 tensor's axes mean
    order: list[str] = []
    op: dict[str, str] = {}
    merges: set[str] = set()
    for node in model.graph.node:
        ins = [i for i in node_inputs(node) if i in reach]
        if not ins or node.op_type in NON_DIFFERENTIABLE:
            continue
        own = node.op_type in LEARNED and not wrapper.intersection(node.output)
        d = max(depth[i] for i in ins) + own
        after = own or any(i in learned for i in ins)
        layout = _layout_of(node, ins, axes)
        for out in node.output:
            if not out:
                continue
            reach.add(out)
            depth[out] = d
            if after:
                learned.add(out)
            shape = shapes.get(out)
            if shape is not None and len(shape) == 4 and layout:
                axes[out] = layout
            if (after and node.op_type not in VIEWS and shape is not None
                    and len(shape) in (3, 4) and dtypes.get(out) in FLOAT_TYPES):
                order.append(out)
                op[out] = node.op_type
                if node.op_type in MERGES and len(ins) >= 2:
                    merges.add(out)
    layouts = {t: "NHWC" for t in order if axes.get(t) == "NHWC"}
    maps = {t for t in order if axes.get(t) in ("NCHW", "NHWC")}
    return LayerScan(order, op, {t: shapes[t] for t in order}, {t: depth[t] for t in order},
                     layouts, merges, maps, max(depth.values()))


def _layout_of(node: onnx.NodeProto, ins: Sequence[str], axes: dict[str, str]) -> str | None:
    if node.op_type in CHANNELS_FIRST:
        return "NCHW"
    src = next((axes[i] for i in ins if i in axes), None)
    if node.op_type == "Transpose":
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
        if src is None or perm is None or len(perm) != 4:
            return None
        return "".join(src[p] for p in perm)
    if node.op_type in VIEWS - {"Identity", "Cast", "Dropout"}:
        return None
    return src


def layer_aliases(tensors: Sequence[str], taken: set[str]) -> dict[str, str]:
    """Short names for tensors with long path names: tensor -> alias.

    A tensor named like a path (``model/block_1/conv_pw_1_relu/Relu6:0``) is the output of each
    scope (``model/block_1/conv_pw_1_relu``) whose last tensor it is, in network order. Its alias
    is the innermost such scope's last part where that part is unique among the scopes
    (``conv_pw_1_relu``), else the shortest unique tail of the innermost scope. A scope that
    holds most of the layers (the model's own name) names nothing. A ``_N`` suffix that every
    one-part alias shares (Keras 3 calling a model inside another adds ``_1`` to every layer) is
    dropped when the names stay unique. Aliases never equal another tensor's name nor ``taken``.
    """
    paths = {t: _path(t) for t in tensors}
    paths = {t: p for t, p in paths.items() if len(p) > 1}
    if not paths:
        return {}
    last: dict[tuple, str] = {}  # scope -> its last tensor (network order)
    size: Counter = Counter()
    for t in tensors:
        p = paths.get(t)
        if p is None:
            continue
        for k in range(1, len(p)):
            last[p[:k]] = t
            size[p[:k]] += 1
    scopes = [s for s in last if size[s] <= max(1, len(paths) // 2)]
    part_count = Counter(s[-1] for s in scopes)
    names = set(tensors) | set(taken)
    used: set[str] = set()
    aliases: dict[str, str] = {}
    for t, p in paths.items():
        own = [p[:k] for k in range(len(p) - 1, 0, -1) if p[:k] in scopes and last[p[:k]] == t]
        if not own:
            continue
        alias = None
        for s in own:  # innermost first: a unique one-part name
            if part_count[s[-1]] == 1:
                alias = s[-1]
                break
        if alias is None:  # the shortest tail of the innermost scope that no other scope has
            s = own[0]
            for k in range(2, len(s) + 1):
                tail = s[-k:]
                if sum(1 for o in scopes if o[-k:] == tail) == 1:
                    alias = "/".join(tail)
                    break
        if alias and alias not in names and alias not in used and alias != t:
            aliases[t] = alias
            used.add(alias)
    return _strip_uniform_suffix(aliases, names)


def _path(tensor: str) -> tuple[str, ...]:
    base = re.sub(r":\d+$", "", tensor).strip("/")
    return tuple(p for p in base.split("/") if p)


def _strip_uniform_suffix(aliases: dict[str, str], names: set[str]) -> dict[str, str]:
    single = [a for a in aliases.values() if "/" not in a]
    m = [re.search(r"_(\d+)$", a) for a in single]
    if len(single) < 3 or not all(m) or len({x.group(1) for x in m}) != 1:
        return aliases
    suffix = "_" + m[0].group(1)
    out = {}
    stripped = {a[: -len(suffix)] for a in single}
    if len(stripped) != len(single):
        return aliases
    for t, a in aliases.items():
        short = a[: -len(suffix)] if "/" not in a else a
        out[t] = a if (short in names and short != t) else short
    return out if len(set(out.values())) == len(out) else aliases


def default_layer(scan: LayerScan, names: dict[str, str], native: tuple[int, int]) -> str | None:
    """A layer about :data:`DEFAULT_DEPTH` into the network (counted in learned ops), preferring
    merges (residual Adds, Concats) or else activations: a feature map with some spatial extent
    left, or a token sequence (rank 3) in a network made mostly of those (a transformer)."""
    def spatial(t: str) -> bool:
        s = scan.shapes[t]
        if len(s) != 4:
            return True
        hw = s[1:3] if scan.layouts.get(t) == "NHWC" else s[2:4]
        return all(isinstance(v, int) and v > 1 for v in hw)

    four = [t for t in scan.order if t in scan.feature_maps and spatial(t)]
    three = [t for t in scan.order if len(scan.shapes[t]) == 3]
    pool = four if len(four) >= len(three) else three
    if not pool:
        return None
    merges = [t for t in pool if t in scan.merges]
    acts = [t for t in pool if scan.op[t] in ACTIVATIONS]
    preferred = merges if len(merges) >= 3 else (acts or merges or pool)
    target = DEFAULT_DEPTH * max(scan.total_depth, 1)
    best = min(preferred, key=lambda t: (abs(scan.depth[t] - target), -scan.depth[t]))
    return names[best]
