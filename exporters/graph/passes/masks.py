"""Passes on the activations' backward masks: read them off the activation's output, and
multiply by them instead of a broadcasting ``Where``."""

from __future__ import annotations

import numpy as np
import onnx

from onnxdream.exporters.graph.builder import FLOAT
from onnxdream.exporters.graph.passes.view import GraphView, is_scalar


def activation_masks(g: GraphView) -> int:
    """The backward masks of Relu/Clip read the activation's output (``relu(x) > 0`` iff
    ``x > 0``), so the forward Conv is followed by its activation alone and fuses with it."""
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
            if act.op_type == "Relu" and n.op_type == "Greater" and is_scalar(cv, 0.0):
                n.input[0] = act.output[0]
                n_done += 1
                break
            if act.op_type == "Clip" and len(act.input) >= 2:
                lo = g.const(act.input[1]) if len(act.input) > 1 and act.input[1] else None
                hi = g.const(act.input[2]) if len(act.input) > 2 and act.input[2] else None
                lo_v = float(lo.reshape(-1)[0]) if is_scalar(lo) else -np.inf
                hi_v = float(hi.reshape(-1)[0]) if is_scalar(hi) else np.inf
                if ((lo is not None and not is_scalar(lo))
                        or (hi is not None and not is_scalar(hi))):
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


def where_to_mul(g: GraphView) -> int:
    """Where(mask, g, 0) -> g * Cast(mask): onnxruntime's broadcasting Where is slow."""
    replace: dict[int, list[onnx.NodeProto]] = {}
    for n in g.nodes:
        if n.op_type == "Where" and is_scalar(g.const(n.input[2]), 0.0) and \
                g.dtypes.get(n.input[1]) == FLOAT and g.dtypes.get(n.output[0]) == FLOAT:
            g.begin()
            m = g.b.op("Cast", [n.input[0]], hint="mask", to=FLOAT)
            g.b.op("Mul", [n.input[1], m], out=n.output[0])
            replace[id(n)] = g.take()
    g.splice(replace)
    return len(replace)
