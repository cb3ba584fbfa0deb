"""Video: what the optical flow costs per frame, which audio codecs copy into MP4/WebM, and the
dream's frames/s and temporal coherence on the synthetic clip.

    .venv/bin/python benchmarks/bench_video.py                    # all three parts
    .venv/bin/python benchmarks/bench_video.py --parts flow,audio  # the quick ones
    .venv/bin/python benchmarks/bench_video.py --parts dream --sizes 320x180 --frames 10

- flow: per frame pair, the median over ``--repeats`` of the two DIS flows (backward and
  forward), and of everything the temporal blend adds per frame (two flows, the occlusion mask,
  the warp, the blend), for each DIS preset, at each size;
- audio: for each audio codec this PyAV wheel encodes, whether ``videoio`` copies it into MP4
  and WebM (remux, no re-encode) or re-encodes it;
- dream: ``video.dream_video`` on the synthetic clip (tests/videoclip.py) at each size with the
  default model and settings (step size 0.006), naive (no flow) and with flow at several blends:
  frames/s and the temporal error (mean |out_t − warp(out_{t−1})| along the input's flow) and
  the mean dream detail |out − in|.

JSON goes to ``--json`` (default benchmarks/results/bench_video.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import videoclip  # noqa: E402


def size_arg(text: str) -> tuple[int, int]:
    w, h = text.lower().split("x")
    return int(w), int(h)


def bench_flow(sizes, repeats: int) -> list[dict]:
    from onnxdream.video.flow import PRESETS, FlowEstimator, coherent_input

    rows = []
    for w, h in sizes:
        a, b = (videoclip.scene(t, w, h) for t in (0, 2))
        dreamed = np.clip(a + 0.05 * np.sin(np.arange(w, dtype=np.float32) / 3)[None, :, None],
                          0, 1)
        for preset in PRESETS:
            est = FlowEstimator(preset)
            est.both(b, a)  # warm up
            flows, blend = [], []
            for _ in range(repeats):
                t0 = time.perf_counter()
                est.both(b, a)
                t1 = time.perf_counter()
                coherent_input(b, a, dreamed, 0.6, flow=est)
                t2 = time.perf_counter()
                flows.append(t1 - t0)
                blend.append(t2 - t1)
            row = {"size": f"{w}x{h}", "preset": preset,
                   "two_flows_ms": 1000 * float(np.median(flows)),
                   "blend_total_ms": 1000 * float(np.median(blend))}
            rows.append(row)
            print(f"flow {row['size']:>8} {preset:>9}: two flows {row['two_flows_ms']:6.1f} ms, "
                  f"whole blend {row['blend_total_ms']:6.1f} ms", flush=True)
    return rows


def bench_audio(tmp: Path) -> list[dict]:
    from onnxdream.media.videoio import probe
    from onnxdream.media.videowrite import write_video

    frames = videoclip.frames(10, 64, 48)
    rows = []
    for codec in ("aac", "libmp3lame", "libopus", "vorbis", "flac", "ac3", "alac", "mp2",
                  "pcm_s16le"):
        src = tmp / f"src-{codec}.mkv"
        try:
            videoclip.make_clip(src, audio=codec, container="matroska", size=(64, 48),
                                seconds=1.0)
        except Exception as exc:  # noqa: BLE001 - an encoder missing from this wheel
            rows.append({"codec": codec, "error": str(exc).splitlines()[0]})
            continue
        row = {"codec": probe(src).audio.codec}
        for ext in (".mp4", ".webm"):
            w = write_video(tmp / f"out-{codec}{ext}", frames, 10, audio_from=src)
            got = probe(w.path).audio
            row[ext[1:]] = "copied" if not w.notes else f"re-encoded to {got.codec}"
        rows.append(row)
        print(f"audio {row['codec']:>10}: mp4 {row['mp4']:<22} webm {row['webm']}", flush=True)
    return rows


def bench_dream(sizes, n_frames: int, blends, tmp: Path) -> list[dict]:
    from PIL import Image

    from onnxdream.media.videoio import open_video
    from onnxdream.settings.options import DreamSettings
    from onnxdream.video.clip import dream_video, make_dream_frame
    from onnxdream.video.flow import temporal_error

    dream = make_dream_frame(DreamSettings(seed=1))  # the default model and settings
    rows = []
    for w, h in sizes:
        clip = videoclip.make_clip(tmp / f"clip-{w}x{h}.mp4", size=(w, h),
                                   seconds=n_frames / videoclip.FPS)
        inputs = list(open_video(clip))
        dream(inputs[0].astype(np.float32) / 255, {})  # compile, warm up
        runs = [("naive", False, 0.0)] + [(f"flow {b}", True, b) for b in blends]
        for name, flow, blend in runs:
            out = tmp / f"out-{w}x{h}-{name.replace(' ', '-').replace('.', '')}"
            t0 = time.perf_counter()
            result = dream_video(clip, out, dream, flow=flow, blend=blend)
            seconds = time.perf_counter() - t0
            outs = [np.asarray(Image.open(p)) for p in sorted(result.path.iterdir())]
            row = {"size": f"{w}x{h}", "run": name, "frames": result.frames,
                   "fps": result.frames / seconds,
                   "temporal_error": temporal_error(outs, inputs),
                   "detail": float(np.mean([np.abs(o.astype(np.float32) - i).mean() / 255
                                            for o, i in zip(outs, inputs)]))}
            rows.append(row)
            print(f"dream {row['size']:>8} {name:>9}: {row['fps']:.2f} frames/s, temporal error "
                  f"{row['temporal_error']:.4f}, detail {row['detail']:.3f}", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="flow,audio,dream")
    ap.add_argument("--sizes", default="320x180,640x360")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--frames", type=int, default=20)
    ap.add_argument("--blends", default="0.4,0.5,0.6,0.7,0.8")
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" /
                    "bench_video.json")
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    sizes = [size_arg(s) for s in args.sizes.split(",")]
    results = {"machine": platform.machine(), "cpus": os.cpu_count(),
               "threads": os.environ.get("ONNXDREAM_THREADS")}
    import av
    import cv2

    results["versions"] = {"av": av.__version__, "ffmpeg": av.ffmpeg_version_info,
                           "opencv": cv2.__version__}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if "flow" in parts:
            results["flow"] = bench_flow(sizes, args.repeats)
        if "audio" in parts:
            results["audio"] = bench_audio(tmp)
        if "dream" in parts:
            os.environ.setdefault("ONNXDREAM_HOME", str(tmp / "home"))
            results["dream"] = bench_dream(sizes, args.frames,
                                           [float(b) for b in args.blends.split(",")], tmp)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
