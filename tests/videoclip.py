"""A small synthetic video for the video tests, made with PyAV (no ffmpeg binary, no files).

Textured shapes move over a textured background at known speeds (so optical flow has a ground
truth and the shapes occlude and reveal the background), with a sine tone as the sound.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np

FPS = 10
SIZE = (160, 120)  # (w, h)
SECONDS = 2.0


def texture(h: int, w: int, seed: int, scale: float = 1.0) -> np.ndarray:
    """Smooth-ish colourful texture, float32 HxWx3 in [0,1] (sums of random plane waves)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    out = np.zeros((h, w, 3), np.float32)
    for _ in range(12):
        k = rng.uniform(0.05, 0.5, 2) * scale * rng.choice([-1, 1], 2)
        phase = rng.uniform(0, 2 * np.pi)
        wave = np.sin(k[0] * xx + k[1] * yy + phase)
        out += wave[..., None] * rng.uniform(0.2, 1.0, 3).astype(np.float32)
    out -= out.min()
    return out / out.max()


def scene(t: int, w: int = SIZE[0], h: int = SIZE[1]) -> np.ndarray:
    """Frame ``t`` as float32 HxWx3: background drifting 1 px/frame left, a disc moving right
    3 px/frame, a square moving down-right (2, 1) px/frame."""
    bg_big = texture(h, w + 64, seed=1)
    frame = bg_big[:, t:t + w].copy()
    yy, xx = np.mgrid[0:h, 0:w]
    disc_tex = texture(h, w, seed=2, scale=1.5)
    cx, cy, r = 30 + 3 * t, 45, 18
    disc = (xx - cx) ** 2 + (yy - cy) ** 2 < r * r
    frame[disc] = np.roll(disc_tex[:, :w], 3 * t, axis=1)[disc]  # the texture moves with it
    sq_tex = texture(h, w, seed=3, scale=2.0)
    x0, y0 = 90 + 2 * t, 60 + t
    sq = (xx >= x0) & (xx < x0 + 26) & (yy >= y0) & (yy < y0 + 26)
    frame[sq] = np.roll(np.roll(sq_tex, 2 * t, axis=1), t, axis=0)[sq]
    return frame


def frames(n: int = int(FPS * SECONDS), w: int = SIZE[0], h: int = SIZE[1]) -> list[np.ndarray]:
    return [(scene(t, w, h) * 255 + 0.5).astype(np.uint8) for t in range(n)]


def make_clip(path: str | Path, *, seconds: float = SECONDS, fps: int = FPS,
              size: tuple[int, int] = SIZE, audio: str | None = "aac", video: bool = True,
              container: str | None = None, n_frames: int | None = None) -> Path:
    """Write the synthetic clip: H.264 video (``video``) and a 440 Hz tone in ``audio`` codec
    (None: silent). ``n_frames`` overrides seconds*fps (0 makes a zero-length video)."""
    import av

    path = Path(path)
    w, h = size
    n = round(seconds * fps) if n_frames is None else n_frames
    with av.open(str(path), "w", format=container) as out:
        vs = None
        if video:
            vs = out.add_stream("libx264", rate=fps, options={"crf": "12", "preset": "fast"})
            vs.width, vs.height, vs.pix_fmt = w, h, "yuv420p"
        a = None
        if audio:
            rate = 48000 if audio in ("libopus", "opus") else 44100
            a = out.add_stream(audio, rate=rate)
            a.layout = "stereo"
            if audio == "vorbis":
                a.codec_context.options = {"strict": "experimental"}
        out.start_encoding()  # the header, even when no frame follows
        pics = frames(n, w, h) if video else []
        total = round(seconds * (44100 if a is None else a.rate))
        chunk = 1024
        done = 0
        for t in range(max(n, 1)):
            if vs is not None and t < n:
                f = av.VideoFrame.from_ndarray(pics[t], format="rgb24")
                f.pts = t
                for pkt in vs.encode(f):
                    out.mux(pkt)
            if a is not None:
                upto = total if t == max(n, 1) - 1 else int(total * (t + 1) / max(n, 1))
                while done < upto:
                    m = min(chunk, upto - done)
                    x = (0.3 * np.sin(2 * np.pi * 440 * (np.arange(done, done + m)) / a.rate))
                    x = np.repeat(x.astype(np.float32)[None], 2, axis=0)
                    af = av.AudioFrame.from_ndarray(x, format="fltp", layout="stereo")
                    af.sample_rate = a.rate
                    af.pts = done
                    af.time_base = Fraction(1, a.rate)
                    done += m
                    for pkt in a.encode(af):
                        out.mux(pkt)
        for s in (vs, a):
            if s is not None:
                for pkt in s.encode(None):
                    out.mux(pkt)
    return path
