"""Items per second: `onnxdream batch` (local backend, 1 and 2 workers) against a loop of
`onnxdream dream` calls and against the HTTP server, on the same N images.

    .venv/bin/python benchmarks/bench_batch.py                     # 24 images of 512 px
    .venv/bin/python benchmarks/bench_batch.py --n 8 --steps 5 --modes batch1,batch2

Every mode dreams the same images with the same settings (the default model, seed 0) from a
fresh process, wall clock from the first command to the last output:

- cli: one `onnxdream dream` process per image (each loads the model and opens a session);
- server: one `onnxdream serve` process (started before the clock; its start-up is reported
  apart), the images POSTed to /dream one after another (its default of 1 worker here);
- batchN: one `onnxdream batch --workers N` (start-up, model loads in the workers, everything).

The model and its compiled gradient graph are built once before any timing (a warm-up dream),
so no mode pays the first compile. JSON goes to benchmarks/results/bench_batch.json, with the
load average before and after (this machine is shared: compare the modes of one run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
# the test photos (examples/README.md)
PHOTOS = [REPO / "examples" / name
          for name in ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg")]


def make_images(folder: Path, n: int, size: int) -> list[Path]:
    """n different size x size crops of the test photos (or noise when none are found)."""
    sources = [p for p in PHOTOS if p.is_file()]
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        if sources:
            with Image.open(sources[i % len(sources)]) as im:
                im = im.convert("RGB")
                scale = size * (1.1 + 0.3 * rng.random()) / min(im.size)
                im = im.resize((max(size, round(im.width * scale)),
                                max(size, round(im.height * scale))), Image.Resampling.LANCZOS)
                x = int(rng.integers(0, im.width - size + 1))
                y = int(rng.integers(0, im.height - size + 1))
                im = im.crop((x, y, x + size, y + size))
                if i % 2:
                    im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        else:
            im = Image.fromarray(rng.integers(0, 256, (size, size, 3), np.uint8))
        p = folder / f"img{i:02d}.png"
        im.save(p)
        out.append(p)
    return out


def onnxdream(*args: str) -> list[str]:
    return [sys.executable, "-m", "onnxdream.cli", *args]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(images, out: Path, dream_args) -> float:
    out.mkdir()
    t0 = time.perf_counter()
    for p in images:
        subprocess.run(onnxdream("dream", str(p), "-o", str(out / p.name), "--quiet",
                                 *dream_args), check=True, capture_output=True, timeout=600)
    return time.perf_counter() - t0


def run_batch(images, out: Path, dream_args, workers: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    subprocess.run(onnxdream("batch", str(images[0].parent), "-o", str(out), "--quiet",
                             "--workers", str(workers), *dream_args),
                   check=True, capture_output=True, timeout=3600)
    wall = time.perf_counter() - t0
    rows = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(rows) == len(images) and all(r["status"] == "ok" for r in rows), rows
    return wall, sum(r["seconds"] for r in rows)


def run_server(images, out: Path, fields: dict[str, str]) -> tuple[float, float]:
    import httpx

    out.mkdir()
    port = free_port()
    log = open(out / "server.log", "w")  # noqa: SIM115 - closed below
    t0 = time.perf_counter()
    server = subprocess.Popen(onnxdream("serve", "--port", str(port), "--log-level", "warning"),
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        with httpx.Client(timeout=600) as client:
            while True:
                try:
                    if client.get(f"{url}/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if server.poll() is not None or time.perf_counter() - t0 > 120:
                    raise RuntimeError("the server did not start:\n"
                                       + (out / "server.log").read_text()[-2000:])
                time.sleep(0.1)
            started = time.perf_counter() - t0
            t1 = time.perf_counter()
            for p in images:
                r = client.post(f"{url}/dream", data=fields,
                                files={"image": (p.name, p.read_bytes(), "image/png")})
                r.raise_for_status()
                (out / p.name).write_bytes(r.content)
            return time.perf_counter() - t1, started
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(5)
        log.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=24, help="images")
    ap.add_argument("--size", type=int, default=512, help="image side in pixels")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--octaves", type=int, default=2)
    ap.add_argument("--modes", default="cli,server,batch1,batch2")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    args = ap.parse_args()
    modes = args.modes.split(",")
    work = Path(tempfile.mkdtemp(prefix="bench-batch-"))
    dream_args = ["--seed", "0", "--steps", str(args.steps), "--octaves", str(args.octaves)]
    fields = {"seed": "0", "steps": str(args.steps), "octaves": str(args.octaves)}
    results: dict = {"n": args.n, "size": args.size, "steps": args.steps,
                     "octaves": args.octaves, "model": "efficientnet-lite0 (default)",
                     "cpus": os.cpu_count(), "python": platform.python_version(),
                     "threads_env": os.environ.get("ONNXDREAM_THREADS"),
                     "load_before": os.getloadavg(), "modes": {}}
    try:
        import onnxruntime

        results["onnxruntime"] = onnxruntime.__version__
        (work / "in").mkdir()
        images = make_images(work / "in", args.n, args.size)
        warm = work / "warm.png"  # builds the zoo model and the compiled graph once
        subprocess.run(onnxdream("dream", str(images[0]), "-o", str(warm), "--quiet",
                                 *dream_args), check=True, capture_output=True, timeout=1800)
        for mode in modes:
            out = work / f"out-{mode}"
            load = os.getloadavg()[0]
            extra: dict = {}
            if mode == "cli":
                wall = run_cli(images, out, dream_args)
            elif mode == "server":
                wall, started = run_server(images, out, fields)
                extra["server_start_s"] = round(started, 2)
            elif mode.startswith("batch"):
                wall, busy = run_batch(images, out, dream_args, int(mode[5:] or 1))
                extra["item_seconds_sum"] = round(busy, 2)
            else:
                raise SystemExit(f"unknown mode {mode}")
            results["modes"][mode] = {"wall_s": round(wall, 2),
                                      "items_per_s": round(args.n / wall, 3),
                                      "s_per_item": round(wall / args.n, 3),
                                      "load_at_start": round(load, 2), **extra}
            print(f"{mode:8s} {wall:7.1f} s  {args.n / wall:6.3f} items/s  "
                  f"{wall / args.n:6.2f} s/item  (load {load:.1f}) {extra or ''}", flush=True)
    finally:
        results["load_after"] = os.getloadavg()
        dest = REPO / "benchmarks" / "results"
        dest.mkdir(parents=True, exist_ok=True)
        (dest / "bench_batch.json").write_text(json.dumps(results, indent=1))
        if args.keep:
            print(f"work folder: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(f"load average before {results['load_before']}, after {results['load_after']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
