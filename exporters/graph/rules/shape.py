"""Gradient rules for ops that move data around: reshapes, transposes, concat/split, slicing."""

from __future__ import annotations

import numpy as np

from onnxdream.exporters.graph.autodiff import RuleContext, rule


@rule("Reshape", "Flatten", "Squeeze", "Unsqueeze")
def _reshape(ctx: RuleContext, dys):
    return [ctx.b.reshape_like(dys[0], ctx.inputs[0])] + [None] * (len(ctx.inputs) - 1)


@rule("Transpose")
def _transpose(ctx, dys):
    perm = ctx.attr("perm")
    if not perm:
        perm = list(range(ctx.rank(ctx.inputs[0])))[::-1]
    inverse = [int(i) for i in np.argsort(perm)]
    return [ctx.b.op("Transpose", [dys[0]], perm=inverse)]


@rule("Expand")
def _expand(ctx, dys):
    return [ctx.unbroadcast(dys[0], ctx.inputs[0], ctx.outputs[0]), None]


@rule("Tile")
def _tile(ctx, dys):
    reps = ctx.const(1)
    if reps is None or np.any(reps != 1):
        raise ctx.fail("Tile with repeats other than 1 is not supported")
    return [dys[0], None]


def _sizes_along(ctx: RuleContext, names: list[str], axis: int) -> str:
    """The sizes of tensors along an axis, as an int64 vector (static when known)."""
    b = ctx.b
    dims = []
    for n in names:
        s = ctx.shape(n)
        dims.append(s[axis] if s is not None and isinstance(s[axis], int) else None)
    if all(d is not None for d in dims):
        return b.ints(dims)
    return b.concat([b.dim(n, axis) for n in names])


@rule("Concat")
def _concat(ctx, dys):
    b = ctx.b
    inputs = ctx.inputs
    axis = int(ctx.attr("axis")) % ctx.rank(ctx.outputs[0])
    if len(inputs) == 1:
        return [dys[0]]
    parts = b.op("Split", [dys[0], _sizes_along(ctx, inputs, axis)], n_out=len(inputs), axis=axis)
    return [parts[i] if ctx.needs(i) else None for i in range(len(inputs))]


@rule("Split")
def _split(ctx, dys):
    b = ctx.b
    axis = int(ctx.attr("axis", 0)) % ctx.rank(ctx.inputs[0])
    parts = [g if g is not None else b.zeros_like(ctx.outputs[i]) for i, g in enumerate(dys)]
    return [b.concat(parts, axis)] + [None] * (len(ctx.inputs) - 1)


@rule("Slice")
def _slice(ctx, dys):
    """Zero-pad dY back to X's extent along each sliced axis (unit steps)."""
    b = ctx.b
    x = ctx.inputs[0]
    rank = ctx.rank(x)
    axes_v = ctx.const(3)
    if ctx.input(3) and axes_v is None:
        raise ctx.fail("its axes are not constant")
    steps_v = ctx.const(4)
    if ctx.input(4) and (steps_v is None or np.any(steps_v < 1)):
        raise ctx.fail("Slice with negative or non-constant steps is not supported")
    if ctx.input(4) and np.any(steps_v != 1):
        return [_strided_slice_grad(ctx, dys[0], axes_v, steps_v)] + [None] * (len(ctx.inputs) - 1)
    n = None
    if axes_v is not None:
        axes = [int(a) % rank for a in axes_v.reshape(-1)]
    else:
        sv = ctx.const(1)
        n = int(sv.size) if sv is not None else ctx.shape(ctx.inputs[1])[0]
        axes = list(range(n))
    i64 = lambda v: b.const(v, np.int64)  # noqa: E731
    dims = b.op("Gather", [b.shape(x), b.ints(axes)], axis=0)
    starts, ends = ctx.inputs[1], ctx.inputs[2]

    def clamp(v):
        v = b.where(b.op("Less", [v, i64(0)]), b.op("Add", [v, dims]), v)
        return b.op("Max", [b.op("Min", [v, dims]), i64(0)])

    s, e = clamp(starts), clamp(ends)
    length = b.op("Max", [b.op("Sub", [e, s]), i64(0)])
    pad_end = b.op("Sub", [b.op("Sub", [dims, s]), length])
    # full-rank pads (no `axes` input): onnxruntime's layout optimiser mis-indexes partial ones
    idx = b.ints(axes)
    zeros = b.const(np.zeros(rank, np.int64), np.int64, "zero_pads")
    begin = b.op("ScatterElements", [zeros, idx, s], axis=0)
    end = b.op("ScatterElements", [zeros, idx, pad_end], axis=0)
    pads = b.concat([begin, end])
    return [b.op("Pad", [dys[0], pads])] + [None] * (len(ctx.inputs) - 1)


def _strided_slice_grad(ctx: RuleContext, g: str, axes_v, steps_v) -> str:
    """Adjoint of a Slice with positive steps, one axis at a time.

    Along an axis sliced as start, start+k, …: interleave k-1 zeros after every element of dY
    (Unsqueeze, Pad, Reshape), shift by start, and cut or pad to X's extent.
    """
    b = ctx.b
    x = ctx.inputs[0]
    rank = ctx.rank(x)
    axes = ([int(a) % rank for a in axes_v.reshape(-1)] if axes_v is not None
            else list(range(int(steps_v.size))))
    i64 = lambda v: b.const(v, np.int64)  # noqa: E731
    for i, (axis, k) in enumerate(zip(axes, steps_v.reshape(-1).tolist())):
        dim = b.dim(x, axis)
        start = b.op("Gather", [ctx.inputs[1], b.ints([i])], axis=0)
        start = b.where(b.op("Less", [start, i64(0)]), b.op("Add", [start, dim]), start)
        start = b.op("Max", [b.op("Min", [start, dim]), i64(0)])
        if k > 1:
            u = b.unsqueeze(g, [axis + 1])
            pads = [0] * (2 * (rank + 1))
            pads[rank + 1 + axis + 1] = k - 1
            u = b.op("Pad", [u, b.ints(pads)])
            shape = b.shape(g)
            new_shape = b.concat([
                b.op("Slice", [shape, b.ints([0]), b.ints([axis]), b.ints([0])]),
                b.op("Mul", [b.op("Slice", [shape, b.ints([axis]), b.ints([axis + 1]),
                                              b.ints([0])]), i64([k])]),
                b.op("Slice", [shape, b.ints([axis + 1]), b.ints([rank]), b.ints([0])])])
            g = b.op("Reshape", [u, new_shape])
        # place at start, then pad (or cut) the end to X's extent
        zeros = b.const(np.zeros(rank, np.int64), np.int64, "zero_pads")
        begin = b.op("ScatterElements", [zeros, b.ints([axis]), start], axis=0)
        length = b.op("Add", [start, b.dim(g, axis)])
        tail = b.op("Max", [b.op("Sub", [dim, length]), i64([0])])
        end = b.op("ScatterElements", [zeros, b.ints([axis]), tail], axis=0)
        g = b.op("Pad", [g, b.concat([begin, end])])
        g = b.slice(g, [0], dim, [axis])
    return g


BIG = 2**62  # "to the end" for Slice ends (onnxruntime clamps)


def _one(b, v: int | str) -> str:
    """An int64 [1] tensor for a static int or a runtime [1] tensor."""
    return b.ints([v]) if isinstance(v, int) else v


def _cut(b, x: str, start: int | str, end: int | str, axis: int, step: int | None = None) -> str:
    """x[start:end(:step)] along one axis; bounds are ints or int64 [1] tensors."""
    if isinstance(start, int) and isinstance(end, int):
        return b.slice(x, [start], [end], [axis], None if step is None else [step])
    return b.slice(x, _one(b, start), _one(b, end), [axis], None if step is None else [step])


def _axis_pads(b, rank: int, axis: int, begin: int | str, end: int | str) -> str:
    """Full-rank Pad pads (onnxruntime's layout optimiser mis-indexes partial ones) that pad
    one axis by ``begin``/``end``."""
    if isinstance(begin, int) and isinstance(end, int):
        v = [0] * (2 * rank)
        v[axis], v[rank + axis] = begin, end
        return b.ints(v)
    parts = [b.ints([0] * axis)] if axis else []
    parts += [_one(b, begin), b.ints([0] * (rank - 1))] if rank > 1 else [_one(b, begin)]
    parts += [_one(b, end)]
    if rank - 1 - axis:
        parts.append(b.ints([0] * (rank - 1 - axis)))
    return b.concat(parts)


def _arith(b, op: str, a: int | str, c: int | str) -> int | str:
    """a op c for ints (folded) or int64 [1] tensors."""
    if isinstance(a, int) and isinstance(c, int):
        return {"Add": a + c, "Sub": a - c, "Max": max(a, c), "Min": min(a, c)}[op]
    return b.op(op, [_one(b, a), _one(b, c)])


def _nonzero(v: int | str) -> bool:
    return not (isinstance(v, int) and v == 0)


def _end_before(b, g: str, axis: int, pe: int | str) -> int | str:
    """Where the last ``pe`` entries of g along ``axis`` begin (the end of what they follow)."""
    if isinstance(pe, int):
        return -pe if pe else BIG
    return b.op("Sub", [b.dim(g, axis), pe])


def _edge_adjoint(b, g: str, axis: int, pb: int | str, pe: int | str) -> str:
    """Edge padding copies x[0] pb times and x[-1] pe times: their gradients sum there."""
    end = _end_before(b, g, axis, pe)
    core = _cut(b, g, pb, end, axis)
    if _nonzero(pb):
        head = b.reduce_sum(_cut(b, g, 0, pb, axis), [axis], keepdims=1)
        core = b.concat([b.op("Add", [_cut(b, core, 0, 1, axis), head]),
                         _cut(b, core, 1, BIG, axis)], axis)
    if _nonzero(pe):
        tail = b.reduce_sum(_cut(b, g, end, BIG, axis), [axis], keepdims=1)
        core = b.concat([_cut(b, core, 0, -1, axis),
                         b.op("Add", [_cut(b, core, -1, BIG, axis), tail])], axis)
    return core


def _reflect_adjoint(b, g: str, axis: int, pb: int | str, pe: int | str) -> str:
    """Reflect padding copies x[pb..1] before x and x[-2..-1-pe] after it (pads < size)."""
    end = _end_before(b, g, axis, pe)
    core = _cut(b, g, pb, end, axis)
    if _nonzero(pb):
        head = _cut(b, _cut(b, g, 0, pb, axis), -1, -BIG, axis, -1)  # x[1..pb]
        stop = _arith(b, "Add", pb, 1)
        core = b.concat([_cut(b, core, 0, 1, axis),
                         b.op("Add", [_cut(b, core, 1, stop, axis), head]),
                         _cut(b, core, stop, BIG, axis)], axis)
    if _nonzero(pe):
        tail = _cut(b, _cut(b, g, end, BIG, axis), -1, -BIG, axis, -1)  # x[-1-pe..-2]
        start = _arith(b, "Sub", -1, pe)
        core = b.concat([_cut(b, core, 0, start, axis),
                         b.op("Add", [_cut(b, core, start, -1, axis), tail]),
                         _cut(b, core, -1, BIG, axis)], axis)
    return core


def _wrap_adjoint(b, g: str, axis: int, rank: int, pb: int | str, pe: int | str) -> str:
    """Wrap padding reads x[(j - pb) mod m] (any pad size): shift dY so that its index is
    congruent to x's mod m, cut it into rows of m and sum the rows."""
    i64 = lambda v: b.const(v, np.int64)  # noqa: E731
    n = b.dim(g, axis)
    m = b.op("Sub", [n, _one(b, _arith(b, "Add", pb, pe))])
    lead = b.op("Mod", [b.op("Sub", [m, b.op("Mod", [_one(b, pb), m])]), m])
    total = b.op("Add", [n, lead])
    rows = b.op("Div", [b.op("Add", [total, b.op("Sub", [m, i64([1])])]), m])
    trail = b.op("Sub", [b.op("Mul", [rows, m]), total])
    g = b.op("Pad", [g, _axis_pads(b, rank, axis, lead, trail)])
    shape = b.shape(g)
    target = b.concat([p for p in (
        b.op("Slice", [shape, b.ints([0]), b.ints([axis]), b.ints([0])]) if axis else None,
        rows, m,
        b.op("Slice", [shape, b.ints([axis + 1]), b.ints([rank]), b.ints([0])])
        if axis + 1 < rank else None) if p is not None])
    return b.reduce_sum(b.op("Reshape", [g, target]), [axis], keepdims=0)


@rule("Pad")
def _pad(ctx, dys):
    """constant: crop dY back to X. edge/reflect/wrap: fold the padded border back onto the
    values it copies, one axis at a time (the padding is separable). Negative pads crop X
    first (as onnxruntime does), so their adjoint zero-pads."""
    b = ctx.b
    mode = ctx.attr("mode", "constant")
    if mode not in ("constant", "edge", "reflect", "wrap"):
        raise ctx.fail(f"Pad mode '{mode}' has no gradient rule")
    x, y = ctx.inputs[0], ctx.outputs[0]
    rank = ctx.rank(x)
    pads, pads_v = ctx.inputs[1], ctx.const(1)
    av = ctx.const(3)
    if ctx.input(3) and av is None:
        raise ctx.fail("its axes are not constant")
    axes = list(range(rank)) if av is None else [int(a) % rank for a in av.reshape(-1)]
    n = len(axes)
    none = [None] * (len(ctx.inputs) - 1)
    if mode == "constant" and pads_v is not None and np.all(pads_v >= 0):
        begin = b.op("Slice", [pads, b.ints([0]), b.ints([n]), b.ints([0])])
        end_pad = b.op("Slice", [pads, b.ints([n]), b.ints([2 * n]), b.ints([0])])
        ends = b.op("Sub", [b.op("Gather", [b.shape(y), b.ints(axes)], axis=0), end_pad])
        return [b.slice(dys[0], begin, ends, axes)] + none
    g = dys[0]
    for i, axis in enumerate(axes):
        if pads_v is not None:
            pb, pe = int(pads_v.reshape(-1)[i]), int(pads_v.reshape(-1)[n + i])
            if pb == pe == 0:
                continue
        else:
            pb = b.op("Gather", [pads, b.ints([i])], axis=0)
            pe = b.op("Gather", [pads, b.ints([n + i])], axis=0)
        # negative pads crop X first; the padding then extends the cropped tensor
        cb = _arith(b, "Max", _arith(b, "Sub", 0, pb), 0)
        ce = _arith(b, "Max", _arith(b, "Sub", 0, pe), 0)
        pb, pe = _arith(b, "Max", pb, 0), _arith(b, "Max", pe, 0)
        if mode == "constant":
            g = _cut(b, g, pb, _end_before(b, g, axis, pe), axis)
        elif mode == "edge":
            g = _edge_adjoint(b, g, axis, pb, pe)
        elif mode == "reflect":
            g = _reflect_adjoint(b, g, axis, pb, pe)
        elif _nonzero(pb) or _nonzero(pe):
            g = _wrap_adjoint(b, g, axis, rank, pb, pe)
        if _nonzero(cb) or _nonzero(ce):
            g = b.op("Pad", [g, _axis_pads(b, rank, axis, cb, ce)])
    return [g] + none


@rule("Gather")
def _gather(ctx, dys):
    """Scatter-add dY into zeros shaped like X, along the gathered axis."""
    b = ctx.b
    x, idx = ctx.inputs
    axis = int(ctx.attr("axis", 0))
    rank = ctx.rank(x) if axis != 0 else None  # axis 0 needs no transposes, so no rank
    if rank is not None:
        axis %= rank
    const_idx = ctx.const(1)
    q = const_idx.ndim if const_idx is not None else ctx.rank(idx)
    dim = b.dim(x, axis)
    idx = b.where(b.op("Less", [idx, b.const(0, np.int64)]),
                  b.op("Add", [idx, b.op("Squeeze", [dim, b.ints([0])])]), idx)
    g = dys[0]
    if axis == 0:
        to_front = g_perm = []
    else:
        to_front = [axis] + [i for i in range(rank) if i != axis]
        # dY axes: x[:axis] + idx dims + x[axis+1:]; bring the idx dims to the front
        g_perm = (list(range(axis, axis + q)) + list(range(axis))
                  + list(range(axis + q, rank - 1 + q)))
    if g_perm != list(range(len(g_perm))):
        g = b.op("Transpose", [g], perm=g_perm)
    zeros = b.zeros_like(x)
    moved = to_front != list(range(len(to_front)))
    if moved:
        zeros = b.op("Transpose", [zeros], perm=to_front)
    # constant indices that never meet (all >= 0 or all < 0, none repeated) scatter into zeros
    # without a reduction: the same values, and providers without ScatterND(add) (OpenVINO)
    # take it (a constant Gather: torchvision's input transform reads x[:, c])
    unique = const_idx is not None and np.unique(const_idx).size == const_idx.size and (
        bool(np.all(const_idx >= 0)) or bool(np.all(const_idx < 0)))
    out = b.op("ScatterND", [zeros, b.unsqueeze(idx, [-1] if q else [0]), g],
               reduction=None if unique else "add")
    if moved:
        out = b.op("Transpose", [out], perm=[int(i) for i in np.argsort(to_front)])
    return [out, None]


@rule("DepthToSpace")
def _depth_to_space(ctx, dys):
    """The inverse rearrangement: SpaceToDepth for mode DCR; for CRD (torch's pixel_shuffle)
    SpaceToDepth orders the channels (b1, b2, C), so they are regrouped to (C, b1, b2)."""
    b = ctx.b
    size = int(ctx.attr("blocksize"))
    g = b.op("SpaceToDepth", [dys[0]], blocksize=size)
    if ctx.attr("mode", "DCR") == "DCR":
        return [g]
    shape = ctx.shape(ctx.outputs[0])
    channels = shape[1] if shape is not None else None
    if not isinstance(channels, int):
        raise ctx.fail("mode CRD needs a static channel count")
    g = b.op("Reshape", [g, b.ints([0, size * size, channels, -1])])
    g = b.op("Transpose", [g], perm=[0, 2, 1, 3])
    return [b.reshape_like(g, ctx.inputs[0])]


@rule("SpaceToDepth")
def _space_to_depth(ctx, dys):
    return [ctx.b.op("DepthToSpace", [dys[0]], blocksize=int(ctx.attr("blocksize")),
                     mode="DCR")]


@rule("ScatterND")
def _scatter_nd(ctx, dys):
    """y = data with ``updates`` written at ``indices`` (``x[..., 1:] = f(x)`` in torch): the
    written places take their gradient from updates, the others from data."""
    b = ctx.b
    data, indices, updates = ctx.inputs
    reduction = ctx.attr("reduction", "none")
    if reduction not in ("none", "add"):
        raise ctx.fail(f"reduction '{reduction}' is not supported (only none and add)")
    d_data = None
    if ctx.needs(0):
        d_data = dys[0] if reduction == "add" else b.op(
            "ScatterND", [dys[0], indices, b.zeros_like(updates)])
    d_updates = b.op("GatherND", [dys[0], indices]) if ctx.needs(2) else None
    return [d_data, None, d_updates]


@rule("GatherND")
def _gather_nd(ctx, dys):
    b = ctx.b
    if int(ctx.attr("batch_dims", 0)) != 0:
        raise ctx.fail("batch_dims other than 0 is not supported")
    x, indices = ctx.inputs
    return [b.op("ScatterND", [b.zeros_like(x), indices, dys[0]], reduction="add"), None]
