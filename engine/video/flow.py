"""Optical flow and temporal coherence for dreamed video (OpenCV's DIS flow, headless build).

Conventions. A flow field ``f`` from image A to image B is float32 H x W x 2 (dx, dy) with
``A(x) ≈ B(x + f(x))``; :func:`warp` samples an image along it (backward warping), so
``warp(B, f) ≈ A``. Flow is always estimated between consecutive *input* frames, never between
dreamed ones (the dream's patterns are not motion).

Temporal coherence (:func:`coherent_input`). Before frame t is dreamed it is blended with a
prediction P of its dreamed self made from frame t-1:

    x_t = (1 - blend) · I_t + blend · P

- with flow, P = I_t + mask · warp(D_{t-1}, w_b): the previous frame's dream *detail*
  D_{t-1} = dreamed_{t-1} − I_{t-1} carried along the backward flow w_b (frame t → t-1) and laid
  on the current frame, so the patterns move with the objects instead of boiling; ``mask`` is 0
  where frame t shows something frame t-1 did not (disocclusions, pixels entering the view), so
  no ghost of the old detail is smeared across moving edges;
- without flow, P = dreamed_{t-1}: DeepDreamVideo's plain blending (ghosts wherever things move).

Occlusion (:func:`consistency_mask`) is the forward–backward check of Sundaram et al. (2010) as
used by Ruder et al. (2016): a pixel x of frame t is trusted when the flow back to t-1 and the
flow forward from there return it near x,

    |w_b(x) + w_f(x + w_b(x))|² < 0.01 (|w_b(x)|² + |w_f(x + w_b(x))|²) + 0.5,

and x + w_b(x) lies inside frame t-1.

:func:`temporal_error` is the coherence measure used by the tests and benchmarks: the mean
absolute difference between consecutive output frames after warping the earlier one by the
*input's* flow, over the pixels the consistency check trusts.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Sequence

import numpy as np

from onnxdream.core.errors import DependencyError, OnnxDreamError

__all__ = [
    "DEFAULT_PRESET",
    "FlowEstimator",
    "PRESETS",
    "coherent_input",
    "consistency_mask",
    "import_cv2",
    "temporal_error",
    "warp",
]

#: DIS presets by name (OpenCV's ULTRAFAST / FAST / MEDIUM).
PRESETS = ("ultrafast", "fast", "medium")
#: The preset used unless told otherwise: on the synthetic clip its mean end-point error is
#: 0.15 px against 0.35 (fast) and 0.37 (ultrafast), and the faster ones miss a 6 px move
#: (-2.1/-2.3 px found); it costs ~25-45 ms for the two flows per frame at 320x180 on this
#: machine's 2 shared cores, nothing next to the dream (benchmarks/bench_video.py).
DEFAULT_PRESET = "medium"


def import_cv2():
    """The ``cv2`` module (OpenCV, headless); DependencyError naming the ``[video]`` extra."""
    try:
        import cv2
    except ImportError as exc:  # pragma: no cover - the [video] extra is missing
        raise DependencyError(
            "optical flow needs OpenCV: pip install 'onnxdream[video]'") from exc
    return cv2


def _gray(img: np.ndarray) -> np.ndarray:
    """H x W x 3 RGB (uint8, or float in [0,1]) → uint8 grey, as DIS wants."""
    cv2 = import_cv2()
    a = np.asarray(img)
    if a.dtype != np.uint8:
        a = (np.clip(a, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if a.ndim == 2:
        return np.ascontiguousarray(a)
    return cv2.cvtColor(np.ascontiguousarray(a), cv2.COLOR_RGB2GRAY)


class FlowEstimator:
    """Dense optical flow between two frames with OpenCV's DIS (Kroeger et al. 2016).

    ``est(a, b)`` → flow from a to b (H x W x 2 float32, ``a(x) ≈ b(x + flow(x))``). Frames are
    RGB (uint8 or float in [0,1]) or grey. One OpenCV object per thread (they are not
    thread-safe).
    """

    def __init__(self, preset: str = DEFAULT_PRESET):
        if preset not in PRESETS:
            raise OnnxDreamError(f"flow preset must be one of {', '.join(PRESETS)}, "
                                 f"got {preset!r}")
        self.preset = preset
        self._local = threading.local()

    def _dis(self):
        dis = getattr(self._local, "dis", None)
        if dis is None:
            cv2 = import_cv2()
            code = {"ultrafast": cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST,
                    "fast": cv2.DISOPTICAL_FLOW_PRESET_FAST,
                    "medium": cv2.DISOPTICAL_FLOW_PRESET_MEDIUM}[self.preset]
            dis = self._local.dis = cv2.DISOpticalFlow_create(code)
        return dis

    def __call__(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        ga, gb = _gray(a), _gray(b)
        if ga.shape != gb.shape:
            raise OnnxDreamError(f"flow needs frames of one size, got {ga.shape} and {gb.shape}")
        return self._dis().calc(ga, gb, None)

    def both(self, current: np.ndarray, previous: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(backward, forward): flow current → previous and previous → current."""
        gc, gp = _gray(current), _gray(previous)
        dis = self._dis()
        return dis.calc(gc, gp, None), dis.calc(gp, gc, None)


@functools.lru_cache(maxsize=4)
def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    gx, gy = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    gx.flags.writeable = gy.flags.writeable = False
    return gx, gy


def warp(img: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """``out(x) = img(x + flow(x))``: bilinear, edges replicated; float32 out (H x W [x C])."""
    cv2 = import_cv2()
    h, w = flow.shape[:2]
    if img.shape[:2] != (h, w):
        raise OnnxDreamError(f"cannot warp a {img.shape[:2]} image by a {(h, w)} flow")
    gx, gy = _grid(h, w)
    src = np.ascontiguousarray(img, dtype=np.float32)
    return cv2.remap(src, gx + flow[..., 0], gy + flow[..., 1], cv2.INTER_LINEAR,
                     borderMode=cv2.BORDER_REPLICATE)


def consistency_mask(backward: np.ndarray, forward: np.ndarray) -> np.ndarray:
    """1.0 where frame t's pixel is seen in frame t-1 (forward–backward consistent), else 0.0.

    ``backward`` is the flow t → t-1, ``forward`` the flow t-1 → t (H x W x 2 each).
    """
    h, w = backward.shape[:2]
    fwd_at = warp(forward, backward)  # w_f(x + w_b(x))
    bu, bv = backward[..., 0], backward[..., 1]
    fu, fv = fwd_at[..., 0], fwd_at[..., 1]
    su, sv = bu + fu, bv + fv
    err = su * su + sv * sv
    bound = 0.01 * (bu * bu + bv * bv + fu * fu + fv * fv) + 0.5
    gx, gy = _grid(h, w)
    tx, ty = gx + bu, gy + bv
    inside = (tx >= 0) & (tx <= w - 1) & (ty >= 0) & (ty <= h - 1)
    return ((err < bound) & inside).astype(np.float32)


def coherent_input(frame: np.ndarray, prev_frame: np.ndarray | None,
                   prev_dreamed: np.ndarray | None, blend: float, *,
                   flow: FlowEstimator | None = None,
                   flows: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """The image to dream for ``frame`` (float32 H x W x 3 in [0,1]) given the previous input
    frame and its dream (same size, float in [0,1]); see the module docstring.

    ``flow`` estimates the flows (None: plain blending); ``flows`` passes precomputed
    (backward, forward) ones instead. With no previous frame or ``blend == 0`` the frame itself.
    """
    if not 0.0 <= blend <= 1.0:
        raise OnnxDreamError(f"blend must be between 0 and 1, got {blend}")
    cur = np.asarray(frame, dtype=np.float32)
    if prev_frame is None or prev_dreamed is None or blend == 0.0:
        return cur.copy()
    prev_dreamed = np.asarray(prev_dreamed, dtype=np.float32)
    if flow is None and flows is None:
        out = (1.0 - blend) * cur + blend * prev_dreamed
    else:
        prev = np.asarray(prev_frame, dtype=np.float32)
        backward, forward = flows if flows is not None else flow.both(cur, prev)
        detail = warp(prev_dreamed - prev, backward)
        mask = consistency_mask(backward, forward)
        out = cur + (blend * mask)[..., None] * detail
    return np.clip(out, 0.0, 1.0, out=out)


def temporal_error(outputs: Sequence[np.ndarray], inputs: Sequence[np.ndarray],
                   flow: FlowEstimator | None = None) -> float:
    """Mean |out_t − warp(out_{t−1}, w_b)| over trusted pixels and t ≥ 1, on the [0,1] scale,
    where w_b is the *input*'s flow t → t−1 (lower: more coherent)."""
    if len(outputs) != len(inputs) or len(outputs) < 2:
        raise OnnxDreamError("temporal_error needs two or more outputs, one per input")
    flow = flow or FlowEstimator()

    def as_float(a):
        a = np.asarray(a)
        return a.astype(np.float32) / 255.0 if a.dtype == np.uint8 else a.astype(np.float32)

    total = weight = 0.0
    for t in range(1, len(outputs)):
        backward, forward = flow.both(inputs[t], inputs[t - 1])
        mask = consistency_mask(backward, forward)
        diff = np.abs(as_float(outputs[t]) - warp(as_float(outputs[t - 1]), backward))
        total += float((diff.mean(axis=2) * mask).sum())
        weight += float(mask.sum())
    return total / max(weight, 1.0)
