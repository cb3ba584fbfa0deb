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

:func:`import_onnx` does it. What the model is before wrapping (its input's layout, its logits)
is read with :mod:`.foreign`, which also guesses the flags an unwrapped file probably needs.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxdream.core.errors import ModelError, SettingsError, first_line
from onnxdream.core.labels import imagenet_labels
from onnxdream.exporters.graph import contract
from onnxdream.exporters.graph.builder import GraphBuilder
from onnxdream.exporters.graph.foreign import (
    channel_dim,
    find_logits,
    graph_inputs,
    infer_layout,
    shape_text,
    shapes_at,
    spatial_dims,
)
from onnxdream.exporters.graph.import_layers import (
    default_layer,
    layer_aliases,
    scan_layers,
)
from onnxdream.exporters.graph.onnxfile import load_model, opset_of, save_model
from onnxdream.exporters.graph.ops import FLOAT_TYPES, node_inputs
from onnxdream.exporters.graph.preprocessing import Preprocess, parse_preprocess
from onnxdream.exporters.graph.shapes import dims_of

LAYOUTS = ("nchw", "nhwc")


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
# reading the foreign model and the options


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
        floats = [i for i in inputs if i.type.tensor_type.elem_type in FLOAT_TYPES]
        if len(floats) != 1:
            what = "no float input" if not floats else f"{len(floats)} float inputs"
            raise SettingsError("input", f"is needed: the model has {what} (inputs: "
                                + ", ".join(f"{i.name!r} {shape_text(dims_of(i))}" for i in inputs)
                                + ")")
        vi = floats[0]
    if vi.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
        raise SettingsError("input", f"{vi.name!r} is not a float32 tensor: only float32 "
                            "image inputs are supported (not uint8, float16 or double)")
    others = [i.name for i in inputs if i.name != vi.name]
    if others:
        raise ModelError(f"the model has more inputs than the image ({', '.join(others)}); a "
                         "dreamable model has exactly one")
    dims = dims_of(vi)
    if len(dims) != 4:
        raise ModelError(f"the input {vi.name!r} is {shape_text(dims)}: an image input has 4 axes "
                         "([N, C, H, W] or [N, H, W, C])")
    return vi


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
    proto = load_model(model if not isinstance(model, onnx.ModelProto) else _copy(model))
    if contract.metadata(proto).get(contract.FORMAT_KEY):
        raise ModelError(f"{src_name} is already a dreamable model (it has onnxdream metadata); "
                         "use it as it is")
    own_metadata = {p.key: p.value for p in proto.metadata_props}
    prep = preprocess if isinstance(preprocess, Preprocess) else parse_preprocess(preprocess)
    if layout is not None and layout.lower() not in LAYOUTS:
        raise SettingsError("layout", f"must be nchw or nhwc, not {layout!r}")
    want_size = parse_size(size)
    label_list = (read_labels(labels) if isinstance(labels, (str, os.PathLike)) or labels is None
                  else [str(x) for x in labels])
    notes: list[str] = []
    moved = constants_to_initializers(proto)
    if moved:
        notes.append(f"{moved} Constant nodes became initializers")
    proto.ir_version = max(proto.ir_version, 8)

    vi = choose_input(proto, input)
    dims = dims_of(vi)
    lay, channels = _layout_and_channels(vi.name, dims, layout, notes)
    native, fixed = _native_size(vi.name, dims, lay, want_size)
    shapes, _ = shapes_at(proto, vi.name, dims, lay, native)
    logit_tensor, note = find_logits(proto, shapes, logits)
    notes += [note] if note else []

    tensors = {o for n in proto.graph.node for o in n.output} | {i.name for i in proto.graph.input}
    taken = tensors | {i.name for i in proto.graph.initializer} | {n.name for n in proto.graph.node}
    builder = GraphBuilder(opset_of(proto), "import", taken)
    network_input, logit_tensor = _free_reserved_names(proto, vi.name, logit_tensor, builder)
    wrapper, batch = _wrap_input(proto, network_input, dims[0], prep, lay, channels,
                                 native if fixed else None, builder)
    _expose_logits(proto, logit_tensor, builder)

    shapes, dtypes = shapes_at(proto, contract.IMAGE, [1, 3, *native], "nchw", native)
    scan = scan_layers(proto, contract.IMAGE, shapes, dtypes, wrapper)
    aliases = layer_aliases(scan.order, {contract.IMAGE, contract.LOGITS} | tensors)
    table = {aliases.get(t, t): t for t in scan.order}
    by_tensor = {t: n for n, t in table.items()}
    layouts = {by_tensor[t]: v for t, v in scan.layouts.items()}
    layouts.update({t: v for t, v in scan.layouts.items() if t not in table})  # both names
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
        table[contract.LOGITS] = contract.LOGITS
        k = shapes.get(contract.LOGITS)
        classes = k[1] if k and len(k) == 2 and isinstance(k[1], int) else None
        if classes:
            dim = proto.graph.output[0].type.tensor_type.shape.dim[1]
            dim.Clear()
            dim.dim_value = classes
    _check_labels(label_list, logit_tensor, classes)

    meta = contract.model_metadata(
        name=name or (Path(model).stem if not isinstance(model, onnx.ModelProto) else "imported"),
        layers=table, default_layers=defaults, input_size=native, dynamic_hw=not fixed,
        source=f"imported from {src_name}", labels=label_list, layouts=layouts,
        preprocess=prep.describe() + (", NHWC" if lay == "nhwc" else ""),
        framework=" ".join(v for v in (proto.producer_name, proto.producer_version) if v) or None)
    for key, value in own_metadata.items():  # the model's own metadata stays
        meta.setdefault(key, value)
    contract.write_metadata(proto, meta)

    result = ImportResult(None, proto, vi.name, dims, lay, layout is None, channels, prep,
                          native, not fixed, logit_tensor, classes, label_list, table, defaults,
                          True, notes)
    small = proto.ByteSize() < 2_000_000_000  # protobuf's limit for one message
    if check and small:
        _probe(result, not fixed and want_size is None, batch)
    elif check:
        notes.append("not run with onnxruntime to check it (over 2 GB)")
    try:
        if small:
            onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as exc:
        raise ModelError(f"the wrapped model is not valid ONNX ({first_line(exc)})") from None
    if out is not None:
        result.path = save_model(proto, out)
    return result


def _layout_and_channels(name: str, dims: list, layout: str | None, notes: list[str]
                         ) -> tuple[str, int]:
    lay = layout.lower() if layout else infer_layout(dims)
    if lay is None:
        raise SettingsError("layout", f"is needed: the input {name!r} is {shape_text(dims)}, "
                            "which does not tell channels-first (nchw) from channels-last (nhwc)")
    channels = channel_dim(dims, lay)
    if not isinstance(channels, int) or channels <= 0:
        channels = 3
        notes.append(f"the input's channel axis is not fixed: assumed 3 ({lay})")
    if channels not in (1, 3):
        raise ModelError(f"the input {name!r} {shape_text(dims)} has {channels} channels in "
                         f"{lay.upper()}: an image network takes 3 (RGB/BGR) or 1 (grey)"
                         + ("" if layout else "; or give --layout"))
    if channels == 1:
        notes.append("one input channel: the image is turned to grey (ITU-R 601 luma)")
    return lay, channels


def _native_size(name: str, dims: list, lay: str, want: tuple[int, int] | None
                 ) -> tuple[tuple[int, int], bool]:
    """(native (h, w), whether the input fixes it)."""
    h, w = (d if isinstance(d, int) and d > 0 else None for d in spatial_dims(dims, lay))
    if h is not None and w is not None:
        if want is not None and want != (h, w):
            raise SettingsError("size", f"is {want[0]}x{want[1]} but the input {name!r} is "
                                f"fixed at {h}x{w}")
        return (h, w), True
    if h is not None or w is not None:
        if want is None:
            raise SettingsError("size", f"is needed: the input {name!r} {shape_text(dims)} fixes "
                                "one side only; give the size the network runs at, HxW")
        return want, True
    return want or (contract.DEFAULT_SIZE, contract.DEFAULT_SIZE), False


def _free_reserved_names(proto: onnx.ModelProto, inp: str, logit_tensor: str | None,
                         builder: GraphBuilder) -> tuple[str, str | None]:
    """Rename the network's tensors called ``image`` or ``logits`` (unless ``logits`` already
    is its logits output); returns the input's and the logits' names after that."""
    tensors = {o for n in proto.graph.node for o in n.output} | {i.name for i in proto.graph.input}
    outputs = {o.name for o in proto.graph.output}
    for reserved in (contract.IMAGE, contract.LOGITS):
        if reserved not in tensors or (reserved == contract.LOGITS == logit_tensor
                                       and reserved in outputs):
            continue
        new = builder.fresh(f"{reserved}_original")
        _rename(proto.graph, reserved, new)
        inp = new if inp == reserved else inp
        logit_tensor = new if logit_tensor == reserved else logit_tensor
    return inp, logit_tensor


def _wrap_input(proto: onnx.ModelProto, inp: str, batch_dim, prep: Preprocess, lay: str,
                channels: int, fixed: tuple[int, int] | None, builder: GraphBuilder
                ) -> tuple[set[str], bool]:
    """Put ``image`` → preprocessing → (transpose) → ``inp`` in front of the network.

    Returns the wrapper's tensors and whether a batch axis fixed at 1 was made symbolic (to be
    checked by running)."""
    batch_symbolic = batch_dim == 1
    image_dims = [batch_dim if isinstance(batch_dim, int) and batch_dim > 1 else "batch", 3,
                  *(fixed or ("height", "width"))]
    x = prep.emit(builder, contract.IMAGE, channels)
    if lay == "nhwc":
        x = builder.op("Transpose", [x], hint="to_nhwc", perm=[0, 2, 3, 1])
    nodes = list(builder.nodes)
    if not _cancel_transpose(proto, inp, nodes, x):
        nodes.append(helper.make_node("Identity", [x], [inp], name=builder.fresh("input")))
    graph = proto.graph
    network = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + network)
    graph.initializer.extend(builder.initializers)
    others = [i for i in graph.input if i.name != inp]
    del graph.input[:]
    graph.input.extend([helper.make_tensor_value_info(contract.IMAGE, onnx.TensorProto.FLOAT,
                                                      image_dims)] + others)
    del graph.value_info[:]  # stale once the input changes; shape inference redoes it
    if batch_symbolic:
        for o in graph.output:
            d = o.type.tensor_type.shape.dim
            if d and d[0].HasField("dim_value") and d[0].dim_value == 1:
                d[0].Clear()
                d[0].dim_param = "batch"
    return {o for n in nodes for o in n.output}, batch_symbolic


def _expose_logits(proto: onnx.ModelProto, logit_tensor: str | None,
                   builder: GraphBuilder) -> None:
    """Make ``logit_tensor`` the first output, ``logits``; the other outputs stay."""
    if logit_tensor is None:
        return
    graph = proto.graph
    if logit_tensor != contract.LOGITS:
        graph.node.append(helper.make_node("Identity", [logit_tensor], [contract.LOGITS],
                                           name=builder.fresh("logits")))
    batch = graph.input[0].type.tensor_type.shape.dim[0]
    logits_vi = helper.make_tensor_value_info(
        contract.LOGITS, onnx.TensorProto.FLOAT,
        [batch.dim_value if batch.HasField("dim_value") else batch.dim_param, "classes"])
    outputs = [logits_vi] + [o for o in graph.output if o.name != contract.LOGITS]
    del graph.output[:]
    graph.output.extend(outputs)


def _check_labels(labels: list[str] | None, logit_tensor: str | None,
                  classes: int | None) -> None:
    if labels is None:
        return
    if logit_tensor is None:
        raise SettingsError("labels", "are for logits, and the model has none (name them with "
                            "--logits)")
    if classes is not None and len(labels) != classes:
        raise SettingsError("labels", f"gives {len(labels)} labels for {classes} classes (one "
                            "label per line)")


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    return m


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
