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


@rule("Pad")
def _pad(ctx, dys):
    b = ctx.b
    if ctx.attr("mode", "constant") != "constant":
        raise ctx.fail(f"Pad mode '{ctx.attr('mode')}' is not supported (only constant)")
    x, y = ctx.inputs[0], ctx.outputs[0]
    rank = ctx.rank(x)
    pads = ctx.inputs[1]
    av = ctx.const(3)
    if ctx.input(3) and av is None:
        raise ctx.fail("its axes are not constant")
    axes = list(range(rank)) if av is None else [int(a) % rank for a in av.reshape(-1)]
    n = len(axes)
    begin = b.op("Slice", [pads, b.ints([0]), b.ints([n]), b.ints([0])])
    end_pad = b.op("Slice", [pads, b.ints([n]), b.ints([2 * n]), b.ints([0])])
    ends = b.op("Sub", [b.op("Gather", [b.shape(y), b.ints(axes)], axis=0), end_pad])
    return [b.slice(dys[0], begin, ends, axes)] + [None] * (len(ctx.inputs) - 1)


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
    out = b.op("ScatterND", [zeros, b.unsqueeze(idx, [-1] if q else [0]), g], reduction="add")
    if moved:
        out = b.op("Transpose", [out], perm=[int(i) for i in np.argsort(to_front)])
    return [out, None]
