"""ms per ascent step in the browser (onnxruntime-web WASM, threads on/off) against the native CPU
engine, and which providers run the compiled graphs (the provider x model table).

    .venv/bin/python benchmarks/bench_browser.py               # Lite0 + GoogLeNet, 224 and 512
    .venv/bin/python benchmarks/bench_browser.py --models lite0 --sizes 224 --rounds 3
    .venv/bin/python benchmarks/bench_browser.py --webgpu      # + WebGPU (headless: SwiftShader)
    .venv/bin/python benchmarks/bench_browser.py --openvino /path/to/ovvenv/bin/python

Per model: an exported site (``onnxdream.browser.site.export_site``, default graphs) served twice
from this process, with COOP/COEP (cross-origin isolated: WASM threads) and without (one thread),
one headless Chromium page per configuration, and the native engine in this process
(``onnxdream.dream.ascent.ascend`` on the CPU provider: gradient graph + numpy step). Each round
runs a short dream (1 octave, ``--steps`` steps, jitter 32) in every configuration in turn, so load
drift on a shared machine hits all alike; a configuration's figure is the median over rounds of
its steps after the first (the first of a round may still allocate). Round 0 warms up.

``--webgpu``: a second Chromium with ``--enable-unsafe-webgpu`` (headless Chromium then offers
SwiftShader, Vulkan emulated on the CPU: this shows that the graphs *run*, not GPU speed) on
sites with ``--target portable`` and default graphs. ``--openvino PY``: PY is the python of a
venv with ``onnxruntime-openvino`` (never this one); it times the *gradient* graphs (default and
portable) on the OpenVINO and CPU providers at 224 px (a step graph would mostly fall back to
the CPU provider). GoogLeNet is exported from torchvision with random weights (needs torch);
timings do not depend on the weights. JSON goes to benchmarks/results/bench_browser.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
MODELS = {"lite0": ("efficientnet-lite0", "blocks.5"), "googlenet": (None, "inception4c")}
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def model_file(key: str, work: Path) -> str:
    name, _ = MODELS[key]
    if name is not None:
        return name
    path = HERE / "results" / "googlenet-random.onnx"
    if not path.exists():
        from onnxdream.exporters import export_torchvision

        path.parent.mkdir(parents=True, exist_ok=True)
        export_torchvision("googlenet", path, "none")
    return str(path)


def serve(root: Path, isolate: bool) -> tuple[str, object]:
    """Serve ``root`` from a thread of this process (a daemon: it ends with the process)."""
    from onnxdream.browser.site import site_server

    server = site_server(root, port=0, isolate=isolate)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server.url.rstrip("/"), server


def photo(size: int) -> Image.Image:
    with Image.open(REPO / "examples" / "chelsea.png") as im:
        return im.convert("RGB").resize((size, size), Image.Resampling.LANCZOS)


def open_page(browser, url: str, threads: int | None, backend: str = "wasm"):
    page = browser.new_page()
    page.set_default_timeout(600_000)
    query = f"?threads={threads}" if threads else ""
    page.goto(f"{url}/{query}")
    page.wait_for_function("window.onnxdream !== undefined")
    page.evaluate("window.onnxdream.ready.then(() => true)")
    info = page.evaluate("({iso: self.crossOriginIsolated, cores: navigator.hardwareConcurrency})")
    return page, info


def browser_steps(page, size: int, steps: int, backend: str = "wasm") -> list[float]:
    r = page.evaluate("([img, s]) => window.onnxdream.dream(img, s)",
                      [f"img-{size}.png", {"octaves": 1, "steps": steps, "jitter": 32, "seed": 1,
                                           "backend": backend}])
    if r["backend"] != backend:
        raise RuntimeError(f"asked for {backend}, ran on {r['backend']}")
    return r["step_ms"]


class Native:
    """The CLI's CPU path: ascend() with the compiled gradient graph on `threads` threads."""

    def __init__(self, model: str, layer: str, threads: int):
        from onnxdream.runtime.gradient import GradientModel

        self.gm = GradientModel(model, [layer], device="cpu", threads=threads)

    def steps(self, size: int, steps: int) -> list[float]:
        from onnxdream.dream.ascent import ascend
        from onnxdream.settings.options import DreamSettings

        img = np.ascontiguousarray(np.asarray(photo(size), np.float32).transpose(2, 0, 1) / 255)
        stamps = [time.perf_counter()]
        ascend(self.gm, img, DreamSettings(jitter=32, tile_size=0), np.random.default_rng(1),
               steps, lambda i, obj: stamps.append(time.perf_counter()) and None)
        return [(b - a) * 1e3 for a, b in zip(stamps, stamps[1:])]


def summary(values: list[list[float]]) -> dict:
    per_round = [float(np.median(v[1:] if len(v) > 1 else v)) for v in values]
    return {"median_ms": round(float(np.median(per_round)), 1),
            "min_ms": round(float(min(per_round)), 1), "rounds": len(per_round)}


def run_browser_table(args, sites: dict[str, Path], natives: dict) -> list[dict]:
    from playwright.sync_api import sync_playwright

    cores = os.cpu_count() or 1
    many = max(2, min(4, cores))
    rows = []
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=args.chromium, headless=True,
                               args=CHROMIUM_ARGS + ["--disable-gpu"])
        try:
            for key, root in sites.items():
                iso_url, _ = serve(root, True)
                plain_url, _ = serve(root, False)
                configs = {}
                for name, url, threads in ((f"wasm {many} threads", iso_url, many),
                                           ("wasm 1 thread", iso_url, 1),
                                           ("wasm not isolated", plain_url, None)):
                    page, info = open_page(b, url, threads)
                    configs[name] = (page, info)
                for size in args.sizes:
                    times: dict[str, list[list[float]]] = {k: [] for k in configs}
                    times.update({k: [] for k in natives[key]})
                    for r in range(args.rounds + 1):
                        for name, (page, _) in configs.items():
                            v = browser_steps(page, size, args.steps)
                            if r:
                                times[name].append(v)
                        for name, native in natives[key].items():
                            v = native.steps(size, args.steps)
                            if r:
                                times[name].append(v)
                    row = {"model": key, "size": size, "load1": round(os.getloadavg()[0], 1),
                           "isolated": {k: info["iso"] for k, (_, info) in configs.items()}}
                    row.update({k: summary(v) for k, v in times.items()})
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                for page, _ in configs.values():
                    page.close()
        finally:
            b.close()
    return rows


def run_webgpu(args, sites: dict[str, Path]) -> list[dict]:
    from playwright.sync_api import sync_playwright

    rows = []
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=args.chromium, headless=True,
                               args=CHROMIUM_ARGS + ["--enable-unsafe-webgpu"])
        try:
            for (key, target), root in sites.items():
                url, _ = serve(root, True)
                page, _ = open_page(b, url, None)
                adapter = page.evaluate("""async () => { const a = navigator.gpu &&
                    await navigator.gpu.requestAdapter(); return a ? (a.info || {}).architecture ||
                    'unknown' : null; }""")
                row = {"model": key, "target": target, "size": 224, "adapter": adapter}
                try:
                    v = browser_steps(page, 224, 2, backend="webgpu")
                    row["webgpu"] = {"runs": True, "ms": round(float(v[-1]), 0)}
                except Exception as exc:  # noqa: BLE001 - the table says what failed
                    row["webgpu"] = {"runs": False, "error": str(exc).splitlines()[0][:200]}
                rows.append(row)
                print(json.dumps(row), flush=True)
                page.close()
        finally:
            b.close()
    return rows


OV_SCRIPT = r"""
import json, sys, time
import numpy as np, onnxruntime as ort
rows = []
x = np.random.default_rng(0).random((1, 3, 224, 224), np.float32)
for name, path in json.loads(sys.argv[1]).items():
    so = ort.SessionOptions(); so.intra_op_num_threads = 1; so.inter_op_num_threads = 1
    row, sess = {"graph": name, "onnxruntime": ort.__version__}, {}
    for ep, opts in (("OpenVINOExecutionProvider", {"device_type": "CPU", "num_of_threads": 1}),
                     ("CPUExecutionProvider", {})):
        try:
            sess[ep] = ort.InferenceSession(path, so, providers=[ep], provider_options=[opts])
        except Exception as e:
            lines = [l.strip() for l in str(e).splitlines() if l.strip()]
            row[ep] = {"runs": False, "error": next((l for l in lines if "Only" in l or
                                                     "Unsupported" in l), lines[0])[:200]}
    times, outs = {ep: [] for ep in sess}, {}
    for r in range(int(sys.argv[2]) + 1):
        for ep, s in sess.items():
            t = time.perf_counter(); outs[ep] = s.run(None, {"image": x})
            if r: times[ep].append((time.perf_counter() - t) * 1e3)
    for ep, v in times.items():
        row[ep] = {"runs": True, "median_ms": round(float(np.median(v)), 1)}
    if len(outs) == 2:
        a, b = outs.values()
        row["max_rel_diff"] = max(float(np.abs(p - q).max() / np.abs(q).max())
                                  for p, q in zip(a, b))
    rows.append(row); print(json.dumps(row), flush=True)
print("RESULT " + json.dumps(rows))
"""


def run_openvino(args, models: dict[str, str], work: Path) -> list[dict]:
    from onnxdream.exporters.graph import compile_gradient, save_model

    graphs = {}
    for key, model in models.items():
        for target in ("default", "portable"):
            path = work / f"{key}-{target}-grad.onnx"
            from onnxdream.runtime.opening import resolve_model_path

            save_model(compile_gradient(resolve_model_path(model), [MODELS[key][1]],
                                        target=target), path)
            graphs[f"{key} {target}"] = str(path)
    out = subprocess.run([args.openvino, "-c", OV_SCRIPT, json.dumps(graphs), str(args.rounds)],
                         capture_output=True, text=True, timeout=1800)
    line = next((s for s in out.stdout.splitlines() if s.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"the OpenVINO run failed:\n{out.stdout}\n{out.stderr[-2000:]}")
    return json.loads(line[len("RESULT "):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="lite0,googlenet")
    ap.add_argument("--sizes", default="224,512")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4, help="steps per dream (the first is dropped)")
    ap.add_argument("--ort-dir", default=os.environ.get("ONNXDREAM_ORT_DIR") or
                    str(REPO / ".cache" / "onnxruntime-web" / "package"))
    ap.add_argument("--chromium", default=os.environ.get("ONNXDREAM_CHROMIUM") or
                    shutil.which("chromium") or "/usr/bin/chromium")
    ap.add_argument("--webgpu", action="store_true", help="also WebGPU (portable graphs)")
    ap.add_argument("--openvino", metavar="PYTHON", help="a python with onnxruntime-openvino")
    ap.add_argument("--no-wasm", action="store_true", help="skip the WASM/native timing table")
    args = ap.parse_args()
    args.sizes = [int(s) for s in args.sizes.split(",")]
    keys = args.models.split(",")

    from onnxdream.browser.site import export_site

    result: dict = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                "platform": platform.platform()}}
    with tempfile.TemporaryDirectory(prefix="bench-browser-") as tmp:
        work = Path(tmp)
        models = {k: model_file(k, work) for k in keys}
        if not args.no_wasm:
            sites = {}
            for k in keys:
                sites[k] = export_site(work / k, model=models[k], layers=[MODELS[k][1]],
                                       ort_dir=args.ort_dir).path
                for size in args.sizes:
                    photo(size).save(sites[k] / f"img-{size}.png")
            cores = os.cpu_count() or 1
            natives = {k: {"native 1 thread": Native(models[k], MODELS[k][1], 1),
                           f"native {max(2, min(4, cores))} threads":
                               Native(models[k], MODELS[k][1], max(2, min(4, cores)))}
                       for k in keys}
            result["wasm"] = run_browser_table(args, sites, natives)
        if args.webgpu:
            gsites = {}
            for k in keys:
                for target in ("portable", "default"):
                    gsites[k, target] = export_site(
                        work / f"{k}-gpu-{target}", model=models[k], layers=[MODELS[k][1]],
                        ort_dir=args.ort_dir, webgpu=True, target=target).path
                    photo(224).save(gsites[k, target] / "img-224.png")
            result["webgpu"] = run_webgpu(args, gsites)
        if args.openvino:
            result["openvino"] = run_openvino(args, models, work)
    out = HERE / "results" / "bench_browser.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
