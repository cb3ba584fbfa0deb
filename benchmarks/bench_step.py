"""Per-step time of the onnxdream engine vs PyTorch eager vs the onnxruntime floor.

For each model and size, side by side in one process, round-robin in blocks of a few steps (so
load changes hit all columns alike, without one runtime's spinning threads slowing the other),
the median over ``--repeats`` of one ascent step:

- engine: ``onnxdream.dream.ascent.ascend(gm, img, ..., steps=1)`` (jitter roll, gradient, mean-abs
  normalise, step, clip, roll back), the compiled graph optimised (``exporters/graph/optimize.py``);
- torch:  the same step in PyTorch eager, frozen weights, autograd w.r.t. the input, truncated at
  the layer (a forward hook stops the network there);
- floor:  twice the onnxruntime forward time of the truncated network (the input gradient costs
  about one more forward);
- plain:  (``--plain``) the engine with the unoptimised compiled graph, to show what optimize did.

Then a 4096x4096 tiled step (``--tiled``) in a child process: time and peak resident memory.

    .venv/bin/python benchmarks/bench_step.py                       # both models, 224/512/1024
    .venv/bin/python benchmarks/bench_step.py --models googlenet --sizes 512 --repeats 9
    .venv/bin/python benchmarks/bench_step.py --device cuda          # onnxruntime-gpu

Prints a table and writes JSON (``--json``, default benchmarks/results/bench_step.json).
GoogLeNet is exported from torchvision with random weights (timing does not depend on them).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"googlenet": "inception4c", "efficientnet-lite0": "blocks.5"}
BLOCK = 3  # steps per column in a row (see bench_model)


# -- models ------------------------------------------------------------------------------------
def onnx_model(name: str, work: Path) -> Path:
    if name == "googlenet":
        path = work / "googlenet-random.onnx"
        if not path.exists():
            import torch

            from onnxdream.exporters.torchvision import export_torchvision

            torch.manual_seed(0)
            export_torchvision("googlenet", path, weights="none")
        return path
    from onnxdream.models import resolve_model

    return Path(resolve_model(name))


def torch_module(name: str, layer: str, device: str = "cpu"):
    """callable x01 -> layer activation; frozen weights, eval mode, on ``device``."""
    import torch

    class Stop(Exception):
        pass

    if name == "googlenet":
        import torchvision

        torch.manual_seed(0)
        net = torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=True,
                                           transform_input=True).eval().to(device)
        mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1)

        def pre(x):
            return (x - mean) / std
    else:
        sys.path.insert(0, str(ROOT / "tests"))
        import torch_efficientnet_lite as tel
        from onnxdream.models import ZOO
        from onnxdream.models.checkpoint import load_state_dict

        net = tel.load(name, load_state_dict(ZOO[name].checkpoint_path())).to(device)
        layer = "_blocks." + layer.split(".")[1] if layer.startswith("blocks.") else layer
        mean, std = (torch.as_tensor(v, dtype=torch.float32).to(device)
                     for v in (tel.MEAN, tel.STD))

        def pre(x):
            return (x - mean) / std
    for p in net.parameters():
        p.requires_grad_(False)
    module = dict(net.named_modules())[layer]
    box = {}

    def hook(_m, _i, out):
        box["out"] = out
        raise Stop

    module.register_forward_hook(hook)

    def forward(x):
        try:
            net(x) if name == "googlenet" else _eff_forward(net, pre(x))
        except Stop:
            pass
        return box.pop("out")

    def _eff_forward(n, x):
        x = n.relu(n._bn0(n._conv_stem(x)))
        for block in n._blocks:
            x = block(x)
        return x

    if name == "googlenet":
        # torchvision applies transform_input to ImageNet-normalised input
        return lambda x: forward(pre(x))
    return forward


def floor_model(src: Path, layer: str) -> bytes:
    import onnx
    from onnx import helper

    from onnxdream.exporters.graph.compiler import _needed_nodes
    from onnxdream.exporters.graph.contract import layer_table, load_model
    from onnxdream.exporters.graph.layers import resolve_layer

    m = load_model(src)
    t = resolve_layer(layer_table(m), layer, m)
    nodes = _needed_nodes(list(m.graph.node), {t})
    used = {i for n in nodes for i in n.input}
    g = helper.make_graph(nodes, "floor", list(m.graph.input),
                          [helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None)],
                          [i for i in m.graph.initializer if i.name in used])
    return helper.make_model(g, opset_imports=m.opset_import,
                             ir_version=m.ir_version).SerializeToString()


# -- steps -------------------------------------------------------------------------------------
def engine_step(gm, settings, k: int = 1, seed=0):
    """k engine steps per call (on CUDA the image stays on the device between them)."""
    from onnxdream.dream.ascent import ascend

    rng = np.random.default_rng(seed)

    def step(img):
        return ascend(gm, img, settings, rng, k)
    return step


def torch_step(fn, settings, k: int = 1, device: str = "cpu", seed=0):
    """k PyTorch eager steps per call, on ``device`` (synchronised before returning)."""
    import torch

    rng = np.random.default_rng(seed)

    def step(img: np.ndarray):
        x0 = torch.from_numpy(img).to(device)
        for _ in range(k):
            oy, ox = (int(v) for v in rng.integers(-settings.jitter, settings.jitter + 1, 2))
            x = x0.roll((oy, ox), (1, 2))[None].requires_grad_(True)
            fn(x).mean().backward()
            g = x.grad[0]
            with torch.no_grad():
                x0 = (x[0] + settings.step_size * g / (g.abs().mean() + 1e-8)).clamp_(0, 1)
                x0 = x0.roll((-oy, -ox), (1, 2))
        out = x0.cpu().numpy()
        if device == "cuda":
            torch.cuda.synchronize()
        return out
    return step


def floor_step(floor, device: str):
    """One forward of the truncated network; on CUDA from a device-resident input."""
    sess = floor.session
    if device != "cuda":
        return lambda img: sess.run(None, {"image": img[None]})
    import onnxruntime as ort

    cache = {}

    def run(img):
        if img.shape not in cache:
            cache.clear()
            cache[img.shape] = ort.OrtValue.ortvalue_from_numpy(img[None], "cuda", 0)
        b = sess.io_binding()
        b.bind_ortvalue_input("image", cache[img.shape])
        for o in sess.get_outputs():
            b.bind_output(o.name, "cuda")
        sess.run_with_iobinding(b)
        b.synchronize_outputs()
    return run


def timed(fn, arg) -> float:
    t = time.perf_counter()
    fn(arg)
    return time.perf_counter() - t


def bench_model(name: str, layer: str, sizes, repeats: int, device: str, work: Path,
                plain: bool, torch_too: bool, k: int = 1) -> list[dict]:
    import onnx

    from onnxdream.dream.ascent import DreamSettings
    from onnxdream.exporters.graph import compile_gradient
    from onnxdream.runtime.gradient import GradientModel
    from onnxdream.runtime.session import create_session

    path = onnx_model(name, work)
    settings = DreamSettings(octaves=1, steps=1, jitter=32, tile_size=0, seed=0)
    gm = GradientModel(path, [layer], device=device)
    floor = create_session(floor_model(path, layer), device=device)
    device = gm.session.device  # what the engine really runs on (auto resolves here)
    runners = {"engine": engine_step(gm, settings, k)}
    if plain:
        raw = compile_gradient(onnx.load(str(path)), [layer], optimize=False)
        gm_plain = GradientModel.__new__(GradientModel)
        gm_plain.__dict__.update(gm.__dict__)
        gm_plain.session = create_session(raw.SerializeToString(), device=device)
        runners["plain"] = engine_step(gm_plain, settings, k)
    if torch_too:
        import torch

        if device == "cpu":
            torch.set_num_threads(gm.session.threads or os.cpu_count())
        runners["torch"] = torch_step(torch_module(name, layer, device), settings, k, device)
    floor_fn = floor_step(floor, device)
    rows = []
    for size in sizes:
        img = np.random.default_rng(size).random((3, size, size), dtype=np.float32)
        times: dict[str, list[float]] = {k: [] for k in [*runners, "floor"]}
        columns = {**runners, "floor": floor_fn}
        for fn in columns.values():  # warm-up (first-run allocations, caches)
            fn(img.copy())
            fn(img.copy())
        # round-robin over short blocks: a load change still hits every column alike, and each
        # block starts after the previous runtime's worker threads stopped spinning (onnxruntime
        # and torch both spin-wait after parallel work, which steals a core from the other)
        done = 0
        while done < repeats:
            n = min(BLOCK, repeats - done)
            for col, fn in columns.items():
                time.sleep(0.3)
                for _ in range(n):
                    dt = timed(fn, img.copy())
                    times[col].append(2 * dt if col == "floor" else dt / k)
            done += n
        med = {k: 1000 * float(np.median(v)) for k, v in times.items()}
        best = {k: 1000 * float(np.min(v)) for k, v in times.items()}
        row = {"model": name, "layer": layer, "size": size, "repeats": repeats,
               "steps_per_call": k, "provider": gm.provider,
               **{f"{k}_ms": round(v, 1) for k, v in med.items()},
               **{f"{k}_min_ms": round(v, 1) for k, v in best.items()},
               "engine_vs_floor": round(med["engine"] / med["floor"], 2)}
        if "torch" in med:
            row["engine_vs_torch"] = round(med["engine"] / med["torch"], 2)
        if "plain" in med:
            row["plain_vs_engine"] = round(med["plain"] / med["engine"], 2)
        print(_fmt(row), flush=True)
        rows.append(row)
    return rows


def tiled_child(model: str, layer: str, size: int, tile: int, device: str, work: str) -> None:
    """Runs in a child process: one tiled gradient step at size x size; prints JSON."""
    from onnxdream.dream.ascent import DreamSettings, ascend
    from onnxdream.runtime.gradient import GradientModel

    path = onnx_model(model, Path(work))
    gm = GradientModel(path, [layer], device=device)
    base = _peak_rss_kb()
    img = np.random.default_rng(0).random((3, size, size), dtype=np.float32)
    settings = DreamSettings(octaves=1, steps=1, jitter=32, tile_size=tile, seed=0)
    rng = np.random.default_rng(0)
    t = time.perf_counter()
    ascend(gm, img, settings, rng, 1)
    dt = time.perf_counter() - t
    peak = _peak_rss_kb()
    print(json.dumps({"model": model, "layer": layer, "size": size, "tile_size": tile,
                      "step_s": round(dt, 2), "peak_rss_mb": round(peak / 1024),
                      "step_rss_mb": round((peak - base) / 1024)}))


def _torch_can_run(device: str) -> bool:
    try:
        import torch
    except ImportError:
        print("no torch column: torch is not installed")
        return False
    if device == "cuda" and not torch.cuda.is_available():
        print("no torch column: this torch has no CUDA device")
        return False
    return True


def _peak_rss_kb() -> int:
    """This process's peak resident memory in KiB: VmHWM (Linux), else ru_maxrss.

    VmHWM belongs to the process image, so a child started by the benchmark does not report the
    parent's peak (ru_maxrss can carry it across fork + exec).
    """
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def _fmt(row: dict) -> str:
    cols = [f"{row['model']:>18s}", f"{row['size']:>5d}"]
    for k in ("engine", "plain", "torch", "floor"):
        cols.append(f"{row[k + '_ms']:>9.1f}" if k + "_ms" in row else f"{'-':>9s}")
    cols.append(f"{row.get('engine_vs_torch', float('nan')):>9.2f}")
    cols.append(f"{row['engine_vs_floor']:>9.2f}")
    return " ".join(cols)


def copy_bandwidth() -> float:
    """GB/s of a 200 MB numpy copy (best of 5): on a shared VM this moves with the neighbours,
    and the engine's many memory-bound passes move with it more than compute-bound PyTorch."""
    a = np.ones(50_000_000, np.float32)
    b = np.empty_like(a)
    best = min(timed(lambda _: np.copyto(b, a), None) for _ in range(5))
    return round(2 * a.nbytes / best / 1e9, 1)


def machine(device: str) -> dict:
    import onnxruntime as ort

    from onnxdream.runtime.session import default_threads

    cpu = platform.processor() or "?"
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = None
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "threads": default_threads(),
            "copy_gb_s": copy_bandwidth(),
            "onnxruntime": ort.__version__, "device": device, "python": platform.python_version(),
            "loadavg_1m_at_start": load}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--sizes", default="224,512,1024")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    ap.add_argument("--plain", action="store_true", help="also time the unoptimised graph")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--steps-per-call", type=int, default=None,
                    help="steps per timed call, time divided by it (default: 10 on CUDA, else 1)")
    ap.add_argument("--tiled", type=int, default=4096, help="tiled run size (0: skip)")
    ap.add_argument("--tile-size", type=int, default=1024)
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "bench_step.json"))
    ap.add_argument("--work", default=None, help="where to keep exported models")
    ap.add_argument("--tiled-child", nargs=2, metavar=("MODEL", "LAYER"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    work = Path(a.work or Path(tempfile.gettempdir()) / "onnxdream-bench")
    work.mkdir(parents=True, exist_ok=True)
    if a.tiled_child:
        tiled_child(*a.tiled_child, a.tiled, a.tile_size, a.device, str(work))
        return 0
    info = machine(a.device)
    print(json.dumps(info))
    print(f"{'model':>18s} {'size':>5s} {'engine':>9s} {'plain':>9s} {'torch':>9s} {'floor':>9s}"
          f" {'eng/torch':>9s} {'eng/floor':>9s}   (ms per step, median of {a.repeats})")
    rows = []
    sizes = [int(s) for s in a.sizes.split(",") if s]
    k = a.steps_per_call or (10 if a.device == "cuda" else 1)
    torch_too = not a.no_torch and _torch_can_run(a.device)
    for name in a.models.split(","):
        rows += bench_model(name, MODELS[name], sizes, a.repeats, a.device, work, a.plain,
                            torch_too, k)
    tiled = []
    if a.tiled:
        for name in a.models.split(","):
            out = subprocess.run([sys.executable, __file__, "--tiled-child", name, MODELS[name],
                                  "--tiled", str(a.tiled), "--tile-size", str(a.tile_size),
                                  "--device", a.device, "--work", str(work)],
                                 capture_output=True, text=True, check=False)
            if out.returncode:
                print(f"tiled {name}: failed\n{out.stderr[-2000:]}")
                continue
            tiled.append(json.loads(out.stdout.strip().splitlines()[-1]))
            t = tiled[-1]
            print(f"tiled {name} {t['size']}x{t['size']} (tiles of {t['tile_size']}): "
                  f"{t['step_s']} s/step, peak RSS {t['peak_rss_mb']} MB "
                  f"(+{t['step_rss_mb']} MB during the step)")
    info["copy_gb_s_at_end"] = copy_bandwidth()
    print(f"memory copy bandwidth: {info['copy_gb_s']} GB/s at start, "
          f"{info['copy_gb_s_at_end']} GB/s at end")
    out = Path(a.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": info, "steps": rows, "tiled": tiled}, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
