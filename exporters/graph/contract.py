"""The dreamable-model contract: what a model must be for onnxdream to dream with it.

Everything that reads or writes a model's ``onnxdream.*`` metadata, and everything that feeds a
compiled gradient graph, goes through this module. It is the project's most important interface:
the exporters (torch, Keras), the zoo builder, the gradient compiler, the engine (CLI, server,
visualisation, the CUDA step loop) and the browser all meet here.

**A dreamable model** is an ONNX file with

- opset >= 18 (:data:`.onnxfile.MIN_OPSET`; older models are converted on load, see
  :func:`load_model`, which :mod:`.onnxfile` owns with the atomic :func:`~.onnxfile.save_model`);
- exactly one graph input that is not an initializer: :data:`IMAGE` (``image``), float32
  ``[N, 3, H, W]``, RGB in [0, 1]. The model's preprocessing (mean/std, BGR, ...) is *inside*
  the graph. ``H``/``W`` are symbolic when the model serves any size (``dynamic_hw``), else fixed;
- optionally an output :data:`LOGITS` (``logits``, ``[N, classes]``, before softmax): the class
  objectives and classification need it (:attr:`ModelInfo.has_logits`); a headless network names
  its last feature map otherwise (e.g. ``features``);
- every dreamable layer a named tensor inside the graph, listed in the metadata below. A model
  without that metadata still works: every float node output is then a layer, under its tensor
  name (:func:`layer_table`).

An ONNX model from elsewhere (tf2onnx, paddle2onnx, …) becomes one with ``onnxdream import
onnx`` (:mod:`.importer`), which wraps it without touching its weights. The engine checks the
input before dreaming (:func:`require_dreamable`): a file that does not take ``image`` gets one
line naming the import command that would wrap it.

**Metadata** (``metadata_props``; strings, JSON where noted), written by :func:`write_metadata`
(or :func:`model_metadata` for the exporters that finish the model themselves):

=================================  ================================================================
key                                value
=================================  ================================================================
``onnxdream.format``               contract version, ``"1"`` (:data:`FORMAT_VERSION`)
``onnxdream.name``                 the model's name (``googlenet``, ``efficientnet-lite0``)
``onnxdream.source``               where the weights came from (shown to users, kept in provenance)
``onnxdream.license``              the weights' licence
``onnxdream.input_size``           native side in pixels, an int (the larger side if not square)
``onnxdream.input_hw``             ``"HxW"`` when the native size is not square
``onnxdream.dynamic_hw``           ``"1"`` if any H/W runs, ``"0"`` if only the native size
``onnxdream.layers``               JSON ``{layer name: tensor name}``, in network order
``onnxdream.default_layers``       JSON list of the layers a dream uses when none is named
``onnxdream.recommended_layers``   JSON list of the layers worth dreaming, shallow to deep (the
                                   atlas's cells, the page's thumbnails); includes the default
``onnxdream.step_size``            the step size a dream uses when none is given (a float; else
                                   the engine's default, 0.006)
``onnxdream.labels``               JSON list of class names, one per logit (optional)
``onnxdream.layer_layouts``        JSON ``{layer: "NHWC"}`` for channels-last layers (default NCHW)
``onnxdream.preprocess``           what the in-graph preprocessing does (informative)
``onnxdream.framework``            the framework and version that exported it (informative)
``onnxdream.builder_version``      the zoo builder's version (zoo models)
``onnxdream.compiled``             on *compiled* graphs only: JSON of the objective, its terms, the
                                   layer tensors, ``pre_relu``, ``border`` and the op profile
                                   ``target`` (``default``/``portable``, see the compiler)
=================================  ================================================================

:class:`ModelInfo` reads all of it back (``ModelInfo.load(path_or_proto)``): the layer table,
default and recommended layers, the recommended step size, labels, native size ``(h, w)``,
fixed or dynamic H/W, layouts, whether there are logits. A model written before the recommended
layers existed reads back its default layers as its recommended ones.

**A compiled gradient graph** (:func:`onnxdream.exporters.graph.compile_gradient`) keeps the
model's metadata, adds ``onnxdream.compiled``, and has

- inputs: ``image`` as above, plus named *objective parameters* (below);
- outputs: :data:`OBJECTIVE` (``objective``, ``[N]``) and :data:`GRAD` (``grad``, shaped like
  ``image``): the objective of each image and its gradient with respect to the pixels.

**Objective parameters** are graph inputs that change what is maximised without recompiling.
Each has a *default*: an initializer of the same name, which the input overrides, so a caller
that passes only ``image`` keeps working. Every runner (the tiler, the CPU loop, the CUDA step
graph, the browser) passes ``{"image": x, **params}`` as one dict. :data:`PARAMS` declares them
(name, dtype, shape, whether *spatial*, default); :func:`graph_params` lists those a graph has.
A *spatial* parameter is aligned with the image (its last two axes are the image's rows and
columns): the tiler cuts it per tile like the image and the jitter rolls it with the image.

- ``weights`` float32 ``[T]``: one weight per objective term; term ``t``'s value is multiplied
  by ``weights[t]``. Default: the weights the objective was compiled with. So a compiled graph
  depends on the model, the layers, the objective kinds, ``pre_relu`` and ``border``, never on
  the weights: one graph serves every weighting.
- ``channel_weights`` float32 ``[N, C]`` (``[N, C, 1, 1]`` for NCHW feature maps, ``[N, 1, 1,
  C]`` for NHWC ones): per-image channel weights of a ``weighted_channels`` term, whose value is
  ``sum_c channel_weights[n, c] * mean(layer[n, c])`` (feature visualisation: a one-hot row is
  a channel or a class, ``1/C`` everywhere the whole layer). Default ``1/C`` (the layer mean).
- ``guide.<t>`` float32 ``[M, C]``: the guide features of guide term ``t`` (M feature vectors
  of the guide image at the term's layer, C its channels), not spatial, and **no default**: a
  graph with a guide term needs them (``onnxdream.guide`` computes them with
  :func:`~onnxdream.exporters.graph.compiler.compile_features`'s graph).
- ``mask`` float32 ``[1 or N, 1 or T, H, W]`` at image resolution, spatial, default ones
  ``[1, 1, 1, 1]``: region masks. Term ``t`` reads channel ``t mod T`` (one mask for all terms,
  or one per term), resized in the graph to its layer (antialiased linear), and weights the
  layer's positions by it before averaging them (terms that average positions of a 4-D layer:
  mean, l2, channel, guide, weighted_channels; a graph has ``mask`` when one of its terms does).
- on the step graph, ``step_mask`` (``[1 or N, 1, H, W]``, spatial, default ones): the per-pixel
  scale of the step, in the image's frame (0 keeps a pixel as it is).

**The step graph** (:mod:`onnxdream.exporters.graph.step`) wraps a compiled graph into one ascent
step: inputs ``x``, ``shift``, ``step_size``, ``grad_floor`` (default 0: the normaliser divides
by ``mean|g| + 1e-8``; F > 0: by ``max(mean|g|, F)``) and the gradient graph's parameters (passed
through); outputs ``image_out`` and ``objective``.
"""

from __future__ import annotations

import json
import os
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxdream.core.errors import LayerError, ModelError, UnwrappedModelError
from onnxdream.exporters.graph.foreign import guess_flags
from onnxdream.exporters.graph.onnxfile import load_model
from onnxdream.exporters.graph.ops import NON_DIFFERENTIABLE

FORMAT_VERSION = "1"
DEFAULT_SIZE = 224  # the native side when a model says nothing

# -- tensor names ------------------------------------------------------------------------------
IMAGE = "image"
LOGITS = "logits"
OBJECTIVE = "objective"
GRAD = "grad"

# -- metadata keys -----------------------------------------------------------------------------
FORMAT_KEY = "onnxdream.format"
NAME_KEY = "onnxdream.name"
SOURCE_KEY = "onnxdream.source"
LICENSE_KEY = "onnxdream.license"
INPUT_SIZE_KEY = "onnxdream.input_size"
INPUT_HW_KEY = "onnxdream.input_hw"
DYNAMIC_HW_KEY = "onnxdream.dynamic_hw"
LAYERS_KEY = "onnxdream.layers"
DEFAULT_LAYERS_KEY = "onnxdream.default_layers"
RECOMMENDED_LAYERS_KEY = "onnxdream.recommended_layers"
STEP_SIZE_KEY = "onnxdream.step_size"
LABELS_KEY = "onnxdream.labels"
LAYOUTS_KEY = "onnxdream.layer_layouts"
PREPROCESS_KEY = "onnxdream.preprocess"
FRAMEWORK_KEY = "onnxdream.framework"
BUILDER_VERSION_KEY = "onnxdream.builder_version"
COMPILED_KEY = "onnxdream.compiled"

# -- objective parameter names -----------------------------------------------------------------
WEIGHTS = "weights"
CHANNEL_WEIGHTS = "channel_weights"
MASK = "mask"
STEP_MASK = "step_mask"
GUIDE_PREFIX = "guide."


# ---------------------------------------------------------------------------------------------
# reading


def metadata(model: onnx.ModelProto) -> dict[str, str]:
    """The model's ``metadata_props`` as a dict."""
    return {p.key: p.value for p in model.metadata_props}


def _json(meta: Mapping[str, str], key: str, default: Any) -> Any:
    text = meta.get(key)
    if not text:
        return default
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise ModelError(f"the model's {key} metadata is not valid JSON") from None


def image_input(model: onnx.ModelProto) -> onnx.ValueInfoProto:
    """The model's one input that is not an initializer (nor an objective parameter)."""
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits and not is_param(i.name)]
    if len(inputs) != 1:
        raise ModelError(f"a dreamable model has exactly one input, this one has {len(inputs)}: "
                         + ", ".join(i.name for i in inputs))
    return inputs[0]


def is_dreamable_input(vi: onnx.ValueInfoProto) -> bool:
    """Whether a model's input is the contract's: ``image``, float32, ``[N, 3, H, W]``."""
    tt = vi.type.tensor_type
    dims = tt.shape.dim if tt.HasField("shape") else []
    return (vi.name == IMAGE and tt.elem_type == onnx.TensorProto.FLOAT and len(dims) == 4
            and (not dims[1].HasField("dim_value") or dims[1].dim_value == 3))


def require_dreamable(model: onnx.ModelProto, name: str = "the model") -> None:
    """Raise :class:`~onnxdream.core.errors.UnwrappedModelError` (a ModelError) for an ONNX file
    that onnxdream did not make dreamable: its message is the ``onnxdream import onnx``
    command, with the flags guessed from the file, that wraps it."""
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits and not is_param(i.name)]
    if len(inputs) == 1 and is_dreamable_input(inputs[0]):
        return
    flags, what = guess_flags(model, DEFAULT_SIZE)
    file = Path(name).name if name != "the model" else "MODEL.onnx"  # no directories: the
    stem = Path(file).stem  # server shows this too
    command = " ".join(["onnxdream import onnx", shlex.quote(file), "-o",
                        shlex.quote(f"{stem}-dreamable.onnx"), *map(shlex.quote, flags)])
    raise UnwrappedModelError(
        f"{Path(name).name} is not a dreamable model ({what}, not image [N,3,H,W] RGB in "
        f"[0,1]): wrap it once with `{command}` (flags guessed: check --preprocess, how the "
        "network expects its pixels)", command)


def layer_table(model: onnx.ModelProto) -> dict[str, str]:
    """Layer name → tensor name. From the model's metadata, else every float node output."""
    meta = metadata(model)
    if LAYERS_KEY in meta:
        table = _json(meta, LAYERS_KEY, {})
        if LOGITS not in table and any(o.name == LOGITS for o in model.graph.output):
            table[LOGITS] = LOGITS
        return table
    table = {}
    for node in model.graph.node:
        if node.op_type in NON_DIFFERENTIABLE:
            continue
        for out in node.output:
            if out:
                table[out] = out
    for o in model.graph.output:
        table.setdefault(o.name, o.name)
    return table


def native_size(model: onnx.ModelProto) -> tuple[int, int]:
    """(h, w) the model was made for: its fixed input size, else the metadata, else 224."""
    dims = image_input(model).type.tensor_type.shape.dim
    if len(dims) == 4 and dims[2].HasField("dim_value") and dims[3].HasField("dim_value"):
        return dims[2].dim_value, dims[3].dim_value
    meta = metadata(model)
    hw = meta.get(INPUT_HW_KEY, "")
    if hw:
        try:
            h, w = (int(v) for v in hw.lower().split("x"))
            return h, w
        except ValueError:
            raise ModelError(f"the model's {INPUT_HW_KEY} metadata {hw!r} is not HxW") from None
    try:
        size = int(meta.get(INPUT_SIZE_KEY, "") or DEFAULT_SIZE)
    except ValueError:
        raise ModelError(f"the model's {INPUT_SIZE_KEY} metadata is not an integer") from None
    return size, size


def _dynamic_hw(model: onnx.ModelProto, meta: Mapping[str, str]) -> bool:
    if meta.get(DYNAMIC_HW_KEY) in ("0", "1"):
        return meta[DYNAMIC_HW_KEY] == "1"
    dims = image_input(model).type.tensor_type.shape.dim
    return not (len(dims) == 4 and dims[2].HasField("dim_value") and dims[3].HasField("dim_value"))


def _step_size(meta: Mapping[str, str]) -> float | None:
    text = meta.get(STEP_SIZE_KEY, "").strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 < value <= 10.0:  # nan fails too
        raise ModelError(f"the model's {STEP_SIZE_KEY} metadata {text[:20]!r} is not a step size "
                         "(a number > 0 and <= 10)")
    return value


@dataclass(frozen=True)
class ModelInfo:
    """What the contract says about one model (see the module docstring)."""

    name: str
    layers: dict[str, str]  # layer name -> tensor name
    default_layers: list[str]
    labels: list[str] | None
    native_size: tuple[int, int]  # (h, w)
    dynamic_hw: bool
    layouts: dict[str, str]  # layer -> "NHWC" for channels-last layers
    outputs: list[str]
    source: str | None = None
    license: str | None = None
    preprocess: str | None = None
    compiled: dict | None = None  # on compiled gradient graphs
    metadata: dict[str, str] = field(default_factory=dict)
    #: the layers worth dreaming, shallow to deep (the default layers if the model names none)
    recommended_layers: list[str] = field(default_factory=list)
    #: the step size a dream uses when none is given (None: the engine's default)
    step_size: float | None = None

    @classmethod
    def load(cls, model: str | os.PathLike | onnx.ModelProto) -> ModelInfo:
        """Read a model (a path, or a loaded ModelProto)."""
        proto = load_model(model)
        meta = metadata(proto)
        name = meta.get(NAME_KEY) or (Path(model).stem if not isinstance(model, onnx.ModelProto)
                                      else proto.graph.name or "the model")
        labels = _json(meta, LABELS_KEY, None)
        return cls(
            name=name,
            layers=layer_table(proto),
            default_layers=list(_json(meta, DEFAULT_LAYERS_KEY, [])),
            labels=list(labels) if labels is not None else None,
            native_size=native_size(proto),
            dynamic_hw=_dynamic_hw(proto, meta),
            layouts=dict(_json(meta, LAYOUTS_KEY, {})),
            outputs=[o.name for o in proto.graph.output],
            source=meta.get(SOURCE_KEY),
            license=meta.get(LICENSE_KEY),
            preprocess=meta.get(PREPROCESS_KEY),
            compiled=_json(meta, COMPILED_KEY, None),
            metadata=meta,
            recommended_layers=list(_json(meta, RECOMMENDED_LAYERS_KEY, None)
                                    or _json(meta, DEFAULT_LAYERS_KEY, [])),
            step_size=_step_size(meta),
        )

    @property
    def has_logits(self) -> bool:
        """Whether the model has a ``logits`` output (class objectives, classification)."""
        return LOGITS in self.outputs

    def layout(self, layer: str) -> str:
        """``"NHWC"`` for a channels-last layer, else ``"NCHW"``."""
        return self.layouts.get(layer, "NCHW")

    def require_logits(self, purpose: str) -> None:
        """Raise a ModelError unless the model has logits; ``purpose`` ends the sentence."""
        if not self.has_logits:
            raise ModelError(f"{self.name} has no '{LOGITS}' output, so {purpose} (outputs: "
                             f"{', '.join(self.outputs)})")

    def require_default_layers(self) -> list[str]:
        """The default layers, or a LayerError if the model names none."""
        if not self.default_layers:
            raise LayerError("this model names no default layer: choose one with --layer "
                             "(`onnxdream layers MODEL` lists them)")
        return list(self.default_layers)


# ---------------------------------------------------------------------------------------------
# writing


def model_metadata(
    *,
    name: str,
    layers: Mapping[str, str],
    default_layers: Sequence[str],
    input_size: int | tuple[int, int],
    dynamic_hw: bool,
    source: str = "",
    license: str = "",
    labels: Sequence[str] | None = None,
    layouts: Mapping[str, str] | None = None,
    preprocess: str | None = None,
    framework: str | None = None,
    builder_version: str | None = None,
    recommended_layers: Sequence[str] | None = None,
    step_size: float | None = None,
) -> dict[str, str]:
    """The metadata of a dreamable model, keys in a fixed order (see the module docstring).

    ``recommended_layers`` default to ``default_layers``; ``step_size`` is written only when
    given (a reader then uses the engine's default)."""
    h, w = (input_size, input_size) if isinstance(input_size, int) else input_size
    meta = {
        FORMAT_KEY: FORMAT_VERSION,
        NAME_KEY: name,
        SOURCE_KEY: source or name,
        LICENSE_KEY: license,
        INPUT_SIZE_KEY: str(int(max(h, w))),  # an int: readers parse it so
        DYNAMIC_HW_KEY: "1" if dynamic_hw else "0",
        LAYERS_KEY: json.dumps(dict(layers)),
        DEFAULT_LAYERS_KEY: json.dumps(list(default_layers)),
        RECOMMENDED_LAYERS_KEY: json.dumps(list(recommended_layers or default_layers)),
    }
    if step_size is not None:
        meta[STEP_SIZE_KEY] = f"{float(step_size):g}"
    if h != w:
        meta[INPUT_HW_KEY] = f"{int(h)}x{int(w)}"
    if labels is not None:
        meta[LABELS_KEY] = json.dumps(list(labels))
    if layouts:
        meta[LAYOUTS_KEY] = json.dumps(dict(layouts))
    if preprocess is not None:
        meta[PREPROCESS_KEY] = preprocess
    if framework is not None:
        meta[FRAMEWORK_KEY] = framework
    if builder_version is not None:
        meta[BUILDER_VERSION_KEY] = builder_version
    return meta


def write_metadata(model: onnx.ModelProto, meta: Mapping[str, str] | None = None,
                   **fields: Any) -> onnx.ModelProto:
    """Replace ``model``'s metadata: ``meta`` as given, or :func:`model_metadata` of ``fields``."""
    if meta is None:
        meta = model_metadata(**fields)
    elif fields:
        raise TypeError("write_metadata takes a metadata dict or fields, not both")
    del model.metadata_props[:]
    for key, value in meta.items():
        model.metadata_props.add(key=key, value=value)
    return model


def write_compiled(model: onnx.ModelProto, source: onnx.ModelProto, compiled: Mapping) -> None:
    """A compiled graph's metadata: the source model's, plus ``onnxdream.compiled``."""
    for p in source.metadata_props:
        model.metadata_props.add(key=p.key, value=p.value)
    model.metadata_props.add(key=COMPILED_KEY, value=json.dumps(dict(compiled)))


# ---------------------------------------------------------------------------------------------
# objective parameters of compiled graphs


@dataclass(frozen=True)
class ParamSpec:
    """The declaration of an objective parameter (see the module docstring)."""

    name: str
    shape: str  # as documented, e.g. "[T]"
    spatial: bool  # last two axes follow the image's rows and columns
    default: str  # what the default initializer holds
    doc: str
    dtype: str = "float32"


PARAMS: dict[str, ParamSpec] = {p.name: p for p in (
    ParamSpec(WEIGHTS, "[T]", False, "the compile-time term weights",
              "term t's value is multiplied by weights[t]"),
    ParamSpec(CHANNEL_WEIGHTS, "[N,C], [N,C,1,1] (NCHW) or [N,1,1,C] (NHWC)", False, "1/C",
              "per-image channel weights of the weighted_channels term"),
    ParamSpec(MASK, "[1 or N, 1 or T, H, W]", True, "ones [1,1,1,1]",
              "region masks at image resolution: channel t mod T weights term t's positions"),
    ParamSpec(STEP_MASK, "[1 or N, 1, H, W]", True, "ones [1,1,1,1]",
              "the step graph's per-pixel step scale (0 keeps a pixel)"),
)}
GUIDE = ParamSpec(GUIDE_PREFIX + "<t>", "[M,C]", False, "none (required)",
                  "guide features of guide term t")


def param_spec(name: str) -> ParamSpec:
    """The declaration of parameter ``name`` (``guide.<t>`` included); ModelError if unknown."""
    if name in PARAMS:
        return PARAMS[name]
    if name.startswith(GUIDE_PREFIX) and name[len(GUIDE_PREFIX):].isdigit():
        return GUIDE
    raise ModelError(f"'{name}' is not an objective parameter (known: "
                     f"{', '.join([*PARAMS, GUIDE.name])})")


def is_param(name: str) -> bool:
    try:
        param_spec(name)
    except ModelError:
        return False
    return True


def is_spatial(name: str) -> bool:
    """Whether parameter ``name`` is image-aligned (cut per tile, rolled by the jitter)."""
    return param_spec(name).spatial


@dataclass(frozen=True)
class GraphParam:
    """An objective parameter as one graph has it."""

    name: str
    dtype: np.dtype
    shape: tuple  # dims: ints, or names for symbolic ones
    spatial: bool
    default: np.ndarray | None


def graph_params(model: onnx.ModelProto) -> dict[str, GraphParam]:
    """The objective parameters of a compiled graph (or step graph), in input order."""
    inits = {i.name: i for i in model.graph.initializer}
    out: dict[str, GraphParam] = {}
    for vi in model.graph.input:
        if not is_param(vi.name):
            continue
        tt = vi.type.tensor_type
        shape = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                      for d in tt.shape.dim)
        default = numpy_helper.to_array(inits[vi.name]) if vi.name in inits else None
        out[vi.name] = GraphParam(vi.name, np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type)),
                                  shape, param_spec(vi.name).spatial, default)
    return out


def param_defaults(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """``{name: default}`` of a graph's parameters: the feeds of a caller with no opinion."""
    return {p.name: p.default for p in graph_params(model).values() if p.default is not None}


def param_input(name: str, default: np.ndarray, shape: Sequence[int | str]
                ) -> tuple[onnx.ValueInfoProto, onnx.TensorProto]:
    """The graph input and its same-named default initializer for parameter ``name``."""
    spec = param_spec(name)
    arr = np.asarray(default, dtype=spec.dtype)
    vi = helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(arr.dtype),
                                       list(shape))
    return vi, numpy_helper.from_array(arr, name)


def cut_spatial(value: np.ndarray, rows: np.ndarray | slice, cols: np.ndarray | slice
                ) -> np.ndarray:
    """A spatial parameter cut like the image: ``value[..., rows, cols]`` (broadcast axes of
    size 1 stay as they are)."""
    r = rows if value.shape[-2] != 1 else slice(None)
    c = cols if value.shape[-1] != 1 else slice(None)
    if isinstance(r, np.ndarray) and isinstance(c, np.ndarray):
        return value[..., r[:, None], c]
    return value[..., r, :][..., c]
