"""Soak check of ``onnxdream serve``: many concurrent clients for minutes, mixed sizes.

Starts the server on 127.0.0.1 (a free port, a private ``ONNXDREAM_HOME`` that shares the
already-built zoo models) unless ``--url`` names one, warms it up, then runs ``--clients``
threads for ``--seconds``. Each client loops until the time is up: a random image size and
request (``POST /dream``, or ``POST /jobs`` then polling, fetching and deleting the result),
random layer weights (so the one-graph-per-structure cache is exercised), and on a 503 it waits
its own random 0.5-2 s (not Retry-After: the point is to keep the queue full). Every request has
a timeout; the server is stopped at the end.

Reports the statuses, p50/p95 latency of the successful dreams per size, the server's resident
memory (VmRSS) sampled every ``--sample`` seconds (growth after warm-up is what matters), the
compiled-graph cache on disk, and writes JSON (``--json``).

    .venv/bin/python benchmarks/soak.py                      # 32 clients, 2 minutes
    .venv/bin/python benchmarks/soak.py --clients 8 --seconds 30
    .venv/bin/python benchmarks/soak.py --url http://127.0.0.1:8000 --seconds 60
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import os
import platform
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SIZES = [(64, 48), (128, 96), (256, 192), (384, 288)]  # width, height; mixed per request
LAYERS = ["blocks.3", "blocks.5", "blocks.9"]


def _png(w: int, h: int, seed: int) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    small = (rng.random((8, 8, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(small).resize((w, h), Image.BICUBIC).save(buf, "PNG")
    return buf.getvalue()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _dir_mb(path: Path) -> tuple[float, int]:
    files = [p for p in path.glob("*.onnx*")] if path.is_dir() else []
    return sum(p.stat().st_size for p in files) / 2**20, len(files)


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.statuses: collections.Counter[str] = collections.Counter()
        self.latency: dict[str, list[float]] = collections.defaultdict(list)
        self.refused: list[float] = []  # 503s: how fast a full queue says no

    def add(self, kind: str, status: int | str, size: tuple[int, int], seconds: float) -> None:
        with self.lock:
            self.statuses[f"{kind} {status}"] += 1
            if status in (200, 202):
                self.latency[f"{kind} {size[0]}x{size[1]}"].append(seconds)
            elif status == 503:
                self.refused.append(seconds)


def client(i: int, url: str, until: float, stats: Stats, images: dict, steps: int) -> None:
    import httpx

    rng = random.Random(i)
    with httpx.Client(base_url=url, timeout=120) as c:
        while time.monotonic() < until:
            size = rng.choice(SIZES)
            layer = f"{rng.choice(LAYERS)}:{rng.uniform(0.5, 3):.3f}"
            data = {"steps": str(steps), "octaves": str(rng.choice([1, 2])), "layer": layer,
                    "seed": str(rng.randrange(2**32))}
            files = {"image": ("p.png", images[size], "image/png")}
            kind = "dream" if rng.random() < 0.7 else "jobs"
            t0 = time.monotonic()
            try:
                if kind == "dream":
                    r = c.post("/dream", files=files, data=data)
                    status = r.status_code
                else:
                    r = c.post("/jobs", files=files, data=data)
                    status = r.status_code
                    if status == 202:
                        status = _follow(c, r.json()["id"], until + 120)
            except httpx.HTTPError as exc:
                status = type(exc).__name__
            stats.add(kind, status, size, time.monotonic() - t0)
            if status == 503:
                time.sleep(rng.uniform(0.5, 2.0))


def _follow(c, job_id: str, deadline: float) -> int | str:
    while time.monotonic() < deadline:
        s = c.get(f"/jobs/{job_id}").json()
        if s["state"] == "done":
            status = c.get(f"/jobs/{job_id}/result").status_code
            c.delete(f"/jobs/{job_id}")
            return status
        if s["state"] in ("failed", "cancelled"):
            return f"job {s['state']}"
        time.sleep(0.25)
    return "job timeout"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", help="an onnxdream server already running (default: start one)")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=120.0)
    ap.add_argument("--warmup", type=float, default=20.0,
                    help="seconds of load before the measured run (RSS growth counts after it)")
    ap.add_argument("--steps", type=int, default=3, help="ascent steps per octave")
    ap.add_argument("--sample", type=float, default=5.0, help="RSS sampling period, seconds")
    ap.add_argument("--server-args", default="--max-queue 16",
                    help="extra `onnxdream serve` arguments")
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "soak.json")
    args = ap.parse_args()

    images = {s: _png(*s, seed=k) for k, s in enumerate(SIZES)}
    proc = None
    home = None
    log = None
    url = args.url
    try:
        if url is None:
            from onnxdream.models import model_home, resolve_model

            resolve_model("efficientnet-lite0")  # built once, shared
            home = Path(tempfile.mkdtemp(prefix="onnxdream-soak-"))
            (home / "models").symlink_to(model_home() / "models", target_is_directory=True)
            port = _free_port()
            url = f"http://127.0.0.1:{port}"
            env = {**os.environ, "ONNXDREAM_HOME": str(home)}
            log = open(home / "server.log", "wb")  # noqa: SIM115 - closed in finally
            proc = subprocess.Popen([sys.executable, "-m", "onnxdream.cli", "serve", "--port",
                                     str(port), "--log-level", "warning",
                                     *args.server_args.split()],
                                    stdout=log, stderr=subprocess.STDOUT, env=env)
        import httpx

        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if (proc is not None and proc.poll() is not None) or time.monotonic() > deadline:
                raise SystemExit("the server did not start")
            time.sleep(0.2)
        pid = proc.pid if proc is not None else None
        samples: list[tuple[float, float | None, dict]] = []
        start = time.monotonic()
        stop = threading.Event()

        def sampler():
            while not stop.is_set():
                try:
                    queue = httpx.get(f"{url}/health", timeout=10).json().get("queue", {})
                except (httpx.HTTPError, ValueError):
                    queue = {}
                samples.append((round(time.monotonic() - start, 1),
                                _rss_mb(pid) if pid else None, queue))
                stop.wait(args.sample)

        threading.Thread(target=sampler, daemon=True).start()
        phases = {}
        for phase, seconds in (("warmup", args.warmup), ("soak", args.seconds)):
            stats = Stats()
            until = time.monotonic() + seconds
            threads = [threading.Thread(target=client, args=(i, url, until, stats, images,
                                                             args.steps), daemon=True)
                       for i in range(args.clients)]
            t0 = time.monotonic()
            for t in threads:
                t.start()
            for t in threads:
                t.join(seconds + 300)
            phases[phase] = (stats, time.monotonic() - t0, time.monotonic() - start)
        stop.set()
        samples.append((round(time.monotonic() - start, 1), _rss_mb(pid) if pid else None, {}))
        report(args, phases, samples, home)
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        if log is not None:
            log.close()


def report(args, phases, samples, home: Path | None) -> None:
    stats, took, _ = phases["soak"]
    warm_end = phases["warmup"][2]
    print(f"{args.clients} clients, {args.seconds:.0f} s (after {args.warmup:.0f} s warm-up), "
          f"steps {args.steps}, sizes {', '.join(f'{w}x{h}' for w, h in SIZES)}")
    print("\nstatus counts (soak):")
    for k, v in sorted(stats.statuses.items()):
        print(f"  {k:24s} {v:6d}")
    print("\nlatency (s), successful dreams by size:  n     p50     p95")
    rows = {}
    for k in sorted(stats.latency, key=lambda k: (k.split()[0], int(k.split()[1].split("x")[0]))):
        v = np.asarray(stats.latency[k])
        rows[k] = {"n": int(v.size), "p50": float(np.percentile(v, 50)),
                   "p95": float(np.percentile(v, 95))}
        print(f"  {k:30s} {v.size:5d} {rows[k]['p50']:7.2f} {rows[k]['p95']:7.2f}")
    if stats.refused:
        v = np.asarray(stats.refused)
        rows["503"] = {"n": int(v.size), "p50": float(np.percentile(v, 50)),
                       "p95": float(np.percentile(v, 95))}
        print(f"  {'503 (refused)':30s} {v.size:5d} {rows['503']['p50']:7.2f} "
              f"{rows['503']['p95']:7.2f}")
    queued = [q.get("queued", 0) + q.get("running", 0) for t, _, q in samples
              if q and t >= warm_end]
    if queued:
        print(f"queue (queued + running) after warm-up: mean {np.mean(queued):.1f}, "
              f"max {max(queued)}")
    rss = [(t, m) for t, m, _ in samples if m is not None]
    after = [m for t, m in rss if t >= warm_end]
    summary = {}
    if rss:
        print("\nserver RSS (MB) over time: " + ", ".join(f"{t:.0f}s {m:.0f}" for t, m in rss))
        if after:
            half = len(after) // 2 or 1
            summary = {"rss_start_mb": after[0], "rss_end_mb": after[-1], "rss_max_mb": max(after),
                       "rss_first_half_mean": float(np.mean(after[:half])),
                       "rss_second_half_mean": float(np.mean(after[half:]))}
            print(f"after warm-up: start {after[0]:.0f}, end {after[-1]:.0f}, max {max(after):.0f}"
                  f"; mean first half {summary['rss_first_half_mean']:.0f}, second half "
                  f"{summary['rss_second_half_mean']:.0f}")
    if home is not None:
        mb, n = _dir_mb(home / "compiled")
        summary.update(compiled_mb=mb, compiled_files=n)
        print(f"compiled-graph cache: {n} files, {mb:.1f} MB")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "clients": args.clients, "seconds": args.seconds, "warmup": args.warmup,
        "steps": args.steps, "statuses": dict(stats.statuses), "latency": rows,
        "rss": rss, "summary": summary, "machine": platform.platform(),
        "cpus": os.cpu_count(), "load": os.getloadavg()}, indent=1))
    print(f"\nJSON: {args.json}")


if __name__ == "__main__":
    main()
