"""Issue 15 without a server: finite weights and options, non-finite dreams stop, hostile model
files, the compiled-graph cache's disk budget and LRU, temp files of killed writes, failed
compiles, and the job queue's admission and Retry-After. (The HTTP side:
tests/server/test_server_hardening.py.)
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from typer.testing import CliRunner

from helpers import overflowing_model, photo, tiny_classifier

# ---------------------------------------------------------------------------------------------
# Models


def huge_initializer_model(path: Path) -> Path:
    """An ONNX file whose Conv weight declares 10^12 values and stores none (99 bytes)."""
    w = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[1_000_000, 1_000_000, 1, 1])
    graph = helper.make_graph(
        [helper.make_node("Conv", ["image", "w"], ["y"], name="conv")], "huge",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, None, None])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


def _cli(*args: str):
    from onnxdream.cli.main import app

    result = CliRunner().invoke(app, list(args))
    out = result.output + (getattr(result, "stderr", "") or "")
    return result.exit_code, out


# ---------------------------------------------------------------------------------------------
# Finite weights and options (issue 15, finding 5)


def test_huge_or_non_finite_weights_and_options_are_refused(model_home, tmp_path):
    from onnxdream.core.errors import LayerError, SettingsError
    from onnxdream.exporters.graph import mean
    from onnxdream.runtime.gradient import GradientModel
    from onnxdream.settings.options import DreamSettings

    out = tmp_path / "out.png"
    image = str(photo("chelsea.png"))
    # 1e39 is a finite double but inf in float32: it used to give a black image and exit 0
    for spec in ("blocks.5:1e39", "blocks.5:-2e6", "blocks.5:inf", "blocks.5:nan"):
        code, text = _cli("dream", image, "-o", str(out), "--layer", spec, "--steps", "1")
        assert code == 2, text
        assert "layer weight in" in text and "between -1e+06 and 1e+06" in text, text
        assert "Traceback" not in text
    code, text = _cli("dream", image, "-o", str(out), "--max-loss", "nan", "--steps", "1")
    assert code == 2 and "--max-loss must be a finite number" in text, text
    code, text = _cli("dream", image, "-o", str(out), "--max-loss", "inf", "--steps", "1")
    assert code == 2 and "--max-loss must be a finite number" in text, text
    assert not out.exists()

    with pytest.raises(SettingsError, match="max_loss must be a finite number"):
        DreamSettings(max_loss=float("nan")).validate()
    # the Python API: an Objective built by hand is checked too
    with pytest.raises(LayerError, match="weight of layer 'blocks.5' is 1e\\+39") as info:
        GradientModel("efficientnet-lite0", mean("blocks.5") * 1e39)
    assert info.value.field == "layers"
    gm = GradientModel("efficientnet-lite0", ["blocks.5:2", "blocks.9"])
    with pytest.raises(LayerError, match="finite number"):
        gm.params_for(mean("blocks.5") * 1e300 + mean("blocks.9"))


def test_a_non_finite_dream_stops_with_a_clear_error(model_home, tmp_path):
    """A model whose layer overflows float32: exit 2 and one line, no black image written."""
    from onnxdream.core.errors import NonFiniteError
    from onnxdream.dream.ascent import dream
    from onnxdream.runtime.gradient import GradientModel
    from onnxdream.settings.options import DreamSettings

    model = overflowing_model(tmp_path / "overflow.onnx")
    out = tmp_path / "dream.png"
    code, text = _cli("dream", str(photo("chelsea.png")), "-o", str(out), "--model", str(model),
                      "--layer", "act", "--objective", "l2", "--steps", "2", "--octaves", "1")
    assert code == 2, text
    assert "stopped being a finite number at step 1" in text and "Traceback" not in text, text
    assert not out.exists()

    # the same guard for every normalisation, and for weights passed past params_for
    rgb = np.random.default_rng(0).random((40, 48, 3), dtype=np.float32)
    gm = GradientModel(model, ["act"], "l2")
    for how in ("mean-abs", "std", "lapnorm"):
        with pytest.raises(NonFiniteError, match="objective"):
            dream(gm, rgb, DreamSettings(octaves=1, steps=2, normalize=how, seed=1))
    gm = GradientModel(tiny_path(tmp_path), ["act"])
    inf = {"weights": np.array([np.inf], np.float32)}
    with pytest.raises(NonFiniteError):
        dream(gm, rgb, DreamSettings(octaves=1, steps=2, seed=1), params=inf)
    # ... and a finite weighting dreams normally
    ok = dream(gm, rgb, DreamSettings(octaves=1, steps=2, seed=1))
    assert np.isfinite(ok).all() and np.abs(ok - rgb).mean() > 0


def tiny_path(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.onnx"
    if not path.exists():
        onnx.save(tiny_classifier(), str(path))
    return path


# ---------------------------------------------------------------------------------------------
# A hostile model file (issue 15, finding 6)


def test_a_huge_declared_initializer_is_a_one_line_error(model_home, tmp_path):
    from onnxdream.core.errors import ModelError
    from onnxdream.exporters.graph import load_model

    path = huge_initializer_model(tmp_path / "huge.onnx")
    assert path.stat().st_size < 200
    with pytest.raises(ModelError, match="declares 1,000,000,000,000 values .* holds 0"):
        load_model(path)
    for args in (["dream", str(photo("chelsea.png")), "-o", str(tmp_path / "o.png"),
                  "--model", str(path), "--layer", "y", "--steps", "1"],
                 ["layers", str(path)]):
        code, text = _cli(*args)
        assert code == 2, text
        assert "declares 1,000,000,000,000 values" in text and "Traceback" not in text, text


# ---------------------------------------------------------------------------------------------
# The compiled-graph cache: weights are not part of it, a disk budget, LRU (issue 15, finding 1)


@pytest.fixture
def compiles(monkeypatch):
    """Counts gradient compiles (onnxdream.runtime.gradient.compile_gradient calls)."""
    import onnxdream.runtime.gradient as gradient

    calls = []
    real = gradient.compile_gradient

    def counting(*args, **kwargs):
        calls.append(args[1].describe() if len(args) > 1 else "?")
        return real(*args, **kwargs)

    monkeypatch.setattr(gradient, "compile_gradient", counting)
    return calls


def _graphs(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.suffix == ".onnx") if directory.exists() \
        else []


def test_twenty_weightings_share_one_model_and_one_compiled_graph(model_home, tmp_path,
                                                                  compiles):
    """The server's model cache: 20 weightings of a layer compile once, load once, and the
    compiled graphs on disk stay within the budget; no request changes the shared model."""
    from onnxdream.jobs.queue import ServerConfig
    from onnxdream.settings.options import DreamSettings

    cache = ServerConfig(workers=1, cache_mb=40).model_cache()
    cache.compiled.directory = tmp_path / "compiled"  # a private cache for this test
    first = None
    for k in range(20):
        settings = DreamSettings(layers=(f"blocks.5:{101 + k}", "blocks.3:0.5"))
        gm, objective, params = cache.get(settings)
        first = first or gm
        assert gm is first
        np.testing.assert_array_equal(params["weights"], np.float32([101 + k, 0.5]))
        assert objective.describe() == f"{101 + k:g}*mean(blocks.5) + 0.5*mean(blocks.3)"
    assert len(compiles) == 1, compiles
    np.testing.assert_array_equal(first.params["weights"], np.float32([101, 0.5]))  # untouched
    assert len(cache.loaded()) == 1
    assert len(_graphs(cache.compiled.directory)) == 1
    assert cache.compiled.usage() <= cache.compiled.budget
    # another structure (a different objective kind) is another model and graph
    cache.get(DreamSettings(layers=("blocks.5:3",), objective="l2"))
    assert len(compiles) == 2 and len(cache.loaded()) == 2


def test_the_disk_budget_evicts_least_recently_used_graphs(model_home, tmp_path, compiles):
    from onnxdream.exporters.graph.compiler import compile_gradient
    from onnxdream.exporters.graph.objective import Objective
    from onnxdream.runtime.gradient import GradientModel
    from onnxdream.runtime.graph_cache import CompiledCache

    model = tiny_path(tmp_path)
    sizes = {(layer, kind): compile_gradient(str(model), Objective.build([layer], kind)).ByteSize()
             for layer, kind in [("conv", "mean"), ("act", "mean"), ("conv", "l2"),
                                 ("act", "l2"), ("act", "channel:1")]}
    big = sorted(sizes.values())
    budget = big[-1] + big[-2] + 100  # any two graphs fit, no three
    assert budget < sum(big[:3])
    directory = tmp_path / "compiled"
    cache = CompiledCache(directory, budget_mb=budget / 2**20)

    def graph(layer, objective="mean"):
        gm = GradientModel(model, [layer], objective, cache=cache)
        return (Path(gm._graph) if isinstance(gm._graph, str) else None), gm

    a, gm_a = graph("conv")
    b, gm_b = graph("act")
    assert a.exists() and b.exists()
    old = time.time() - 100
    os.utime(a, (old, old))
    os.utime(b, (old - 10, old - 10))  # b is the least recently used ...
    del gm_a, gm_b  # ... and no live model holds either
    again = graph("conv")[0]  # a hit touches a: now b is even older
    assert again == a and len(compiles) == 2 and a.stat().st_mtime > old
    c, gm_c = graph("conv", objective="l2")
    assert c.exists() and a.exists() and not b.exists(), "b (least recently used) goes first"
    assert cache.usage() <= cache.budget

    # a graph a live model uses is never evicted: then the new one runs from memory
    d, gm_d = graph("act", objective="l2")
    assert d is not None and d.exists() and not a.exists()  # a was free, so it went
    assert c.exists(), "c is in use by gm_c"
    assert cache.usage() <= cache.budget
    e, gm_e = graph("act", objective="channel:1")  # c and d in use: e cannot be written
    assert e is None and isinstance(gm_e._graph, bytes) and c.exists() and d.exists()
    assert cache.usage() <= cache.budget
    obj, grad = gm_e(np.zeros((1, 3, 16, 16), np.float32))  # and it runs from memory
    assert grad.shape == (1, 3, 16, 16)
    # a graph bigger than the whole budget is never written
    tiny = CompiledCache(tmp_path / "tiny", budget_mb=big[0] / 4 / 2**20)
    gm = GradientModel(model, ["conv"], cache=tiny)
    assert isinstance(gm._graph, bytes) and _graphs(tmp_path / "tiny") == []


def test_cache_budget_from_the_environment(monkeypatch):
    from onnxdream.core.errors import OnnxDreamError
    from onnxdream.jobs.queue import ServerConfig
    from onnxdream.runtime.graph_cache import DEFAULT_BUDGET_MB, CompiledCache

    monkeypatch.delenv("ONNXDREAM_CACHE_MB", raising=False)
    assert CompiledCache().budget_mb == DEFAULT_BUDGET_MB == 512
    assert ServerConfig.from_env(workers=1).cache_mb == 512
    monkeypatch.setenv("ONNXDREAM_CACHE_MB", "64")
    assert CompiledCache().budget == 64 * 2**20 and ServerConfig.from_env(workers=1).cache_mb == 64
    assert ServerConfig.from_env(workers=1, cache_mb=8).cache_mb == 8  # the option wins
    for bad in ("0", "-3", "lots", "nan"):
        monkeypatch.setenv("ONNXDREAM_CACHE_MB", bad)
        with pytest.raises(OnnxDreamError, match="ONNXDREAM_CACHE_MB must be an integer >= 1"):
            CompiledCache()


# ---------------------------------------------------------------------------------------------
# Nothing half-written stays behind (issue 15, finding 6)


def test_a_failed_compile_or_write_leaves_nothing(model_home, tmp_path, monkeypatch):
    import onnxdream.runtime.gradient as gradient
    from onnxdream.core.errors import ModelError, UnsupportedOpError
    from onnxdream.runtime.gradient import GradientModel
    from onnxdream.runtime.graph_cache import CompiledCache

    model = tiny_path(tmp_path)
    directory = tmp_path / "compiled"
    cache = CompiledCache(directory)

    def no_rule(*args, **kwargs):
        raise UnsupportedOpError("no gradient rule for op 'Banana'")

    with monkeypatch.context() as m:
        m.setattr(gradient, "compile_gradient", no_rule)
        with pytest.raises(UnsupportedOpError):
            GradientModel(model, ["act"], cache=cache)
    assert not directory.exists() or list(directory.iterdir()) == []

    # the disk fills up half-way through writing the graph: nothing is left, the model works
    real_save = onnx.save

    def disk_full(proto, path, *args, **kwargs):
        Path(path).write_bytes(b"half a graph")
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(onnx, "save", disk_full)
        gm = GradientModel(model, ["act"], cache=cache)
    assert isinstance(gm._graph, bytes) and list(directory.iterdir()) == []
    assert onnx.save is real_save

    # a freshly compiled graph that no session accepts is removed, not kept for next time
    def refuse(*args, **kwargs):
        raise ModelError("onnxruntime cannot load the graph")

    with monkeypatch.context() as m:
        m.setattr(gradient, "create_session", refuse)
        with pytest.raises(ModelError, match="cannot load"):
            GradientModel(model, ["act"], cache=cache)
    assert list(directory.iterdir()) == []


KILLED_WRITER = """
import sys, time
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from onnxdream.core.atomic import write_atomic

def slow(tmp):
    Path(tmp).write_bytes(b"x" * 100000)
    Path(sys.argv[2]).write_text("writing")
    time.sleep(120)

write_atomic(Path(sys.argv[1]) / "model-0123456789abcdef.onnx", slow)
"""


def test_kill_9_during_a_cache_write_leaves_a_temp_that_the_next_start_removes(tmp_path):
    """A writer killed mid-write leaves its temporary; a server starting an hour later removes
    it (a younger one may be another process's write in progress: kept)."""
    pytest.importorskip("fastapi", reason="the server needs the [serve] extra")
    from onnxdream.jobs.queue import ModelCache, ServerConfig
    from onnxdream.runtime.graph_cache import CompiledCache
    from onnxdream.server.app import create_app

    home = tmp_path / "home"
    compiled = home / "compiled"
    compiled.mkdir(parents=True)
    marker = tmp_path / "marker"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(compiled), str(marker)])
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        proc.kill()  # SIGKILL: no cleanup runs
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    temps = [p for p in compiled.iterdir() if p.name.endswith(".tmp")]
    assert len(temps) == 1 and not (compiled / "model-0123456789abcdef.onnx").exists()
    young = compiled / ".other.onnx.abc.tmp"
    young.write_bytes(b"a write in progress elsewhere")
    hour_ago = time.time() - 3700
    os.utime(temps[0], (hour_ago, hour_ago))

    old_home = os.environ.get("ONNXDREAM_HOME")
    os.environ["ONNXDREAM_HOME"] = str(home)
    try:
        app = create_app(ServerConfig(workers=1))
        assert app.state.models.compiled.directory == compiled
        with _lifespan(app):  # the server's start-up
            assert not temps[0].exists() and young.exists()
    finally:
        if old_home is None:
            os.environ.pop("ONNXDREAM_HOME", None)
        else:
            os.environ["ONNXDREAM_HOME"] = old_home
    assert isinstance(ModelCache, type) and isinstance(CompiledCache(compiled).usage(), int)


class _lifespan:
    """Runs an ASGI app's start-up on entry and its shutdown on exit (no requests)."""

    def __init__(self, app):
        import asyncio

        self.app, self.loop = app, asyncio.new_event_loop()
        self.ctx = app.router.lifespan_context(app)

    def __enter__(self):
        self.loop.run_until_complete(self.ctx.__aenter__())
        return self.app

    def __exit__(self, *exc):
        try:
            self.loop.run_until_complete(self.ctx.__aexit__(None, None, None))
        finally:
            self.loop.close()


# ---------------------------------------------------------------------------------------------
# The job queue: Retry-After from the work waiting (issue 15, finding 6)


class FakeClock:
    def __init__(self):
        self.now = 1000.0
        self.lock = threading.Lock()

    def __call__(self) -> float:
        with self.lock:
            return self.now

    def advance(self, seconds: float) -> None:
        with self.lock:
            self.now += seconds


def _request(width: int, height: int):
    from onnxdream.jobs.queue import DreamRequest
    from onnxdream.settings.options import DreamSettings

    return DreamRequest(settings=DreamSettings(octaves=1, steps=10, seed=1), fmt="png",
                        image=None, alpha=None, size=(width, height))


@pytest.mark.parametrize("history", [True, False])
def test_retry_after_is_the_work_waiting_at_the_recent_speed(monkeypatch, history):
    """17 dreams of ~50 s waiting: Retry-After says ~14 minutes, not 1 s (the old estimate:
    the mean time of recent jobs, tiny ones here, times the queue). Without history the
    running dream's progress gives the speed."""
    import onnxdream.jobs.queue as jobs
    from onnxdream.jobs.queue import JobCancelled, JobManager, QueueFull, ServerConfig

    clock, release, started = FakeClock(), threading.Event(), threading.Event()

    def fake_run(req, models, job):
        if req.size == (64, 64):  # a thumbnail: 0.05 s
            clock.advance(0.05)
            return b"ok"
        job.total, job.done = 10, 1  # a big dream: one step in 5 s, so 50 s in all
        clock.advance(5.0)
        started.set()
        release.wait(30)
        raise JobCancelled()

    monkeypatch.setattr(jobs, "run_request", fake_run)
    manager = JobManager(ServerConfig(workers=1, max_queue=16), None, clock=clock)
    try:
        if history:
            for _ in range(5):
                job = manager.submit(_request(64, 64), track=False)
                assert job.future.result(10).state == "done"
        big = (2048, 2000)  # 1000x the pixels of 64x64: ~50 s at the thumbnails' speed
        manager.submit(_request(*big), track=False)
        assert started.wait(10)
        for _ in range(16):
            manager.submit(_request(*big), track=False)
        with pytest.raises(QueueFull) as info:
            manager.submit(_request(64, 64), track=False)
        # ahead: 0.9 of the running dream + 16 queued, at ~50 s each
        assert 700 <= info.value.retry_after <= 1000, info.value.retry_after
        assert manager.retry_after() == info.value.retry_after
        assert f"retry in {info.value.retry_after}s" in str(info.value)
    finally:
        release.set()
        manager.stop()


def test_nothing_known_yet_assumes_ten_seconds_a_dream(monkeypatch):
    from onnxdream.jobs.queue import JobManager, ServerConfig

    manager = JobManager(ServerConfig(workers=2, max_queue=4), None, clock=FakeClock())
    assert manager.retry_after() == 1
    with manager.admit(), manager.admit(), manager.admit():
        assert manager.retry_after() == 15  # 3 dreams being admitted, 2 workers, 10 s each
    assert manager.stats()["admitting"] == 0


def test_admission_holds_a_place_and_gives_it_back(monkeypatch):
    import onnxdream.jobs.queue as jobs
    from onnxdream.jobs.queue import JobManager, QueueFull, ServerConfig, ShuttingDown

    release = threading.Event()
    monkeypatch.setattr(jobs, "run_request", lambda req, models, job: release.wait(30) and b"")
    manager = JobManager(ServerConfig(workers=1, max_queue=1), None)
    try:
        with manager.admit() as first:
            with manager.admit():
                with pytest.raises(QueueFull):  # two places held: capacity 2
                    with manager.admit():
                        pass
            # the second was given back (a bad request, say): there is room again
            with manager.admit() as second:
                manager.submit(_request(64, 64), track=False, admission=second)
            manager.submit(_request(64, 64), track=False, admission=first)
        assert manager.stats()["admitting"] == 0
        with pytest.raises(QueueFull):
            manager.submit(_request(64, 64), track=False)
    finally:
        release.set()
        manager.stop()
    with pytest.raises(ShuttingDown):
        with manager.admit():
            pass
