"""The layer atlas (`onnxdream atlas`, the server's thumbnails) and the recommended layers and
step sizes in the models' metadata. Small cells and few steps."""

from __future__ import annotations

import asyncio
import json
import shlex
import time

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from helpers import photo, tiny_classifier

GAP = 4  # visualize.grid's gap


def _cli(*args: str):
    from onnxdream.cli.main import app

    result = CliRunner().invoke(app, list(args), env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return result


def _cells(img: np.ndarray, n: int, cell: int) -> list[np.ndarray]:
    return [img[GAP:GAP + cell, GAP + i * (cell + GAP):GAP + i * (cell + GAP) + cell]
            for i in range(n)]


def _caption_strip(img: np.ndarray, i: int, cell: int) -> np.ndarray:
    x0 = GAP + i * (cell + GAP)
    return img[GAP + cell:, x0:x0 + cell]


def test_atlas_writes_one_labelled_cell_per_layer(model_home, tmp_path):
    from onnxdream.media.imageio import read_metadata

    out = tmp_path / "atlas.png"
    layers = ["blocks.2", "blocks.5", "blocks.9"]
    cell = 64
    _cli("atlas", str(photo("chelsea.png")), "-o", str(out), "--layers", ",".join(layers),
         "--cell", str(cell), "--steps", "2", "--octaves", "1", "--seed", "3", "-q")
    img = np.asarray(Image.open(out).convert("RGB"), np.float64) / 255
    caption = max(10, cell // 16) + 2 * GAP  # visualize.grid's caption strip
    assert img.shape[:2] == (GAP + cell + caption, len(layers) * (cell + GAP) + GAP)
    cells = _cells(img, len(layers), cell)
    for i, a in enumerate(cells):
        assert (_caption_strip(img, i, cell) < 0.5).any(), f"cell {i} has no caption"
        for b in cells[i + 1:]:
            assert np.abs(a - b).mean() > 0.01  # each layer dreams differently
    meta = read_metadata(out)
    assert json.loads(meta["onnxdream:layers"]) == layers
    assert meta["onnxdream:kind"] == "atlas" and meta["onnxdream:cell"] == str(cell)
    assert meta["onnxdream:step_size"] == "0.006" and meta["onnxdream:seed"] == "3"
    argv = shlex.split(meta["onnxdream:command"])
    assert argv[:2] == ["onnxdream", "atlas"] and "--layers" in argv
    assert argv[argv.index("--layers") + 1] == ",".join(layers)


def test_atlas_defaults_to_the_recommended_layers_of_the_bundled_example(model_home, tmp_path,
                                                                           monkeypatch):
    from onnxdream.exporters.graph.contract import ModelInfo
    from onnxdream.media.imageio import read_metadata
    from onnxdream.models import resolve_model

    monkeypatch.chdir(tmp_path)
    _cli("atlas", "--cell", "64", "--steps", "1", "--octaves", "1", "-q")
    out = tmp_path / "chelsea-atlas.png"
    recommended = ModelInfo.load(resolve_model("efficientnet-lite0")).recommended_layers
    assert json.loads(read_metadata(out)["onnxdream:layers"]) == recommended
    assert Image.open(out).size[0] == min(len(recommended), 8) * (64 + GAP) + GAP


def test_atlas_channels(model_home, tmp_path):
    from onnxdream.media.imageio import read_metadata

    out = tmp_path / "channels.png"
    _cli("atlas", "--channels", "blocks.9", "--count", "3", "--cell", "64", "--steps", "6",
         "--seed", "1", "-o", str(out), "-q")
    img = np.asarray(Image.open(out).convert("RGB"), np.float64) / 255
    assert img.shape[1] == 3 * (64 + GAP) + GAP
    a, b, c = _cells(img, 3, 64)
    assert np.abs(a - b).mean() > 0.01 and np.abs(b - c).mean() > 0.01
    meta = read_metadata(out)
    assert json.loads(meta["onnxdream:targets"]) == [f"channel:blocks.9:{k}" for k in range(3)]
    assert "--channels blocks.9 --count 3" in meta["onnxdream:command"]


def test_atlas_all_layers_of_a_model_file_from_noise(model_home, tmp_path):
    import onnx

    from onnxdream.media.imageio import read_metadata

    model = tmp_path / "tiny.onnx"
    onnx.save(tiny_classifier(), model)  # no metadata: every node output is a layer
    out = tmp_path / "all.png"
    _cli("atlas", "--model", str(model), "--all", "--init", "noise", "--cell", "64",
         "--steps", "2", "--octaves", "1", "-o", str(out), "-q")
    meta = read_metadata(out)
    assert json.loads(meta["onnxdream:layers"]) == ["conv", "act"]  # feature maps, no logits
    assert meta["onnxdream:init"] == "noise" and "--init noise" in meta["onnxdream:command"]
    assert Image.open(out).size[0] == 2 * (64 + GAP) + GAP


def test_atlas_user_errors_are_one_line(model_home, tmp_path):
    from onnxdream.cli.main import app

    runner = CliRunner()
    for args, needle in [(["--layers", "blocks.99"], "unknown layer 'blocks.99'"),
                         (["--layers", "blocks.1", "--all"], "not both"),
                         (["--init", "sky"], "--init must be photo or noise"),
                         (["--cell", "8"], "Invalid value for '--cell'")]:
        r = runner.invoke(app, ["atlas", "-o", str(tmp_path / "x.png"), *args],
                          env={"COLUMNS": "200"})
        assert r.exit_code == 2, r.output
        assert needle in r.output and "Traceback" not in r.output
        assert not (tmp_path / "x.png").exists()


# -- recommended layers and step sizes ---------------------------------------------------------


@pytest.mark.parametrize("name", ["efficientnet-lite0", "efficientnet-lite1",
                                  "efficientnet-lite2"])
def test_zoo_models_carry_their_recommendations(model_home, name):
    from onnxdream.exporters.graph.contract import ModelInfo
    from onnxdream.models import ZOO, resolve_model
    from onnxdream.settings.options import DreamSettings
    from onnxdream.settings.resolve import resolve

    entry = ZOO[name]
    info = ModelInfo.load(resolve_model(name))
    assert info.recommended_layers == list(entry.recommended_layers)
    assert 4 <= len(info.recommended_layers) <= 6
    assert set(info.default_layers) <= set(info.recommended_layers)
    order = list(info.layers)
    assert info.recommended_layers == sorted(info.recommended_layers, key=order.index)
    assert info.step_size == entry.step_size and entry.step_size is not None
    # used when the settings name none, overridden when they do
    assert resolve(DreamSettings(model=name), 300, 400, info).step_size == entry.step_size
    assert resolve(DreamSettings(model=name, step_size=0.02), 300, 400, info).step_size == 0.02


def test_dream_uses_the_models_step_size_unless_given(model_home, tmp_path):
    from onnxdream.media.imageio import read_metadata
    from onnxdream.models import ZOO

    src = tmp_path / "small.png"
    Image.open(photo("chelsea.png")).convert("RGB").crop((150, 40, 214, 104)).save(src)
    for extra, want in [((), ZOO["efficientnet-lite0"].step_size), (("--step-size", "0.02"), 0.02)]:
        out = tmp_path / "d.png"
        _cli("dream", str(src), "-o", str(out), "--steps", "1", "--octaves", "1", "-q", *extra)
        meta = read_metadata(out)
        assert float(meta["onnxdream:step_size"]) == want
        assert json.loads(meta["onnxdream:resolved"])["step_size"] == want
        assert f"--step-size {want}" in meta["onnxdream:command"]


def test_a_model_without_recommendations(tmp_path):
    """No step size: the engine's default; no recommended layers: the default ones."""
    from onnxdream.exporters.graph.contract import ModelInfo, write_metadata
    from onnxdream.settings.options import DreamSettings
    from onnxdream.settings.resolve import resolve

    info = ModelInfo.load(tiny_classifier())
    assert info.step_size is None and info.recommended_layers == []
    assert resolve(DreamSettings(), 32, 32, info).step_size == 0.006
    model = write_metadata(tiny_classifier(), name="tiny", layers={"conv": "conv", "act": "act"},
                           default_layers=["act"], input_size=32, dynamic_hw=True)
    assert ModelInfo.load(model).recommended_layers == ["act"]
    model = write_metadata(tiny_classifier(), name="tiny", layers={"conv": "conv", "act": "act"},
                           default_layers=["act"], recommended_layers=["conv", "act"],
                           step_size=0.01, input_size=32, dynamic_hw=True)
    info = ModelInfo.load(model)
    assert info.recommended_layers == ["conv", "act"] and info.step_size == 0.01
    assert resolve(DreamSettings(), 32, 32, info).step_size == 0.01


# -- the server's thumbnails -------------------------------------------------------------------


def test_server_atlas_thumbnails_are_computed_once_and_cached(model_home, tmp_path):
    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    import onnx

    from onnxdream.exporters.graph.contract import write_metadata
    from onnxdream.server.app import ServerConfig, create_app
    from onnxdream.settings.options import DreamSettings

    path = tmp_path / "tiny.onnx"
    onnx.save(write_metadata(tiny_classifier(), name="tiny",
                             layers={"conv": "conv", "act": "act"}, default_layers=["act"],
                             recommended_layers=["act"], input_size=32, dynamic_hw=True), path)
    config = ServerConfig.from_env(model_paths=[path], workers=1)

    def app_with_tiny_thumbnails():
        app = create_app(config)
        app.state.atlas.cell = 64
        app.state.atlas.settings = DreamSettings(seed=0, steps=1, octaves=1)
        return app

    async def fetch(app, *urls, until_done=False):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://test", timeout=60) as c:
            if until_done:
                deadline = time.monotonic() + 50
                r = await c.get(urls[0])
                first = r
                while r.status_code == 202 and time.monotonic() < deadline:
                    await asyncio.sleep(0.1)
                    r = await c.get(urls[0])
                return first, r
            return [await c.get(u) for u in urls]

    app = app_with_tiny_thumbnails()
    try:
        first, done = asyncio.run(fetch(app, "/models/tiny/atlas", until_done=True))
        assert first.status_code == 202, first.text
        assert first.json()["layers"] == [{"layer": "act", "url": None}]
        assert done.status_code == 200, done.text
        body = done.json()
        assert body["state"] == "done" and body["cell"] == 64
        (row,) = body["layers"]
        assert row["layer"] == "act" and row["url"].startswith("/models/tiny/atlas/act.png?v=")
        thumb, again, missing, unknown = asyncio.run(fetch(
            app, row["url"], "/models/tiny/atlas", "/models/tiny/atlas/conv.png",
            "/models/nope/atlas"))
        assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/png"
        im = Image.open(__import__("io").BytesIO(thumb.content))
        assert im.size == (64, 64)
        assert again.status_code == 200 and again.json() == body  # cached: nothing queued
        assert missing.status_code == 404 and unknown.status_code == 404
        assert app.state.models.loaded() == []  # the thumbnails' session was not kept
    finally:
        app.state.jobs.stop()
    files = list((model_home / "atlas").glob("*/act.png"))
    assert len(files) == 1
    mtime = files[0].stat().st_mtime_ns
    # a new server finds them on disk
    app = app_with_tiny_thumbnails()
    try:
        (r,) = asyncio.run(fetch(app, "/models/tiny/atlas"))
        assert r.status_code == 200 and r.json()["layers"] == body["layers"]
    finally:
        app.state.jobs.stop()
    assert files[0].stat().st_mtime_ns == mtime


def test_atlas_job_steps_aside_between_thumbnails_when_dreams_wait(model_home, tmp_path):
    import onnx

    from onnxdream.exporters.graph.contract import write_metadata
    from onnxdream.jobs.atlas_cache import AtlasRequest
    from onnxdream.jobs.queue import ServerConfig
    from onnxdream.settings.options import DreamSettings

    path = tmp_path / "tiny.onnx"
    onnx.save(write_metadata(tiny_classifier(), name="tiny",
                             layers={"conv": "conv", "act": "act"}, default_layers=["act"],
                             recommended_layers=["conv", "act"], input_size=32,
                             dynamic_hw=True), path)
    models = ServerConfig.from_env(model_paths=[path], workers=1).model_cache()
    settings = DreamSettings(model="tiny", seed=0, steps=1, octaves=1)
    folder = tmp_path / "thumbs"
    busy = AtlasRequest(settings, ["conv", "act"], folder, 64, yield_to=lambda: True)
    assert json.loads(busy.run(models)) == ["conv"]  # a dream waits: one thumbnail, then stop
    assert sorted(p.name for p in folder.iterdir()) == ["conv.png"]
    idle = AtlasRequest(settings, ["act"], folder, 64, yield_to=lambda: False)
    assert json.loads(idle.run(models)) == ["act"]
    assert sorted(p.name for p in folder.iterdir()) == ["act.png", "conv.png"]


def test_layer_file_names_are_safe():
    from onnxdream.jobs.atlas_cache import layer_file

    assert layer_file("blocks.5") == "blocks.5"
    odd = layer_file("model/block_1/Relu6:0")
    assert "/" not in odd and ":" not in odd and odd.startswith("model-block_1-Relu6-0-")
    assert layer_file("..") != ".." and "/" not in layer_file("../../etc")
    assert layer_file("a/b") != layer_file("a:b")
