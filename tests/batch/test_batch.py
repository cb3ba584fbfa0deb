"""``onnxdream batch``: the same pixels as ``onnxdream dream`` on both backends (worker processes,
and a real loopback Ray cluster joined by address), resume after a kill, failures recorded and
the batch going on, and the input/plan rules."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import tiny_classifier
from onnxdream.batch import run as batch
from onnxdream.core.errors import DependencyError, SettingsError
from onnxdream.settings.options import DreamSettings
from raycluster import needs_ray

LAYERS = ("conv", "act")
# tiny and quick: 2 octaves (the images are >= 45 px), 3 steps
DREAM_ARGS = ["--octaves", "2", "--steps", "3", "--jitter", "4"]
SIZES = [(48, 64), (56, 48), (64, 64), (50, 70), (45, 60), (60, 45)]  # (h, w)
RELS = ["a", "b", "c", "d", "sub/e", "sub/deeper/f"]


@pytest.fixture(scope="module")
def threads_1():
    """One onnxruntime thread everywhere (here and in every process started), so results are
    bit-for-bit reproducible."""
    old = os.environ.get("ONNXDREAM_THREADS")
    os.environ["ONNXDREAM_THREADS"] = "1"
    yield
    if old is None:
        os.environ.pop("ONNXDREAM_THREADS", None)
    else:
        os.environ["ONNXDREAM_THREADS"] = old


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from onnxdream.exporters.graph.contract import write_metadata

    m = tiny_classifier()
    write_metadata(m, name="tiny", layers={"conv": "conv", "act": "act"},
                   default_layers=["act"], input_size=64, dynamic_hw=True)
    path = tmp_path_factory.mktemp("model") / "tiny.onnx"
    import onnx

    onnx.save(m, path)
    return path


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """6 small images in nested folders, plus a corrupt one."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for rel, (h, w) in zip(RELS, SIZES):
        p = root / f"{rel}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)).save(p)
    (root / "bad.png").write_bytes(b"this is not a PNG")
    return root


@pytest.fixture(scope="module")
def reference(model_home, threads_1, tiny_model, photos, tmp_path_factory) -> dict[str, np.ndarray]:
    """What `onnxdream dream` writes for each image x layer (seed 0), by output name."""
    from typer.testing import CliRunner

    from onnxdream.cli.main import app

    out = tmp_path_factory.mktemp("reference")
    runner = CliRunner()
    ref = {}
    for rel in RELS:
        for layer in LAYERS:
            name = f"{rel}--{layer}--s0.png"
            target = out / name.replace("/", "_")
            result = runner.invoke(app, ["dream", str(photos / f"{rel}.png"), "-o", str(target),
                                         "--model", str(tiny_model), "--layer", layer,
                                         "--seed", "0", "--quiet", *DREAM_ARGS])
            assert result.exit_code == 0, result.output
            ref[name] = np.asarray(Image.open(target))
    return ref


def run_batch(*args: str, env: dict[str, str] | None = None, timeout: float = 120,
              check_rc: int | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "onnxdream.cli", "batch", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**(env or os.environ), "COLUMNS": "200"})
    if check_rc is not None:
        assert proc.returncode == check_rc, f"exit {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc


def manifest(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def check_outputs(out: Path, reference: dict[str, np.ndarray]) -> None:
    """Every reference image is in ``out`` (sub-folders mirrored), pixel for pixel."""
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*.png"))
    assert written == sorted(reference)
    for name, want in reference.items():
        got = np.asarray(Image.open(out / name))
        assert got.shape == want.shape and np.array_equal(got, want), name


def check_rows(rows: list[dict], photos: Path) -> None:
    assert len(rows) == 14
    bad = [r for r in rows if r["status"] == "failed"]
    assert {r["layer"] for r in bad} == set(LAYERS)
    assert all(r["input"] == str(photos / "bad.png") for r in bad)
    assert all("\n" not in r["error"] and "bad.png" in r["error"] for r in bad)
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) == 12 and all(len(r["settings_hash"]) == 20 for r in ok)


@pytest.mark.timeout(120)
def test_local_batch_equals_dream(reference, tiny_model, photos, tmp_path):
    out = tmp_path / "out"
    proc = run_batch(str(photos), "-o", str(out), "--model", str(tiny_model), "--layers",
                     ",".join(LAYERS), "--workers", "2", *DREAM_ARGS, check_rc=3)
    check_outputs(out, reference)
    check_rows(manifest(out / "manifest.jsonl"), photos)
    assert "12 dreamed, 0 already done, 2 failed" in proc.stderr
    assert "Traceback" not in proc.stderr
    from onnxdream.media.imageio import read_metadata

    meta = read_metadata(out / "sub/e--act--s0.png")
    assert meta[batch.HASH_KEY] and "--layer act:1" in meta["onnxdream:command"]


@pytest.mark.xdist_group("ray")
@pytest.mark.timeout(150)
def test_ray_cluster_batch_equals_dream(ray_head, reference, tiny_model, photos, tmp_path):
    """A real cluster on 127.0.0.1 (`ray start --head`, conftest's ray_head), joined with
    --address."""
    out = tmp_path / "out"
    proc = run_batch(str(photos), "-o", str(out), "--model", str(tiny_model), "--layers",
                     ",".join(LAYERS), "--backend", "ray", "--address", ray_head.address,
                     "--workers", "2", "--cpus-per-worker", "0.5", *DREAM_ARGS,
                     env=ray_head.env, check_rc=3)
    check_outputs(out, reference)
    check_rows(manifest(out / "manifest.jsonl"), photos)
    assert "12 dreamed, 0 already done, 2 failed" in proc.stderr
    # Ray's console noise went to its log (removed: no worker died), not to the terminal
    assert "core_worker" not in proc.stderr and "(raylet)" not in proc.stderr
    assert not (out / ".onnxdream-ray.log").exists()


@pytest.mark.xdist_group("ray")  # never beside the cluster: 2 cores
@pytest.mark.timeout(120)
def test_ray_private_instance(reference, tiny_model, photos, tmp_path):
    """Without --address: a private Ray instance, gone afterwards."""
    needs_ray()
    out = tmp_path / "out"
    before = set(os.listdir("/tmp"))
    token_file = Path.home() / ".ray" / "auth_token"
    had_token = token_file.exists()
    rows = batch.run([photos / "a.png", photos / "sub"], DreamSettings(
        model=str(tiny_model), octaves=2, steps=3, jitter=4), "ray", output_dir=out,
        layers=["conv"], workers=1, cpus_per_worker=0.5)
    assert [r.status for r in rows] == ["ok"] * 3
    # a folder's sub-folders are mirrored below the output folder, relative to that folder
    for got, want in [("a", "a"), ("e", "sub/e"), ("deeper/f", "sub/deeper/f")]:
        assert np.array_equal(np.asarray(Image.open(out / f"{got}--conv--s0.png")),
                              reference[f"{want}--conv--s0.png"])
    leftovers = {d for d in set(os.listdir("/tmp")) - before if d.startswith("odr")}
    assert not leftovers
    assert "RAY_AUTH_TOKEN" not in os.environ
    assert token_file.exists() == had_token  # its own token: nothing written to ~/.ray


@pytest.mark.timeout(120)
def test_interrupted_batch_resumes(model_home, threads_1, tiny_model, tmp_path):
    """Kill the batch after a few items; the same command then dreams only the missing ones
    (and a changed setting redoes everything)."""
    rng = np.random.default_rng(1)
    src = tmp_path / "in"
    src.mkdir()
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (96, 96, 3), np.uint8)).save(src / f"p{i}.png")
    out = tmp_path / "out"
    args = [str(src), "-o", str(out), "--model", str(tiny_model), "--layer", "conv",
            "--octaves", "2", "--steps", "40", "--workers", "1", "--quiet"]
    proc = subprocess.Popen([sys.executable, "-m", "onnxdream.cli", "batch", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        rows_file = out / "manifest.jsonl"
        while time.monotonic() < deadline and proc.poll() is None:
            if rows_file.exists() and len(rows_file.read_text().splitlines()) >= 2:
                break
            time.sleep(0.01)
        assert proc.poll() is None, "the batch finished before it could be interrupted"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the driver and its worker, mid-item
        proc.wait(10)
        proc.stderr.close()
    done_before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    assert 2 <= len(done_before) < 12, sorted(done_before)
    again = run_batch(*args, check_rc=0)
    rows = manifest(out / "manifest.jsonl")  # compacted: one row per output
    assert len(rows) == 12 and all(r["status"] == "ok" for r in rows)
    assert f"{12 - len(done_before)} dreamed, {len(done_before)} already done" in again.stderr, (
        sorted(done_before), again.stderr)
    for name, mtime in done_before.items():
        assert (out / name).stat().st_mtime_ns == mtime  # not dreamed again
    changed = run_batch(*args, "--steps", "5", check_rc=0)  # other settings: all again
    assert "12 dreamed, 0 already done" in changed.stderr


@pytest.mark.timeout(60)
def test_a_dead_worker_fails_its_item_only(model_home, threads_1, tiny_model, tmp_path):
    import multiprocessing

    rng = np.random.default_rng(2)
    items = []
    for i in range(4):
        p = tmp_path / f"p{i}.png"
        Image.fromarray(rng.integers(0, 256, (96, 96, 3), np.uint8)).save(p)
        items.append(batch.BatchItem(str(p), str(tmp_path / f"o{i}.png"), "image", "conv",
                                     DreamSettings(model=str(tiny_model), layers=("conv",),
                                                   steps=60, octaves=1, seed=0)))
    rows, killed = [], False
    from onnxdream.batch.local_backend import local_rows

    gen = local_rows(items, workers=2, threads=1)
    with contextlib.closing(gen):
        for row in gen:
            rows.append(row)
            if not killed:
                victims = multiprocessing.active_children()
                assert victims
                os.kill(victims[0].pid, signal.SIGKILL)
                killed = True
    assert len(rows) == 4 and {r.output for r in rows} == {it.output for it in items}
    dead = [r for r in rows if r.status == "failed"]
    assert len(dead) == 1 and dead[0].error.startswith(batch.DIED)
    assert not multiprocessing.active_children()


def test_inputs_plan_and_names(tmp_path):
    root = tmp_path / "photos"
    for rel in ("x.png", "a/y.jpg", "a/b/z.webp", ".hidden/h.png", "a/notes.txt", "a/.t.png"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"")
    out = root / "dreams"
    (out / "sub").mkdir(parents=True)
    (out / "old--conv--s0.png").write_bytes(b"")  # outputs are never inputs
    lst = tmp_path / "list.txt"
    lst.write_text("# comment\nphotos/x.png\n\nphotos/a/b\n")
    found = batch.find_inputs([root], exclude=out)
    assert [(str(s.rel), s.kind) for s in found] == [("x", "image"), ("a/y", "image"),
                                                   ("a/b/z", "image")]
    assert [str(s.rel) for s in batch.find_inputs([lst])] == ["x", "z"]
    assert [str(s.rel) for s in batch.find_inputs([str(root / "a" / "**" / "*.*")])] == [
        "b/z", "y"]
    with pytest.raises(batch.BatchError, match="missing.png does not exist"):
        batch.find_inputs([root / "missing.png"])
    (root / "clip.mp4").write_bytes(b"")
    with pytest.raises(batch.BatchError, match=r"clip.mp4: videos need the \[video\] extra"):
        batch.find_inputs([root], exclude=out, allow_videos=False)
    assert batch.find_inputs([root / "clip.mp4"], allow_videos=True)[0].kind == "video"

    sources = batch.find_inputs([root / "x.png", root / "a"])
    items = batch.plan(sources, "OUT", DreamSettings(), layers=["model/b_1/Relu6:0", "A+B"],
                       seeds=[3, 4])
    names = [it.output for it in items]
    assert len(names) == 2 * 2 * 3 and len(set(names)) == len(names)
    assert names[:3] == ["OUT/x--model_b_1_Relu6_0--s3.png", "OUT/y--model_b_1_Relu6_0--s3.png",
                         "OUT/b/z--model_b_1_Relu6_0--s3.png"]
    assert items[-1].settings.layers == ("A", "B") and items[-1].settings.seed == 4
    assert items[-1].output == "OUT/b/z--A+B--s4.png"
    one = batch.plan(sources[:1], "OUT", DreamSettings(seed=9), default_label="blocks.9")
    assert [it.output for it in one] == ["OUT/x--blocks.9--s9.png"]
    clash = [batch.Source(root / "x.png", Path("x"), "image"),
             batch.Source(root / "x.jpg", Path("x"), "image")]
    with pytest.raises(batch.BatchError, match="would both write"):
        batch.plan(clash, "OUT", DreamSettings())

    assert batch.parse_seeds("1,3-5,3") == [1, 3, 4, 5]
    assert batch.parse_layers("a, b+c:2") == ["a", "b+c:2"]
    for bad in ("x", "1-", "-1", str(2**32)):
        with pytest.raises(SettingsError) as e:
            batch.parse_seeds(bad)
        assert e.value.field == "seeds"
    with pytest.raises(SettingsError) as e:
        batch.parse_layers("a,,b")
    assert e.value.field == "layers"


def test_options_are_checked_before_any_work(tmp_path, monkeypatch):
    (tmp_path / "p.png").write_bytes(b"")
    s = DreamSettings()
    for kwargs, field in [(dict(backend="spark"), "backend"), (dict(workers=0), "workers"),
                          (dict(address="auto"), "address"),
                          (dict(gpus_per_worker=1.0), "gpus_per_worker"),
                          (dict(backend="ray", address="nowhere"), "address"),
                          (dict(backend="ray", device="cuda"), "gpus_per_worker")]:
        with pytest.raises(SettingsError) as e:
            batch.run([tmp_path], s, output_dir=tmp_path / "out", **kwargs)
        assert e.value.field == field, kwargs
    if importlib.util.find_spec("ray") is not None:
        from raycluster import free_port

        t0 = time.monotonic()
        with pytest.raises(batch.BatchError, match="no Ray cluster answers at 127.0.0.1:"):
            batch.run([tmp_path], s, "ray", output_dir=tmp_path / "out",
                      address=f"127.0.0.1:{free_port()}")
        assert time.monotonic() - t0 < 10
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "ray" else real(name, *a))
    with pytest.raises(DependencyError, match=r"pip install 'onnxdream\[ray\]'"):
        batch.run([tmp_path], s, "ray", output_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_mistakes_are_one_line(tiny_model, tmp_path):
    (tmp_path / "p.png").write_bytes(b"")
    for args, needle in [
        (["--layer", "conv", "--layers", "conv,act"], "--layers makes one output per layer"),
        (["--seed", "1", "--seeds", "1,2"], "--seeds makes one output per seed"),
        (["--seeds", "x"], "--seeds must be integers"),
        (["--address", "auto"], "--address is for the ray backend"),
        (["--layers", "nope"], "nope"),
    ]:
        proc = run_batch(str(tmp_path / "p.png"), "-o", str(tmp_path / "out"), "--model",
                         str(tiny_model), *args, timeout=60)
        assert proc.returncode == 2, (args, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], (args, proc.stderr)


@pytest.mark.timeout(60)
def test_video_in_a_batch(model_home, threads_1, tiny_model, tmp_path):
    pytest.importorskip("av")
    pytest.importorskip("cv2")
    import videoclip

    clip = videoclip.make_clip(tmp_path / "clip.mp4", seconds=0.5)
    settings = DreamSettings(model=str(tiny_model), octaves=1, steps=2)
    rows = batch.run([clip], settings, output_dir=tmp_path / "out", workers=1)
    assert [(r.status, Path(r.output).name) for r in rows] == [("ok", "clip--act--s0.mp4")], rows
    from onnxdream.media.videoio import probe

    info = probe(tmp_path / "out" / "clip--act--s0.mp4")
    assert info.frames == 5 and info.size == videoclip.SIZE
    again = batch.run([clip], settings, output_dir=tmp_path / "out", workers=1)
    assert [r.status for r in again] == ["skipped"]


def test_resume_reads_sizes_from_headers(tmp_path):
    """The resume check takes (h, w) from the header, EXIF rotation included, as load_image
    gives them after decoding."""
    from onnxdream.media.imageio import load_image

    im = Image.fromarray(np.zeros((40, 70, 3), np.uint8))
    exif = im.getexif()
    exif[0x0112] = 6  # rotated 90°
    im.save(tmp_path / "r.jpg", exif=exif)
    im.save(tmp_path / "p.png")
    for name in ("r.jpg", "p.png"):
        p = str(tmp_path / name)
        assert batch._image_size(p) == load_image(p).rgb.shape[:2]


def test_manifest_keeps_the_latest_row_per_output(tmp_path):
    path = tmp_path / "m.jsonl"
    first = batch.ManifestRow("in/a.png", "out/a.png", "conv", 0, "h1", "ok", 1.0)
    path.write_text(first.to_json() + "\n" + '{"input": "in/b.png", "outp')  # cut by a kill
    m = batch.Manifest(path)
    assert list(m.previous) == ["out/a.png"]
    m.write(batch.ManifestRow("in/a.png", "out/a.png", "conv", 0, "h1", "skipped", 0.0))
    m.write(batch.ManifestRow("in/b.png", "out/b.png", "conv", 0, "h2", "failed", 0.5, "boom"))
    m.compact()
    rows = manifest(path)
    assert [(r["output"], r["status"]) for r in rows] == [("out/a.png", "ok"),
                                                         ("out/b.png", "failed")]
    empty = batch.Manifest(tmp_path / "new.jsonl")
    empty.close()
    assert not (tmp_path / "new.jsonl").exists()
