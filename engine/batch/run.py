"""Batches: many dreams (images × layers × seeds, and videos) on worker processes or a Ray cluster.

:func:`run` is the whole thing in one call::

    from onnxdream.batch import run as batch
    from onnxdream.settings.options import DreamSettings

    rows = batch.run(["photos/"], DreamSettings(steps=10), output_dir="dreams",
                     layers=["blocks.5", "blocks.9"], seeds=[1, 2], workers=2)

Steps, each public so that front ends can show them:

- :func:`find_inputs` (in :mod:`onnxdream.batch.inputs`): files, folders (recursive), glob
  patterns and text files of paths → :class:`Source`\\ s, each with the place its outputs
  take under the output folder (input sub-folders are mirrored).
- :func:`plan`: the cross product sources × layers × seeds → :class:`BatchItem`\\ s with
  deterministic outputs, ``OUT/<sub-folders>/<stem>--<layer>--s<seed>.png`` (``.mp4`` for a
  video).
- Resume: an item whose output exists and carries the same *settings hash* (:func:`image_hash`:
  the resolver's digest + the model file + the input file; embedded in the PNG's provenance as
  ``onnxdream:batch_hash``) is skipped, not dreamed again.
- The backends dream the rest: ``local`` (:mod:`onnxdream.batch.local_backend`: worker processes,
  each holding its loaded models, one item at a time each) or ``ray``
  (:mod:`onnxdream.batch.ray_backend`: a Ray Data pipeline over an actor pool, on a private local
  instance or a cluster). Both run :class:`Dreamer`, so both write the same files as
  ``onnxdream dream`` does.
- The manifest (JSON lines, :class:`ManifestRow`) gets one line per finished item as it
  finishes, and is compacted to the latest line per output when the batch ends.

A failed item (a corrupt image, a model that cannot run at its size, a worker that crashed) is
a ``failed`` row with a one-line error; the batch goes on. Problems with the batch itself (no
inputs, an unreachable cluster) raise :class:`BatchError`; a bad option raises
:class:`~onnxdream.core.errors.SettingsError` naming it (``layers``, ``seeds``, ``workers``, ...), a
bad layer or model its own error; all of them before any item runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from onnxdream.batch.dreamer import Dreamer
from onnxdream.batch.inputs import (
    IMAGE_SUFFIXES,
    VIDEO_SUFFIXES,
    Source,
    find_inputs,
    videos_available,
)
from onnxdream.batch.items import (
    BACKENDS,
    DIED,
    FAILED,
    HASH_KEY,
    MANIFEST_NAME,
    OK,
    SKIPPED,
    BatchItem,
    Manifest,
    ManifestRow,
    image_hash,
    parse_layers,
    parse_seeds,
    plan,
    video_hash,
)
from onnxdream.batch.local_backend import default_workers, local_rows, worker_threads
from onnxdream.batch.ray_backend import check as check_ray
from onnxdream.batch.ray_backend import ray_rows
from onnxdream.core.errors import BatchError, OnnxDreamError
from onnxdream.dream.frame import file_fingerprint
from onnxdream.settings.options import DreamSettings, require

__all__ = ["BACKENDS", "DIED", "FAILED", "OK", "SKIPPED", "BatchError", "BatchItem", "Dreamer",
"HASH_KEY", "IMAGE_SUFFIXES",
           "MANIFEST_NAME", "Manifest", "ManifestRow", "Source", "VIDEO_SUFFIXES",
           "find_inputs", "image_hash", "parse_layers", "parse_seeds", "plan", "run",
           "video_hash", "videos_available"]


def expected_hash(item: BatchItem, model_info) -> str | None:
    """The settings hash ``item``'s output would have (None: the input cannot be read)."""
    try:
        if item.kind == "video":
            return video_hash(item, file_fingerprint(item.input))
        from onnxdream.settings.resolve import resolve

        h, w = _image_size(item.input)
        return image_hash(resolve(item.settings, h, w, model_info), item.model_id,
                          file_fingerprint(item.input))
    except (OnnxDreamError, OSError):
        return None


def _image_size(path: str) -> tuple[int, int]:
    """(height, width) as :func:`~onnxdream.media.imageio.load_image` gives them (EXIF orientation
    applied), from the header where possible: a resume checks thousands of these. A header
    that disagrees with the decoded image only costs a redo (the hash would differ)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            w, h = im.size
            turned = im.getexif().get(0x0112, 1) in (5, 6, 7, 8)  # Orientation: rotated 90°
        return (w, h) if turned else (h, w)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError):
        from onnxdream.media.imageio import load_image

        return load_image(path).rgb.shape[:2]


def already_done(item: BatchItem, model_info, previous: dict[str, ManifestRow]) -> str | None:
    """The settings hash when ``item``'s output exists with the hash it would get now (a PNG
    by its embedded hash, a video by the manifest's row), else None."""
    out = Path(item.output)
    if not out.is_file():
        return None
    if item.kind == "video":
        row = previous.get(item.output)
        have = row.settings_hash if row is not None and row.status == OK else None
    else:
        from onnxdream.media.imageio import read_metadata

        try:
            have = read_metadata(out).get(HASH_KEY)
        except OnnxDreamError:
            have = None
    if not have:
        return None
    want = expected_hash(item, model_info)
    return want if want == have else None


# ---------------------------------------------------------------------------------------------
# The whole batch


ProgressFn = Callable[[ManifestRow, int, int], None]


def _model_file(settings: DreamSettings) -> tuple[DreamSettings, Path]:
    """The settings with a model file's path made absolute (workers may start elsewhere), and
    the model file."""
    from onnxdream.runtime.opening import resolve_model_path

    path = resolve_model_path(settings.model)
    p = Path(settings.model).expanduser()
    if p.suffix.lower() == ".onnx" or p.is_file():
        settings = dataclasses.replace(settings, model=str(path.resolve()))
    return settings, path


def _check_objectives(items: Sequence[BatchItem]):
    """Build each distinct objective's gradient graph once here (layer names checked, the
    compiled-graph cache warmed for the workers); returns the model's ModelInfo."""
    from onnxdream.runtime.gradient import GradientModel

    seen: dict[tuple, Any] = {}
    for item in items:
        key = item.settings.gradient_key()
        if key not in seen:
            seen[key] = GradientModel.from_settings(item.settings, device="cpu", threads=1).info
    return next(iter(seen.values()))


def _default_label(settings: DreamSettings, info) -> str:
    if settings.layers:
        return "+".join(settings.layers)
    if settings.objective.startswith("class"):
        return settings.objective.replace(":", "")
    return "+".join(info.default_layers) or "default"


def run(inputs: Iterable[str | os.PathLike], settings: DreamSettings | None = None,
        backend: str = "local", *, output_dir: str | os.PathLike,
        layers: Sequence[str] | str | None = None, seeds: Sequence[int] | str | None = None,
        manifest: str | os.PathLike | None = None, workers: int | None = None,
        device: str = "auto", address: str | None = None, gpus_per_worker: float = 0.0,
        cpus_per_worker: float | None = None, progress: ProgressFn | None = None,
        on_start: Callable[[int, int], None] | None = None) -> list[ManifestRow]:
    """Dream every input × layer × seed into ``output_dir``; returns this run's manifest rows
    (one per item, in plan order).

    Args:
        inputs: files, folders, glob patterns, text files of paths (see :func:`find_inputs`).
        settings: the dream (default: DreamSettings()); its ``layers``/``seed`` apply when
            ``layers``/``seeds`` are not given.
        backend: ``local`` (worker processes here) or ``ray`` (a Ray Data pipeline; needs
            ``onnxdream[ray]``).
        layers, seeds: the cross product, as lists or ``"A,B"`` / ``"1,2"`` text.
        manifest: the JSON-lines manifest (default ``output_dir/manifest.jsonl``).
        workers: worker processes (local) or actors (ray); default :func:`default_workers`,
            or on Ray the cluster's CPUs (GPUs) over ``cpus_per_worker`` (``gpus_per_worker``).
        device: local workers' device (auto, cpu, cuda); Ray actors use CUDA exactly when they
            were given GPUs (``gpus_per_worker``).
        address: Ray only: None (a private local instance), ``auto`` (the running cluster) or
            ``HOST:PORT``.
        progress: called ``(row, done, total)`` after each item.
        on_start: called ``(to_dream, skipped)`` once the plan is made, before any dreaming.

    The local backend starts its workers with ``multiprocessing``'s *spawn*: a script that calls
    this needs the usual ``if __name__ == "__main__":`` guard.
    """
    require([
        (backend in BACKENDS, "backend", f"must be one of {', '.join(BACKENDS)}"),
        (workers is None or 1 <= workers <= 1024, "workers", "must be between 1 and 1024"),
        (gpus_per_worker >= 0, "gpus_per_worker", "must be >= 0"),
        (backend == "ray" or not gpus_per_worker, "gpus_per_worker",
         "is for the ray backend (local workers use the device setting)"),
        (backend == "ray" or address is None, "address", "is for the ray backend"),
        (backend == "ray" or cpus_per_worker is None, "cpus_per_worker",
         "is for the ray backend"),
    ])
    settings = (settings or DreamSettings()).validate()
    layer_list, seed_list = parse_layers(layers), parse_seeds(seeds)
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise BatchError(f"the output {out} is a file, not a folder", field="output_dir")
    sources = find_inputs(inputs, exclude=out)
    if backend == "ray":
        check_ray(address, device=device, gpus_per_worker=gpus_per_worker,
              cpus_per_worker=cpus_per_worker)  # the extra, the options, the address: first
    else:
        from onnxdream.runtime.session import resolve_providers

        resolve_providers(device)  # an unknown device, or cuda without CUDA: before any work
    settings, model_path = _model_file(settings)
    model_id = file_fingerprint(model_path)
    from onnxdream.exporters.graph.contract import ModelInfo

    label = _default_label(settings, ModelInfo.load(model_path))
    items = plan(sources, out, settings, layers=layer_list, seeds=seed_list,
                 default_label=label, model_id=model_id)
    info = _check_objectives(items)
    out.mkdir(parents=True, exist_ok=True)
    book = Manifest(manifest if manifest is not None else out / MANIFEST_NAME)
    results: dict[str, ManifestRow] = {}
    done = 0

    def record(row: ManifestRow) -> None:
        nonlocal done
        book.write(row)
        results[row.output] = row
        done += 1
        if progress is not None:
            progress(row, done, len(items))

    try:
        todo, skipped = [], []
        for item in items:
            have = already_done(item, info, book.previous)
            (skipped if have else todo).append((item, have))
        if on_start is not None:
            on_start(len(todo), len(skipped))
        for item, have in skipped:
            record(ManifestRow.for_item(item, SKIPPED, settings_hash=have or ""))
        pending = [item for item, _ in todo]
        if backend == "local":
            n = workers or default_workers(device, len(pending))
            rows: Iterator[ManifestRow] = local_rows(pending, workers=n, device=device,
                                                     threads=worker_threads(n))
        else:
            rows = ray_rows(pending, address=address, workers=workers,
                            gpus_per_worker=gpus_per_worker, cpus_per_worker=cpus_per_worker,
                            device=device)
        with contextlib.closing(rows):
            for row in rows:
                record(row)
        book.compact()
    finally:
        book.close()
    return [results[item.output] for item in items if item.output in results]
