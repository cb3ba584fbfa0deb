"""Passes that rewrite the slow adjoints of pooling and strided convolution: MaxPool's backward
without ``Indices`` (:mod:`.fast_adjoints`), the Relu mask moved to the pool's output, and a
strided Conv's adjoint by output phases."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from onnxdream.exporters.graph.builder import FLOAT, node_attr
from onnxdream.exporters.graph.passes import fast_adjoints
from onnxdream.exporters.graph.passes.view import GraphView, is_scalar


def maxpool_backward(g: GraphView) -> int:
    """MaxPool's backward without ``Indices`` and ScatterElements, for pools of stride up to
    ``g.maxpool_max_stride`` (:mod:`.fast_adjoints`)."""
    n_done = 0
    replace: dict[int, list[onnx.NodeProto]] = {}
    for mp in g.nodes:
        if mp.op_type != "MaxPool" or len(mp.output) < 2 or not mp.output[1]:
            continue
        m = match_maxpool_backward(g, mp)
        if m is None:
            continue
        final, dy = m
        g.begin()
        ok = (fast_adjoints.emit_separable_maxpool_backward(g.b, mp, dy, final.output[0])
              or fast_adjoints.emit_maxpool_backward(g.b, mp, dy, final.output[0],
                                                     g.maxpool_max_stride))
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


def pool_masks(g: GraphView) -> int:
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
                not is_scalar(g.const(gts[0].input[1]), 0.0):
            continue
        cast = g.only_consumer(gts[0].output[0])
        mul = (g.only_consumer(cast.output[0])
               if cast is not None and cast.op_type == "Cast" else None)
        if mul is None or mul.op_type != "Mul":
            continue
        if len(mp.output) > 1 and mp.output[1]:
            m = match_maxpool_backward(g, mp)
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


def match_maxpool_backward(g: GraphView, mp: onnx.NodeProto):
    """Indices -> Reshape -> ScatterElements(add) -> Reshape: (the final Reshape, dY) or None."""
    idx = mp.output[1]
    if idx in g.outputs or node_attr(mp, "storage_order", 0) != 0:
        return None
    users = g.consumers.get(idx, [])
    if len(users) != 1 or users[0].op_type != "Reshape":
        return None
    flat_i = users[0].output[0]
    sc = g.only_consumer(flat_i)
    if sc is None or sc.op_type != "ScatterElements" or sc.input[1] != flat_i:
        return None
    if (node_attr(sc, "reduction", b"none") not in (b"add", "add")
            or int(node_attr(sc, "axis", 0)) != 0):
        return None
    zeros = g.producer.get(sc.input[0])
    if zeros is None or zeros.op_type != "ConstantOfShape":
        return None
    zv = node_attr(zeros, "value")
    if zv is None or np.any(numpy_helper.to_array(zv) != 0):
        return None
    rg = g.producer.get(sc.input[2])
    if rg is None or rg.op_type != "Reshape":
        return None
    final = g.only_consumer(sc.output[0])
    if final is None or final.op_type != "Reshape":
        return None
    return final, rg.input[0]


def strided_conv(g: GraphView) -> int:
    """The adjoint of a strided Conv (a ConvTranspose) as stride-1 Convs per output phase."""
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
