"""Graph passes that make a compiled gradient graph fast on onnxruntime (same values, fewer passes).

:func:`optimize` rewrites the graph that :func:`~onnxdream.exporters.graph.compile_gradient`
produced. Every pass keeps the contract (default-domain ops, any H/W, same ``objective`` and
``grad`` up to float rounding) and leaves anything it does not recognise alone:

- ``identity``: forward ``Identity`` nodes (exporters alias shared weights through them).
- ``constants``: evaluate nodes whose inputs are all small constants (BatchNorm factors ...).
- ``batchnorm``: fold inference BatchNormalization into the Conv before it.
- ``activation_masks``: the backward masks of Relu/Clip read the activation's *output*
  (``relu(x) > 0`` iff ``x > 0``), so the forward Conv is followed by its activation alone and
  onnxruntime fuses Conv+Relu/Clip (3-8 % per step; peak memory of 4 batched 700-px
  EfficientNet-Lite0 tiles 1368 -> 1284 MB).
- ``where_to_mul``: ``Where(mask, g, 0)`` becomes ``g * Cast(mask)`` (onnxruntime's broadcasting
  Where is ~20x slower than Mul on a CPU: 11.7 ms vs 0.5 ms on 786k floats).
- ``channel_scale``: a per-channel ``Mul`` by a constant in front of a Conv/ConvTranspose (the
  BatchNorm backward) goes into that convolution's weights.
- ``maxpool``: the backward of stride-1 MaxPools without the ``Indices`` output and without
  ScatterElements: two 1-D compare-and-take cascades (:mod:`.passes.fast_adjoints`; GoogLeNet ->
  inception4c at 512 px: 221 -> 195 ms per step). Strided pools keep Indices
  (:data:`MAXPOOL_MAX_STRIDE`): their views and interleaving cost what they save; the
  ``portable`` target (``optimize(..., portable=True)``) rewrites them too, for providers
  without MaxPool's ``Indices`` output (onnxruntime-web's WebGPU) or fast ScatterElements(add)
  (OpenVINO).
- ``pool_masks``: for MaxPool(Relu(x)) the Relu backward mask moves to the pool's output (the
  argmax of each window is where relu(x) equals the pooled value), s^2 times fewer elements.
- ``strided_conv``: the adjoint of a strided Conv (a ConvTranspose with output_padding) becomes
  stride-1 Convs producing every output phase, interleaved back (:mod:`.passes.fast_adjoints`:
  GoogLeNet's 7x7/2 stem: 40 ms -> ~5 ms at 512 px; EfficientNet-Lite0 -> blocks.5 at 512 px:
  73 -> 64 ms per step).
- ``slice_chain``: two unit-step Slices in a row (a strided adjoint's crop, then the exporter's
  explicit Pad's backward) become one, when their starts and ends are provably non-negative.
- ``sum_to_add``: variadic Sums (where gradients meet) become chains of Adds, which onnxruntime
  runs faster.
- ``dead_code``: nodes and initializers nothing uses.

The passes live in :mod:`.passes`, one module per kind of rewrite; this module lists them
(:data:`PASSES`, in the order they run) and runs them over one
:class:`~.passes.view.GraphView`. Graph inputs are never constants, even with a same-named
initializer (the objective parameters'
defaults, see :mod:`.contract`). New nodes go through the one emitter,
:class:`~onnxdream.exporters.graph.builder.GraphBuilder`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import onnx

from onnxdream.exporters.graph.passes.adjoints import maxpool_backward, pool_masks, strided_conv
from onnxdream.exporters.graph.passes.fold import fold_batchnorm, fold_channel_scale, fold_constants
from onnxdream.exporters.graph.passes.masks import activation_masks, where_to_mul
from onnxdream.exporters.graph.passes.simplify import (
    dead_code,
    forward_identities,
    slice_chain,
    sum_to_add,
)
from onnxdream.exporters.graph.passes.view import GraphView
from onnxdream.exporters.graph.shapes import infer_shapes

#: The largest MaxPool stride the ``maxpool`` pass rewrites: strided pools keep Indices (their
#: views and interleaving cost what they save); the tests raise it to check the phase emitter.
MAXPOOL_MAX_STRIDE = 1
#: ... and for the portable target: every stride (no MaxPool keeps ``Indices``).
PORTABLE_MAXPOOL_MAX_STRIDE = 1 << 30


@dataclass
class OptimizeReport:
    """How many rewrites each pass made, and the node counts before and after."""

    rewrites: dict[str, int] = field(default_factory=dict)
    nodes_before: int = 0
    nodes_after: int = 0
    ops_before: dict[str, int] = field(default_factory=dict)
    ops_after: dict[str, int] = field(default_factory=dict)


PASSES: dict[str, Callable[[GraphView], int]] = {
    "identity": forward_identities,
    "constants": fold_constants,
    "batchnorm": fold_batchnorm,
    "activation_masks": activation_masks,
    "where_to_mul": where_to_mul,
    "channel_scale": fold_channel_scale,
    "maxpool": maxpool_backward,
    "pool_masks": pool_masks,
    "strided_conv": strided_conv,
    "slice_chain": slice_chain,
    "sum_to_add": sum_to_add,
    "dead_code": dead_code,
}


#: The passes :func:`optimize` runs by default: all of them.
DEFAULT_PASSES = tuple(PASSES)


def optimize(model: onnx.ModelProto, passes: Sequence[str] | None = None,
             report: OptimizeReport | None = None, *, portable: bool = False
             ) -> onnx.ModelProto:
    """A faster equivalent of the compiled gradient graph ``model`` (a new ModelProto).

    ``passes`` picks a subset of :data:`PASSES` (default: :data:`DEFAULT_PASSES`); ``report``, if
    given, is filled with what each pass did. ``portable``: the ``maxpool`` pass rewrites strided
    pools too (no MaxPool ``Indices``, no ScatterElements(add); see the compiler's targets).
    """
    names = list(DEFAULT_PASSES) if passes is None else [p for p in PASSES if p in passes] + [
        p for p in passes if p not in PASSES]
    unknown = [p for p in names if p not in PASSES]
    if unknown:
        raise ValueError(f"unknown optimisation pass(es) {unknown}; known: {', '.join(PASSES)}")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    opset = max((o.version for o in out.opset_import if o.domain in ("", "ai.onnx")), default=18)
    g = GraphView(out.graph, opset,
                  PORTABLE_MAXPOOL_MAX_STRIDE if portable else MAXPOOL_MAX_STRIDE)
    rep = report if report is not None else OptimizeReport()
    rep.nodes_before = len(g.nodes)
    rep.ops_before = dict(Counter(n.op_type for n in g.nodes))
    if "where_to_mul" in names:
        g.dtypes = _dtypes(out)
    for name in names:
        rep.rewrites[name] = rep.rewrites.get(name, 0) + PASSES[name](g)
    if "dead_code" not in names:
        dead_code(g)
    g.finish()
    rep.nodes_after = len(g.nodes)
    rep.ops_after = dict(Counter(n.op_type for n in g.nodes))
    return out


def _dtypes(model: onnx.ModelProto) -> dict[str, int]:
    inferred = infer_shapes(model, data_prop=False)  # best effort, and safe past 2 GB
    g = inferred.graph
    out = {vi.name: vi.type.tensor_type.elem_type for vi in
           list(g.input) + list(g.value_info) + list(g.output)}
    out.update({i.name: i.data_type for i in model.graph.initializer})
    return out
