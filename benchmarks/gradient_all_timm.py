"""The slow check of issue 12: timm architectures across families, exported and differentiated.

    python benchmarks/gradient_all_timm.py [--models a,b,...] [--timeout S] [--json FILE]

For each model of :data:`MODELS` (small variants of 41 timm families: CNNs, ViTs, hybrids, MLP
mixers), in its own subprocess: random weights (BatchNorm with non-trivial statistics, norm
layers with random affine parameters), ``export_timm`` to a dreamable model, compile the gradient
of ``mean`` at the model's default layer, run it on onnxruntime's CPU provider and compare with
torch autograd (relative error max|Δ|/max|g|, with onnxruntime's ReLU/MaxPool/Clip decisions
shared as in tests/gradcheck.py). Size: 179x211 where the model is dynamic, its native size
otherwise (where torch calls its ReLUs/MaxPools in another order than the compiled graph,
without sharing the decisions). A model passes when the error is below 1e-4. Each row records how
far it got (export, compile, compare) and the first line of the failure.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1] / "tests"

#: Small variants across timm's families (timm 1.0.31 names).
MODELS = [
    # CNNs
    "resnet18", "resnext26ts", "seresnext26d_32x4d", "regnetx_002", "regnety_002",
    "densenet121", "dla34", "vgg11_bn", "inception_v3", "efficientnet_b0",
    "mobilenetv3_small_050", "mobilenetv4_conv_small", "ghostnet_100", "hrnet_w18_small",
    "repvgg_a0", "rexnet_100", "lcnet_050", "convnext_atto", "convnextv2_atto", "nfnet_l0",
    # transformers
    "vit_tiny_patch16_224", "deit_tiny_patch16_224", "eva02_tiny_patch14_224",
    "swin_tiny_patch4_window7_224", "cait_xxs24_224", "xcit_nano_12_p16_224", "pvt_v2_b0",
    "twins_pcpvt_small", "mvitv2_tiny",
    # hybrids, MLPs and others
    "levit_128s", "mobilevit_xxs", "mobilevitv2_050", "coatnet_nano_rw_224", "maxvit_nano_rw_256",
    "efficientformer_l1", "fastvit_t8", "tiny_vit_5m_224", "edgenext_xx_small",
    "efficientvit_b0", "poolformer_s12", "mixer_s16_224",
]

CHILD = r"""
import json, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[3])
name, out = sys.argv[1], Path(sys.argv[2])
row = {"stage": "build"}
def done(**kw):
    row.update(kw); print(json.dumps(row), flush=True); sys.exit(0)
try:
    t = time.perf_counter()
    import onnx, torch
    from gradcheck import compare
    from onnxdream.exporters.timm import build_timm, export_timm, timm_data_config
    torch.manual_seed(0)
    model, _, _ = build_timm(name, "none")
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.uniform_(-0.5, 0.5); m.running_var.uniform_(0.5, 2.0)
            # the default affine (1, 0) of a norm layer makes the mean of its output a
            # constant, whose gradient is float noise: give it some character
            if isinstance(m, (torch.nn.LayerNorm, torch.nn.GroupNorm)) and m.weight is not None:
                m.weight.uniform_(0.5, 1.5); m.bias.uniform_(-0.5, 0.5)
    row["stage"] = "export"
    r = export_timm(name, out, "none", module=model)
    row.update(dynamic=r.dynamic_hw, exporter=r.exporter, layers=len(r.layers))
    if not r.dynamic_hw:
        row["why_fixed"] = "; ".join(r.notes)[:300]
    proto = onnx.load(str(out))
    meta = {p.key: p.value for p in proto.metadata_props}
    layer = json.loads(meta["onnxdream.default_layers"])[0]
    hw = tuple(int(v) for v in timm_data_config(model)["input_size"][1:])
    hw = (179, 211) if r.dynamic_hw else hw
    row.update(layer=layer, size=list(hw), stage="compile")
    for m in model.modules():
        if hasattr(m, "inplace") and isinstance(m.inplace, bool):
            m.inplace = False
    cap = {}
    dict(model.named_modules())[layer].register_forward_hook(
        lambda mod, i, o: cap.__setitem__("o", o))
    from onnxdream.exporters import timm as T
    cfg = timm_data_config(model)
    mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    multiple = T.pad_multiple(model, tuple(int(v) for v in cfg["input_size"][1:]))
    def fn(x):
        x = (x - mean) / std
        if multiple is not None:
            x = T.pad_to_multiple(x, multiple)
        model(x)
        return cap["o"]
    from onnxdream.exporters.graph import compile_gradient
    compile_gradient(proto, [layer], "mean")  # fails here: a missing rule
    row["stage"] = "compare"
    from gradcheck import contiguous_batchnorm_grads
    stack = contiguous_batchnorm_grads(model)  # a torch bug in the reference (see there)
    stack.__enter__()
    try:
        err = compare(None, [hw], objective="mean", layers=[layer], batch=1, model=proto,
                      torch_fn=fn)
    except Exception as exc:
        # sharing onnxruntime's ReLU/MaxPool decisions assumes torch calls them in the
        # graph's node order, which a compiled graph of parallel branches (DLA's trees) need
        # not keep: compare without sharing then
        import gradcheck
        gradcheck.onnx_decisions = lambda m, x: {"maxpool": [], "relu": [], "clip": []}
        row["decisions"] = "unshared (" + type(exc).__name__ + ")"
        err = compare(None, [hw], objective="mean", layers=[layer], batch=1, model=proto,
                      torch_fn=fn)
    done(error=err, stage="done", seconds=time.perf_counter() - t)
except SystemExit:
    raise
except BaseException as exc:
    text = (str(exc).strip().splitlines() or [""])[0]
    done(failure=f"{type(exc).__name__}: {text}"[:300])
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="", help="comma-separated names (default: MODELS)")
    parser.add_argument("--timeout", type=float, default=1200)
    parser.add_argument("--json", default="", help="also write the rows as JSON lines here")
    args = parser.parse_args()

    names = args.models.split(",") if args.models else MODELS
    tmp = Path(tempfile.mkdtemp(prefix="onnxdream-timm-"))
    try:
        return sweep(names, tmp, args.timeout, Path(args.json) if args.json else None)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def sweep(names: list[str], tmp: Path, timeout: float, out_file: Path | None) -> int:
    print(f"{'model':<30} {'status':<6} {'layer':<22} {'size':<9} {'rel.err':>9} {'sec':>6}",
          flush=True)
    passed, rows = 0, []
    for name in names:
        out = tmp / f"{name}.onnx"
        t = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, "-c", CHILD, name, str(out), str(TESTS)],
                                  capture_output=True, text=True, timeout=timeout,
                                  env={**os.environ, "PYTHONWARNINGS": "ignore"})
            last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
            row = json.loads(last) if last.startswith("{") else {
                "failure": (proc.stderr.strip().splitlines() or ["killed"])[-1][:300]}
        except subprocess.TimeoutExpired:
            row = {"failure": f"timed out after {timeout:.0f}s"}
        for p in tmp.glob(f"{name}.onnx*"):
            p.unlink()
        row["name"] = name
        ok = "error" in row and row["error"] < 1e-4
        passed += ok
        row["status"] = "ok" if ok else "FAIL"
        rows.append(row)
        if out_file is not None:  # written as it goes: a long sweep can be read half-way
            with out_file.open("a") as f:
                f.write(json.dumps(row) + "\n")
        if "error" in row:
            fixed = "" if row.get("dynamic") else "  (fixed size)"
            print(f"{name:<30} {row['status']:<6} {row['layer']:<22} "
                  f"{'x'.join(map(str, row['size'])):<9} {row['error']:>9.1e} "
                  f"{time.perf_counter() - t:>6.1f}{fixed}", flush=True)
        else:
            print(f"{name:<30} FAIL   at {row.get('stage', '?')}: {row['failure']}", flush=True)
    print(f"\n{passed}/{len(names)} models: gradient equals autograd within 1e-4", flush=True)
    return 0 if passed == len(names) else 1


if __name__ == "__main__":
    sys.exit(main())
