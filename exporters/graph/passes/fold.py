"""Folding passes: constants evaluated ahead of time, BatchNorm and per-channel scales folded
into the convolutions' weights."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper
from onnx.reference import ReferenceEvaluator

from onnxdream.exporters.graph.builder import node_attr
from onnxdream.exporters.graph.passes.view import GraphView

_FOLDABLE = {"Add", "Sub", "Mul", "Div", "Sqrt", "Reciprocal", "Neg", "Reshape", "Unsqueeze",
             "Squeeze", "Cast", "Concat", "Transpose", "Flatten", "Identity", "Abs", "Pow"}
_FOLD_LIMIT = 1 << 22  # elements: fold constants up to 16 MB


def fold_constants(g: GraphView) -> int:
    """Evaluate nodes whose inputs are all small constants (BatchNorm factors ...)."""
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
                    g.set_const(n.output[0], out)
                    n_done += 1
                    continue
        keep.append(n)
    g.nodes = keep
    g.index()
    return n_done


def fold_batchnorm(g: GraphView) -> int:
    """Fold an inference BatchNormalization into the Conv before it."""
    n_done = 0
    drop = set()
    for bn in g.nodes:
        if bn.op_type != "BatchNormalization" or len([o for o in bn.output if o]) != 1:
            continue
        if node_attr(bn, "training_mode", 0):
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
        k = scale / np.sqrt(var + float(node_attr(bn, "epsilon", 1e-5)))
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


def fold_channel_scale(g: GraphView) -> int:
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
        group = int(node_attr(conv, "group", 1))
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
