"""The torch-free checkpoint reader: equal to torch.load bit for bit, and refuses code."""

from __future__ import annotations

import collections
import importlib.util
import io
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from onnxdream.core.errors import ModelError, UnsafeCheckpointError  # noqa: E402
from onnxdream.models.checkpoint import load_state_dict, read_checkpoint  # noqa: E402
from onnxdream.models.registry import ZOO  # noqa: E402


def _as_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach()
    if t.dtype == torch.bfloat16:
        t = t.float()  # exact widening; the reader does the same
    return np.array(t.numpy(), order="C")  # (ascontiguousarray would make 0-d arrays 1-d)


def assert_same(ours: dict, ref: dict) -> None:
    assert list(ours) == list(ref)
    for key, t in ref.items():
        want = _as_numpy(t)
        got = ours[key]
        assert isinstance(got, np.ndarray), key
        assert got.dtype == want.dtype and got.shape == want.shape, key
        assert got.tobytes() == want.tobytes(), f"{key} differs"


@pytest.mark.parametrize("name", ["efficientnet-lite0", "efficientnet-lite2"])
def test_package_checkpoints_equal_torch_load(name):
    entry = ZOO[name]
    if importlib.util.find_spec(entry.module) is None:
        pytest.skip(f"{entry.package} is not installed")
    path = entry.checkpoint_path()
    assert not zipfile.is_zipfile(path), "the packages ship torch's legacy (non-zip) format"
    ref = torch.load(path, map_location="cpu", weights_only=True)
    assert_same(load_state_dict(path), ref)


def _tricky_state_dict() -> dict:
    torch.manual_seed(0)
    base = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    sd = m.state_dict()  # an OrderedDict with a _metadata attribute (pickled via BUILD)
    sd["transposed"] = base.permute(2, 0, 1)  # non-contiguous strides
    sd["view"] = base[1, 1:]  # a view with a storage offset into the same storage
    sd["half"] = torch.randn(5).half()
    sd["bf16"] = torch.randn(3, 2).bfloat16()
    sd["double"] = torch.randn(2, dtype=torch.float64)
    sd["int32"] = torch.tensor([1, -2, 3], dtype=torch.int32)
    sd["int8"] = torch.tensor([-5, 7], dtype=torch.int8)
    sd["uint8"] = torch.tensor([250, 3], dtype=torch.uint8)
    sd["bool"] = torch.tensor([True, False, True])
    sd["scalar"] = torch.tensor(7)
    sd["empty"] = torch.zeros(0, 3)
    sd["param"] = torch.nn.Parameter(torch.randn(2, 2))
    return sd


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_torch_save_round_trip(tmp_path, zip_format):
    sd = _tricky_state_dict()
    path = tmp_path / "ckpt.pth"
    torch.save(sd, path, _use_new_zipfile_serialization=zip_format)
    assert zipfile.is_zipfile(path) == zip_format
    ref = torch.load(path, map_location="cpu", weights_only=True)
    assert_same(load_state_dict(path), ref)


def test_wrapped_and_dataparallel_state_dicts(tmp_path):
    sd = collections.OrderedDict(
        [("module.w", torch.randn(3, 2)), ("module.b", torch.randn(3))]
    )
    path = tmp_path / "wrapped.pth"
    torch.save({"epoch": 3, "best_acc": 0.75, "state_dict": sd, "arch": "x"}, path)
    ours = load_state_dict(path)
    assert list(ours) == ["w", "b"]
    assert ours["w"].tobytes() == sd["module.w"].numpy().tobytes()
    # read_checkpoint keeps the wrapper as it is
    raw = read_checkpoint(path)
    assert raw["epoch"] == 3 and raw["arch"] == "x"
    assert isinstance(raw["state_dict"]["module.b"], np.ndarray)


def test_no_state_dict_is_an_error(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(ModelError, match="no state dict"):
        load_state_dict(path)


# --- refusing code ---------------------------------------------------------------------------


class _Evil:
    def __init__(self, cmd: str) -> None:
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


def _evil_payload(marker: Path) -> bytes:
    return pickle.dumps(collections.OrderedDict(w=_Evil(f"touch {marker}")), protocol=2)


def _legacy_file(path: Path, state_pickle: bytes, magic_pickle: bytes | None = None) -> None:
    with open(path, "wb") as f:
        f.write(magic_pickle or pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2))
        f.write(pickle.dumps(1001, protocol=2))
        f.write(pickle.dumps({"protocol_version": 1001, "little_endian": True}, protocol=2))
        f.write(state_pickle)
        f.write(pickle.dumps([], protocol=2))


def _zip_file(path: Path, state_pickle: bytes) -> None:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("evil/data.pkl", state_pickle)
        z.writestr("evil/byteorder", "little")
        z.writestr("evil/version", "3\n")


def test_payload_is_live(tmp_path):
    """Sanity check of the test itself: a plain unpickler does run the payload."""
    marker = tmp_path / "pwned-by-plain-pickle"
    pickle.loads(_evil_payload(marker))
    assert marker.exists()


@pytest.mark.parametrize("form", ["legacy", "zip", "legacy-magic"])
def test_malicious_pickle_is_refused_before_running(tmp_path, form):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    payload = _evil_payload(marker)
    if form == "legacy":
        _legacy_file(path, payload)
    elif form == "legacy-magic":  # the code hides in the first, tiny header pickle
        _legacy_file(path, pickle.dumps(_Evil(f"touch {marker}"), protocol=2), magic_pickle=payload)
    else:
        _zip_file(path, payload)
    with pytest.raises(UnsafeCheckpointError) as info:
        load_state_dict(path)
    assert not marker.exists(), "the payload ran"
    msg = str(info.value)
    assert any(f"'{mod}.system'" in msg for mod in ("posix", "os", "nt")), msg
    assert isinstance(info.value, ModelError)


def test_malicious_global_inside_persistent_id_is_refused(tmp_path):
    """A storage type that is not a torch storage (here: builtins.eval) is refused too."""
    marker = tmp_path / "pwned"
    buf = io.BytesIO()

    class P(pickle.Pickler):
        def persistent_id(self, obj):
            if obj == "STORAGE":
                return ("storage", eval, "0", "cpu", 1)
            return None

    P(buf, protocol=2).dump(collections.OrderedDict(w="STORAGE"))
    path = tmp_path / "evil.pth"
    _zip_file(path, buf.getvalue())
    with pytest.raises(UnsafeCheckpointError, match=r"\.eval'"):
        load_state_dict(path)
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"PK\x03\x04garbage"])
def test_garbage_is_a_model_error(tmp_path, content):
    path = tmp_path / "bad.pth"
    path.write_bytes(content)
    with pytest.raises(ModelError, match="not a readable PyTorch checkpoint"):
        load_state_dict(path)


def test_truncated_legacy_checkpoint(tmp_path):
    path = ZOO["efficientnet-lite0"].checkpoint_path()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(ModelError, match="truncated"):
        load_state_dict(cut)


def test_missing_file(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_state_dict(tmp_path / "nope.pth")
