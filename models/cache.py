"""The model home: where built zoo models are kept.

``ONNXDREAM_HOME`` if set, else the user's cache directory (``platformdirs``). A built model is
``<home>/models/<name>-<hash12>.onnx``, the hash covering the builder version, the entry name
and the checkpoint bytes, so a new weights release or a new builder gives a new file and never
overwrites an old one. Files are written atomically (a temporary file in the same folder, then
``os.replace``); a cached file that is empty or does not load and check is rebuilt.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

from onnxdream.core.atomic import write_atomic
from onnxdream.core.errors import ModelError

__all__ = [
    "HOME_ENV", "cached_models", "cached_path", "checkpoint_digest", "ensure_built",
    "is_valid_model", "model_home", "models_dir",
]

HOME_ENV = "ONNXDREAM_HOME"

# (path, size, mtime_ns) -> digest; hashing a 20 MB checkpoint costs ~30 ms, once per process
_digests: dict[tuple[str, int, int], str] = {}
# files this process has already verified (path, size, mtime_ns)
_verified: set[tuple[str, int, int]] = set()


def model_home() -> Path:
    """``$ONNXDREAM_HOME`` if set and not empty, else the user cache dir for onnxdream."""
    env = os.environ.get(HOME_ENV, "").strip()
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("onnxdream"))


def models_dir() -> Path:
    return model_home() / "models"


def checkpoint_digest(checkpoint: Path, builder_version: str, name: str) -> str:
    """12 hex digits of sha256(builder version, name, checkpoint bytes)."""
    st = checkpoint.stat()
    key = (f"{builder_version}\0{name}\0{checkpoint.resolve()}", st.st_size, st.st_mtime_ns)
    digest = _digests.get(key)
    if digest is None:
        h = hashlib.sha256(f"onnxdream-builder:{builder_version}\0{name}\0".encode())
        with open(checkpoint, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        digest = _digests[key] = h.hexdigest()[:12]
    return digest


def cached_path(name: str, digest: str) -> Path:
    return models_dir() / f"{name}-{digest}.onnx"


def _stamp(path: Path) -> tuple[str, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (str(path), st.st_size, st.st_mtime_ns)


def is_valid_model(path: Path) -> bool:
    """True if ``path`` is a non-empty ONNX file that loads and passes the checker."""
    stamp = _stamp(path)
    if stamp is None or stamp[1] == 0:
        return False
    if stamp in _verified:
        return True
    import onnx

    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception:
        return False
    _verified.add(stamp)
    return True


def ensure_built(name: str, digest: str, build: Callable[[], bytes]) -> Path:
    """The cached model file for (name, digest), building and storing it first if needed."""
    path = cached_path(name, digest)
    if is_valid_model(path):
        return path
    if path.exists() and not path.is_file():
        raise ModelError(f"cannot cache model '{name}': {path} exists and is not a file")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ModelError(
            f"cannot create the model cache folder {path.parent} ({e.strerror}); "
            f"set {HOME_ENV} to a writable folder"
        ) from None
    data = build()
    try:
        write_atomic(path, data)
    except OSError as e:
        raise ModelError(f"cannot write the model cache file {path} ({e.strerror}); "
                         f"set {HOME_ENV} to a writable folder") from None
    stamp = _stamp(path)
    if stamp is not None:
        _verified.add(stamp)  # we just wrote it from a checked model
    return path


def cached_models() -> list[Path]:
    """The built models in the model home, sorted by name."""
    folder = models_dir()
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("*.onnx") if p.is_file() and not p.name.startswith("."))
