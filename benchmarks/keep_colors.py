"""``--keep-colors``: YCbCr or Lab? The photo's chroma under the dream's luminance, measured.

For each photo, one default dream (EfficientNet-Lite0, seed 0), then three ways to put the
photo's colours back:

- ``ycbcr`` (the engine's, :func:`onnxdream.dream.controls.keep_colors`): BT.601 YCbCr, the dream's
  luma Y clamped to the range where R, G and B all stay in [0, 1] with the photo's Cb/Cr;
- ``ycbcr-clip``: the same, but RGB clipped instead of the luma clamped;
- ``lab``: CIELAB (sRGB, D65): the dream's L* with the photo's a*, b*, back to sRGB, clipped.

Measured on the 8-bit results: the chroma error against the photo in YCbCr (|dCb|, |dCr| in
1/255; the test's criterion is <= 2) and in Lab (the a*b* distance), how far the luminance is
from the dream's (mean |dY| in 1/255, mean |dL*|), and the share of pixels that had to be
clipped or clamped (where the result cannot be both).

    .venv/bin/python benchmarks/keep_colors.py
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from onnxdream.dream.ascent import dream
from onnxdream.dream.controls import keep_colors
from onnxdream.media.imageio import load_image, to_uint8
from onnxdream.runtime.gradient import GradientModel
from onnxdream.settings.options import DreamSettings

PHOTOS = ["chelsea.png", "coffee.png", "rocket.jpg"]
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
LUMA = np.array([0.299, 0.587, 0.114])


def ycbcr(rgb: np.ndarray) -> np.ndarray:
    """HxWx3 in [0, 1] → Y, Cb, Cr (BT.601 full range, Cb/Cr centred on 0)."""
    y = rgb @ LUMA
    return np.stack([y, 0.564 * (rgb[..., 2] - y), 0.713 * (rgb[..., 0] - y)], -1)


def _lin(c):
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


def _gam(c):
    c = np.clip(c, 0, None)
    return np.where(c <= 0.0031308, 12.92 * c, 1.055 * c ** (1 / 2.4) - 0.055)


_M = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
_WHITE = np.array([0.95047, 1.0, 1.08883])


def lab(rgb: np.ndarray) -> np.ndarray:
    xyz = _lin(rgb) @ _M.T / _WHITE
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]),
                     200 * (f[..., 1] - f[..., 2])], -1)


def lab_to_rgb(lab_: np.ndarray) -> np.ndarray:
    fy = (lab_[..., 0] + 16) / 116
    f = np.stack([fy + lab_[..., 1] / 500, fy, fy - lab_[..., 2] / 200], -1)
    xyz = np.where(f > 6 / 29, f ** 3, 3 * (6 / 29) ** 2 * (f - 4 / 29)) * _WHITE
    return _gam(xyz @ np.linalg.inv(_M).T)


def methods(dreamed: np.ndarray, photo: np.ndarray) -> dict[str, tuple[np.ndarray, float]]:
    """name → (result HxWx3 in [0, 1], share of pixels clipped or clamped)."""
    out = {}
    res = keep_colors(dreamed.transpose(2, 0, 1), photo.transpose(2, 0, 1)).transpose(1, 2, 0)
    y_want = dreamed @ LUMA
    out["ycbcr"] = (res, float(np.mean(np.abs(res @ LUMA - y_want) > 1e-6)))
    raw = (y_want[..., None] + photo - (photo @ LUMA)[..., None])
    out["ycbcr-clip"] = (np.clip(raw, 0, 1), float(np.mean(((raw < 0) | (raw > 1)).any(-1))))
    mixed = lab(photo)
    mixed[..., 0] = lab(dreamed)[..., 0]
    raw = lab_to_rgb(mixed)
    out["lab"] = (np.clip(raw, 0, 1), float(np.mean(((raw < -1e-6) | (raw > 1 + 1e-6)).any(-1))))
    return out


def main() -> None:
    gm = GradientModel("efficientnet-lite0", device="cpu")
    rows = []
    for name in PHOTOS:
        photo = load_image(EXAMPLES / name).rgb.astype(np.float64)
        dreamed = np.clip(dream(gm, photo.astype(np.float32), DreamSettings(seed=0)), 0, 1)
        dreamed = np.asarray(dreamed, np.float64)
        p_ycc, p_lab = ycbcr(photo), lab(photo)
        for method, (res, clipped) in methods(dreamed, photo).items():
            r8 = to_uint8(res).astype(np.float64) / 255
            r_ycc, r_lab = ycbcr(r8), lab(r8)
            dchroma = np.abs(r_ycc[..., 1:] - p_ycc[..., 1:]) * 255
            row = {"photo": name, "method": method,
                   "chroma_ycbcr_max": float(dchroma.max()),
                   "chroma_ycbcr_mean": float(dchroma.mean()),
                   "chroma_ycbcr_over_2": float(np.mean((dchroma > 2).any(-1))),
                   "chroma_lab_mean": float(np.hypot(*(r_lab[..., 1:] - p_lab[..., 1:])
                                                     .transpose(2, 0, 1)).mean()),
                   "luma_vs_dream_mean": float(np.abs(r_ycc[..., 0] - dreamed @ LUMA).mean()
                                               * 255),
                   "L_vs_dream_mean": float(np.abs(r_lab[..., 0] - lab(dreamed)[..., 0]).mean()),
                   "clipped_share": clipped}
            rows.append(row)
            print(json.dumps({k: round(v, 3) if isinstance(v, float) else v
                              for k, v in row.items()}), flush=True)
    out = Path(__file__).parent / "results" / "keep_colors.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
