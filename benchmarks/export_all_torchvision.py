"""Export every torchvision classifier (random weights) and probe it; print a table.

    python benchmarks/export_all_torchvision.py [--models a,b,...] [--out DIR] [--timeout S]

Each model runs in its own subprocess (a crash or a memory blow-up stays local). Columns:
status, whether H/W stayed dynamic, which exporter succeeded, seconds for the whole export
(build + trace + export + onnxruntime probe + save), file size, layer count, default layer,
and why the dynamic attempt was given up. Slow: roughly 30–60 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, sys, time
from pathlib import Path
from onnxdream.exporters import export_torchvision
name, out = sys.argv[1], Path(sys.argv[2])
t = time.perf_counter()
r = export_torchvision(name, out, weights="none")
seconds = time.perf_counter() - t
import onnx
meta = {p.key: p.value for p in onnx.load(str(out), load_external_data=False).metadata_props}
size = out.stat().st_size + (out.with_name(out.name + ".data").stat().st_size
                             if out.with_name(out.name + ".data").exists() else 0)
print(json.dumps({"dynamic": r.dynamic_hw, "exporter": r.exporter, "seconds": seconds,
                  "mb": size / 1e6, "layers": len(r.layers),
                  "default": json.loads(meta["onnxdream.default_layers"]),
                  "input_size": meta["onnxdream.input_size"], "notes": r.notes}))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", default="", help="comma-separated names (default: all 80)")
    parser.add_argument("--out", default="", help="keep the .onnx files here (default: temp)")
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--json", default="", help="also write the rows as JSON lines here")
    args = parser.parse_args()

    import torchvision

    names = args.models.split(",") if args.models else torchvision.models.list_models(
        module=torchvision.models
    )
    outdir = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="onnxdream-tv-"))
    outdir.mkdir(parents=True, exist_ok=True)
    header = f"{'model':<24} {'status':<6} {'dyn':<3} {'size':>4} {'exporter':<11} {'sec':>6} " \
             f"{'MB':>7} {'layers':>6}  default / notes"
    print(header, flush=True)
    print("-" * len(header), flush=True)
    ok = 0
    for name in names:
        out = outdir / f"{name}.onnx"
        t = time.perf_counter()
        try:
            proc = subprocess.run(
                [sys.executable, "-c", CHILD, name, str(out)],
                capture_output=True, text=True, timeout=args.timeout,
            )
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            if proc.returncode == 0 and lines:
                row = json.loads(lines[-1])
                row.update(name=name, status="ok")
            else:
                err = (proc.stderr.strip().splitlines() or ["?"])[-1]
                row = {"name": name, "status": "FAIL", "error": err[:300]}
        except subprocess.TimeoutExpired:
            row = {"name": name, "status": "TIME", "error": f"over {args.timeout:.0f} s"}
        row.setdefault("seconds", time.perf_counter() - t)
        if row["status"] == "ok":
            ok += 1
            notes = "; ".join(row["notes"])
            print(
                f"{name:<24} {'ok':<6} {'yes' if row['dynamic'] else 'no':<3} "
                f"{row['input_size']:>4} {row['exporter']:<11} {row['seconds']:>6.1f} "
                f"{row['mb']:>7.1f} {row['layers']:>6}  {','.join(row['default'])}"
                + (f"  [{notes}]" if notes else ""),
                flush=True,
            )
        else:
            print(f"{name:<24} {row['status']:<6} {'':<3} {'':>4} {'':<11} "
                  f"{row['seconds']:>6.1f} {'':>7} {'':>6}  {row['error']}", flush=True)
        if args.json:
            with open(args.json, "a") as fh:
                fh.write(json.dumps(row) + "\n")
        if not args.out:
            for f in (out, out.with_name(out.name + ".data")):
                f.unlink(missing_ok=True)
    print(f"\n{ok}/{len(names)} exported and probed", flush=True)
    return 0 if ok == len(names) else 1


if __name__ == "__main__":
    sys.exit(main())
