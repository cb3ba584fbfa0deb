"""Gradient rules for elementwise math, reductions, matrix products and normalisations."""

from __future__ import annotations

import math

import numpy as np
import onnx

from onnxdream.exporters.graph.autodiff import RuleContext, rule

# -- unary elementwise ------------------------------------------------------------------------


@rule("Identity", "Dropout")
def _identity(ctx: RuleContext, dys):
    return [dys[0]]


@rule("Neg")
def _neg(ctx, dys):
    return [ctx.b.op("Neg", [dys[0]])]


@rule("Cast")
def _cast(ctx, dys):
    x = ctx.inputs[0]
    return [ctx.b.cast(dys[0], ctx.info.dtypes.get(x, onnx.TensorProto.FLOAT))]


def _mask_grad(ctx: RuleContext, g: str, cond: str, scale: str | None = None) -> str:
    b = ctx.b
    zero = b.scalar(0.0)
    return b.where(cond, g if scale is None else b.mul(g, scale), zero)


@rule("Relu")
def _relu(ctx, dys):
    b = ctx.b
    return [_mask_grad(ctx, dys[0], b.op("Greater", [ctx.inputs[0], b.scalar(0.0)]))]


@rule("LeakyRelu")
def _leaky(ctx, dys):
    b = ctx.b
    alpha = float(ctx.attr("alpha", 0.01))
    pos = b.op("Greater", [ctx.inputs[0], b.scalar(0.0)])
    return [b.where(pos, dys[0], b.mul(dys[0], b.scalar(alpha)))]


@rule("Clip")
def _clip(ctx, dys):
    b = ctx.b
    x = ctx.inputs[0]
    lo, hi = ctx.input(1), ctx.input(2)
    conds = []
    if lo:
        conds.append(b.op("Greater", [x, lo]))
    if hi:
        conds.append(b.op("Less", [x, hi]))
    if not conds:
        return [dys[0]]
    cond = conds[0] if len(conds) == 1 else b.op("And", conds)
    return [_mask_grad(ctx, dys[0], cond)]


@rule("HardSigmoid")
def _hardsigmoid(ctx, dys):
    b = ctx.b
    alpha, beta = float(ctx.attr("alpha", 0.2)), float(ctx.attr("beta", 0.5))
    t = b.op("Add", [b.mul(ctx.inputs[0], b.scalar(alpha)), b.scalar(beta)])
    cond = b.op("And", [b.op("Greater", [t, b.scalar(0.0)]), b.op("Less", [t, b.scalar(1.0)])])
    return [_mask_grad(ctx, dys[0], cond, b.scalar(alpha))]


@rule("HardSwish")
def _hardswish(ctx, dys):
    # y = x * clip(x/6 + 1/2, 0, 1): dy/dx = 0 below -3, x/3 + 1/2 inside, 1 above 3.
    b = ctx.b
    x = ctx.inputs[0]
    inner = b.op("Add", [b.op("Div", [x, b.scalar(3.0)]), b.scalar(0.5)])
    d = b.where(b.op("Less", [x, b.scalar(-3.0)]), b.scalar(0.0),
                b.where(b.op("Greater", [x, b.scalar(3.0)]), b.scalar(1.0), inner))
    return [b.mul(dys[0], d)]


@rule("Sigmoid")
def _sigmoid(ctx, dys):
    b = ctx.b
    y = ctx.outputs[0]
    return [b.mul(dys[0], b.mul(y, b.op("Sub", [b.scalar(1.0), y])))]


@rule("Tanh")
def _tanh(ctx, dys):
    b = ctx.b
    y = ctx.outputs[0]
    return [b.mul(dys[0], b.op("Sub", [b.scalar(1.0), b.mul(y, y)]))]


@rule("Erf")
def _erf(ctx, dys):
    b = ctx.b
    x = ctx.inputs[0]
    e = b.op("Exp", [b.op("Neg", [b.mul(x, x)])])
    return [b.mul(dys[0], b.mul(e, b.scalar(2.0 / math.sqrt(math.pi))))]


@rule("Gelu")
def _gelu(ctx, dys):
    b = ctx.b
    x = ctx.inputs[0]
    if ctx.attr("approximate", "none") == "tanh":
        # y = 0.5 x (1 + tanh(u)), u = c (x + 0.044715 x^3)
        c = math.sqrt(2.0 / math.pi)
        x2 = b.mul(x, x)
        u = b.mul(b.scalar(c), b.op("Add", [x, b.mul(b.scalar(0.044715), b.mul(x2, x))]))
        t = b.op("Tanh", [u])
        du = b.mul(b.scalar(c), b.op("Add", [b.scalar(1.0), b.mul(b.scalar(3 * 0.044715), x2)]))
        sech2 = b.op("Sub", [b.scalar(1.0), b.mul(t, t)])
        d = b.op("Add", [b.mul(b.scalar(0.5), b.op("Add", [b.scalar(1.0), t])),
                         b.mul(b.mul(b.scalar(0.5), x), b.mul(sech2, du))])
        return [b.mul(dys[0], d)]
    cdf = b.mul(b.scalar(0.5), b.op("Add", [b.scalar(1.0),
                                             b.op("Erf", [b.mul(x, b.scalar(1 / math.sqrt(2)))])]))
    pdf = b.mul(b.scalar(1 / math.sqrt(2 * math.pi)),
                b.op("Exp", [b.mul(b.scalar(-0.5), b.mul(x, x))]))
    return [b.mul(dys[0], b.op("Add", [cdf, b.mul(x, pdf)]))]


@rule("Exp")
def _exp(ctx, dys):
    return [ctx.b.mul(dys[0], ctx.outputs[0])]


@rule("Log")
def _log(ctx, dys):
    return [ctx.b.op("Div", [dys[0], ctx.inputs[0]])]


@rule("Sqrt")
def _sqrt(ctx, dys):
    b = ctx.b
    return [b.op("Div", [dys[0], b.mul(b.scalar(2.0), ctx.outputs[0])])]


@rule("Reciprocal")
def _reciprocal(ctx, dys):
    b = ctx.b
    y = ctx.outputs[0]
    return [b.op("Neg", [b.mul(dys[0], b.mul(y, y))])]


@rule("Abs")
def _abs(ctx, dys):
    return [ctx.b.mul(dys[0], ctx.b.op("Sign", [ctx.inputs[0]]))]


@rule("Softplus")
def _softplus(ctx, dys):
    return [ctx.b.mul(dys[0], ctx.b.op("Sigmoid", [ctx.inputs[0]]))]


@rule("Elu")
def _elu(ctx, dys):
    b = ctx.b
    alpha = float(ctx.attr("alpha", 1.0))
    x, y = ctx.inputs[0], ctx.outputs[0]
    neg = b.op("Add", [y, b.scalar(alpha)])
    return [b.mul(dys[0], b.where(b.op("Greater", [x, b.scalar(0.0)]), b.scalar(1.0), neg))]


# -- binary / n-ary elementwise ---------------------------------------------------------------


def _binary(ctx: RuleContext, ga: str | None, gb: str | None):
    y = ctx.outputs[0]
    out = []
    for i, g in enumerate((ga, gb)):
        out.append(ctx.unbroadcast(g, ctx.inputs[i], y) if g is not None and ctx.needs(i) else None)
    return out


@rule("Add")
def _add(ctx, dys):
    return _binary(ctx, dys[0], dys[0])


@rule("Sub")
def _sub(ctx, dys):
    return _binary(ctx, dys[0], ctx.b.op("Neg", [dys[0]]) if ctx.needs(1) else None)


@rule("Mul")
def _mul(ctx, dys):
    b = ctx.b
    a, c = ctx.inputs
    return _binary(ctx, b.mul(dys[0], c) if ctx.needs(0) else None,
                   b.mul(dys[0], a) if ctx.needs(1) else None)


@rule("Div")
def _div(ctx, dys):
    b = ctx.b
    a, c = ctx.inputs
    ga = b.op("Div", [dys[0], c]) if ctx.needs(0) else None
    gb = (b.op("Neg", [b.op("Div", [b.mul(dys[0], ctx.outputs[0]), c])])
          if ctx.needs(1) else None)
    return _binary(ctx, ga, gb)


@rule("Pow")
def _pow(ctx, dys):
    b = ctx.b
    a, e = ctx.inputs
    ga = gb = None
    if ctx.needs(0):
        ev = ctx.const(1)
        if ev is not None and ev.size == 1 and float(ev.reshape(())) == 2.0:
            ga = b.mul(dys[0], b.mul(a, b.scalar(2.0)))
        else:
            ef = b.cast(e, onnx.TensorProto.FLOAT) if ctx.info.dtypes.get(e, 1) != 1 else e
            em1 = b.op("Sub", [ef, b.scalar(1.0)])
            ga = b.mul(dys[0], b.mul(ef, b.op("Pow", [a, em1])))
    if ctx.needs(1):
        gb = b.mul(dys[0], b.mul(ctx.outputs[0], b.op("Log", [a])))
    return _binary(ctx, ga, gb)


@rule("Sum")
def _sum(ctx, dys):
    y = ctx.outputs[0]
    return [ctx.unbroadcast(dys[0], x, y) if ctx.needs(i) else None
            for i, x in enumerate(ctx.inputs)]


@rule("Max", "Min")
def _maxmin(ctx, dys):
    b = ctx.b
    y = ctx.outputs[0]
    out = []
    for i, x in enumerate(ctx.inputs):
        if not ctx.needs(i):
            out.append(None)
            continue
        m = b.where(b.op("Equal", [x, y]), dys[0], b.scalar(0.0))
        out.append(ctx.unbroadcast(m, x, y))
    return out


@rule("Where")
def _where(ctx, dys):
    b = ctx.b
    cond, _, _ = ctx.inputs
    y = ctx.outputs[0]
    zero = b.scalar(0.0)
    gx = ctx.unbroadcast(b.where(cond, dys[0], zero), ctx.inputs[1], y) if ctx.needs(1) else None
    gy = ctx.unbroadcast(b.where(cond, zero, dys[0]), ctx.inputs[2], y) if ctx.needs(2) else None
    return [None, gx, gy]


# -- reductions -------------------------------------------------------------------------------


def _reduce_axes(ctx: RuleContext) -> list[int]:
    x = ctx.inputs[0]
    rank = ctx.rank(x)
    v = ctx.const(1)
    if ctx.input(1) and v is None:
        raise ctx.fail("its axes are not a constant")
    axes = [] if v is None else [int(a) for a in v.reshape(-1)]
    if not axes:
        if ctx.attr("noop_with_empty_axes", 0):
            return []
        axes = list(range(rank))
    return sorted(a % rank for a in axes)


def _expand_reduced(ctx: RuleContext, g: str, axes: list[int]) -> str:
    """Bring a reduction's output gradient back to the input's shape."""
    b = ctx.b
    if not ctx.attr("keepdims", 1) and axes:
        g = b.unsqueeze(g, axes)
    return b.op("Expand", [g, b.shape(ctx.inputs[0])])


def _count(ctx: RuleContext, axes: list[int]) -> str:
    b = ctx.b
    shape = ctx.shape(ctx.inputs[0]) or ()
    dims = [shape[a] if a < len(shape) else None for a in axes]
    if all(isinstance(d, int) and d > 0 for d in dims):
        return b.scalar(float(np.prod(dims)))
    sizes = b.op("Gather", [b.shape(ctx.inputs[0]), b.ints(axes)], axis=0)
    return b.cast(b.op("ReduceProd", [sizes], keepdims=0), onnx.TensorProto.FLOAT)


@rule("ReduceSum")
def _reduce_sum(ctx, dys):
    axes = _reduce_axes(ctx)
    if not axes:
        return [dys[0]]
    return [_expand_reduced(ctx, dys[0], axes)]


@rule("ReduceMean")
def _reduce_mean(ctx, dys):
    axes = _reduce_axes(ctx)
    if not axes:
        return [dys[0]]
    g = _expand_reduced(ctx, dys[0], axes)
    return [ctx.b.op("Div", [g, _count(ctx, axes)])]


@rule("ReduceSumSquare")
def _reduce_sumsq(ctx, dys):
    axes = _reduce_axes(ctx)
    g = _expand_reduced(ctx, dys[0], axes) if axes else dys[0]
    return [ctx.b.mul(g, ctx.b.mul(ctx.inputs[0], ctx.b.scalar(2.0)))]


@rule("ReduceL2")
def _reduce_l2(ctx, dys):
    b = ctx.b
    axes = _reduce_axes(ctx)
    if not axes:
        return [b.mul(dys[0], b.op("Sign", [ctx.inputs[0]]))]
    g = _expand_reduced(ctx, dys[0], axes)
    y = ctx.outputs[0]
    if not ctx.attr("keepdims", 1):
        y = b.unsqueeze(y, axes)
    return [b.op("Div", [b.mul(g, ctx.inputs[0]), y])]


@rule("ReduceMax", "ReduceMin")
def _reduce_max(ctx, dys):
    b = ctx.b
    axes = _reduce_axes(ctx)
    if not axes:
        return [dys[0]]
    g = _expand_reduced(ctx, dys[0], axes)
    y = ctx.outputs[0]
    if not ctx.attr("keepdims", 1):
        y = b.unsqueeze(y, axes)
    mask = b.cast(b.op("Equal", [ctx.inputs[0], y]), onnx.TensorProto.FLOAT)
    # ties share the gradient equally, as torch's amax/amin do
    share = b.reduce_sum(mask, axes, keepdims=1)
    return [b.op("Div", [b.mul(g, mask), share])]


@rule("GlobalAveragePool")
def _gap(ctx, dys):
    b = ctx.b
    x = ctx.inputs[0]
    rank = ctx.rank(x)
    g = b.op("Expand", [dys[0], b.shape(x)])
    return [b.op("Div", [g, _count(ctx, list(range(2, rank)))])]


@rule("GlobalMaxPool")
def _gmp(ctx, dys):
    b = ctx.b
    x = ctx.inputs[0]
    g = b.op("Expand", [dys[0], b.shape(x)])
    return [b.where(b.op("Equal", [x, ctx.outputs[0]]), g, b.scalar(0.0))]


# -- softmax ----------------------------------------------------------------------------------


@rule("Softmax")
def _softmax(ctx, dys):
    b = ctx.b
    axis = int(ctx.attr("axis", -1))
    y = ctx.outputs[0]
    gy = b.mul(dys[0], y)
    s = b.reduce_sum(gy, [axis], keepdims=1)
    return [b.op("Sub", [gy, b.mul(y, s)])]


@rule("LogSoftmax")
def _logsoftmax(ctx, dys):
    b = ctx.b
    axis = int(ctx.attr("axis", -1))
    p = b.op("Exp", [ctx.outputs[0]])
    s = b.reduce_sum(dys[0], [axis], keepdims=1)
    return [b.op("Sub", [dys[0], b.mul(p, s)])]


# -- matrix products --------------------------------------------------------------------------


def _swap_last(ctx: RuleContext, x: str, rank: int) -> str:
    perm = list(range(rank))
    perm[-1], perm[-2] = perm[-2], perm[-1]
    return ctx.b.op("Transpose", [x], perm=perm)


@rule("MatMul")
def _matmul(ctx, dys):
    b = ctx.b
    a, c = ctx.inputs
    y = ctx.outputs[0]
    ra, rc = ctx.rank(a), ctx.rank(c)
    if ra < 2 or rc < 2:
        raise ctx.fail("MatMul with a 1-D operand is not supported")
    g = dys[0]
    ga = gb = None
    if ctx.needs(0):
        ga = b.op("MatMul", [g, _swap_last(ctx, c, rc)])
        ga = ctx.unbroadcast(ga, a, y) if ra >= rc else _sum_to_rank(ctx, ga, a)
    if ctx.needs(1):
        gb = b.op("MatMul", [_swap_last(ctx, a, ra), g])
        gb = ctx.unbroadcast(gb, c, y) if rc >= ra else _sum_to_rank(ctx, gb, c)
    return [ga, gb]


def _sum_to_rank(ctx: RuleContext, g: str, x: str) -> str:
    """g has the broadcast batch shape of a MatMul; sum it to operand x (lower rank)."""
    return ctx.unbroadcast(g, x, ctx.outputs[0])


@rule("Gemm")
def _gemm(ctx, dys):
    b = ctx.b
    a, c = ctx.inputs[0], ctx.inputs[1]
    alpha, beta = float(ctx.attr("alpha", 1.0)), float(ctx.attr("beta", 1.0))
    ta, tb = int(ctx.attr("transA", 0)), int(ctx.attr("transB", 0))
    g = dys[0]
    if alpha != 1.0:
        g = b.mul(g, b.scalar(alpha))
    ga = gb = gc = None
    if ctx.needs(0):
        # A' = op(A); dA' = g @ op(B)^T
        ga = (b.op("Gemm", [g, c], transB=0 if tb else 1) if not ta
              else b.op("Gemm", [c, g], transA=tb, transB=1))
    if ctx.needs(1):
        # dB' = op(A)^T @ g
        gb = (b.op("Gemm", [a, g], transA=0 if ta else 1) if not tb
              else b.op("Gemm", [g, a], transA=1, transB=ta))
    if ctx.needs(2):
        gc = ctx.unbroadcast(b.mul(dys[0], b.scalar(beta)), ctx.inputs[2], ctx.outputs[0])
    return [ga, gb, gc]


# -- normalisations ---------------------------------------------------------------------------


def _channel_view(ctx: RuleContext, v: str, rank: int) -> str:
    """A [C] vector viewed as [C, 1, ..., 1] so it broadcasts over an NC... tensor."""
    return ctx.b.op("Reshape", [v, ctx.b.ints([-1] + [1] * (rank - 2))])


@rule("BatchNormalization")
def _batchnorm(ctx, dys):
    b = ctx.b
    if ctx.attr("training_mode", 0):
        raise ctx.fail("BatchNormalization in training mode is not supported; export in eval mode")
    x = ctx.inputs[0]
    rank = ctx.rank(x)
    eps = float(ctx.attr("epsilon", 1e-5))
    scale, var = ctx.const(1), ctx.const(4)
    if scale is not None and var is not None:
        k = (scale.astype(np.float64) / np.sqrt(var.astype(np.float64) + eps)).astype(np.float32)
        factor = b.const(k.reshape([-1] + [1] * (rank - 2)), hint="bn_scale")
    else:
        std = b.op("Sqrt", [b.op("Add", [ctx.inputs[4], b.scalar(eps)])])
        factor = _channel_view(ctx, b.op("Div", [ctx.inputs[1], std]), rank)
    return [b.mul(dys[0], factor)]


def _normalized_grad(ctx: RuleContext, x: str, gx: str, axes: list[int], eps: float) -> str:
    """dX of (x - mean) / sqrt(var + eps) over ``axes``, given gx = dY * scale."""
    b = ctx.b
    mu = b.reduce_mean(x, axes)
    xc = b.op("Sub", [x, mu])
    var = b.reduce_mean(b.mul(xc, xc), axes)
    rstd = b.op("Reciprocal", [b.op("Sqrt", [b.op("Add", [var, b.scalar(eps)])])])
    xhat = b.mul(xc, rstd)
    m1 = b.reduce_mean(gx, axes)
    m2 = b.reduce_mean(b.mul(gx, xhat), axes)
    return b.mul(rstd, b.op("Sub", [b.op("Sub", [gx, m1]), b.mul(xhat, m2)]))


@rule("LayerNormalization")
def _layernorm(ctx, dys):
    x = ctx.inputs[0]
    rank = ctx.rank(x)
    axis = int(ctx.attr("axis", -1)) % rank
    gx = ctx.b.mul(dys[0], ctx.inputs[1])
    return [_normalized_grad(ctx, x, gx, list(range(axis, rank)),
                             float(ctx.attr("epsilon", 1e-5)))]


@rule("InstanceNormalization")
def _instancenorm(ctx, dys):
    x = ctx.inputs[0]
    rank = ctx.rank(x)
    gx = ctx.b.mul(dys[0], _channel_view(ctx, ctx.inputs[1], rank))
    return [_normalized_grad(ctx, x, gx, list(range(2, rank)), float(ctx.attr("epsilon", 1e-5)))]


@rule("LRN")
def _lrn(ctx, dys):
    # y = x * s^-beta, s = bias + alpha/size * W(x^2), W the cross-channel window sum.
    # dx = g * s^-beta - 2 alpha beta / size * x * W^T(g * x * s^(-beta-1))
    b = ctx.b
    x = ctx.inputs[0]
    size = int(ctx.attr("size"))
    alpha, beta = float(ctx.attr("alpha", 1e-4)), float(ctx.attr("beta", 0.75))
    bias = float(ctx.attr("bias", 1.0))
    lo, hi = (size - 1) // 2, size - 1 - (size - 1) // 2
    s = b.op("Add", [b.mul(b.scalar(alpha / size), _window_sum(ctx, b.mul(x, x), lo, hi)),
                     b.scalar(bias)])
    g = dys[0]
    t1 = b.mul(g, b.op("Pow", [s, b.scalar(-beta)]))
    inner = b.mul(b.mul(g, x), b.op("Pow", [s, b.scalar(-beta - 1.0)]))
    t2 = b.mul(b.mul(x, b.scalar(2 * alpha * beta / size)), _window_sum(ctx, inner, hi, lo))
    return [b.op("Sub", [t1, t2])]


def _window_sum(ctx: RuleContext, v: str, lo: int, hi: int) -> str:
    """out[c] = sum of v[c-lo .. c+hi] over the channel axis (zero outside), any rank >= 3."""
    b = ctx.b
    shape = b.shape(v)
    n_c = b.op("Slice", [shape, b.ints([0]), b.ints([2]), b.ints([0])])
    v4 = b.op("Reshape", [v, b.concat([n_c, b.ints([1, -1])])])  # [N, C, 1, HW]
    v4 = b.op("Transpose", [v4], perm=[0, 2, 1, 3])  # [N, 1, C, HW]
    kernel = b.const(np.ones((1, 1, lo + hi + 1, 1), np.float32), hint="lrn_window")
    out = b.op("Conv", [v4, kernel], pads=[lo, 0, hi, 0])
    out = b.op("Transpose", [out], perm=[0, 2, 1, 3])
    return b.op("Reshape", [out, shape])


# -- einsum -----------------------------------------------------------------------------------


@rule("Einsum")
def _einsum(ctx, dys):
    """For ``a,b->o``: dA = einsum('o,b->a', dY, B), and likewise for B (one or two operands)."""
    eq = ctx.attr("equation").replace(" ", "")
    if "->" not in eq or "." in eq:
        raise ctx.fail(f"Einsum '{eq}' needs an explicit output and no ellipsis")
    lhs, out = eq.split("->")
    specs = lhs.split(",")
    if len(specs) > 2 or any(len(set(s)) != len(s) for s in specs + [out]):
        raise ctx.fail(f"Einsum '{eq}' (more than two operands or repeated indices) has no rule")
    grads = []
    for i, spec in enumerate(specs):
        if not ctx.needs(i):
            grads.append(None)
            continue
        others = [specs[j] for j in range(len(specs)) if j != i]
        if any(c not in out and all(c not in o for o in others) for c in spec):
            raise ctx.fail(f"Einsum '{eq}' sums an index of operand {i} alone; no rule")
        equation = ",".join([out] + others) + "->" + spec
        ins = [dys[0]] + [ctx.inputs[j] for j in range(len(specs)) if j != i]
        grads.append(ctx.b.op("Einsum", ins, equation=equation))
    return grads
