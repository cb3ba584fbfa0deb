"""Faster exact forms of two adjoints, emitted by the optimiser's ``maxpool`` and
``strided_conv`` passes (:mod:`.adjoints`; run by :mod:`onnxdream.exporters.graph.optimize`).

- **MaxPool backward without Indices.** onnxruntime computes MaxPool's ``Indices`` with a slow
  scalar kernel (~10x the plain MaxPool), and the rule's ScatterElements is slow too. A stride-1
  k_h x k_w max is the vertical max of horizontal maxima, and the first maximum in row-major
  window order (torch's and onnxruntime's tie-break) is the first such row, then the first such
  column in it; so dY goes back through two 1-D backwards, each a cascade of (k-1)
  compare-and-take steps (``Equal``/``Mul``/``Sub``) with Pad shifts, 2(k-1) steps instead of
  k_h*k_w (:func:`emit_separable_maxpool_backward`). :func:`emit_maxpool_backward` does any
  stride by phases (the optimiser uses it for stride 1 only: strided views and interleaving
  cost what they save).
- **A strided Conv's adjoint as phase Convs.** The rule's ConvTranspose (stride s,
  output_padding s-1) becomes stride-1 Convs producing every output phase, interleaved back: for
  a dense Conv one Conv + a DepthToSpace; for a depthwise Conv whose channels are a multiple of
  :data:`NCHWC_BLOCK`, one depthwise Conv per phase, stacked by Concat + Reshape
  (:func:`emit_phase_conv`).

Each emitter appends to a :class:`~onnxdream.exporters.graph.builder.GraphBuilder` and returns
False (having emitted nothing) when the node is not one it handles.
"""

from __future__ import annotations

import numpy as np
import onnx

from onnxdream.exporters.graph.builder import FLOAT, GraphBuilder, node_attr

#: Channel counts whose depthwise convolutions onnxruntime runs in its blocked NCHWc layout on
#: x86 (block size 16 with AVX-512, 8 with AVX2): a multiple of 16 suits both.
NCHWC_BLOCK = 16


def pool_geometry(mp: onnx.NodeProto):
    """(kernel, strides, pads[4]) of a 2-D MaxPool without dilation, else None.

    SAME padding is static at stride 1 (k - 1 in total, the odd pixel at the end for
    SAME_UPPER); strided SAME pads depend on the runtime size: None.
    """
    kernel = list(node_attr(mp, "kernel_shape", []))
    if len(kernel) != 2:
        return None
    strides = list(node_attr(mp, "strides", [1, 1]))
    dil = list(node_attr(mp, "dilations", [1, 1]))
    auto_pad = node_attr(mp, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if any(d != 1 for d in dil):
        return None
    if auto_pad in ("SAME_UPPER", "SAME_LOWER") and strides == [1, 1]:
        small = [(k - 1) // 2 for k in kernel]
        big = [k - 1 - h for k, h in zip(kernel, small)]
        return kernel, strides, small + big if auto_pad == "SAME_UPPER" else big + small
    if auto_pad not in ("NOTSET", "VALID", ""):
        return None
    pads = [0] * 4 if auto_pad == "VALID" else list(node_attr(mp, "pads", [0] * 4))
    return kernel, strides, pads


def emit_separable_maxpool_backward(b: GraphBuilder, mp: onnx.NodeProto, dy: str, out: str
                                    ) -> bool:
    """Stride-1 MaxPool backward as two 1-D backwards: rows of maxima, then the max of rows.

    A k_h x k_w max is the vertical k_h-max of the horizontal k_w-maxima ``h``, and the first
    maximum in row-major window order (onnxruntime's and torch's tie-break) is the first row whose
    ``h`` equals the output, then the first column of that row that equals ``h``. So dY goes
    back through the vertical 1-D backward (k_h taps on ``h``), then the horizontal one (k_w taps
    on X): 2 x (k-1) compare-and-take steps instead of k_h x k_w, and no Indices.
    """
    geo = pool_geometry(mp)
    if geo is None:
        return False
    kernel, strides, pads = geo
    if strides != [1, 1] or any(p >= k for p, k in zip(pads[:2] + pads[2:], kernel * 2)):
        return False
    (kh, kw), (ph0, pw0, ph1, pw1) = kernel, pads
    x, y = mp.input[0], mp.output[0]
    if kh > 1 and kw > 1:
        h = b.op("MaxPool", [x], hint="pool_rows", kernel_shape=[1, kw], pads=[0, pw0, 0, pw1],
                 strides=[1, 1])
        dh = emit_pool1d_backward(b, h, y, dy, 2, kh, ph0, ph1)
        emit_pool1d_backward(b, x, h, dh, 3, kw, pw0, pw1, out)
    elif kh > 1:
        emit_pool1d_backward(b, x, y, dy, 2, kh, ph0, ph1, out)
    else:
        emit_pool1d_backward(b, x, y, dy, 3, kw, pw0, pw1, out)
    return True


def emit_pool1d_backward(b: GraphBuilder, x: str, y: str, dy: str, axis: int, k: int, pb: int,
                         pe: int, out: str | None = None) -> str:
    """dX of y = max over k taps of x along ``axis`` (stride 1, pads pb/pe), first maximum wins.

    Window q covers x[q - pb + a], a < k. Tap a's view of x is one Pad (negative pads crop, the
    rest is -inf); dY moves to the first tap equal to y (``rest`` keeps what is not yet taken:
    exactly dY or 0); tap a's share goes back to x by the opposite Pad; the shares are summed.
    """
    def pads(begin: int, end: int) -> str:
        v = [0] * 8
        v[axis], v[4 + axis] = begin, end
        return b.ints(v)

    ninf = b.const(-np.inf, hint="neg_inf")
    rest, takes = dy, []
    for a in range(k - 1):
        vb, ve = pb - a, pe - k + 1 + a
        view = x if vb == ve == 0 else b.op("Pad", [x, pads(vb, ve), ninf], hint="pool_view")
        hit = b.op("Cast", [b.op("Equal", [view, y])], to=FLOAT, hint="pool_hit")
        take = b.op("Mul", [rest, hit], hint="pool_take")
        rest = b.op("Sub", [rest, take], hint="pool_rest")  # exact: rest or 0
        takes.append(take)
    takes.append(rest)
    placed = []
    for a, t in enumerate(takes):
        begin, end = a - pb, k - 1 - pe - a
        placed.append(t if begin == end == 0 else
                      b.op("Pad", [t, pads(begin, end)], hint="pool_placed"))
    if len(placed) == 1:
        return b.op("Identity", placed, out=out, hint="pool_dx")
    return b.op("Sum", placed, out=out, hint="pool_dx")


def emit_maxpool_backward(b: GraphBuilder, mp: onnx.NodeProto, dy: str, out: str,
                          max_stride: int = 1) -> bool:
    """MaxPool backward (any stride up to ``max_stride``) by phases, without Indices."""
    geo = pool_geometry(mp)
    if geo is None:
        return False
    kernel, strides, pads = geo
    s = strides[0]
    if strides[1] != s or any(k < s for k in kernel):
        return False  # DepthToSpace needs one block size; every phase needs a tap
    if s > max_stride:
        return False
    ceil = int(node_attr(mp, "ceil_mode", 0))
    x, y = mp.input[0], mp.output[0]
    pb, pe = pads[:2], pads[2:]
    ninf = b.const(-np.inf, hint="neg_inf")
    extra = s - 1 if ceil else 0
    xp = b.op("Pad", [x, b.ints([0, 0, pb[0], pb[1], 0, 0, pe[0] + extra, pe[1] + extra]), ninf],
              hint="pool_in_padded")
    # the window at output i starts at i*s (padded coordinates): views end at (Ho-1)*s + 1 + a
    y_hw = b.op("Slice", [b.op("Shape", [y]), b.ints([2]), b.ints([4])], hint="pool_hw")
    base = b.op("Add", [b.op("Mul", [b.op("Sub", [y_hw, b.ints([1])]), b.ints([s, s])]),
                        b.ints([1])], hint="pool_ext")
    axes, steps = b.ints([2, 3]), b.ints([s, s])
    rest = dy
    taps = [(a, c) for a in range(kernel[0]) for c in range(kernel[1])]
    t = [-(-k // s) for k in kernel]  # taps per phase
    e = 1 if s > 1 else 0  # one more row/column per phase so the DepthToSpace output covers X
    phases: dict[tuple[int, int], list[str]] = {}
    for k, (a, c) in enumerate(taps):
        view = b.op("Slice", [xp, b.ints([a, c]), b.op("Add", [base, b.ints([a, c])]), axes,
                              steps], hint="pool_view")
        hit = b.op("Cast", [b.op("Equal", [view, y])], to=FLOAT, hint="pool_hit")
        take = b.op("Mul", [rest, hit], hint="pool_take")
        if k < len(taps) - 1:
            rest = b.op("Sub", [rest, take], hint="pool_rest")  # exact: rest or 0
        qa, qb = a // s, c // s
        placed = b.op("Pad", [take, b.ints([0, 0, qa, qb, 0, 0, t[0] - 1 - qa + e,
                                             t[1] - 1 - qb + e])], hint="pool_placed")
        phases.setdefault((a % s, c % s), []).append(placed)
    sums = []
    for ra in range(s):
        for rb in range(s):
            parts = phases[(ra, rb)]
            sums.append(parts[0] if len(parts) == 1 else b.op("Sum", parts, hint="pool_phase"))
    full = sums[0] if s == 1 else b.op("DepthToSpace", [b.op("Concat", sums, axis=1)],
                                       blocksize=s, mode="DCR", hint="pool_full")
    starts = b.ints(pb)
    x_hw = b.op("Slice", [b.op("Shape", [x]), b.ints([2]), b.ints([4])], hint="pool_x_hw")
    b.op("Slice", [full, starts, b.op("Add", [x_hw, starts]), axes], out=out)
    return True


def emit_phase_conv(b: GraphBuilder, ct: onnx.NodeProto, w: np.ndarray | None) -> bool:
    """ConvTranspose(dY, W; stride s, pads (pb, 0), output_padding s-1) as phase Convs, W its
    constant weights (None: not constant, nothing done)."""
    if w is None or w.ndim != 4 or (len(ct.input) > 2 and ct.input[2]):
        return False
    nd = 2
    strides = list(node_attr(ct, "strides", [1] * nd))
    s = strides[0]
    if s < 2 or strides[1] != s or any(d != 1 for d in node_attr(ct, "dilations", [1] * nd)):
        return False
    if node_attr(ct, "output_shape") or \
            node_attr(ct, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        return False
    pads = list(node_attr(ct, "pads", [0] * 4))
    if pads[2:] != [0, 0] or list(node_attr(ct, "output_padding", [0, 0])) != [s - 1, s - 1]:
        return False
    group = int(node_attr(ct, "group", 1))
    m, cg = w.shape[:2]
    depthwise = group > 1 and group == m and cg == 1
    if group != 1 and not (depthwise and m % NCHWC_BLOCK == 0):
        return False  # other grouped ones: the phase Conv would be slow
    # ConvTranspose weights: [C_in (=dY channels), C_out/group, kh, kw]
    kh, kw = w.shape[2:]
    th, tw = -(-kh // s), -(-kw // s)
    c_out = cg * group
    mg = m // group
    blocks = []
    for ra in range(s):
        for rb in range(s):
            sub = np.zeros((m, cg, th, tw), w.dtype)
            taps_h = list(range(ra, kh, s))
            taps_w = list(range(rb, kw, s))
            sub[:, :, :len(taps_h), :len(taps_w)] = w[:, :, ra::s, rb::s]
            # out[a] = sum_t dY[a - t] sub[t]: a Conv with the kernel flipped, grouped like W
            wg = sub.reshape(group, mg, cg, th, tw).transpose(0, 2, 1, 3, 4)[..., ::-1, ::-1]
            blocks.append(wg.reshape(c_out, mg, th, tw))
    eh, ew = -(-(kh - 1) // s), -(-(kw - 1) // s)
    conv_pads = [th - 1, tw - 1, eh, ew]
    if depthwise:
        full = interleave_phases(b, [b.op(
            "Conv", [ct.input[0], b.initializer(np.ascontiguousarray(blk), hint="phase_w")],
            group=group, kernel_shape=[th, tw], pads=conv_pads, hint="phase_conv")
            for blk in blocks], s)
    else:
        # output channel c*s*s + phase: groups stay contiguous, DepthToSpace CRD interleaves
        wc = np.stack(blocks, axis=1).reshape(c_out * s * s, mg, th, tw)
        phased = b.op("Conv", [ct.input[0], b.initializer(np.ascontiguousarray(wc),
                                                           hint="phase_w")],
                      group=group, kernel_shape=[th, tw], pads=conv_pads, hint="phase_conv")
        full = b.op("DepthToSpace", [phased], blocksize=s, mode="CRD", hint="phase_full")
    dy_hw = b.op("Slice", [b.op("Shape", [ct.input[0]]), b.ints([2]), b.ints([4])])
    ends = b.op("Add", [b.op("Mul", [dy_hw, b.ints([s, s])]), b.ints([kh - 1, kw - 1])])
    b.op("Slice", [full, b.ints(pads[:2]), ends, b.ints([2, 3])], out=ct.output[0])
    return True


def interleave_phases(b: GraphBuilder, phases: list[str], s: int) -> str:
    """[P(0,0), P(0,1), ..., P(s-1,s-1)] (N,C,h,w) -> X (N,C,h*s,w*s),
    X[s*i+a, s*j+b] = P(a,b)[i,j].

    Stacked on new axes and reshaped, which onnxruntime copies in contiguous runs: much faster
    than DepthToSpace on big tensors (0.8 ms vs 8 ms for 4M floats on 2 cores).
    """
    rows = []
    for a in range(s):
        cols = [b.op("Unsqueeze", [p, b.ints([4])]) for p in phases[a * s:(a + 1) * s]]
        rows.append(b.op("Unsqueeze", [b.op("Concat", cols, axis=4), b.ints([3])]))
    stacked = b.op("Concat", rows, axis=3, hint="phase_rows")  # (N, C, h, s, w, s)
    shape = b.op("Shape", [phases[0]])
    hw = b.op("Mul", [b.op("Slice", [shape, b.ints([2]), b.ints([4])]), b.ints([s, s])])
    target = b.op("Concat", [b.op("Slice", [shape, b.ints([0]), b.ints([2])]), hw], axis=0)
    return b.op("Reshape", [stacked, target], hint="phase_full")
