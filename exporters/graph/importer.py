"""``onnxdream import onnx``: wrap any ONNX image classifier or feature extractor into the
dreamable contract (:mod:`.contract`).

A model converted by tf2onnx, paddle2onnx, torch.onnx or anything else takes its own input
(``input`` NHWC in [-1,1], ``x`` BGR normalised, …) and has no onnxdream metadata. The wrapper
puts in front of it what the contract asks for: one input ``image`` float32 ``[N, 3, H, W]``, RGB
in [0,1], mapped to the network's input by the preprocessing (:mod:`.preprocessing`) and, for a
channels-last network, a transpose. The network's nodes and weights stay as they were (``Constant``
nodes become initializers of the same name and value); its logits (the single ``[N, K]`` output,
or the input of a final Softmax) become the output ``logits``; every float tensor of rank 4 (and
rank 3, for transformers) computed from the image by the network's own layers becomes a layer,
under its tensor name or a short alias of it (:func:`layer_aliases`); the metadata records the
native size, whether other sizes run, the preprocessing, the labels and a default layer.

:func:`import_onnx` does it; :func:`guess_flags` says which flags an unwrapped file probably
needs (the hint that ``dream``/``predict``/``compile`` give for one, see
:func:`onnxdream.exporters.graph.contract.require_dreamable`).
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxdream.errors import ModelError, SettingsError, first_line
from onnxdream.exporters.graph import contract
from onnxdream.exporters.graph.autodiff import NON_DIFFERENTIABLE, infer_shapes, node_inputs
from onnxdream.exporters.graph.builder import GraphBuilder
from onnxdream.exporters.graph.preprocessing import Preprocess, parse_preprocess

FLOATS = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
          onnx.TensorProto.BFLOAT16}
LAYOUTS = ("nchw", "nhwc")
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


@dataclass
class ImportResult:
    """What :func:`import_onnx` wrote and inferred (the CLI prints it as the summary)."""

    path: Path | None
    model: onnx.ModelProto
    input: str
    input_shape: list  # the original input's dims (ints, names or None)
    layout: str  # "nchw" or "nhwc"
    layout_inferred: bool
    channels: int
    preprocess: Preprocess
    native_size: tuple[int, int]
    dynamic_hw: bool
    logits: str | None  # the tensor that became ``logits``
    classes: int | None
    labels: list[str] | None
    layers: dict[str, str]  # layer name -> tensor, in network order
    default_layers: list[str]
    batch: bool  # whether several images run at once
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# reading the foreign model


def dims_of(vi: onnx.ValueInfoProto) -> list:
    """A value's dims: ints where fixed, the symbol (or None) where not."""
    tt = vi.type.tensor_type
    if not tt.HasField("shape"):
        return []
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
            for d in tt.shape.dim]


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    inits = {i.name for i in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def choose_input(model: onnx.ModelProto, name: str | None = None) -> onnx.ValueInfoProto:
    """The image input: ``name``, else the only float input (SettingsError(field="input"))."""
    inputs = graph_inputs(model)
    if name is not None:
        for vi in inputs:
            if vi.name == name:
                break
        else:
            raise SettingsError("input", f"names no input of the model: {name!r} (its inputs: "
                                f"{', '.join(repr(i.name) for i in inputs) or 'none'})")
    else:
        floats = [i for i in inputs if i.type.tensor_type.elem_type in FLOATS]
        if len(floats) != 1:
            what = "no float input" if not floats else f"{len(floats)} float inputs"
            raise SettingsError("input", f"is needed: the model has {what} (inputs: "
                                + ", ".join(f"{i.name!r} {_shape(dims_of(i))}" for i in inputs)
                                + ")")
        vi = floats[0]
    if vi.type.tensor_type.elem_type not in FLOATS:
        raise SettingsError("input", f"{vi.name!r} is not a float tensor: an image input is "
                            "float (uint8 inputs are not supported)")
    others = [i.name for i in inputs if i.name != vi.name]
    if others:
        raise ModelError(f"the model has more inputs than the image ({', '.join(others)}); a "
                         "dreamable model has exactly one")
    dims = dims_of(vi)
    if len(dims) != 4:
        raise ModelError(f"the input {vi.name!r} is {_shape(dims)}: an image input has 4 axes "
                         "([N, C, H, W] or [N, H, W, C])")
    return vi


def infer_layout(dims: Sequence) -> str | None:
    """``"nchw"`` or ``"nhwc"`` from an input's dims where a channel axis of 3 (or 1) tells;
    None when ambiguous."""
    for channels in (3, 1):
        first, last = dims[1] == channels, dims[3] == channels
        if first != last:
            return "nchw" if first else "nhwc"
        if first and last:
            return None
    return None


def _spatial(dims: Sequence, layout: str) -> tuple:
    return (dims[2], dims[3]) if layout == "nchw" else (dims[1], dims[2])


def _channels(dims: Sequence, layout: str):
    return dims[1] if layout == "nchw" else dims[3]


def parse_size(text: str | Sequence[int] | None) -> tuple[int, int] | None:
    """``"224"``, ``"48x192"`` (HxW) or (h, w) → (h, w); SettingsError(field="size")."""
    if text is None or text == "":
        return None
    if not isinstance(text, str):
        h, w = (int(v) for v in text)
    else:
        m = re.fullmatch(r"\s*(\d+)\s*(?:[x×,]\s*(\d+))?\s*", text.lower())
        if not m:
            raise SettingsError("size", f"{text!r} is not a size: use H or HxW, e.g. 224 or 48x192")
        h = int(m.group(1))
        w = int(m.group(2)) if m.group(2) else h
    if not (1 <= h <= 16384 and 1 <= w <= 16384):
        raise SettingsError("size", f"{h}x{w} is out of range (1..16384 per side)")
    return h, w


def read_labels(path: str | os.PathLike | None) -> list[str] | None:
    """One label per line (blank lines at the end dropped); ``imagenet`` for ImageNet's 1000."""
    if path is None:
        return None
    if str(path).lower() == "imagenet" and not Path(path).exists():
        from onnxdream.models.labels import imagenet_labels

        return imagenet_labels()
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise SettingsError("labels", f"file {str(p)!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingsError("labels", f"file {str(p)!r} cannot be read ({first_line(exc)})"
                            ) from None
    labels = [line.strip() for line in text.splitlines()]
    while labels and not labels[-1]:
        labels.pop()
    if not labels:
        raise SettingsError("labels", f"file {str(p)!r} is empty (one label per line)")
    return labels


def constants_to_initializers(model: onnx.ModelProto) -> int:
    """Move the main graph's ``Constant`` nodes into initializers of the same name and value."""
    moved = 0
    keep = []
    for node in model.graph.node:
        tensor = _constant_value(node) if node.op_type == "Constant" else None
        if tensor is None:
            keep.append(node)
            continue
        model.graph.initializer.append(tensor)
        moved += 1
    if moved:
        del model.graph.node[:]
        model.graph.node.extend(keep)
    return moved


def _constant_value(node: onnx.NodeProto) -> onnx.TensorProto | None:
    if len(node.attribute) != 1 or node.domain not in ("", "ai.onnx"):
        return None
    a = node.attribute[0]
    if a.name == "value":
        t = onnx.TensorProto()
        t.CopyFrom(a.t)
    elif a.name in ("value_float", "value_floats"):
        t = numpy_helper.from_array(np.asarray(helper.get_attribute_value(a), np.float32))
    elif a.name in ("value_int", "value_ints"):
        t = numpy_helper.from_array(np.asarray(helper.get_attribute_value(a), np.int64))
    else:
        return None
    t.name = node.output[0]
    return t


def producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in model.graph.node for o in n.output if o}


def find_logits(model: onnx.ModelProto, shapes: dict, requested: str | None
                ) -> tuple[str | None, str | None]:
    """(the logits tensor or None, a note on how it was chosen)."""
    prod = producers(model)
    if requested is not None:
        if requested.lower() == "none":
            return None, None
        known = set(prod) | {o.name for o in model.graph.output}
        if requested not in known:
            from onnxdream.errors import did_you_mean

            raise SettingsError("logits", f"names no tensor of the model: {requested!r}"
                                + did_you_mean(requested, sorted(known)))
        shape = shapes.get(requested)
        if shape is not None and len(shape) != 2:
            raise SettingsError("logits", f"must name an [N, classes] tensor; {requested!r} is "
                                f"{_shape(shape)}")
        return requested, None
    rank2 = [o.name for o in model.graph.output
             if o.type.tensor_type.elem_type in FLOATS
             and len(shapes.get(o.name) or dims_of(o)) == 2]
    if not rank2:
        return None, None
    if len(rank2) > 1:
        return None, (f"several [N, K] outputs ({', '.join(rank2)}): no logits; name them with "
                      "--logits")
    name = rank2[0]
    src = name
    while src in prod and prod[src].op_type in ("Identity", "Flatten", "Reshape", "Squeeze"):
        src = prod[src].input[0]
    node = prod.get(src)
    if node is not None and node.op_type in ("Softmax", "LogSoftmax"):
        src = node.input[0]  # back through the reshapes an opset conversion adds
        while (src in prod and prod[src].op_type in ("Identity", "Flatten", "Reshape", "Squeeze")
               and len(shapes.get(prod[src].input[0]) or ()) == 2):
            src = prod[src].input[0]
        return src, (f"the output {name!r} is a {node.op_type.lower()}, not logits: using its "
                     f"input {src!r}")
    return name, None


# ---------------------------------------------------------------------------------------------
# layers


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
                    and len(shape) in (3, 4) and dtypes.get(out) in FLOATS):
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


# ---------------------------------------------------------------------------------------------
# the wrapper


def import_onnx(
    model: str | os.PathLike | onnx.ModelProto,
    out: str | os.PathLike | None = None,
    *,
    input: str | None = None,  # noqa: A002 - the flag's name
    layout: str | None = None,
    preprocess: str | Preprocess = "unit",
    size: str | Sequence[int] | None = None,
    labels: str | os.PathLike | Sequence[str] | None = None,
    logits: str | None = None,
    name: str | None = None,
    default_layers: Sequence[str] | None = None,
    check: bool = True,
) -> ImportResult:
    """Wrap ``model`` into a dreamable model and write it to ``out`` (atomically; None: only
    return it). See the module docstring and ``onnxdream import onnx --help``.

    ``check`` runs the result once with onnxruntime (when installed) at the native size and at
    another size, and with two images at once: a model that fails at other sizes is recorded
    as fixed-size, one that needs ``--size`` says so.
    """
    src_name = Path(model).name if not isinstance(model, onnx.ModelProto) else "the model"
    # a missing, corrupt or empty file is a ModelError; opset >= 18 (converted if older)
    raw = contract.load_model(model if not isinstance(model, onnx.ModelProto) else _copy(model))
    if contract.metadata(raw).get(contract.FORMAT_KEY):
        raise ModelError(f"{src_name} is already a dreamable model (it has onnxdream metadata); "
                         "use it as it is")
    prep = preprocess if isinstance(preprocess, Preprocess) else parse_preprocess(preprocess)
    if layout is not None and layout.lower() not in LAYOUTS:
        raise SettingsError("layout", f"must be nchw or nhwc, not {layout!r}")
    want_size = parse_size(size)
    label_list = (read_labels(labels) if isinstance(labels, (str, os.PathLike)) or labels is None
                  else [str(x) for x in labels])
    notes: list[str] = []

    proto = raw
    moved = constants_to_initializers(proto)
    if moved:
        notes.append(f"{moved} Constant nodes became initializers")
    proto.ir_version = max(proto.ir_version, 8)
    vi = choose_input(proto, input)
    dims = dims_of(vi)
    guessed = infer_layout(dims)
    lay = layout.lower() if layout else guessed
    if lay is None:
        raise SettingsError("layout", f"is needed: the input {vi.name!r} is {_shape(dims)}, "
                            "which does not tell channels-first (nchw) from channels-last (nhwc)")
    channels = _channels(dims, lay)
    if not isinstance(channels, int) or channels <= 0:
        channels = 3
        notes.append(f"the input's channel axis is not fixed: assumed 3 ({lay})")
    if channels not in (1, 3):
        raise ModelError(f"the input {vi.name!r} {_shape(dims)} has {channels} channels in "
                         f"{lay.upper()}: an image network takes 3 (RGB/BGR) or 1 (grey)"
                         + ("" if layout else "; or give --layout"))
    if channels == 1:
        notes.append("one input channel: the image is turned to grey (ITU-R 601 luma)")
    h_dim, w_dim = _spatial(dims, lay)
    fixed = isinstance(h_dim, int) and isinstance(w_dim, int) and h_dim > 0 and w_dim > 0
    if fixed:
        if want_size is not None and want_size != (h_dim, w_dim):
            raise SettingsError("size", f"is {want_size[0]}x{want_size[1]} but the input "
                                f"{vi.name!r} is fixed at {h_dim}x{w_dim}")
        native = (h_dim, w_dim)
    elif isinstance(h_dim, int) and h_dim > 0 or isinstance(w_dim, int) and w_dim > 0:
        if want_size is None:
            raise SettingsError("size", f"is needed: the input {vi.name!r} {_shape(dims)} fixes "
                                "one side only; give the size the network runs at, HxW")
        native = want_size
        fixed = True
    else:
        native = want_size or (contract.DEFAULT_SIZE, contract.DEFAULT_SIZE)
    size_assumed = not fixed and want_size is None
    batch_dim = dims[0]

    # rename what would collide with the contract's names
    tensors = {o for n in proto.graph.node for o in n.output} | {i.name for i in proto.graph.input}
    taken = tensors | {i.name for i in proto.graph.initializer} | {n.name for n in proto.graph.node}
    builder = GraphBuilder(contract.opset_of(proto), "import", taken)
    shapes, dtypes = _infer(proto, vi.name, dims, lay, native)
    logit_tensor, note = find_logits(proto, shapes, logits)
    if note:
        notes.append(note)
    for reserved in (contract.IMAGE, contract.LOGITS):
        if reserved in tensors and not (reserved == contract.LOGITS and logit_tensor == reserved
                                        and reserved in {o.name for o in proto.graph.output}):
            new = builder.fresh(f"{reserved}_original")
            _rename(proto.graph, reserved, new)
            logit_tensor = new if logit_tensor == reserved else logit_tensor
            if reserved == vi.name:
                vi = next(i for i in proto.graph.input if i.name == new)
            shapes = {new if k == reserved else k: v for k, v in shapes.items()}
            dtypes = {new if k == reserved else k: v for k, v in dtypes.items()}

    # the wrapper: image -> preprocessing -> (transpose) -> the network's input
    image_dims = [batch_dim if isinstance(batch_dim, int) and batch_dim > 0 else "batch", 3,
                  native[0] if fixed else "height", native[1] if fixed else "width"]
    batch_symbolic = isinstance(image_dims[0], int) and image_dims[0] == 1
    if batch_symbolic:
        image_dims[0] = "batch"
    x = prep.emit(builder, contract.IMAGE, channels)
    if lay == "nhwc":
        x = builder.op("Transpose", [x], hint="to_nhwc", perm=[0, 2, 3, 1])
    nodes = list(builder.nodes)
    cancelled = _cancel_transpose(proto, vi.name, nodes, x)
    if not cancelled:
        nodes.append(helper.make_node("Identity", [x], [vi.name], name=builder.fresh("input")))
    graph = proto.graph
    network = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + network)
    graph.initializer.extend(builder.initializers)
    image_vi = helper.make_tensor_value_info(contract.IMAGE, onnx.TensorProto.FLOAT, image_dims)
    if vi.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
        raise ModelError(f"the input {vi.name!r} is not float32; only float32 networks are "
                         "supported")
    keep_inputs = [i for i in graph.input if i.name != vi.name]
    del graph.input[:]
    graph.input.extend([image_vi] + keep_inputs)
    del graph.value_info[:]  # stale once the input changes; shape inference redoes it

    outputs = list(graph.output)
    if batch_symbolic:
        for o in outputs:
            d = o.type.tensor_type.shape.dim
            if d and d[0].HasField("dim_value") and d[0].dim_value == 1:
                d[0].Clear()
                d[0].dim_param = "batch"
    if logit_tensor is not None:
        if logit_tensor != contract.LOGITS:
            graph.node.append(helper.make_node("Identity", [logit_tensor], [contract.LOGITS],
                                               name=builder.fresh("logits")))
        k = (shapes.get(logit_tensor) or (None, None))[1]
        logits_vi = helper.make_tensor_value_info(
            contract.LOGITS, onnx.TensorProto.FLOAT,
            [image_dims[0], k if isinstance(k, int) else "classes"])
        outputs = [logits_vi] + [o for o in outputs if o.name != contract.LOGITS]
    del graph.output[:]
    graph.output.extend(outputs)

    # layers
    shapes, dtypes = _infer(proto, contract.IMAGE, [1, 3, *native], "nchw", native)
    scan = scan_layers(proto, contract.IMAGE, shapes, dtypes,
                       {o for n in nodes for o in n.output})
    reserved = {contract.IMAGE, contract.LOGITS}
    aliases = layer_aliases(scan.order, reserved | set(tensors))
    table = {aliases.get(t, t): t for t in scan.order}
    by_tensor = {t: n for n, t in table.items()}
    layouts = {by_tensor[t]: v for t, v in scan.layouts.items()}
    layouts.update({t: v for t, v in scan.layouts.items() if t not in table})
    if logit_tensor is not None:
        table[contract.LOGITS] = contract.LOGITS
    if default_layers is None:
        guess = default_layer(scan, by_tensor, native)
        defaults = [guess] if guess else []
    else:
        defaults = [by_tensor.get(d, d) for d in default_layers]
        unknown = [d for d in defaults if d not in table]
        if unknown:
            raise SettingsError("default_layers", f"names no layer: {', '.join(unknown)}")
    classes = None
    if logit_tensor is not None:
        k = shapes.get(contract.LOGITS)
        classes = k[1] if k and len(k) == 2 and isinstance(k[1], int) else None
    if label_list is not None:
        if logit_tensor is None:
            raise SettingsError("labels", "are for logits, and the model has none (name them "
                                "with --logits)")
        if classes is not None and len(label_list) != classes:
            raise SettingsError("labels", f"gives {len(label_list)} labels for {classes} "
                                "classes (one label per line)")

    meta = contract.model_metadata(
        name=name or (Path(model).stem if not isinstance(model, onnx.ModelProto) else "imported"),
        layers=table, default_layers=defaults, input_size=native, dynamic_hw=not fixed,
        source=f"imported from {src_name}", labels=label_list, layouts=layouts,
        preprocess=prep.describe() + (", NHWC" if lay == "nhwc" else ""),
        framework=" ".join(v for v in (raw.producer_name, raw.producer_version) if v) or None)
    for p in raw.metadata_props:  # the model's own metadata stays
        meta.setdefault(p.key, p.value)
    contract.write_metadata(proto, meta)

    result = ImportResult(None, proto, vi.name, dims, lay, layout is None, channels, prep,
                          native, not fixed, logit_tensor, classes, label_list, table, defaults,
                          True, notes)
    small = proto.ByteSize() < 2_000_000_000  # protobuf's limit for one message
    if check and small:
        _probe(result, size_assumed, batch_symbolic)
    elif check:
        notes.append("not run with onnxruntime to check it (over 2 GB)")
    try:
        if small:
            onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as exc:
        raise ModelError(f"the wrapped model is not valid ONNX ({first_line(exc)})") from None
    if out is not None:
        from onnxdream.exporters.graph.compiler import save_model

        result.path = save_model(proto, out)
    return result


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    return m


def _shape(dims: Sequence) -> str:
    return "[" + ", ".join("?" if not isinstance(d, int) or d <= 0 else str(d) for d in dims) + "]"


def _infer(model: onnx.ModelProto, inp: str, dims: Sequence, layout: str,
           native: tuple[int, int]) -> tuple[dict, dict]:
    """Shapes and dtypes of every tensor with ``inp`` set to one image at the native size."""
    probe = _copy(model)
    concrete = [1, 3, native[0], native[1]] if layout == "nchw" else [1, native[0], native[1], 3]
    channels = _channels(dims, layout) if len(dims) == 4 else 3
    if isinstance(channels, int) and channels > 0:
        concrete[1 if layout == "nchw" else 3] = channels
    for i in probe.graph.input:
        if i.name == inp:
            d = i.type.tensor_type.shape.dim
            for axis, v in enumerate(concrete):
                d[axis].Clear()
                d[axis].dim_value = v
    del probe.graph.value_info[:]
    inferred = infer_shapes(probe)
    shapes, dtypes = {}, {}
    g = inferred.graph
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        tt = vi.type.tensor_type
        dtypes[vi.name] = tt.elem_type
        if tt.HasField("shape"):
            shapes[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else None
                                    for d in tt.shape.dim)
    return shapes, dtypes


def _rename(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Rename tensor ``old`` everywhere in ``graph`` and the subgraphs that read it."""
    for n in graph.node:
        for i, v in enumerate(n.input):
            if v == old:
                n.input[i] = new
        for i, v in enumerate(n.output):
            if v == old:
                n.output[i] = new
        for a in n.attribute:
            for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                if old not in {i.name for i in g.input} | {o for x in g.node for o in x.output}:
                    _rename(g, old, new)
    for coll in (graph.input, graph.output, graph.value_info, graph.initializer):
        for v in coll:
            if v.name == old:
                v.name = new


def _cancel_transpose(model: onnx.ModelProto, inp: str, nodes: list[onnx.NodeProto],
                      x: str) -> bool:
    """tf2onnx starts NHWC networks with a Transpose to NCHW: when every reader of the input
    is such a Transpose and the wrapper ends with the opposite one, both go (the network's
    Transposes become Identities of the preprocessed NCHW image, keeping their names)."""
    if not nodes or nodes[-1].op_type != "Transpose" or nodes[-1].output[0] != x:
        return False
    readers = [n for n in model.graph.node if inp in node_inputs(n)]
    perms = [next((list(a.ints) for a in n.attribute if a.name == "perm"), None) for n in readers]
    if (not readers or any(n.op_type != "Transpose" for n in readers)
            or any(p != [0, 3, 1, 2] for p in perms)
            or inp in {o.name for o in model.graph.output}):
        return False
    before = nodes[-1].input[0]
    nodes.pop()
    for n in readers:
        out, name = n.output[0], n.name
        n.Clear()
        n.CopyFrom(helper.make_node("Identity", [before], [out], name=name))
    return True


def _probe(result: ImportResult, size_assumed: bool, batch_symbolic: bool) -> None:
    """Run the wrapped model: native size must run; another size and a batch of two may."""
    try:
        import onnxruntime as ort
    except ImportError:
        result.notes.append("not checked with onnxruntime (not installed)")
        return
    options = ort.SessionOptions()
    options.log_severity_level = 4
    proto = result.model
    try:
        session = ort.InferenceSession(proto.SerializeToString(), options,
                                       providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types
        raise ModelError(f"onnxruntime cannot load the wrapped model ({first_line(exc)})"
                         ) from None
    outputs = [o.name for o in proto.graph.output]
    rng = np.random.default_rng(0)
    h, w = result.native_size

    def run(n: int, hh: int, ww: int):
        x = rng.random((n, 3, hh, ww), dtype=np.float32)
        return x, session.run(outputs, {contract.IMAGE: x})

    try:
        x1, y1 = run(1, h, w)
    except Exception as exc:  # noqa: BLE001
        hint = (" (the size was assumed: give the size the network runs at with --size HxW)"
                if size_assumed else "")
        raise ModelError(f"the wrapped model does not run at {h}x{w}{hint}: "
                         f"{first_line(exc, 160)}") from None
    if batch_symbolic:
        try:
            x2 = np.concatenate([x1, rng.random(x1.shape, dtype=np.float32)])
            y2 = session.run(outputs, {contract.IMAGE: x2})
            ok = all(np.allclose(a[:1], b, rtol=1e-3, atol=1e-4) for a, b in zip(y2, y1))
        except Exception:  # noqa: BLE001
            ok = False
        if not ok:
            d = proto.graph.input[0].type.tensor_type.shape.dim[0]
            d.Clear()
            d.dim_value = 1
            result.batch = False
            result.notes.append("the model runs one image at a time (its batch axis is fixed "
                                "at 1)")
    if result.dynamic_hw:
        hh, ww = h + 32, w + 32
        try:
            run(1, hh, ww)
        except Exception as exc:  # noqa: BLE001
            result.dynamic_hw = False
            for d, v in zip(proto.graph.input[0].type.tensor_type.shape.dim[2:], (h, w)):
                d.Clear()
                d.dim_value = v
            meta = contract.metadata(proto)
            meta[contract.DYNAMIC_HW_KEY] = "0"
            contract.write_metadata(proto, meta)
            result.notes.append(f"runs only at {h}x{w} (at {hh}x{ww}: {first_line(exc, 100)})")


# ---------------------------------------------------------------------------------------------
# the hint for an unwrapped model


def guess_flags(model: onnx.ModelProto) -> tuple[list[str], str]:
    """(the ``import onnx`` flags an unwrapped model probably needs, what its input is)."""
    inputs = graph_inputs(model)
    floats = [i for i in inputs if i.type.tensor_type.elem_type in FLOATS]
    flags: list[str] = []
    vi = floats[0] if floats else (inputs[0] if inputs else None)
    if vi is None:
        return flags, "no input"
    if len(floats) != 1:
        flags += ["--input", vi.name]
    dims = dims_of(vi)
    what = f"input {vi.name!r} {_shape(dims)}"
    if len(dims) == 4:
        lay = infer_layout(dims)
        if lay == "nhwc":
            flags += ["--layout", "nhwc"]
            what += " NHWC"
        elif lay is None:
            flags += ["--layout", "nchw|nhwc"]
        h, w = _spatial(dims, lay or "nchw")
        if isinstance(h, int) != isinstance(w, int):
            flags += ["--size", "HxW"]
    producer = (model.producer_name or "").lower()
    prep = ("torch" if "torch" in producer else "tf" if "tf2onnx" in producer
            or "keras" in producer else "unit")
    flags += ["--preprocess", prep]
    try:
        shapes, _ = (_infer(model, vi.name, dims, infer_layout(dims) or "nchw",
                            (contract.DEFAULT_SIZE, contract.DEFAULT_SIZE))
                     if len(dims) == 4 else ({}, {}))
        tensor, note = find_logits(model, shapes, None)
    except Exception:  # noqa: BLE001 - a hint is best effort
        tensor, note = None, None
    if tensor is None and note:  # several [N, K] outputs: the user picks
        flags += ["--logits", "TENSOR"]
    return flags, what
