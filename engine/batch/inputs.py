"""A batch's inputs: files, folders (recursive), glob patterns and text files of paths → the
input files, each with where its outputs go (see :func:`find_inputs`). Part of
:mod:`onnxdream.batch.run`, which re-exports these names."""

from __future__ import annotations

import glob
import importlib.util
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from onnxdream.core.errors import BatchError, first_line

__all__ = ["IMAGE_SUFFIXES", "LIST_SUFFIXES", "Source", "VIDEO_SUFFIXES", "find_inputs",
           "videos_available"]

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".avif", ".bmp", ".dib", ".gif",
                            ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".ico"})
VIDEO_SUFFIXES = frozenset({".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg"})
#: A file input with one of these suffixes is a list of inputs, one per line.
LIST_SUFFIXES = frozenset({".txt", ".lst", ".list"})



@dataclass(frozen=True)
class Source:
    """One input file: ``rel`` is where its outputs go under the output folder (the input's
    sub-folder and stem), ``kind`` is ``image`` or ``video``."""

    path: Path
    rel: Path
    kind: str


def videos_available() -> bool:
    """Whether the ``[video]`` extra (PyAV and OpenCV) is installed."""
    return all(importlib.util.find_spec(m) is not None for m in ("av", "cv2"))


def _kind(path: Path) -> str:
    return "video" if path.suffix.lower() in VIDEO_SUFFIXES else "image"


def _scan(folder: Path, exclude: Path | None) -> Iterator[Path]:
    """Image and video files under ``folder``, recursively, skipping hidden entries and
    ``exclude`` (the output folder)."""
    for root, dirs, files in os.walk(folder, followlinks=False):
        r = Path(root)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")
                         and (exclude is None or not _same(r / d, exclude)))
        for f in sorted(files):
            p = r / f
            if not f.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES | VIDEO_SUFFIXES:
                yield p


def _same(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def _inside(p: Path, folder: Path | None) -> bool:
    if folder is None:
        return False
    try:
        p.resolve().relative_to(folder.resolve())
        return True
    except (ValueError, OSError):
        return False


def _glob_base(pattern: str) -> Path:
    """The folder part of a glob pattern before its first wildcard."""
    parts = Path(pattern).parts
    base: list[str] = []
    for part in parts:
        if glob.has_magic(part):
            break
        base.append(part)
    return Path(*base) if base else Path(".")


def find_inputs(inputs: Iterable[str | os.PathLike], *, exclude: str | os.PathLike | None = None,
                allow_videos: bool | None = None) -> list[Source]:
    """The input files of a batch, in a stable order, each once.

    Each input is a file (its outputs go to the top of the output folder), a folder (searched
    recursively for images and videos; sub-folders are mirrored), a glob pattern (``'*.jpg'``,
    ``'photos/**/*.png'``; mirrored below the pattern's fixed part), or a text file of inputs
    (``.txt``/``.lst``: one per line, ``#`` comments; relative ones are relative to the list's
    folder). ``exclude``: a folder never searched (the output folder). Videos are refused with a
    :class:`BatchError` without the ``[video]`` extra (``allow_videos`` overrides the check).
    """
    excl = Path(exclude) if exclude is not None else None
    found: dict[Path, Source] = {}

    def add(p: Path, rel: Path) -> None:
        key = p.resolve()
        if key not in found:
            found[key] = Source(p, rel, _kind(p))

    def visit(text: str, base: Path | None, depth: int) -> None:
        p = Path(text).expanduser()
        if base is not None and not p.is_absolute():
            p = base / p
        if p.is_dir():
            for f in _scan(p, excl):
                add(f, f.relative_to(p).with_suffix(""))
        elif p.is_file() and p.suffix.lower() in LIST_SUFFIXES and depth == 0:
            try:
                lines = p.read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError) as exc:
                raise BatchError(f"cannot read the list of inputs {p}: {first_line(exc)}",
                                 field="inputs") from None
            for line in lines:
                line = line.strip()
                if line and not line.startswith("#"):
                    visit(line, p.parent, depth + 1)
        elif p.is_file():
            add(p, Path(p.stem))
        elif glob.has_magic(str(p)):
            matches = sorted(glob.glob(str(p), recursive=True))
            files = [Path(m) for m in matches if Path(m).is_file() and not _inside(Path(m), excl)
                     and Path(m).suffix.lower() in IMAGE_SUFFIXES | VIDEO_SUFFIXES]
            if not files:
                raise BatchError(f"no image or video matches {text}", field="inputs")
            root = _glob_base(str(p))
            for f in files:
                try:
                    rel = f.relative_to(root).with_suffix("")
                except ValueError:
                    rel = Path(f.stem)
                add(f, rel)
        else:
            where = f" (listed in a file under {base})" if base is not None else ""
            raise BatchError(f"input {text} does not exist{where}", field="inputs")

    for item in inputs:
        visit(os.fspath(item), None, 0)
    sources = list(found.values())
    if not sources:
        raise BatchError("no images or videos found in the inputs", field="inputs")
    videos = [s for s in sources if s.kind == "video"]
    if videos and not (videos_available() if allow_videos is None else allow_videos):
        more = f" and {len(videos) - 1} more" if len(videos) > 1 else ""
        raise BatchError(f"{videos[0].path}{more}: videos need the [video] extra "
                         "(pip install 'onnxdream[video]')", field="inputs")
    return sources
