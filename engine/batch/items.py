"""A batch's items and its manifest: the plan (sources × layers × seeds → :class:`BatchItem`),
the settings hashes that resume compares, and the manifest's rows (:class:`ManifestRow`, one JSON
line per finished item). Shared by :mod:`onnxdream.batch.run` and both backends."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from onnxdream.batch.inputs import (
    Source,
)
from onnxdream.core.errors import BatchError, SettingsError
from onnxdream.settings.options import DreamSettings
from onnxdream.settings.provenance import key

__all__ = ["BACKENDS", "DIED", "FAILED", "HASH_KEY", "MANIFEST_NAME", "OK", "SKIPPED",
           "BatchItem", "Manifest", "ManifestRow", "image_hash", "parse_layers", "parse_seeds",
           "plan", "safe_label", "video_hash"]

BACKENDS = ("local", "ray")
MANIFEST_NAME = "manifest.jsonl"
#: The PNG provenance key that holds an output's settings hash (what resume compares).
HASH_KEY = key("batch_hash")
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
        from onnxdream.core.atomic import write_atomic

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
