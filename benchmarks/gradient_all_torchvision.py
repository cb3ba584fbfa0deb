"""The slow check of issue 2: every torchvision classifier, exported and differentiated.

    python benchmarks/gradient_all_torchvision.py [--models a,b,...] [--timeout S] [--json FILE]

For each of the 80 models of ``torchvision.models.list_models(module=torchvision.models)``, in its
own subprocess: random weights (BatchNorm with non-trivial statistics), export to a dreamable
model, compile the gradient of ``mean`` at the model's default layer, run it on onnxruntime's
CPU provider and compare with torch autograd (relative error max|Δ|/max|g|, with onnxruntime's
ReLU/MaxPool/Clip decisions shared as in tests/gradcheck.py; LayerNorm gets random affine
parameters too). Sizes: 179x211 where the model is
dynamic, its native size otherwise. A model passes when the error is below 1e-4.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1] / "tests"

CHILD = r"""
import json, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[3])
import onnx, torch, torchvision
from gradcheck import compare
from onnxdream.exporters import export_torchvision
name, out = sys.argv[1], Path(sys.argv[2])
t = time.perf_counter()
torch.manual_seed(0)
from onnxdream.exporters.torchvision import build_torchvision
model, _, _ = build_torchvision(name, "none")
with torch.no_grad():
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5); m.running_var.uniform_(0.5, 2.0)
        # LayerNorm's default affine (1, 0) makes the mean of its output a constant, whose
        # gradient is float noise: give it some character
        if isinstance(m, torch.nn.LayerNorm) and m.weight is not None:
            m.weight.uniform_(0.5, 1.5); m.bias.uniform_(-0.5, 0.5)
r = export_torchvision(name, out, "none", module=model)
proto = onnx.load(str(out))
meta = {p.key: p.value for p in proto.metadata_props}
layer = json.loads(meta["onnxdream.default_layers"])[0]
size = int(meta["onnxdream.input_size"])
hw = (179, 211) if r.dynamic_hw else (size, size)
for m in model.modules():
    if hasattr(m, "inplace"):
        m.inplace = False
mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
cap = {}
dict(model.named_modules())[layer].register_forward_hook(lambda mod, i, o: cap.__setitem__("o", o))
def fn(x):
    model((x - mean) / std)
    return cap["o"]
err = compare(None, [hw], objective="mean", layers=[layer], batch=1, model=proto, torch_fn=fn)
print(json.dumps({"layer": layer, "size": list(hw), "dynamic": r.dynamic_hw, "error": err,
                  "seconds": time.perf_counter() - t}))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="", help="comma-separated names (default: all 80)")
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--json", default="", help="also write the rows as JSON lines here")
    args = parser.parse_args()

    import torchvision

    names = args.models.split(",") if args.models else torchvision.models.list_models(
        module=torchvision.models)
    tmp = Path(tempfile.mkdtemp(prefix="onnxdream-grad-"))
    print(f"{'model':<24} {'status':<6} {'layer':<34} {'size':<9} {'rel.err':>9} {'sec':>6}",
          flush=True)
    passed, rows = 0, []
    for name in names:
        out = tmp / f"{name}.onnx"
        t = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, "-c", CHILD, name, str(out), str(TESTS)],
                                  capture_output=True, text=True, timeout=args.timeout)
            last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
            row = json.loads(last) if proc.returncode == 0 and last.startswith("{") else {
                "failure": (proc.stderr.strip().splitlines() or ["killed"])[-1][:160]}
        except subprocess.TimeoutExpired:
            row = {"failure": f"timed out after {args.timeout:.0f}s"}
        for p in tmp.glob(f"{name}.onnx*"):
            p.unlink()
        row["name"] = name
        ok = "error" in row and row["error"] < 1e-4
        passed += ok
        row["status"] = "ok" if ok else "FAIL"
        rows.append(row)
        if "error" in row:
            print(f"{name:<24} {row['status']:<6} {row['layer']:<34} "
                  f"{'x'.join(map(str, row['size'])):<9} {row['error']:>9.1e} "
                  f"{time.perf_counter() - t:>6.1f}", flush=True)
        else:
            print(f"{name:<24} FAIL   {row['failure']}", flush=True)
    print(f"\n{passed}/{len(names)} models: gradient equals autograd within 1e-4", flush=True)
    if args.json:
        Path(args.json).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return 0 if passed == len(names) else 1


if __name__ == "__main__":
    sys.exit(main())
