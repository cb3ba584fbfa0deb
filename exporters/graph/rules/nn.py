"""Gradient rules for convolutions and pooling."""

from __future__ import annotations

import numpy as np
import onnx

from onnxdream.exporters.graph.autodiff import RuleContext, rule


def _spatial(ctx: RuleContext, nd: int, name: str, default: int) -> list[int]:
    v = ctx.attr(name)
    return list(v) if v else [default] * nd


def _pads(ctx: RuleContext, x: str, nd: int, keff: list[int],
          strides: list[int]) -> tuple[list[int] | str, list[int] | str]:
    """(begin, end) spatial pads of a Conv or pool: int lists when static, else int64 [nd]
    tensors computed from x's runtime shape.

    ``auto_pad`` SAME_UPPER/SAME_LOWER pad so that out = ceil(in / stride): total =
    max(0, (out - 1) * stride + keff - in), the odd pixel at the end (UPPER) or the beginning
    (LOWER). At stride 1 that is keff - 1 whatever the size; otherwise it depends on in mod
    stride, so it is static only where the input's spatial shape is.
    """
    auto_pad = ctx.attr("auto_pad", "NOTSET")
    if auto_pad in ("NOTSET", ""):
        pads = _spatial(ctx, 2 * nd, "pads", 0)
        return pads[:nd], pads[nd:]
    if auto_pad == "VALID":
        return [0] * nd, [0] * nd
    if auto_pad not in ("SAME_UPPER", "SAME_LOWER"):
        raise ctx.fail(f"auto_pad={auto_pad} is not an ONNX padding mode")
    upper = auto_pad == "SAME_UPPER"
    shape = ctx.shape(x)
    sizes = list(shape[2:]) if shape is not None and len(shape) == nd + 2 else [None] * nd
    if all(s == 1 or isinstance(n, int) for s, n in zip(strides, sizes)):
        total = [ke - 1 if s == 1 else max(0, (-(-n // s) - 1) * s + ke - n)
                 for ke, s, n in zip(keff, strides, sizes)]
        small = [t // 2 for t in total]
        big = [t - h for t, h in zip(total, small)]
        return (small, big) if upper else (big, small)
    b = ctx.b
    i64 = b.ints
    n = b.op("Slice", [b.shape(x), i64([2]), i64([2 + nd]), i64([0])])
    out = b.op("Div", [b.op("Add", [n, i64([s - 1 for s in strides])]), i64(strides)])
    total = b.op("Max", [b.op("Sub", [b.op("Add", [b.mul(b.op("Sub", [out, i64([1] * nd)]),
                                                            i64(strides)), i64(keff)]), n]),
                         i64([0] * nd)])
    small = b.op("Div", [total, i64([2] * nd)])
    big = b.op("Sub", [total, small])
    return (small, big) if upper else (big, small)


def _crop_from(ctx: RuleContext, t: str, like: str, nd: int, begin: str) -> str:
    """Slice the spatial axes of t from ``begin`` (int64 [nd]) to the spatial size of ``like``."""
    b = ctx.b
    size = b.op("Slice", [b.shape(like), b.ints([2]), b.ints([2 + nd]), b.ints([0])])
    return b.slice(t, begin, b.op("Add", [begin, size]), list(range(2, 2 + nd)))


def _crop_to(ctx: RuleContext, t: str, like: str, nd: int) -> str:
    """Slice the spatial axes of t to the spatial size of ``like`` (starting at 0)."""
    b = ctx.b
    ends = b.op("Slice", [b.shape(like), b.ints([2]), b.ints([2 + nd]), b.ints([0])])
    return b.slice(t, [0] * nd, ends, list(range(2, 2 + nd)))


def _flipped_kernel(w: np.ndarray, group: int) -> np.ndarray:
    """Weights of the Conv that is the adjoint of a stride-1 Conv with weights w."""
    m, cg = w.shape[:2]
    mg = m // group
    wg = w.reshape(group, mg, cg, *w.shape[2:])
    wt = np.swapaxes(wg, 1, 2)  # group, C/g, M/g, k...
    wt = np.flip(wt, axis=tuple(range(3, wt.ndim)))
    return np.ascontiguousarray(wt.reshape(group * cg, mg, *w.shape[2:]))


@rule("Conv")
def _conv(ctx, dys):
    """dX: the transposed convolution of dY with the same weights, cropped to X."""
    b = ctx.b
    x, w = ctx.inputs[0], ctx.inputs[1]
    if ctx.needs(1) or ctx.needs(2):
        raise ctx.fail("its weights depend on the input image")
    wshape = ctx.shape(w)
    if wshape is None or any(not isinstance(d, int) for d in wshape):
        raise ctx.fail("its weight shape is not static")
    nd = len(wshape) - 2
    kernel = list(wshape[2:])
    strides = _spatial(ctx, nd, "strides", 1)
    dilations = _spatial(ctx, nd, "dilations", 1)
    group = int(ctx.attr("group", 1))
    keff = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    pb, pe = _pads(ctx, x, nd, keff, strides)
    g = dys[0]
    if isinstance(pb, str):
        # SAME padding at a runtime size (strided): the full transposed convolution, then the
        # window of X, which starts at the runtime begin pad
        full = b.op("ConvTranspose", [g, w], strides=strides, dilations=dilations, group=group,
                    pads=[0] * (2 * nd), output_padding=[s - 1 for s in strides])
        return [_crop_from(ctx, full, x, nd, pb), None, None]
    pads = pb + pe
    wv = ctx.const(1)
    if all(s == 1 for s in strides) and wv is not None and all(
            0 <= p <= ke - 1 for p, ke in zip(pads, keff + keff)):
        # Stride 1: the adjoint is itself a Conv with the flipped, transposed kernel, which
        # onnxruntime runs faster than ConvTranspose.
        wt = b.const(_flipped_kernel(wv, group), hint="conv_adjoint_w")
        adj_pads = [ke - 1 - p for ke, p in zip(keff + keff, pb + pe)]
        return [b.op("Conv", [g, wt], strides=strides, dilations=dilations, group=group,
                     pads=adj_pads), None, None]
    if all(s == 1 for s in strides):
        return [b.op("ConvTranspose", [g, w], strides=strides, dilations=dilations, group=group,
                     pads=pads), None, None]
    # Strided: the largest output_padding covers every input size; crop to X afterwards.
    full = b.op("ConvTranspose", [g, w], strides=strides, dilations=dilations, group=group,
                pads=pb + [0] * nd, output_padding=[s - 1 for s in strides])
    return [_crop_to(ctx, full, x, nd), None, None]


@rule("MaxPool")
def _maxpool(ctx, dys):
    """Scatter-add dY to the argmax positions that the forward MaxPool reports as Indices."""
    b = ctx.b
    if int(ctx.attr("storage_order", 0)) != 0:
        raise ctx.fail("MaxPool with storage_order=1 is not supported")
    x = ctx.inputs[0]
    indices = ctx.forward_output(1)
    numel = b.op("ReduceProd", [b.shape(x)], keepdims=1)
    zeros = b.op("ConstantOfShape", [numel],
                 value=onnx.numpy_helper.from_array(np.zeros(1, np.float32)))
    flat = b.ints([-1])
    out = b.op("ScatterElements", [zeros, b.op("Reshape", [indices, flat]),
                                   b.op("Reshape", [dys[0], flat])], axis=0, reduction="add")
    return [b.reshape_like(out, x)]


@rule("AveragePool")
def _avgpool(ctx, dys):
    """Divide dY by each window's divisor, then spread it over the window (a transposed conv)."""
    b = ctx.b
    x, y = ctx.inputs[0], ctx.outputs[0]
    nd = ctx.rank(x) - 2
    kernel = list(ctx.attr("kernel_shape"))
    strides = _spatial(ctx, nd, "strides", 1)
    if any(d != 1 for d in _spatial(ctx, nd, "dilations", 1)):
        raise ctx.fail("AveragePool with dilations is not supported")
    pb, pe = _pads(ctx, x, nd, kernel, strides)
    runtime = isinstance(pb, str)

    def pad_at(p, i: int) -> str:
        return b.op("Gather", [p, b.ints([i])], axis=0) if runtime else b.const(p[i], np.int64)

    include_pad = bool(ctx.attr("count_include_pad", 0))
    divisor = None
    for i in range(nd):
        n_out = b.op("Squeeze", [b.dim(y, 2 + i), b.ints([0])])
        size = b.dim(x, 2 + i)
        o = b.op("Range", [b.const(0, np.int64), n_out, b.const(1, np.int64)])
        start = b.op("Sub", [b.mul(o, b.const(strides[i], np.int64)), pad_at(pb, i)])
        end = b.op("Add", [start, b.const(kernel[i], np.int64)])
        if include_pad:
            cnt = b.op("Sub", [b.op("Min", [end, b.op("Add", [size, pad_at(pe, i)])]), start])
        else:
            cnt = b.op("Sub", [b.op("Min", [end, size]),
                               b.op("Max", [start, b.const(0, np.int64)])])
        cnt = b.cast(cnt, onnx.TensorProto.FLOAT)
        cnt = b.op("Reshape", [cnt, b.ints([-1] + [1] * (nd - 1 - i))])
        divisor = cnt if divisor is None else b.mul(divisor, cnt)
    g = b.op("Div", [dys[0], divisor])
    # one channel at a time: [N*C, 1, spatial...]
    g1 = b.op("Reshape", [g, b.concat([b.ints([-1, 1]), b.op(
        "Slice", [b.shape(y), b.ints([2]), b.ints([2 + nd]), b.ints([0])])])])
    ones = b.const(np.ones([1, 1] + kernel, np.float32), hint="avgpool_window")
    full = b.op("ConvTranspose", [g1, ones], strides=strides,
                pads=[0] * (2 * nd) if runtime else pb + [0] * nd,
                output_padding=[s - 1 for s in strides])
    dx = _crop_from(ctx, full, x, nd, pb) if runtime else _crop_to(ctx, full, x, nd)
    return [b.reshape_like(dx, x)]


@rule("ConvTranspose")
def _convtranspose(ctx, dys):
    """The adjoint of a transposed convolution is the convolution with the same weights."""
    b = ctx.b
    w = ctx.inputs[1]
    if ctx.needs(1) or ctx.needs(2):
        raise ctx.fail("its weights depend on the input image")
    if ctx.attr("output_shape"):
        raise ctx.fail("ConvTranspose with output_shape is not supported")
    wshape = ctx.shape(w)
    if wshape is None or any(not isinstance(d, int) for d in wshape):
        raise ctx.fail("its weight shape is not static")
    nd = len(wshape) - 2
    strides = _spatial(ctx, nd, "strides", 1)
    dilations = _spatial(ctx, nd, "dilations", 1)
    auto_pad = ctx.attr("auto_pad", "NOTSET")
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        # out = in * stride, so the total padding keff + output_padding - stride is static;
        # onnxruntime (and the ONNX spec's formula) put the odd pixel at the end for UPPER
        keff = [(k - 1) * d + 1 for k, d in zip(wshape[2:], dilations)]
        adj = _spatial(ctx, nd, "output_padding", 0)
        total = [ke + a - s for ke, a, s in zip(keff, adj, strides)]
        if any(t < 0 for t in total):
            raise ctx.fail(f"auto_pad={auto_pad} with a kernel smaller than its stride is not "
                           "supported")
        small = [t // 2 for t in total]
        big = [t - h for t, h in zip(total, small)]
        pads = small + big if auto_pad == "SAME_UPPER" else big + small
    elif auto_pad == "VALID":
        pads = [0] * (2 * nd)
    else:
        pads = _spatial(ctx, 2 * nd, "pads", 0)
    return [b.op("Conv", [dys[0], w], strides=strides, dilations=dilations,
                 group=int(ctx.attr("group", 1)), pads=pads), None, None]
