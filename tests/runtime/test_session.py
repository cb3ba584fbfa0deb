"""Sessions: provider choice, honest fallbacks, threads, and clear model errors (no GPU needed)."""

from __future__ import annotations

import re
import subprocess
import sys
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from helpers import skip_ok
from onnxdream.core.errors import DependencyError, DeviceError, ModelError, OnnxDreamError
from onnxdream.runtime import session as S
from onnxdream.runtime.session import (
    CPU,
    CUDA,
    Session,
    available_devices,
    create_session,
    default_threads,
    describe_provider,
    resolve_providers,
)


def _tiny_model() -> onnx.ModelProto:
    """image [N,3,H,W] → Relu(Conv 1x1) as `objective`-ish output; dynamic H, W."""
    w = helper.make_tensor("w", TensorProto.FLOAT, [2, 3, 1, 1], [1, 0, 0, 0, -1, 0])
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["image", "w"], ["c"]),
            helper.make_node("Relu", ["c"], ["y"]),
        ],
        "tiny",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2, "H", "W"])],
        initializer=[w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


@pytest.fixture
def model_bytes() -> bytes:
    return _tiny_model().SerializeToString()


@pytest.fixture
def with_cuda(monkeypatch):
    """Pretend this onnxruntime was built with the CUDA provider."""
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])


@pytest.fixture
def without_cuda(monkeypatch):
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CPU])


class FakeInferenceSession:
    """Stands in for ort.InferenceSession; `reports` is what get_providers() returns."""

    reports: list[str] = [CPU]
    fail_with: dict[str, Exception] = {}
    calls: list[list] = []

    def __init__(self, source, sess_options=None, providers=None, enable_fallback=1):
        names = [p[0] if isinstance(p, tuple) else p for p in providers]
        type(self).calls.append(list(providers))
        assert enable_fallback == 0, "onnxruntime's printing fallback must be off"
        if names[0] in self.fail_with:
            raise self.fail_with[names[0]]
        self._providers = list(self.reports) if names[0] == CUDA else [CPU]
        self._options = sess_options

    def get_providers(self):
        return self._providers

    def get_provider_options(self):
        cuda = {"device_id": "0", "use_tf32": "0", "cudnn_conv_algo_search": "HEURISTIC"}
        return {p: (cuda if p == CUDA else {}) for p in self._providers}

    def get_session_options(self):
        return self._options


@pytest.fixture
def fake_session(monkeypatch):
    FakeInferenceSession.reports = [CPU]
    FakeInferenceSession.fail_with = {}
    FakeInferenceSession.calls = []
    monkeypatch.setattr(ort, "InferenceSession", FakeInferenceSession)
    return FakeInferenceSession


# ------------------------------------------------------------------------------------------
# Provider resolution


def test_auto_with_cuda_prefers_cuda_then_cpu(with_cuda):
    providers = resolve_providers("auto")
    assert [p[0] if isinstance(p, tuple) else p for p in providers] == [CUDA, CPU]
    opts = providers[0][1]
    assert opts["cudnn_conv_algo_search"] == "HEURISTIC"
    assert opts["use_tf32"] == "0"
    assert opts["arena_extend_strategy"] == "kNextPowerOfTwo"
    assert all(isinstance(v, str) for v in opts.values())


def test_cuda_options_and_tf32_override(with_cuda):
    providers = resolve_providers(
        "cuda", tf32=True, cuda_options={"device_id": 1, "cudnn_conv_algo_search": "EXHAUSTIVE"}
    )
    opts = providers[0][1]
    assert opts["use_tf32"] == "1" and opts["device_id"] == "1"
    assert opts["cudnn_conv_algo_search"] == "EXHAUSTIVE"
    assert resolve_providers("cuda", cuda_options={"use_tf32": False})[0][1]["use_tf32"] == "0"


def test_auto_without_cuda_is_cpu(without_cuda):
    assert resolve_providers("auto") == [CPU]
    assert available_devices() == ["cpu"]


def test_cpu_never_uses_cuda(with_cuda):
    assert resolve_providers("cpu") == [CPU]
    assert resolve_providers(" CPU ") == [CPU]
    assert available_devices() == ["cuda", "cpu"]


def test_cuda_missing_is_a_device_error(without_cuda):
    with pytest.raises(DeviceError) as ei:
        resolve_providers("cuda")
    msg = str(ei.value)
    assert msg.startswith("CUDA was requested but onnxruntime has no CUDA provider here")
    assert "installed: CPUExecutionProvider" in msg
    assert "onnxdream[gpu]" in msg and "--device cpu" in msg
    assert ei.value.exit_code == 2


@pytest.mark.parametrize("bad", ["gpu", "cuda:0", "", "tpu"])
def test_bad_device_string(bad):
    msg = r"unknown device .*; use one of auto, cpu, cuda"
    with pytest.raises(OnnxDreamError, match=msg) as ei:
        resolve_providers(bad)
    assert not isinstance(ei.value, DeviceError)
    with pytest.raises(OnnxDreamError, match="unknown device"):
        create_session(b"x", device=bad)


# ------------------------------------------------------------------------------------------
# What the session actually got


def test_auto_fallback_to_cpu_warns(with_cuda, fake_session, model_bytes):
    fake_session.reports = [CPU]  # CUDA asked for, CPU delivered (e.g. no driver)
    with pytest.warns(RuntimeWarning, match="CUDA is installed but the session runs on the CPU"):
        s = create_session(model_bytes, "auto")
    assert s.device == "cpu" and s.provider == CPU and s.requested == "auto"
    assert s.fallback_warning and "--device cpu" in s.fallback_warning
    first = fake_session.calls[0][0]
    assert first[0] == CUDA and first[1]["use_tf32"] == "0"


def test_auto_fallback_when_cuda_session_creation_raises(with_cuda, fake_session, model_bytes):
    fake_session.fail_with = {CUDA: RuntimeError("libcudnn.so.9: cannot open shared object file")}
    with pytest.warns(RuntimeWarning, match="libcudnn"):
        s = create_session(model_bytes, "auto")
    assert s.device == "cpu" and "libcudnn" in s.fallback_warning
    first_of_each_call = [c[0][0] if isinstance(c[0], tuple) else c[0] for c in fake_session.calls]
    assert first_of_each_call == [CUDA, CPU]


def test_auto_on_cuda_does_not_warn(with_cuda, fake_session, model_bytes):
    fake_session.reports = [CUDA, CPU]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = create_session(model_bytes, "auto")
    assert s.device == "cuda" and s.provider == CUDA and s.fallback_warning is None
    assert describe_provider(s).endswith(
        "CUDAExecutionProvider (device 0, TF32 off, cuDNN HEURISTIC)")


def test_cuda_requested_but_session_on_cpu_fails(with_cuda, fake_session, model_bytes):
    fake_session.reports = [CPU]
    msg = "CUDA was requested but onnxruntime created the session on CPUExecutionProvider"
    with pytest.raises(DeviceError, match=msg):
        create_session(model_bytes, "cuda")


def test_cuda_requested_and_cuda_raises(with_cuda, fake_session, model_bytes):
    fake_session.fail_with = {
        CUDA: RuntimeError("CUDA failure 100: no CUDA-capable device is detected")}
    with pytest.raises(DeviceError, match="no CUDA-capable device"):
        create_session(model_bytes, "cuda")


def test_model_error_is_not_blamed_on_cuda(with_cuda, fake_session, model_bytes):
    fake_session.fail_with = {CUDA: RuntimeError("bad model"), CPU: RuntimeError("bad model")}
    with pytest.raises(ModelError, match="bad model"):
        create_session(model_bytes, "cuda")
    with pytest.raises(ModelError, match="bad model"):
        create_session(model_bytes, "auto")


def test_cuda_missing_fails_before_loading(without_cuda, fake_session, model_bytes):
    with pytest.raises(DeviceError, match="no CUDA provider"):
        create_session(model_bytes, "cuda")
    assert fake_session.calls == []


# ------------------------------------------------------------------------------------------
# Real CPU sessions


def test_real_cpu_session_runs(model_bytes, tmp_path):
    path = tmp_path / "tiny.onnx"
    path.write_bytes(model_bytes)
    for source in (model_bytes, path, str(path), _tiny_model()):
        s = create_session(source, "cpu", threads=1)
        assert isinstance(s, Session)
        assert s.provider == CPU and s.device == "cpu" and s.fallback_warning is None
        x = np.random.default_rng(0).standard_normal((2, 3, 5, 7)).astype(np.float32)
        (y,) = s.run(["y"], {"image": x})
        np.testing.assert_allclose(y[:, 0], np.maximum(x[:, 0], 0), rtol=1e-6)
        np.testing.assert_allclose(y[:, 1], np.maximum(-x[:, 1], 0), rtol=1e-6)
        assert s.input_names == ["image"] and s.output_names == ["y"]
    assert s.io_binding() is not None  # the hook the CUDA engine will use


def test_session_options(model_bytes):
    s = create_session(model_bytes, "cpu", threads=1)
    so = s.session.get_session_options()
    assert so.intra_op_num_threads == 1
    assert so.inter_op_num_threads == 1
    assert so.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert so.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert not so.enable_mem_pattern  # it doubled a gradient run's peak (benchmarks/README.md)
    assert so.enable_cpu_mem_arena


def test_auto_on_this_cpu_machine_does_not_warn(model_bytes):
    if CUDA in ort.get_available_providers():  # pragma: no cover - GPU machines
        skip_ok("this machine has the CUDA provider")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = create_session(model_bytes)  # auto
    assert s.device == "cpu" and s.fallback_warning is None


def test_describe_provider(model_bytes):
    s = create_session(model_bytes, "cpu", threads=2)
    text = describe_provider(s)
    assert text == f"onnxruntime {ort.__version__}, CPUExecutionProvider, 2 threads"
    assert re.fullmatch(r"onnxruntime \d+\.\d+\.\d+\S*, CPUExecutionProvider, 2 threads", text)
    assert describe_provider(s.session) == text  # a raw InferenceSession works too
    one = create_session(model_bytes, "cpu", threads=1)
    assert describe_provider(one).endswith(", 1 thread")


def test_threads_from_env_and_argument(model_bytes, monkeypatch):
    monkeypatch.setenv("ONNXDREAM_THREADS", "3")
    assert default_threads() == 3
    s = create_session(model_bytes, "cpu")
    assert s.threads == 3 and s.session.get_session_options().intra_op_num_threads == 3
    s = create_session(model_bytes, "cpu", threads=1)  # the argument beats the env var
    assert s.threads == 1
    monkeypatch.setenv("ONNXDREAM_THREADS", "many")
    msg = "ONNXDREAM_THREADS must be an integer >= 1, got 'many'"
    with pytest.raises(OnnxDreamError, match=msg):
        create_session(model_bytes, "cpu")
    monkeypatch.setenv("ONNXDREAM_THREADS", "0")
    with pytest.raises(OnnxDreamError, match="ONNXDREAM_THREADS"):
        default_threads()


def test_default_threads_is_sensible(monkeypatch):
    monkeypatch.delenv("ONNXDREAM_THREADS", raising=False)
    import os

    n = default_threads()
    assert 1 <= n <= (os.cpu_count() or 1)


def test_bad_thread_counts(model_bytes):
    for bad in (-1, 1.5, True):
        with pytest.raises(OnnxDreamError, match="threads must be"):
            create_session(model_bytes, "cpu", threads=bad)


# ------------------------------------------------------------------------------------------
# Bad models


def test_corrupt_model_file(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07\x12\x00not an onnx model at all" * 4)
    with pytest.raises(ModelError, match=r"bad\.onnx is not a valid ONNX model"):
        create_session(bad, "cpu")
    with pytest.raises(ModelError, match="is not a valid ONNX model"):
        create_session(b"garbage", "cpu")


def test_truncated_model_file(tmp_path, model_bytes):
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(model_bytes[: len(model_bytes) // 2])
    with pytest.raises(ModelError, match=r"cut\.onnx"):
        create_session(cut, "cpu")


def test_missing_empty_and_directory_models(tmp_path):
    with pytest.raises(ModelError, match=r"model file .*missing\.onnx does not exist"):
        create_session(tmp_path / "missing.onnx", "cpu")
    with pytest.raises(ModelError, match="is a directory"):
        create_session(tmp_path, "cpu")
    with pytest.raises(ModelError, match="empty"):
        create_session(b"", "cpu")
    with pytest.raises(ModelError, match="pass a path or bytes"):
        create_session(12345, "cpu")


def test_unknown_op_is_a_model_error():
    graph = helper.make_graph(
        [helper.make_node("NoSuchOp", ["image"], ["y"])],
        "g",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    with pytest.raises(ModelError, match="NoSuchOp") as ei:
        create_session(model.SerializeToString(), "cpu")
    assert "[ONNXRuntimeError]" not in str(ei.value)
    assert "\n" not in str(ei.value)


# ------------------------------------------------------------------------------------------
# onnxruntime is optional at import time


def test_missing_onnxruntime_is_a_dependency_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` fail
    with pytest.raises(DependencyError) as ei:
        create_session(b"x", "cpu")
    assert str(ei.value) == (
        "onnxruntime is not installed: pip install 'onnxdream[cpu]' (or '[gpu]' for CUDA)"
    )
    with pytest.raises(DependencyError):
        available_devices()


def test_broken_onnxruntime_install(monkeypatch):
    import types

    monkeypatch.setitem(sys.modules, "onnxruntime", types.ModuleType("onnxruntime"))
    msg = "reinstall exactly one of onnxruntime or onnxruntime-gpu"
    with pytest.raises(DependencyError, match=msg):
        S.import_onnxruntime()


def test_import_does_not_load_onnxruntime():
    code = "import sys, onnxdream.runtime.session; assert 'onnxruntime' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
