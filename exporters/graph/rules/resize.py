"""The gradient rule for Resize: per-axis interpolation matrices read off the forward op itself.

Resize (nearest, linear, cubic; any coordinate transformation except tf_crop_and_resize; with
or without antialias) is linear in X and separable: along each resized axis a, Y = A_a X with
a matrix A_a [out, in] that depends only on the sizes, the scale and the attributes. The
adjoint applies A_aᵀ along each axis. Rather than re-deriving onnxruntime's coordinates, the
rule asks the same Resize for A_a at run time: it resizes the identity matrix eye(in), laid out
with the basis index on a non-resized axis and the basis vectors on axis a (scale 1 elsewhere),
which returns A_aᵀ exactly, nearest rounding and border clamping included. So the gradient is
the exact adjoint of the forward onnxruntime computes, for every size, with runtime ``scales``
or ``sizes``; it costs one small Resize (in × out values) and one MatMul per resized axis,
with as many multiply-adds per element of dY as X has along that axis (64 px: about what a
64-channel 1x1 Conv costs there; a 3x3 Conv on 256 channels costs 36x more).

Nearest upsampling by a constant integer factor k that maps output j to input j // k (torch's
``nearest``, half-pixel rounding) needs no matrix: its adjoint sums dY over blocks of k.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from onnxdream.exporters.graph.autodiff import RuleContext, rule


def _resized_axes(ctx: RuleContext, axes: list[int]) -> list[tuple[int, int]]:
    """(position in scales/sizes, axis) of each axis whose mapping may not be the identity."""
    x, y = ctx.inputs[0], ctx.outputs[0]
    scales = ctx.const(2) if ctx.input(2) else None
    sx, sy = ctx.shape(x), ctx.shape(y)
    out = []
    for p, a in enumerate(axes):
        if scales is not None and scales.size == len(axes) and float(scales.reshape(-1)[p]) == 1.0:
            continue  # scale 1: out = in and every mode maps j to j
        if ctx.input(3) and sx is not None and sy is not None and sx[a] is not None and \
                sx[a] == sy[a]:
            continue  # sizes: out = in gives scale 1
        out.append((p, a))
    return out


def _block_factor(ctx: RuleContext, p: int) -> int | None:
    """k when axis p is a nearest upsampling by a constant integer k that maps output j to
    input j // k; the adjoint then sums blocks of k (a Reshape and a ReduceSum)."""
    scales = ctx.const(2) if ctx.input(2) else None
    if ctx.attr("mode", "nearest") != "nearest" or scales is None or ctx.attr("antialias", 0):
        return None
    k = float(scales.reshape(-1)[p])
    if k != int(k) or k < 2:
        return None
    k = int(k)
    ctm = ctx.attr("coordinate_transformation_mode", "half_pixel")
    rounding = ctx.attr("nearest_mode", "round_prefer_floor")
    if ctm == "asymmetric":  # j / k
        ok = rounding == "floor" or (rounding == "round_prefer_floor" and k == 2)
    elif ctm in ("half_pixel", "pytorch_half_pixel", "half_pixel_symmetric"):
        # (j + 0.5) / k - 0.5 lies strictly within 0.5 of j // k; out = k * in, so the
        # symmetric offset is 0 and out > 1
        ok = rounding in ("round_prefer_floor", "round_prefer_ceil")
    else:
        ok = False
    return k if ok else None


def _sum_blocks(ctx: RuleContext, g: str, axis: int, k: int, rank: int) -> str:
    b = ctx.b
    shape = b.shape(g)
    parts = [b.op("Slice", [shape, b.ints([0]), b.ints([axis]), b.ints([0])])] if axis else []
    parts.append(b.ints([-1, k]))
    if axis + 1 < rank:
        parts.append(b.op("Slice", [shape, b.ints([axis + 1]), b.ints([rank]), b.ints([0])]))
    return b.reduce_sum(b.op("Reshape", [g, b.concat(parts)]), [axis + 1], keepdims=0)


@rule("Resize")
def _resize(ctx, dys):
    b = ctx.b
    x = ctx.inputs[0]
    rank = ctx.rank(x)
    ctm = ctx.attr("coordinate_transformation_mode", "half_pixel")
    if ctm == "tf_crop_and_resize":
        raise ctx.fail("Resize with coordinate_transformation_mode=tf_crop_and_resize has no "
                       "gradient rule")
    if any(ctx.needs(i) for i in (1, 2, 3)):
        raise ctx.fail("its roi, scales or sizes depend on the image values")
    scales, sizes = ctx.input(2), ctx.input(3)
    if sizes and ctx.attr("keep_aspect_ratio_policy", "stretch") != "stretch":
        raise ctx.fail("Resize with sizes and keep_aspect_ratio_policy="
                       f"{ctx.attr('keep_aspect_ratio_policy')} has no gradient rule")
    if not scales and not sizes:
        raise ctx.fail("Resize without scales or sizes")
    axes = ctx.attr("axes")
    axes = [int(a) % rank for a in axes] if axes else list(range(rank))
    attrs = {a.name: helper.get_attribute_value(a) for a in ctx.node.attribute}
    g = dys[0]
    # one axis at a time (the adjoints along different axes commute), the last axis first
    for p, a in reversed(_resized_axes(ctx, axes)):
        k = _block_factor(ctx, p)
        if k is not None:
            g = _sum_blocks(ctx, g, a, k, rank)
            continue
        basis = 0 if a != 0 else 1
        n = b.dim(x, a)
        idx = b.op("Range", [b.const(0, np.int64), b.op("Squeeze", [n, b.ints([0])]),
                             b.const(1, np.int64)])
        eye = b.cast(b.op("Equal", [b.unsqueeze(idx, [1]), b.unsqueeze(idx, [0])]),
                     onnx.TensorProto.FLOAT)
        on_probe = np.zeros(rank, bool)
        on_probe[[a, basis]] = True
        probe_shape = b.where(b.const(on_probe, bool), n, b.ints([1] * rank))
        probe = b.op("Reshape", [eye, probe_shape])  # eye is symmetric: the order is moot
        at_p = np.zeros(len(axes), bool)
        at_p[p] = True
        if scales:
            ins = [probe, "", b.where(b.const(at_p, bool), scales,
                                      b.const(np.ones(len(axes), np.float32)))]
        else:
            others = b.ints([1] * len(axes))
            if basis in axes:
                at_basis = np.zeros(len(axes), bool)
                at_basis[axes.index(basis)] = True
                others = b.where(b.const(at_basis, bool), n, others)
            ins = [probe, "", "", b.where(b.const(at_p, bool), sizes, others)]
        resp = b.op("Resize", ins, **attrs)  # [.., n at basis, out at a, ..]: A or Aᵀ
        # a matrix [in, out] = Aᵀ (basis before a) or [out, in] = A (a == 0, basis 1)
        mat = b.op("Reshape", [resp, b.concat([n, b.ints([-1])]) if basis < a
                               else b.concat([b.ints([-1]), n])])
        a_t = mat if basis < a else b.op("Transpose", [mat], perm=[1, 0])  # [in, out]
        if a == rank - 2:
            g = b.op("MatMul", [a_t, g])
        else:
            a_m = b.op("Transpose", [a_t], perm=[1, 0])  # [out, in]
            if a == rank - 1:
                g = b.op("MatMul", [g, a_m])
            else:
                perm = list(range(rank))
                perm[a], perm[-1] = perm[-1], perm[a]
                g = b.op("Transpose", [b.op("MatMul", [b.op("Transpose", [g], perm=perm), a_m])],
                         perm=perm)
    return [g, None, None, None][:len(ctx.inputs)]
