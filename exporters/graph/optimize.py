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
  ScatterElements: two 1-D compare-and-take cascades (:mod:`.fast_adjoints`; GoogLeNet ->
  inception4c at 512 px: 221 -> 195 ms per step). Strided pools keep Indices
  (:data:`MAXPOOL_MAX_STRIDE`): their views and interleaving cost what they save.
- ``pool_masks``: for MaxPool(Relu(x)) the Relu backward mask moves to the pool's output (the
  argmax of each window is where relu(x) equals the pooled value), s^2 times fewer elements.
- ``strided_conv``: the adjoint of a strided Conv (a ConvTranspose with output_padding) becomes
  stride-1 Convs producing every output phase, interleaved back (:mod:`.fast_adjoints`:
  GoogLeNet's 7x7/2 stem: 40 ms -> ~5 ms at 512 px; EfficientNet-Lite0 -> blocks.5 at 512 px:
  73 -> 64 ms per step).
- ``slice_chain``: two unit-step Slices in a row (a strided adjoint's crop, then the exporter's
  explicit Pad's backward) become one, when their starts and ends are provably non-negative.
- ``sum_to_add``: variadic Sums (where gradients meet) become chains of Adds, which onnxruntime
  runs faster.
- ``dead_code``: nodes and initializers nothing uses.

Graph inputs are never constants, even with a same-named initializer (the objective parameters'
defaults, see :mod:`.contract`). New nodes go through the one emitter,
:class:`~onnxdream.exporters.graph.builder.GraphBuilder`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxdream.exporters.graph import fast_adjoints
from onnxdream.exporters.graph.builder import FLOAT, GraphBuilder
from onnxdream.exporters.graph.builder import node_attr as _attr

_FOLDABLE = {"Add", "Sub", "Mul", "Div", "Sqrt", "Reciprocal", "Neg", "Reshape", "Unsqueeze",
             "Squeeze", "Cast", "Concat", "Transpose", "Flatten", "Identity", "Abs", "Pow"}
_FOLD_LIMIT = 1 << 22  # elements: fold constants up to 16 MB
#: The largest MaxPool stride the ``maxpool`` pass rewrites: strided pools keep Indices (their
#: views and interleaving cost what they save); the tests raise it to check the phase emitter.
MAXPOOL_MAX_STRIDE = 1


@dataclass
class OptimizeReport:
    """How many rewrites each pass made, and the node counts before and after."""

    rewrites: dict[str, int] = field(default_factory=dict)
    nodes_before: int = 0
    nodes_after: int = 0
    ops_before: dict[str, int] = field(default_factory=dict)
    ops_after: dict[str, int] = field(default_factory=dict)


class _Graph:
    """A mutable view of a GraphProto: node list, constant table, producers and consumers.

    New nodes and constants are emitted through :attr:`b` (a GraphBuilder, names ``opt/...``):
    ``begin()``, emit, ``take()`` the new nodes.
    """

    def __init__(self, graph: onnx.GraphProto, opset: int):
        self.graph = graph
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = list(graph.node)
        self.inits: dict[str, onnx.TensorProto] = {i.name: i for i in graph.initializer}
        self._arrays: dict[str, np.ndarray] = {}
        self.outputs = {o.name for o in graph.output}
        self.inputs = {i.name for i in graph.input}
        self.dtypes: dict[str, int] = {}
        self.pool_grads: dict[str, tuple[str, str]] = {}  # pool output -> (dY, dX), see _maxpool
        self._names = {o for n in self.nodes for o in n.output} | set(self.inits) | self.inputs
        self.b = GraphBuilder(opset, "opt", self._names)
        self.index()

    def index(self) -> None:
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in self.nodes:
            for o in n.output:
                if o:
                    self.producer[o] = n
            for i in n.input:
                if i:
                    self.consumers.setdefault(i, []).append(n)
        for n in self.nodes:  # subgraphs (If/Loop) use outer names implicitly: treat as used
            for a in n.attribute:
                if a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
                    for g in [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs):
                        for sub in g.node:
                            for i in sub.input:
                                self.consumers.setdefault(i, []).append(n)

    # -- constants ----------------------------------------------------------------------------
    def const(self, name: str) -> np.ndarray | None:
        """The value of a constant tensor, else None. A graph input is never a constant, even
        with a same-named initializer: that is its default, which a caller overrides (the
        objective parameters, see the contract)."""
        if name in self.inputs:
            return None
        self._adopt()
        if name in self._arrays:
            return self._arrays[name]
        if name in self.inits:
            arr = numpy_helper.to_array(self.inits[name])
            self._arrays[name] = arr
            return arr
        n = self.producer.get(name)
        if (n is not None and n.op_type == "Constant" and n.attribute
                and n.attribute[0].name == "value"):
            arr = numpy_helper.to_array(n.attribute[0].t)
            self._arrays[name] = arr
            return arr
        return None

    def _adopt(self) -> None:
        """Take the builder's new initializers into the constant table."""
        for t in self.b.initializers:
            self.inits[t.name] = t
        self.b.initializers.clear()

    def add_const(self, arr: np.ndarray, hint: str = "const") -> str:
        """A new (unshared) constant: folded weights."""
        name = self.b.initializer(np.ascontiguousarray(arr), hint=hint)
        self._adopt()
        self._arrays[name] = arr
        return name

    def begin(self) -> None:
        self.b.nodes = []

    def take(self) -> list[onnx.NodeProto]:
        """The nodes emitted since :meth:`begin`."""
        new, self.b.nodes = self.b.nodes, []
        self._adopt()
        return new

    def only_consumer(self, name: str) -> onnx.NodeProto | None:
        users = self.consumers.get(name, [])
        if len(users) != 1 or name in self.outputs:
            return None
        return users[0]

    def splice(self, replace: dict[int, list[onnx.NodeProto]] | None = None,
               drop: set[int] | frozenset[int] = frozenset(),
               after: dict[int, list[onnx.NodeProto]] | None = None) -> None:
        """Rebuild the node list, then re-index: nodes whose id is in ``drop`` go,
        ``replace[id(n)]`` stands in for n, ``after[id(n)]`` follows it."""
        replace, after = replace or {}, after or {}
        out: list[onnx.NodeProto] = []
        for n in self.nodes:
            if id(n) not in drop:
                out.extend(replace.get(id(n), [n]))
                out.extend(after.get(id(n), []))
        self.nodes = out
        self.index()

    def rename_uses(self, old: str, new: str) -> None:
        for n in self.consumers.get(old, []):
            for k, i in enumerate(n.input):
                if i == old:
                    n.input[k] = new

    def finish(self) -> onnx.GraphProto:
        g = self.graph
        del g.node[:]
        g.node.extend(self.nodes)
        used = {i for n in self.nodes for i in n.input} | self.outputs
        for n in self.nodes:
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    used |= {i for s in a.g.node for i in s.input}
        del g.initializer[:]
        g.initializer.extend(t for name, t in self.inits.items() if name in used)
        return g


def _is_scalar(arr: np.ndarray | None, value: float | None = None) -> bool:
    if arr is None or arr.size != 1:
        return False
    return value is None or float(arr.reshape(-1)[0]) == value


# ---------------------------------------------------------------------------------------------
# passes: each takes the graph and returns how many rewrites it made


def _identity(g: _Graph) -> int:
    n_done = 0
    keep = []
    for n in g.nodes:
        if n.op_type == "Identity" and n.output[0] not in g.outputs and n.input[0]:
            g.rename_uses(n.output[0], n.input[0])
            for c in g.consumers.get(n.output[0], []):
                g.consumers.setdefault(n.input[0], []).append(c)
            n_done += 1
            continue
        keep.append(n)
    g.nodes = keep
    return n_done


def _constants(g: _Graph) -> int:
    from onnx.reference import ReferenceEvaluator

    n_done = 0
    keep = []
    for n in g.nodes:
        if n.op_type in _FOLDABLE and n.input and len(n.output) == 1 and not n.domain:
            vals = [g.const(i) if i else None for i in n.input]
            if all(v is not None or not i for v, i in zip(vals, n.input)) and all(
                    v is None or v.size <= _FOLD_LIMIT for v in vals):
                feeds = {i: v for i, v in zip(n.input, vals) if i}
                tmp = helper.make_graph(
                    [n], "fold", [helper.make_tensor_value_info(i, helper.np_dtype_to_tensor_dtype(
                        v.dtype), v.shape) for i, v in feeds.items()],
                    [helper.make_tensor_value_info(n.output[0], onnx.TensorProto.UNDEFINED, None)])
                try:
                    model = helper.make_model(tmp, opset_imports=[helper.make_opsetid("", g.opset)])
                    out = ReferenceEvaluator(model).run(None, feeds)[0]
                except Exception:  # noqa: BLE001 - leave what the reference cannot evaluate
                    keep.append(n)
                    continue
                out = np.asarray(out)
                if out.size <= _FOLD_LIMIT and n.output[0] not in g.outputs:
                    name = n.output[0]
                    g.inits[name] = numpy_helper.from_array(out, name)
                    g._arrays[name] = out
                    n_done += 1
                    continue
        keep.append(n)
    g.nodes = keep
    g.index()
    return n_done


def _batchnorm(g: _Graph) -> int:
    n_done = 0
    drop = set()
    for bn in g.nodes:
        if bn.op_type != "BatchNormalization" or len([o for o in bn.output if o]) != 1:
            continue
        if _attr(bn, "training_mode", 0):
            continue
        conv = g.producer.get(bn.input[0])
        if conv is None or conv.op_type != "Conv" or g.only_consumer(conv.output[0]) is not bn:
            continue
        w = g.const(conv.input[1])
        bias = g.const(conv.input[2]) if len(conv.input) > 2 and conv.input[2] else None
        params = [g.const(i) for i in bn.input[1:5]]
        if w is None or (len(conv.input) > 2 and conv.input[2] and bias is None) or any(
                p is None for p in params):
            continue
        scale, beta, mean, var = (p.astype(np.float64) for p in params)
        k = scale / np.sqrt(var + float(_attr(bn, "epsilon", 1e-5)))
        if k.shape != (w.shape[0],):
            continue
        w2 = (w.astype(np.float64) * k.reshape([-1] + [1] * (w.ndim - 1))).astype(w.dtype)
        b0 = np.zeros(w.shape[0]) if bias is None else bias.astype(np.float64)
        b2 = ((b0 - mean) * k + beta).astype(w.dtype)
        x_in = conv.input[0]
        del conv.input[:]
        conv.input.extend([x_in, g.add_const(w2, "bn_folded_w"), g.add_const(b2, "bn_folded_b")])
        drop.add(id(bn))
        conv.output[0] = bn.output[0]
        n_done += 1
    if n_done:
        g.splice(drop=drop)
    return n_done


def _activation_masks(g: _Graph) -> int:
    n_done = 0
    for n in g.nodes:
        if n.op_type not in ("Greater", "Less"):
            continue
        x, c = n.input[0], n.input[1]
        cv = g.const(c)
        if cv is None or cv.size != 1:
            continue
        for act in g.consumers.get(x, []):
            if act is n:
                continue
            if act.op_type == "Relu" and n.op_type == "Greater" and _is_scalar(cv, 0.0):
                n.input[0] = act.output[0]
                n_done += 1
                break
            if act.op_type == "Clip" and len(act.input) >= 2:
                lo = g.const(act.input[1]) if len(act.input) > 1 and act.input[1] else None
                hi = g.const(act.input[2]) if len(act.input) > 2 and act.input[2] else None
                lo_v = float(lo.reshape(-1)[0]) if _is_scalar(lo) else -np.inf
                hi_v = float(hi.reshape(-1)[0]) if _is_scalar(hi) else np.inf
                if ((lo is not None and not _is_scalar(lo))
                        or (hi is not None and not _is_scalar(hi))):
                    continue
                if not lo_v < hi_v:
                    continue
                v = float(cv.reshape(-1)[0])
                # clip(x) > lo iff x > lo; clip(x) < hi iff x < hi (lo < hi)
                if (n.op_type == "Greater" and v == lo_v) or (n.op_type == "Less" and v == hi_v):
                    n.input[0] = act.output[0]
                    n_done += 1
                    break
    g.index()
    return n_done


def _where_to_mul(g: _Graph) -> int:
    """Where(mask, g, 0) -> g * Cast(mask): onnxruntime's broadcasting Where is slow."""
    replace: dict[int, list[onnx.NodeProto]] = {}
    for n in g.nodes:
        if n.op_type == "Where" and _is_scalar(g.const(n.input[2]), 0.0) and \
                g.dtypes.get(n.input[1]) == FLOAT and g.dtypes.get(n.output[0]) == FLOAT:
            g.begin()
            m = g.b.op("Cast", [n.input[0]], hint="mask", to=FLOAT)
            g.b.op("Mul", [n.input[1], m], out=n.output[0])
            replace[id(n)] = g.take()
    g.splice(replace)
    return len(replace)


def _channel_scale(g: _Graph) -> int:
    """Mul(g, k[C,1,1]) -> Conv/ConvTranspose(.., W): scale W along its input channels."""
    n_done = 0
    drop = set()
    for mul in g.nodes:
        if mul.op_type != "Mul":
            continue
        for data, k_name in ((mul.input[0], mul.input[1]), (mul.input[1], mul.input[0])):
            k = g.const(k_name)
            if k is not None and g.const(data) is None:
                break
        else:
            continue
        conv = g.only_consumer(mul.output[0])
        if (conv is None or conv.op_type not in ("Conv", "ConvTranspose")
                or conv.input[0] != mul.output[0]):
            continue
        w = g.const(conv.input[1])
        if w is None or k.dtype != w.dtype:
            continue
        group = int(_attr(conv, "group", 1))
        c_in = w.shape[1] * group if conv.op_type == "Conv" else w.shape[0]
        nd = w.ndim - 2
        if k.size == 1:
            kv = np.full(c_in, k.reshape(-1)[0], k.dtype)
        elif k.ndim >= nd + 1 and k.shape[-(nd + 1)] == c_in and k.size == c_in:
            kv = k.reshape(-1)
        else:
            continue
        if conv.op_type == "Conv":
            m, cg = w.shape[:2]
            wg = w.reshape(group, m // group, cg, *w.shape[2:])
            w2 = wg * kv.reshape(group, 1, cg, *([1] * nd))
            w2 = w2.reshape(w.shape)
        else:
            w2 = w * kv.reshape([-1] + [1] * (w.ndim - 1))
        conv.input[0] = data
        conv.input[1] = g.add_const(w2.astype(w.dtype), "scaled_w")
        drop.add(id(mul))
        n_done += 1
    if n_done:
        g.splice(drop=drop)
    return n_done


def _maxpool(g: _Graph) -> int:
    n_done = 0
    replace: dict[int, list[onnx.NodeProto]] = {}
    for mp in g.nodes:
        if mp.op_type != "MaxPool" or len(mp.output) < 2 or not mp.output[1]:
            continue
        m = _match_maxpool_backward(g, mp)
        if m is None:
            continue
        final, dy = m
        g.begin()
        ok = (fast_adjoints.emit_separable_maxpool_backward(g.b, mp, dy, final.output[0])
              or fast_adjoints.emit_maxpool_backward(g.b, mp, dy, final.output[0],
                                                     MAXPOOL_MAX_STRIDE))
        if not ok:
            g.take()
            continue
        replace[id(final)] = g.take()
        del mp.output[1:]
        g.pool_grads[mp.output[0]] = (dy, final.output[0])
        n_done += 1
    if n_done:
        g.splice(replace)
    return n_done


def _pool_masks(g: _Graph) -> int:
    """MaxPool(Relu(x)): the Relu mask moves to the pool's output, where it is smaller.

    The pool sends dY[w] to the argmax p of window w, where relu(x)[p] = Y[w]; so
    ``[relu(x) > 0] * unpool(dY)`` is ``unpool([Y > 0] * dY)``, exactly, a stride-s pool's
    mask s^2 times smaller. Only where the mask multiplies the pool's dX itself, so no other
    use of relu(x) adds gradient there.
    """
    n_done = 0
    insert: dict[int, list[onnx.NodeProto]] = {}
    drop: set[int] = set()
    for mp in g.nodes:
        if mp.op_type != "MaxPool":
            continue
        y, pooled = mp.input[0], mp.output[0]
        relu = g.producer.get(y)
        gts = [u for u in g.consumers.get(y, []) if u.op_type == "Greater" and u.input[0] == y]
        if relu is None or relu.op_type != "Relu" or len(gts) != 1 or \
                not _is_scalar(g.const(gts[0].input[1]), 0.0):
            continue
        cast = g.only_consumer(gts[0].output[0])
        mul = (g.only_consumer(cast.output[0])
               if cast is not None and cast.op_type == "Cast" else None)
        if mul is None or mul.op_type != "Mul":
            continue
        if len(mp.output) > 1 and mp.output[1]:
            m = _match_maxpool_backward(g, mp)
            grads = (m[1], m[0].output[0]) if m is not None else None
        else:
            grads = g.pool_grads.get(pooled)
        if grads is None:
            continue
        dy, dx = grads
        # the mask multiplies the pool's dX itself, not a sum with other uses' gradients
        other = [i for i in mul.input if i != cast.output[0]]
        if other != [dx] or g.only_consumer(dx) is not mul or dy in g.outputs:
            continue
        source = g.producer.get(dy)
        if source is None:
            continue
        g.begin()
        hit = g.b.op("Cast", [g.b.op("Greater", [pooled, gts[0].input[1]])], to=FLOAT,
                     hint="pool_relu_mask")
        masked = g.b.op("Mul", [dy, hit], hint="pool_dy_masked")
        for n in g.consumers.get(dy, []):
            for k, i in enumerate(n.input):
                if i == dy:
                    n.input[k] = masked
        g.rename_uses(mul.output[0], dx)
        insert[id(source)] = g.take()
        drop.update((id(mul), id(cast), id(gts[0])))
        n_done += 1
    if n_done:
        g.splice(drop=drop, after=insert)
    return n_done


def _match_maxpool_backward(g: _Graph, mp: onnx.NodeProto):
    """Indices -> Reshape -> ScatterElements(add) -> Reshape: (the final Reshape, dY) or None."""
    idx = mp.output[1]
    if idx in g.outputs or _attr(mp, "storage_order", 0) != 0:
        return None
    users = g.consumers.get(idx, [])
    if len(users) != 1 or users[0].op_type != "Reshape":
        return None
    flat_i = users[0].output[0]
    sc = g.only_consumer(flat_i)
    if sc is None or sc.op_type != "ScatterElements" or sc.input[1] != flat_i:
        return None
    if _attr(sc, "reduction", b"none") not in (b"add", "add") or int(_attr(sc, "axis", 0)) != 0:
        return None
    zeros = g.producer.get(sc.input[0])
    if zeros is None or zeros.op_type != "ConstantOfShape":
        return None
    zv = _attr(zeros, "value")
    if zv is None or np.any(numpy_helper.to_array(zv) != 0):
        return None
    rg = g.producer.get(sc.input[2])
    if rg is None or rg.op_type != "Reshape":
        return None
    final = g.only_consumer(sc.output[0])
    if final is None or final.op_type != "Reshape":
        return None
    return final, rg.input[0]


def _strided_conv(g: _Graph) -> int:
    n_done = 0
    replace: dict[int, list[onnx.NodeProto]] = {}
    for ct in g.nodes:
        if ct.op_type != "ConvTranspose":
            continue
        g.begin()
        w = g.const(ct.input[1]) if len(ct.input) > 1 else None
        if fast_adjoints.emit_phase_conv(g.b, ct, w):
            replace[id(ct)] = g.take()
            n_done += 1
        else:
            g.take()
    if n_done:
        g.splice(replace)
    return n_done


def _sum_to_add(g: _Graph) -> int:
    """Sum(a, b, c, ...) -> Add(Add(a, b), c) ...: onnxruntime's variadic Sum is slower than its
    Adds (3 inputs of 2M floats: 1.6 ms vs 0.9 ms on 2 cores), and an Add of a Conv's output
    can be fused into that Conv (the blocked NCHWc kernels accumulate in place)."""
    n_done = 0
    replace: dict[int, list[onnx.NodeProto]] = {}
    for n in g.nodes:
        ins = [i for i in n.input if i]
        if n.op_type != "Sum" or len(ins) < 2 or g.dtypes.get(n.output[0], FLOAT) != FLOAT:
            continue
        # Conv outputs first: onnxruntime can then add them in its blocked layout, even
        # accumulate them inside the Conv kernels, before the rest leaves that layout
        ins.sort(key=lambda i: getattr(g.producer.get(i), "op_type", "") != "Conv")
        g.begin()
        acc = ins[0]
        for k, i in enumerate(ins[1:], 2):
            acc = g.b.op("Add", [acc, i], out=n.output[0] if k == len(ins) else None,
                         hint="sum_part")
        replace[id(n)] = g.take()
        n_done += 1
    if n_done:
        g.splice(replace)
    return n_done


def _slice_chain(g: _Graph) -> int:
    """Slice(Slice(x, s1, e1), s2, e2) on the same axes -> Slice(x, s1 + s2, min(e1, s1 + e2)).

    Both unit-step with constant non-negative starts, and ends known to be non-negative (constants
    or arithmetic on Shape values), so the composition is exact; the inner result must feed only
    the outer Slice. A strided Conv's adjoint crops its phase output, then the backward of the
    exporter's explicit Pad crops again: one pass over a big tensor instead of two.
    """
    total = 0
    while True:  # a chain of n Slices takes n-1 sweeps; each sweep merges disjoint pairs
        n_done = _slice_chain_sweep(g)
        total += n_done
        if not n_done:
            return total


def _slice_chain_sweep(g: _Graph) -> int:
    n_done = 0
    drop: set[int] = set()
    touched: set[int] = set()
    new_nodes: dict[int, list[onnx.NodeProto]] = {}
    for outer in g.nodes:
        if outer.op_type != "Slice" or len(outer.input) < 4 or id(outer) in touched:
            continue
        inner = g.producer.get(outer.input[0])
        if inner is None or inner.op_type != "Slice" or len(inner.input) < 4 or \
                id(inner) in touched:
            continue
        if g.only_consumer(inner.output[0]) is not outer:
            continue
        ax_o, ax_i = g.const(outer.input[3]), g.const(inner.input[3])
        s_o, s_i = g.const(outer.input[1]), g.const(inner.input[1])
        if ax_o is None or ax_i is None or s_o is None or s_i is None:
            continue
        if list(ax_o.reshape(-1)) != list(ax_i.reshape(-1)) or (s_o < 0).any() or (s_i < 0).any():
            continue
        if any(len(n.input) > 4 and n.input[4] and not _all_ones(g.const(n.input[4]))
               for n in (outer, inner)):
            continue
        if not (_nonneg(g, outer.input[2]) and _nonneg(g, inner.input[2])):
            continue
        g.begin()
        e_o = outer.input[2] if not s_i.any() else g.b.op("Add", [g.b.ints(s_i.reshape(-1)),
                                                                    outer.input[2]])
        ends = g.b.op("Min", [inner.input[2], e_o], hint="slice_ends")
        g.b.op("Slice", [inner.input[0], g.b.ints((s_i + s_o).reshape(-1)), ends, inner.input[3]],
               out=outer.output[0])
        new_nodes[id(outer)] = g.take()
        drop.add(id(inner))
        touched.update((id(inner), id(outer)))
        n_done += 1
    if n_done:
        g.splice(new_nodes, drop)
    return n_done


def _all_ones(arr: np.ndarray | None) -> bool:
    return arr is not None and bool((arr == 1).all())


_NONNEG_OPS = {"Slice", "Gather", "Concat", "Squeeze", "Unsqueeze", "Reshape", "Add", "Mul", "Max",
               "Min", "Cast"}


def _nonneg(g: _Graph, name: str, depth: int = 0) -> bool:
    """True if tensor ``name`` is provably >= 0: constants, Shape, and arithmetic on those."""
    c = g.const(name)
    if c is not None:
        return bool((c >= 0).all())
    n = g.producer.get(name)
    if n is None or depth > 8:
        return False
    if n.op_type == "Shape":
        return True
    if n.op_type not in _NONNEG_OPS:
        return False
    data = n.input[:1] if n.op_type in ("Slice", "Gather", "Squeeze", "Unsqueeze", "Reshape") \
        else [i for i in n.input if i]
    return all(_nonneg(g, i, depth + 1) for i in data)


def _dead_code(g: _Graph) -> int:
    live = set(g.outputs)
    keep = []
    for n in reversed(g.nodes):
        if any(o in live for o in n.output if o):
            keep.append(n)
            live.update(i for i in n.input if i)
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    live.update(i for s in a.g.node for i in s.input)
    removed = len(g.nodes) - len(keep)
    g.nodes = keep[::-1]
    g.index()
    return removed


PASSES: dict[str, Callable[[_Graph], int]] = {
    "identity": _identity,
    "constants": _constants,
    "batchnorm": _batchnorm,
    "activation_masks": _activation_masks,
    "where_to_mul": _where_to_mul,
    "channel_scale": _channel_scale,
    "maxpool": _maxpool,
    "pool_masks": _pool_masks,
    "strided_conv": _strided_conv,
    "slice_chain": _slice_chain,
    "sum_to_add": _sum_to_add,
    "dead_code": _dead_code,
}


#: The passes :func:`optimize` runs by default: all of them.
DEFAULT_PASSES = tuple(PASSES)


def optimize(model: onnx.ModelProto, passes: Sequence[str] | None = None,
             report: OptimizeReport | None = None) -> onnx.ModelProto:
    """A faster equivalent of the compiled gradient graph ``model`` (a new ModelProto).

    ``passes`` picks a subset of :data:`PASSES` (default: :data:`DEFAULT_PASSES`); ``report``, if
    given, is filled with what each pass did.
    """
    names = list(DEFAULT_PASSES) if passes is None else [p for p in PASSES if p in passes] + [
        p for p in passes if p not in PASSES]
    unknown = [p for p in names if p not in PASSES]
    if unknown:
        raise ValueError(f"unknown optimisation pass(es) {unknown}; known: {', '.join(PASSES)}")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    opset = max((o.version for o in out.opset_import if o.domain in ("", "ai.onnx")), default=18)
    g = _Graph(out.graph, opset)
    rep = report if report is not None else OptimizeReport()
    rep.nodes_before = len(g.nodes)
    rep.ops_before = dict(Counter(n.op_type for n in g.nodes))
    if "where_to_mul" in names:
        g.dtypes = _dtypes(out)
    for name in names:
        rep.rewrites[name] = rep.rewrites.get(name, 0) + PASSES[name](g)
    if "dead_code" not in names:
        _dead_code(g)
    g.finish()
    rep.nodes_after = len(g.nodes)
    rep.ops_after = dict(Counter(n.op_type for n in g.nodes))
    return out


def _dtypes(model: onnx.ModelProto) -> dict[str, int]:
    from onnxdream.exporters.graph.autodiff import infer_shapes

    inferred = infer_shapes(model, data_prop=False)  # best effort, and safe past 2 GB
    g = inferred.graph
    out = {vi.name: vi.type.tensor_type.elem_type for vi in
           list(g.input) + list(g.value_info) + list(g.output)}
    out.update({i.name: i.data_type for i in model.graph.initializer})
    return out
