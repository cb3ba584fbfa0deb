"""Batches: many dreams (images × layers × seeds, and videos) on worker processes or a Ray cluster.

:func:`run` is the whole thing in one call::

    from onnxdream import batch
    from onnxdream.settings import DreamSettings

    rows = batch.run(["photos/"], DreamSettings(steps=10), output_dir="dreams",
                     layers=["blocks.5", "blocks.9"], seeds=[1, 2], workers=2)

Steps, each public so that front ends can show them:

- :func:`find_inputs` (in :mod:`onnxdream.batch_inputs`): files, folders (recursive), glob
  patterns and text files of paths → :class:`Source`\\ s, each with the place its outputs
  take under the output folder (input sub-folders are mirrored).
- :func:`plan`: the cross product sources × layers × seeds → :class:`BatchItem`\\ s with
  deterministic outputs, ``OUT/<sub-folders>/<stem>--<layer>--s<seed>.png`` (``.mp4`` for a
  video).
- Resume: an item whose output exists and carries the same *settings hash* (:func:`image_hash`:
  the resolver's digest + the model file + the input file; embedded in the PNG's provenance as
  ``onnxdream:batch_hash``) is skipped, not dreamed again.
- The backends dream the rest: ``local`` (:mod:`onnxdream.batch_local`: worker processes,
  each holding its loaded models, one item at a time each) or ``ray``
  (:mod:`onnxdream.batch_ray`: a Ray Data pipeline over an actor pool, on a private local
  instance or a cluster). Both run :class:`Dreamer`, so both write the same files as
  ``onnxdream dream`` does.
- The manifest (JSON lines, :class:`ManifestRow`) gets one line per finished item as it
  finishes, and is compacted to the latest line per output when the batch ends.

A failed item (a corrupt image, a model that cannot run at its size, a worker that crashed) is
a ``failed`` row with a one-line error; the batch goes on. Problems with the batch itself (no
inputs, an unreachable cluster) raise :class:`BatchError`; a bad option raises
:class:`~onnxdream.errors.SettingsError` naming it (``layers``, ``seeds``, ``workers``, ...), a bad
layer or model its own error; all of them before any item runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from onnxdream.batch_inputs import (
    IMAGE_SUFFIXES,
    VIDEO_SUFFIXES,
    Source,
    find_inputs,
    videos_available,
)
from onnxdream.errors import BatchError, OnnxDreamError, SettingsError, first_line
from onnxdream.framedream import OpenModels, file_fingerprint
from onnxdream.settings import DreamSettings, require

__all__ = ["BACKENDS", "BatchError", "BatchItem", "Dreamer", "HASH_KEY", "IMAGE_SUFFIXES",
           "MANIFEST_NAME", "Manifest", "ManifestRow", "Source", "VIDEO_SUFFIXES",
           "find_inputs", "image_hash", "parse_layers", "parse_seeds", "plan", "run",
           "video_hash", "videos_available"]

BACKENDS = ("local", "ray")
MANIFEST_NAME = "manifest.jsonl"
#: The PNG provenance key that holds an output's settings hash (what resume compares).
HASH_KEY = "onnxdream:batch_hash"
OK, FAILED, SKIPPED = "ok", "failed", "skipped"
DIED = "worker process died (a crash or out of memory)"


# ---------------------------------------------------------------------------------------------
# Items


def parse_layers(text: str | Sequence[str] | None) -> list[str]:
    """``"A,B:2,C+D"`` → ``["A", "B:2", "C+D"]``: one output per entry; ``+`` mixes layers in
    one dream (``C+D``: both, as ``--layer C --layer D`` would)."""
    if text is None or (not isinstance(text, str) and not text):
        return []
    parts = text.split(",") if isinstance(text, str) else [p for t in text for p in t.split(",")]
    out = [p.strip() for p in parts]
    if not out or any(not p or any(not s.strip() for s in p.split("+")) for p in out):
        raise SettingsError("layers", "must be a comma-separated list of layer names (A,B,C); "
                            "A+B mixes two layers in one dream")
    return out


def parse_seeds(text: str | Sequence[int] | None) -> list[int]:
    """``"1,2,3"`` or ``"1-4"`` (inclusive) → seeds, each in [0, 2^32)."""
    if text is None or (not isinstance(text, str) and not text):
        return []
    if not isinstance(text, str):
        seeds = [int(s) for s in text]
    else:
        seeds = []
        try:
            for part in text.split(","):
                a, sep, b = part.strip().partition("-")
                seeds += list(range(int(a), int(b) + 1)) if sep else [int(a)]
        except ValueError:
            seeds = [-1]
    if not seeds or any(not 0 <= s < 2**32 for s in seeds) or len(seeds) > 100_000:
        raise SettingsError("seeds", "must be integers between 0 and 2^32-1: 1,2,3 or a "
                            "range 1-8")
    return list(dict.fromkeys(seeds))


@dataclass(frozen=True)
class BatchItem:
    """One dream of a batch: ``settings`` has this item's layers and seed; ``layer`` is the
    label used in the output name and the manifest; ``model_id`` fingerprints the model file."""

    input: str
    output: str
    kind: str
    layer: str
    settings: DreamSettings
    model_id: str = ""

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> BatchItem:
        d = json.loads(text)
        s = d.pop("settings")
        s["layers"] = tuple(s["layers"])
        return cls(settings=DreamSettings(**s), **d)


_UNSAFE = re.compile(r"[^A-Za-z0-9._+=-]+")


def safe_label(label: str) -> str:
    """A layer label made safe for a file name (``model/block_1/Relu6:0`` →
    ``model_block_1_Relu6_0``)."""
    return _UNSAFE.sub("_", label).strip("._") or "layer"


def plan(sources: Sequence[Source], output_dir: str | os.PathLike, settings: DreamSettings, *,
         layers: Sequence[str] = (), seeds: Sequence[int] = (), default_label: str = "default",
         model_id: str = "") -> list[BatchItem]:
    """The batch's items: every layer (``A`` or ``A+B``) × seed × source, in that order.

    Without ``layers`` each item dreams ``settings.layers`` (labelled by them, else by
    ``default_label``: the model's default layers); without ``seeds``, ``settings.seed``, else 0
    (a batch is reproducible, so resumable, by default). Two sources that would write the same
    output are a BatchError.
    """
    out = Path(output_dir)
    specs: list[tuple[tuple[str, ...], str]] = (
        [(tuple(s.strip() for s in spec.split("+")), spec) for spec in layers] if layers else
        [(tuple(settings.layers), "+".join(settings.layers) or default_label)])
    seed_list = list(seeds) or [settings.seed if settings.seed is not None else 0]
    items: list[BatchItem] = []
    owner: dict[Path, Source] = {}
    for names, label in specs:
        for seed in seed_list:
            s = dataclasses.replace(settings, layers=names, seed=int(seed))
            for src in sources:
                ext = ".mp4" if src.kind == "video" else ".png"
                target = out / src.rel.parent / f"{src.rel.name}--{safe_label(label)}--s{seed}{ext}"
                other = owner.setdefault(target, src)
                if other is not src:
                    raise BatchError(f"{other.path} and {src.path} would both write {target}; "
                                     "rename one or give them separate folders", field="inputs")
                items.append(BatchItem(str(src.path), str(target), src.kind, label, s, model_id))
    return items


def _hash(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def image_hash(resolved, model_id: str, input_id: str) -> str:
    """The settings hash of an image item: the resolver's digest (settings, seed, size, resolved
    values), the model file and the input file."""
    return _hash("image", resolved.digest(), model_id, input_id)


def video_hash(item: BatchItem, input_id: str) -> str:
    """The settings hash of a video item (the settings, the model file and the input file)."""
    settings = dataclasses.asdict(item.settings)
    settings["layers"] = list(settings["layers"])
    return _hash("video", settings, item.model_id, input_id)


# ---------------------------------------------------------------------------------------------
# The manifest


@dataclass(frozen=True)
class ManifestRow:
    """One line of the manifest: an item's outcome (``ok``, ``failed`` or ``skipped``: its
    output was already there with the same settings hash)."""

    input: str
    output: str
    layer: str
    seed: int
    settings_hash: str
    status: str
    seconds: float
    error: str = ""

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ManifestRow:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def for_item(cls, item: BatchItem, status: str, *, settings_hash: str = "",
                 seconds: float = 0.0, error: str = "") -> ManifestRow:
        return cls(item.input, item.output, item.layer, int(item.settings.seed or 0),
                   settings_hash, status, round(float(seconds), 3), error)


class Manifest:
    """The JSON-lines manifest: rows appended (and flushed) as items finish; :meth:`compact`
    rewrites it with the latest row per output when the batch ends."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.previous = self._read()
        self._created = not self.path.exists()
        try:  # opened now, so an unwritable manifest fails before any work
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
            if not self._created and not self._ends_with_newline():
                self._fh.write("\n")  # after a line cut short by a kill
        except OSError as exc:
            raise BatchError(f"cannot write the manifest {self.path}: "
                             f"{exc.strerror or exc}", field="manifest") from None
        self.rows: list[ManifestRow] = []

    def _ends_with_newline(self) -> bool:
        with open(self.path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            if fh.tell() == 0:
                return True
            fh.seek(-1, os.SEEK_END)
            return fh.read(1) == b"\n"

    def _read(self) -> dict[str, ManifestRow]:
        rows: dict[str, ManifestRow] = {}
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError):
            return rows
        for line in lines:
            try:
                row = ManifestRow.from_dict(json.loads(line))
            except (ValueError, TypeError):
                continue  # a line cut short by a kill, or not ours
            if row.status != SKIPPED or row.output not in rows:
                rows[row.output] = row
        return rows

    def write(self, row: ManifestRow) -> None:
        self._fh.write(row.to_json() + "\n")
        self._fh.flush()
        self.rows.append(row)

    def compact(self) -> None:
        """Rewrite the manifest atomically: the latest row per output (a ``skipped`` row keeps
        the earlier row that made the output, if there is one)."""
        from onnxdream.atomic import write_atomic

        latest = dict(self.previous)
        for row in self.rows:
            if row.status != SKIPPED or row.output not in latest:
                latest[row.output] = row
        self._fh.close()
        text = "".join(r.to_json() + "\n" for r in latest.values())
        with contextlib.suppress(OSError):
            write_atomic(self.path, text.encode("utf-8"))

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.close()
        if self._created and not self.rows:  # nothing ran: leave no empty manifest behind
            self.path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# The dreamer: what every worker runs


class Dreamer:
    """Dreams items with loaded models: one GradientModel (one onnxruntime session) per
    objective, the last ``max_models`` kept. :meth:`process` never raises for an item's own
    problem: it returns a ``failed`` row."""

    def __init__(self, device: str = "auto", threads: int | None = None, max_models: int = 4):
        self.models = OpenModels(device, threads, size=max_models)

    def process(self, item: BatchItem) -> ManifestRow:
        t0 = time.perf_counter()
        digest = ""
        try:
            if item.kind == "video":
                digest = self._video(item)
            else:
                digest = self._image(item)
        except OnnxDreamError as exc:
            return ManifestRow.for_item(item, FAILED, settings_hash=digest,
                                        seconds=time.perf_counter() - t0,
                                        error=first_line(exc, 300))
        except Exception as exc:  # noqa: BLE001 - one item's bug must not stop the batch
            return ManifestRow.for_item(item, FAILED, settings_hash=digest,
                                        seconds=time.perf_counter() - t0,
                                        error=f"{type(exc).__name__}: {first_line(exc, 300)}")
        return ManifestRow.for_item(item, OK, settings_hash=digest,
                                    seconds=time.perf_counter() - t0)

    def _image(self, item: BatchItem) -> str:
        from onnxdream.ascent import dream
        from onnxdream.imageio import load_image
        from onnxdream.imagewrite import save_image
        from onnxdream.provenance import dream_metadata
        from onnxdream.resolve import resolve

        loaded = load_image(item.input)
        gm = self.models.get(item.settings)
        h, w = loaded.rgb.shape[:2]
        resolved = resolve(item.settings, h, w, gm.info)
        digest = image_hash(resolved, item.model_id, file_fingerprint(item.input))
        result = dream(gm, loaded.rgb, resolved)
        meta = dream_metadata(resolved, objective=gm.objective, provider=gm.provider,
                              image=item.input, output=item.output)
        meta[HASH_KEY] = digest
        Path(item.output).parent.mkdir(parents=True, exist_ok=True)
        save_image(item.output, result, alpha=loaded.alpha, metadata=meta)
        return digest

    def _video(self, item: BatchItem) -> str:
        from onnxdream.ascent import dream
        from onnxdream.video import dream_video, frame_settings

        gm = self.models.get(item.settings)
        digest = video_hash(item, file_fingerprint(item.input))

        def dream_frame(rgb, params):
            return dream(gm, rgb, frame_settings(item.settings, params))

        Path(item.output).parent.mkdir(parents=True, exist_ok=True)
        dream_video(item.input, item.output, dream_frame,
                    dream_key={"batch": digest, "settings": item.settings})
        return digest


def expected_hash(item: BatchItem, model_info) -> str | None:
    """The settings hash ``item``'s output would have (None: the input cannot be read)."""
    try:
        if item.kind == "video":
            return video_hash(item, file_fingerprint(item.input))
        from onnxdream.resolve import resolve

        h, w = _image_size(item.input)
        return image_hash(resolve(item.settings, h, w, model_info), item.model_id,
                          file_fingerprint(item.input))
    except (OnnxDreamError, OSError):
        return None


def _image_size(path: str) -> tuple[int, int]:
    """(height, width) as :func:`~onnxdream.imageio.load_image` gives them (EXIF orientation
    applied), from the header where possible: a resume checks thousands of these. A header
    that disagrees with the decoded image only costs a redo (the hash would differ)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            w, h = im.size
            turned = im.getexif().get(0x0112, 1) in (5, 6, 7, 8)  # Orientation: rotated 90°
        return (w, h) if turned else (h, w)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError):
        from onnxdream.imageio import load_image

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
        from onnxdream.imageio import read_metadata

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
    from onnxdream.gradient import resolve_model_path

    path = resolve_model_path(settings.model)
    p = Path(settings.model).expanduser()
    if p.suffix.lower() == ".onnx" or p.is_file():
        settings = dataclasses.replace(settings, model=str(path.resolve()))
    return settings, path


def _check_objectives(items: Sequence[BatchItem]):
    """Build each distinct objective's gradient graph once here (layer names checked, the
    compiled-graph cache warmed for the workers); returns the model's ModelInfo."""
    from onnxdream.gradient import GradientModel

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
        from onnxdream.batch_ray import check

        check(address, device=device, gpus_per_worker=gpus_per_worker,
              cpus_per_worker=cpus_per_worker)  # the extra, the options, the address: first
    else:
        from onnxdream.session import resolve_providers

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
            from onnxdream.batch_local import default_workers, local_rows, worker_threads

            n = workers or default_workers(device, len(pending))
            rows: Iterator[ManifestRow] = local_rows(pending, workers=n, device=device,
                                                     threads=worker_threads(n))
        else:
            from onnxdream.batch_ray import ray_rows

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
