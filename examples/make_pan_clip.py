"""Make examples/pan.mp4: a slow camera move across examples/chelsea.png, the input of the README's
`onnxdream video` example (needs onnxdream[video]).

    python examples/make_pan_clip.py            # writes examples/pan.mp4 (4 s, 12 fps, 240x160)

The camera pans left to right over the cat while zooming in a little and tilting by a few
degrees, so the motion has translation, scale and rotation for the optical flow to follow.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
from PIL import Image

from onnxdream.media.videowrite import write_video

HERE = Path(__file__).resolve().parent


def frames(photo: Image.Image, n: int, size: tuple[int, int]):
    """n frames of size (w, h): a window 0.62 of the photo's height high, moving across it."""
    w, h = size
    pw, ph = photo.size
    for i in range(n):
        t = i / max(n - 1, 1)
        ease = 0.5 - 0.5 * math.cos(math.pi * t)  # start and stop gently
        zoom = 1.0 + 0.18 * ease
        win_h = 0.62 * ph / zoom
        win_w = win_h * w / h
        cx = win_w / 2 + 4 + ease * (pw - win_w - 8)
        cy = ph * (0.55 - 0.08 * ease)
        angle = -4.0 * ease
        # rotate about the window's centre, then cut the window out and scale it to the frame
        rotated = photo.rotate(angle, resample=Image.Resampling.BICUBIC, center=(cx, cy))
        box = (cx - win_w / 2, cy - win_h / 2, cx + win_w / 2, cy + win_h / 2)
        yield np.asarray(rotated.resize(size, Image.Resampling.LANCZOS, box=box))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--output", type=Path, default=HERE / "pan.mp4")
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--fps", type=int, default=12)
    ap.add_argument("--size", default="240x160")
    args = ap.parse_args()
    w, h = (int(v) for v in args.size.split("x"))
    photo = Image.open(HERE / "chelsea.png").convert("RGB")
    n = round(args.seconds * args.fps)
    writer = write_video(args.output, frames(photo, n, (w, h)), args.fps)
    print(f"wrote {args.output} ({writer.frames} frames, {w}x{h}, {args.fps} fps)")


if __name__ == "__main__":
    main()
