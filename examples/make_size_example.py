"""Make examples/size-2048.jpg: the same photo dreamed at 512 and at 2048 pixels, shown at the
same small size, with the old fixed 4 octaves and with the default ``--octaves auto``.

    python examples/make_size_example.py PHOTO -o examples/size-2048.jpg [--work-dir DIR]

PHOTO is square-ish (the README's copy uses astronaut.png from scikit-image's sample data,
public domain). Each dream is one ``onnxdream dream`` command (printed), seed 7, the default
model; the panels are those dreams scaled down to 384 px, labelled.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw

PANEL = 384


def dream(src: Path, out: Path, *extra: str) -> Path:
    cmd = [sys.executable, "-m", "onnxdream.cli.main", "dream", str(src), "-o", str(out), "--seed",
    "7",
           "-q", *extra]
    print("onnxdream", *cmd[3:], flush=True)
    subprocess.run(cmd, check=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("photo", type=Path)
    ap.add_argument("-o", "--output", type=Path, default=Path("examples/size-2048.jpg"))
    ap.add_argument("--work-dir", type=Path, default=None)
    args = ap.parse_args()
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="onnxdream-size-"))
    work.mkdir(parents=True, exist_ok=True)
    with Image.open(args.photo) as im:
        rgb = im.convert("RGB")
    small, big = work / "photo-512.png", work / "photo-2048.png"
    rgb.resize((512, 512 * rgb.height // rgb.width), Image.Resampling.LANCZOS).save(small)
    rgb.resize((2048, 2048 * rgb.height // rgb.width), Image.Resampling.LANCZOS).save(big)
    panels = [
        ("512 px, defaults", dream(small, work / "d512.png")),
        ("2048 px, --octaves 4 (the old default)",
         dream(big, work / "d2048-4.png", "--octaves", "4")),
        ("2048 px, defaults (--octaves auto: 8)", dream(big, work / "d2048-auto.png")),
    ]
    h = PANEL * rgb.height // rgb.width
    sheet = Image.new("RGB", (PANEL * len(panels), h + 24), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (label, path) in enumerate(panels):
        with Image.open(path) as im:
            sheet.paste(im.convert("RGB").resize((PANEL, h), Image.Resampling.LANCZOS),
                        (i * PANEL, 24))
        draw.text((i * PANEL + 6, 5), label, fill="black")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.output, quality=88)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
