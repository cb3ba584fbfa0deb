"""ONNX files: loading one (checked, at opset >= :data:`MIN_OPSET`) and saving one atomically.

The one owner of both: the contract, the compiler, the importer and the exporters read and write
models through :func:`load_model` and :func:`save_model`. A leaf (onnx, numpy and
:mod:`onnxdream.core` only).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from onnxdream.core.atomic import write_atomic
from onnxdream.core.errors import ModelError

#: The opset every loaded model is brought to (older ones are converted on load).
MIN_OPSET = 18
#: protobuf cannot serialise a message over 2 GiB: above this many bytes of weights,
#: :func:`save_model` writes them beside the model (``<name>.data``).
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


# ---------------------------------------------------------------------------------------------
# loading


def load_model(model: str | os.PathLike | onnx.ModelProto) -> onnx.ModelProto:
    """Load an ONNX model from a path (or pass a ModelProto through), at opset >= 18."""
    if isinstance(model, onnx.ModelProto):
        proto = model
    else:
        path = Path(model)
        if not path.exists():
            raise ModelError(f"no such model file: {path}")
        if path.is_dir():
            raise ModelError(f"{path} is a directory, not an ONNX model file")
        try:
            proto = onnx.load(str(path))
        except Exception as exc:  # noqa: BLE001 - protobuf raises many types
            why = str(exc).splitlines()[0][:120] if str(exc) else "corrupt"
            raise ModelError(f"{path} is not a valid ONNX model ({type(exc).__name__}: "
                             f"{why})") from None
        if not proto.graph.node:
            raise ModelError(f"{path} is not a valid ONNX model (it has no graph nodes)")
    if len(proto.graph.input) < 1:
        raise ModelError("the model has no input")
    check_initializers(proto)
    return ensure_opset(proto)


def check_initializers(proto: onnx.ModelProto) -> None:
    """ModelError naming the first initializer whose stored values do not match its declared
    shape (a truncated or hostile file: ``dims`` of 10^12 and no data would otherwise make
    numpy try to allocate terabytes). Externally stored tensors are checked where they are read."""
    for t in proto.graph.initializer:
        declared = 1
        for d in t.dims:
            if d < 0:
                raise ModelError(f"model initializer '{t.name[:80]}' has a negative dimension "
                                 f"{list(t.dims)}: the file is corrupt")
            declared *= d
        if t.data_location == onnx.TensorProto.EXTERNAL:
            continue
        stored = _stored_values(t)
        if stored is not None and stored != declared:
            raise ModelError(f"model initializer '{t.name[:80]}' declares {declared:,} values "
                             f"(shape {list(t.dims)}) but holds {stored:,}: the file is corrupt "
                             "or truncated")


def _stored_values(t: onnx.TensorProto) -> int | None:
    """How many values ``t`` stores inline (None when that cannot be told: packed 4-bit types)."""
    try:
        itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
    except (KeyError, TypeError, ValueError):
        return None
    if t.data_type in _PACKED_TYPES:
        return None
    if t.raw_data:
        return len(t.raw_data) // itemsize
    per_value = 2 if t.data_type in (onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128) \
        else 1
    for values in (t.float_data, t.int32_data, t.int64_data, t.double_data, t.uint64_data,
                   t.string_data):
        if len(values):
            return len(values) // per_value
    return 0


_PACKED_TYPES = {getattr(onnx.TensorProto, n) for n in ("INT4", "UINT4", "FLOAT4E2M1", "INT2",
                                                        "UINT2") if hasattr(onnx.TensorProto, n)}


def opset_of(model: onnx.ModelProto) -> int:
    """The model's default-domain opset (1 when it names none)."""
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return 1


def ensure_opset(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` at opset >= :data:`MIN_OPSET`: as it is, or converted (ModelError if it cannot
    be)."""
    if opset_of(model) >= MIN_OPSET:
        return model
    from onnx import version_converter

    try:
        return version_converter.convert_version(model, MIN_OPSET)
    except Exception as exc:  # noqa: BLE001
        raise ModelError(f"the model uses opset {opset_of(model)} and could not be converted to "
                         f"opset {MIN_OPSET} ({exc}); re-export it at opset {MIN_OPSET}") from None


# ---------------------------------------------------------------------------------------------
# saving


def save_model(model: onnx.ModelProto, path: str | os.PathLike, *, parents: bool = False,
               external_above: int | None = None) -> Path:
    """Write ``model`` to ``path`` atomically (:func:`onnxdream.core.atomic.write_atomic`: never
    half a file); returns ``path`` as a Path.

    A model whose weights take more than ``external_above`` bytes (default
    :data:`EXTERNAL_DATA_THRESHOLD`) keeps them beside the file, in ``<file name>.data``.
    ``parents`` makes a missing directory (the exporters); otherwise a missing directory is a
    ModelError.
    """
    path = Path(path)
    if parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    elif not path.parent.exists():
        raise ModelError(f"cannot write {path}: the directory {path.parent} does not exist")
    limit = EXTERNAL_DATA_THRESHOLD if external_above is None else external_above
    external = sum(i.ByteSize() for i in model.graph.initializer) > limit

    def write(tmp: Path) -> None:
        if external:
            onnx.save(model, str(tmp), save_as_external_data=True,
                            all_tensors_to_one_file=True, location=path.name + ".data",
                            size_threshold=1024)
        else:
            onnx.save(model, str(tmp))

    return write_atomic(path, write)
