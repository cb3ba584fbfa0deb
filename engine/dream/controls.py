"""Creative controls: guided dreams, region masks, original colours, dreams from noise.

A dream's settings (:class:`~onnxdream.settings.options.DreamSettings`) name the controls: ``guide``
(an image whose features the dream moves toward), ``mask`` (where to dream: white dreams, black
keeps the photo, grey dreams partly), ``mask_layers`` (which layer dreams where), ``feather``,
``keep_colors`` (the dream changes luminance only), ``init`` and ``size`` (a dream from noise or
grey instead of a photo) and ``seamless`` (a tileable texture). The ascent does the last three
itself (``keep_colors``, ``seamless``; :func:`init_image` makes the start). The pictures the
others read become *objective parameters* (see :mod:`onnxdream.exporters.graph.contract`):

- the guide's features at each guide term's layer → ``guide.<t>`` ([M, C]; :func:`guide_params`);
- the layer masks → the gradient graph's region ``mask`` ([1, T, H, W]): term t's positions
  count in proportion to its mask, resized in the graph to its layer;
- the mask → the step's ``step_mask`` ([1, 1, H, W]): every ascent step, at every octave, is
  multiplied by it (CPU loop, tiles and the CUDA step graph alike), and the photo's pixels
  where it is 0 stay exactly as they were.

:class:`Controls` holds the decoded pictures with the SHA-256 of each file's bytes (for the
provenance): ``Controls.load(settings)`` reads the files the settings name (CLI, Python),
``Controls.from_bytes`` takes uploads (the server); :meth:`Controls.params` turns them into the
parameters of one dream::

    settings = DreamSettings(guide="flowers.jpg", mask="mask.png", keep_colors=True).with_seed()
    gm = GradientModel.from_settings(settings)
    controls = Controls.load(settings)
    out = dream(gm, rgb, settings, params=controls.params(gm, settings, rgb.shape[:2]))

Guide features: the guide image is resized to the model's native area (its aspect kept; a
fixed-size model gets exactly its size), as the notebook fed its guide at the network's size,
and read at each guide layer by the forward-only graph of
:func:`~onnxdream.exporters.graph.compiler.compile_features`. More than
:data:`MAX_GUIDE_VECTORS` positions are subsampled evenly in raster order (a regular grid).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from onnxdream.core.errors import ImageError, ObjectiveError, OnnxDreamError, SettingsError
from onnxdream.exporters.graph.contract import GUIDE_PREFIX, MASK, STEP_MASK
from onnxdream.settings.choices import INITS, parse_size

__all__ = ["INITS", "MAX_GUIDE_VECTORS", "Controls", "feather", "fit_mask", "guide_params",
           "init_image", "keep_colors", "parse_size"]

#: Starts of a dream without a photo (``init``).
#: Guide feature vectors kept per layer (the MatMul against them is [positions x M]).
MAX_GUIDE_VECTORS = 4096
#: A mask whose aspect ratio differs from the image's by more than this is refused, not resized.
ASPECT_TOLERANCE = 0.02

Note = Callable[[str], None]

# ITU-R BT.601 luma (JPEG's YCbCr)
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)


# ---------------------------------------------------------------------------------------------
# the pictures


def _read(path: str, what: str) -> bytes:
    p = Path(path)
    if not p.exists():
        raise SettingsError(what, f"file {path} does not exist")
    if p.is_dir():
        raise SettingsError(what, f"{path} is a directory, not an image file")
    try:
        return p.read_bytes()
    except OSError as exc:
        raise SettingsError(what, f"file {path} cannot be read ({exc.strerror or exc})") from None


def _decode(data: bytes, what: str, name: str, max_pixels: int | None) -> np.ndarray:
    from onnxdream.media.imageio import DEFAULT_MAX_PIXELS, load_image_bytes

    try:
        return load_image_bytes(data, name=name, max_pixels=max_pixels or DEFAULT_MAX_PIXELS).rgb
    except ImageError as exc:
        raise type(exc)(str(exc), field=what) if type(exc) is ImageError else exc from None


def _gray(rgb: np.ndarray) -> np.ndarray:
    """A mask from an image: its luma, in [0, 1] (white dreams, black keeps)."""
    return np.clip(rgb @ _LUMA, 0.0, 1.0).astype(np.float32)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True, eq=False)
class Controls:
    """The decoded pictures of a dream's controls, and the SHA-256 of each file's bytes.

    ``guide``: float32 HxWx3 in [0, 1]; ``mask`` and each of ``mask_layers``: float32 HxW in
    [0, 1]; ``hashes``: ``{"guide": hex, "mask": hex, "mask_layers": "hex,hex"}`` for those
    given (what the provenance records).
    """

    guide: np.ndarray | None = None
    mask: np.ndarray | None = None
    mask_layers: tuple[np.ndarray, ...] = ()
    hashes: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_bytes(cls, guide: bytes | None = None, mask: bytes | None = None,
                   mask_layers: Sequence[bytes] = (), *, max_pixels: int | None = None
                   ) -> Controls:
        """From the files' bytes (uploads); ImageError naming the field when one is not an
        image."""
        hashes: dict[str, str] = {}
        g = m = None
        if guide is not None:
            g = _decode(guide, "guide", "the guide image", max_pixels)
            hashes["guide"] = _sha256(guide)
        if mask is not None:
            m = _gray(_decode(mask, "mask", "the mask", max_pixels))
            hashes["mask"] = _sha256(mask)
        layers = tuple(_gray(_decode(d, "mask_layers", f"layer mask {i + 1}", max_pixels))
                       for i, d in enumerate(mask_layers))
        if mask_layers:
            hashes["mask_layers"] = ",".join(_sha256(d) for d in mask_layers)
        return cls(g, m, layers, hashes)

    @classmethod
    def load(cls, settings: Any, *, max_pixels: int | None = None) -> Controls:
        """The pictures the ``settings`` (a DreamSettings) name by path: guide, mask,
        mask_layers. SettingsError/ImageError naming the field for a missing or bad file."""
        hashes: dict[str, str] = {}
        g = m = None
        if settings.guide:
            data = _read(settings.guide, "guide")
            g = _decode(data, "guide", f"the guide image {settings.guide}", max_pixels)
            hashes["guide"] = _sha256(data)
        if settings.mask:
            data = _read(settings.mask, "mask")
            m = _gray(_decode(data, "mask", f"the mask {settings.mask}", max_pixels))
            hashes["mask"] = _sha256(data)
        layers, digests = [], []
        for path in settings.mask_layers:
            data = _read(path, "mask_layers")
            layers.append(_gray(_decode(data, "mask_layers", f"the layer mask {path}",
                                        max_pixels)))
            digests.append(_sha256(data))
        if digests:
            hashes["mask_layers"] = ",".join(digests)
        return cls(g, m, tuple(layers), hashes)

    def params(self, gm: Any, settings: Any, size: tuple[int, int],
               note: Note | None = None, base: dict[str, np.ndarray] | None = None
               ) -> dict[str, np.ndarray]:
        """The objective parameters of one dream of an image of ``size`` (h, w) with ``gm`` (a
        GradientModel): ``base`` (default ``gm.params``) plus the guide's features, the layer
        masks (``mask``) and the feathered mask (``step_mask``), at the image's resolution.
        A mask of another size is resized (``note`` says so) when its aspect ratio is the
        image's, else refused (SettingsError)."""
        h, w = (int(v) for v in size)
        params = dict(gm.params if base is None else base)
        if gm.required and self.guide is None:
            raise SettingsError("guide", "is needed: the objective guide dreams toward an image")
        if self.guide is not None:
            if not gm.required:
                raise ObjectiveError(f"this model dreams {gm.objective.describe()}, not a guide "
                                     "(build it with objective 'guide')")
            params.update(guide_params(gm, self.guide))
        if self.mask is not None:
            m = feather(fit_mask(self.mask, (h, w), "mask", note), settings.feather)
            params[STEP_MASK] = m[None, None]
        if self.mask_layers:
            params[MASK] = self._layer_masks(gm, (h, w), note)
        return params

    def _layer_masks(self, gm: Any, size: tuple[int, int], note: Note | None) -> np.ndarray:
        terms = len(gm.objective.terms)
        if MASK not in gm.session.parameter_names:
            raise SettingsError("mask_layers", "apply to layers with spatial positions (feature "
                                "maps) and objectives that average them; "
                                f"{gm.objective.describe()} has none")
        masks = [fit_mask(m, size, "mask_layers", note) for m in self.mask_layers]
        if len(masks) == 1 and terms == 2:
            masks.append(1.0 - masks[0])  # one mask, two layers: white the first, black the second
        if len(masks) != terms:
            raise SettingsError("mask_layers", f"needs one mask per layer ({terms} layer"
                                f"{'s' if terms != 1 else ''}, {len(self.mask_layers)} "
                                "mask(s)), or one mask for two layers (white: the first, black: "
                                "the second)")
        return np.stack(masks)[None].astype(np.float32)


# ---------------------------------------------------------------------------------------------
# guide features


def guide_params(gm: Any, rgb: np.ndarray) -> dict[str, np.ndarray]:
    """``{"guide.<t>": [M, C]}`` for every guide term of ``gm``'s objective: the guide image's
    (float32 HxWx3 in [0, 1]) features at the term's layer, M <= :data:`MAX_GUIDE_VECTORS`."""
    from onnxdream.media.imageio import resize

    nh, nw = gm.info.native_size
    h, w = rgb.shape[:2]
    if gm.info.dynamic_hw:  # the native area, the guide's own aspect ratio
        scale = np.sqrt(nh * nw / (h * w))
        nh, nw = max(16, round(h * scale)), max(16, round(w * scale))
    x = resize(rgb, (nh, nw)).transpose(2, 0, 1)[None]
    try:
        feats = gm.features(np.ascontiguousarray(np.clip(x, 0.0, 1.0), dtype=np.float32))
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types
        from onnxdream.core.errors import first_line

        raise OnnxDreamError(f"the guide's features cannot be computed at {nw}x{nh} pixels: "
                             f"{first_line(exc, 160)}") from None
    layers = gm.objective.layers
    out = {}
    for k, t in enumerate(gm.objective.terms):
        if t.kind == "guide":
            f = feats[layers.index(t.layer)]
            out[f"{GUIDE_PREFIX}{k}"] = _vectors(f, gm.info.layout(t.layer))
    return out


def _vectors(f: np.ndarray, layout: str) -> np.ndarray:
    """One image's activations → its feature vectors [M, C], at most MAX_GUIDE_VECTORS."""
    f = f[0]
    if f.ndim == 3:  # a feature map
        v = f.reshape(-1, f.shape[-1]) if layout == "NHWC" else f.reshape(f.shape[0], -1).T
    elif f.ndim == 2:  # tokens [L, C]
        v = f
    else:
        v = f.reshape(1, -1)
    if len(v) > MAX_GUIDE_VECTORS:
        v = v[np.linspace(0, len(v) - 1, MAX_GUIDE_VECTORS).round().astype(np.int64)]
    return np.ascontiguousarray(v, dtype=np.float32)


# ---------------------------------------------------------------------------------------------
# masks


def fit_mask(mask: np.ndarray, size: tuple[int, int], what: str = "mask",
             note: Note | None = None) -> np.ndarray:
    """``mask`` (HxW) at ``size`` (h, w): as it is, or resized (bilinear) with a ``note`` when
    only its size differs; SettingsError(``what``) when its aspect ratio differs by more than
    :data:`ASPECT_TOLERANCE`."""
    from onnxdream.media.imageio import resize

    h, w = size
    mh, mw = mask.shape
    if (mh, mw) == (h, w):
        return mask.astype(np.float32, copy=False)
    if abs((mw / mh) / (w / h) - 1.0) > ASPECT_TOLERANCE:
        raise SettingsError(what, f"is {mw}x{mh} pixels, another shape than the image's "
                                  f"{w}x{h}: make it the image's size")
    if note is not None:
        note(f"the {what.replace('_', ' ')} is {mw}x{mh} pixels: resized to the image's {w}x{h}")
    return np.clip(resize(mask, (h, w), resample="bilinear"), 0.0, 1.0)


def _box_blur(a: np.ndarray, r: int, axis: int) -> np.ndarray:
    pad = [(0, 0)] * a.ndim
    pad[axis] = (r + 1, r)
    c = np.cumsum(np.pad(a, pad, mode="edge"), axis=axis, dtype=np.float64)
    n = a.shape[axis]
    hi = np.take(c, np.arange(2 * r + 1, 2 * r + 1 + n), axis=axis)
    lo = np.take(c, np.arange(0, n), axis=axis)
    return ((hi - lo) / (2 * r + 1)).astype(np.float32)


def feather(mask: np.ndarray, radius: int) -> np.ndarray:
    """Soften the mask's edges *inward*: within ``radius`` pixels of a black (0) region the
    mask ramps smoothly from 0 up to its value, so the dream fades out before the kept region
    and black stays exactly black (greys elsewhere are kept). ``radius`` 0: as it is."""
    if radius <= 0 or not (mask <= 0).any():
        return mask.astype(np.float32, copy=False)
    support = (mask > 0).astype(np.float32)
    blurred = support
    r = max(1, int(round(radius / np.sqrt(3))))  # three boxes of this radius ≈ a Gaussian
    for _ in range(3):
        blurred = _box_blur(_box_blur(blurred, r, 0), r, 1)
    ramp = np.clip(2.0 * blurred - 1.0, 0.0, 1.0)
    ramp = ramp * ramp * (3.0 - 2.0 * ramp)  # smoothstep
    return (mask * ramp * support).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# colours and starts


def keep_colors(dreamed: np.ndarray, photo: np.ndarray) -> np.ndarray:
    """The dream's luminance with the photo's chroma ([3, H, W] float32 in [0, 1] both).

    In YCbCr (BT.601): keeping Cb and Cr is keeping R-Y, G-Y and B-Y, so the result is
    ``Y' + (photo - Y_photo)`` per channel, with the dream's luma Y' clamped to the range where
    all three channels stay in [0, 1] (it holds the photo's own luma, so it is never empty):
    the chroma is the photo's exactly, no channel is clipped (see benchmarks/keep_colors.py for
    the comparison with Lab, which changes the chroma where it clips).
    """
    luma = _LUMA.reshape(3, 1, 1)
    offset = photo - (photo * luma).sum(0, keepdims=True)  # R-Y, G-Y, B-Y of the photo
    y = (dreamed * luma).sum(0)
    y = np.clip(y, (-offset).max(0), (1.0 - offset).min(0))
    return (y[None] + offset).astype(np.float32)


def init_image(kind: str, size: tuple[int, int], seed: int | None) -> np.ndarray:
    """The start of a dream without a photo, float32 HxWx3 in [0, 1], from ``seed``:
    ``noise`` (mid-grey with Gaussian colour noise of sigma 0.15) or ``grey`` (mid-grey with
    a faint ±1/255 noise, as the Caffe notebook started its dreams from noise)."""
    h, w = (int(v) for v in size)
    rng = np.random.default_rng([0 if seed is None else seed, 17])  # apart from the jitter's
    if kind == "noise":
        x = 0.5 + 0.15 * rng.standard_normal((h, w, 3), dtype=np.float32)
    elif kind == "grey":
        x = 0.5 + rng.uniform(-1 / 255, 1 / 255, (h, w, 3)).astype(np.float32)
    else:
        raise SettingsError("init", f"must be one of {', '.join(INITS)} (or a photo), got "
                                    f"{kind!r}")
    return np.clip(x, 0.0, 1.0).astype(np.float32)


