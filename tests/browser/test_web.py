"""The browser path without a browser: the compiler's portable target, the octave-resize graph,
`onnxdream web export` (files, manifest, one-line errors) and the server's /web routes.

The browser itself (Chromium) is tests/browser/test_browser_dream.py.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from helpers import run_cli

FAKE_ORT = {"ort.wasm.min.mjs": "export const env = {};\n",
            "ort-wasm-simd-threaded.mjs": "// loader\n", "ort-wasm-simd-threaded.wasm": "\0asm",
            "ort.webgpu.min.mjs": "export const env = {};\n",
            "ort-wasm-simd-threaded.asyncify.mjs": "// loader\n",
            "ort-wasm-simd-threaded.asyncify.wasm": "\0asm"}


def fake_ort(tmp_path, webgpu: bool = True):
    """An unpacked 'onnxruntime-web' package with placeholder files (for what is not run)."""
    pkg = tmp_path / "package"
    (pkg / "dist").mkdir(parents=True)
    (pkg / "package.json").write_text(json.dumps({"name": "onnxruntime-web", "version": "1.30.0"}))
    for name, text in FAKE_ORT.items():
        if webgpu or "webgpu" not in name and "asyncify" not in name:
            (pkg / "dist" / name).write_text(text)
    return pkg


def pooled_model():
    """image → per-channel Gathers (torchvision's input transform) → Conv → Relu → strided
    MaxPool(ceil_mode) → Conv → Relu (``act``) → MaxPool 3/2 (``pool``) → Conv (``deep``)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=s).astype(np.float32), n) for n, s in
             (("w1", (8, 3, 3, 3)), ("w2", (8, 8, 3, 3)), ("w3", (4, 8, 3, 3)))]
    inits += [numpy_helper.from_array(np.array([1], np.int64), "ax1"),
              numpy_helper.from_array(np.array(1.7, np.float32), "scale")]
    nodes, parts = [], []
    for k, c in enumerate((0, 1, 2)):
        inits.append(numpy_helper.from_array(np.array(c, np.int64), f"i{k}"))
        nodes += [helper.make_node("Gather", ["image", f"i{k}"], [f"g{k}"], axis=1),
                  helper.make_node("Unsqueeze", [f"g{k}", "ax1"], [f"u{k}"]),
                  helper.make_node("Mul", [f"u{k}", "scale"], [f"m{k}"])]
        parts.append(f"m{k}")
    nodes += [helper.make_node("Concat", parts, ["x"], axis=1),
              helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
              helper.make_node("Relu", ["c1"], ["r1"]),
              helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[3, 3], strides=[2, 2],
                               ceil_mode=1),
              helper.make_node("Conv", ["p1", "w2"], ["c2"], pads=[1, 1, 1, 1]),
              helper.make_node("Relu", ["c2"], ["act"]),
              helper.make_node("MaxPool", ["act"], ["pool"], kernel_shape=[3, 3], strides=[2, 2],
                               pads=[1, 1, 1, 1]),
              helper.make_node("Conv", ["pool", "w3"], ["deep"], pads=[1, 1, 1, 1])]
    graph = helper.make_graph(
        nodes, "pooled",
        [helper.make_tensor_value_info("image", onnx.TensorProto.FLOAT, ["n", 3, "h", "w"])],
        [helper.make_tensor_value_info("deep", onnx.TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _session(model):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


# ---------------------------------------------------------------------------------------------
# the compiler's targets


def test_portable_target_equals_the_default_graph_without_indices_or_scatter_add():
    from onnxdream.exporters.graph import compile_gradient
    from onnxdream.exporters.graph.compiler import portability_problems

    model = pooled_model()
    default = compile_gradient(model, ["deep"])
    portable = compile_gradient(model, ["deep"], target="portable")
    problems = portability_problems(default)
    assert any("Indices" in p for p in problems) and any("ScatterElements" in p for p in problems)
    assert portability_problems(portable) == []
    # the constant, distinct Gather indices scatter without a reduction in both (OpenVINO)
    for g in (default, portable):
        nd = [n for n in g.graph.node if n.op_type == "ScatterND"]
        assert nd and all(helper.get_attribute_value(a) == b"none" for n in nd
                          for a in n.attribute if a.name == "reduction"), nd
    assert json.loads({p.key: p.value for p in portable.metadata_props}[
        "onnxdream.compiled"])["target"] == "portable"
    a, b = _session(default), _session(portable)
    rng = np.random.default_rng(1)
    for h, w in ((33, 47), (64, 64), (57, 30)):
        x = rng.random((2, 3, h, w), np.float32)
        (oa, ga), (ob, gb) = a.run(None, {"image": x}), b.run(None, {"image": x})
        np.testing.assert_allclose(ob, oa, rtol=1e-6)
        assert np.abs(gb - ga).max() <= 1e-5 * np.abs(ga).max(), (h, w)


def test_repeated_gather_indices_still_add_their_gradients():
    from onnxdream.exporters.graph import compile_gradient

    idx = numpy_helper.from_array(np.array([0, 0, 2], np.int64), "idx")  # channel 0 twice
    graph = helper.make_graph(
        [helper.make_node("Gather", ["image", "idx"], ["x"], axis=1)], "g",
        [helper.make_tensor_value_info("image", onnx.TensorProto.FLOAT, ["n", 3, "h", "w"])],
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, None)], [idx])
    g = compile_gradient(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]),
                         ["x"])
    reductions = [helper.get_attribute_value(a) for n in g.graph.node if n.op_type == "ScatterND"
                  for a in n.attribute if a.name == "reduction"]
    assert reductions == [b"add"]
    x = np.random.default_rng(2).random((1, 3, 8, 9), np.float32)
    _, grad = _session(g).run(None, {"image": x})
    n = 3 * 8 * 9  # the mean of [x0, x0, x2]
    np.testing.assert_allclose(grad[0, :, 0, 0], [2 / n, 0.0, 1 / n], rtol=1e-5)


def test_unknown_target_is_a_clear_error(model_home, tmp_path):
    proc = run_cli("compile", "efficientnet-lite0", "--target", "fast", "-o",
                   str(tmp_path / "g.onnx"), home=model_home, check=False)
    assert proc.returncode == 2 and "unknown target 'fast': use default or portable" in \
        proc.stderr and "Traceback" not in proc.stderr


def test_resize_graph_equals_imageio_resize():
    from onnxdream.exporters.graph.step import resize_graph
    from onnxdream.media.imageio import resize

    model = resize_graph()
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version <= 10  # onnxruntime-web 1.30 reads IR <= 13; keep it modest
    s = _session(model)
    img = np.random.default_rng(0).random((96, 128, 3), np.float32) * 1.2 - 0.1  # detail < 0
    for size in ((69, 91), (96, 128), (134, 179), (33, 40), (200, 100)):
        y = s.run(None, {"x": img.transpose(2, 0, 1)[None].copy(),
                         "sizes": np.array([1, 3, *size], np.int64)})[0][0].transpose(1, 2, 0)
        assert np.abs(y - resize(img, size)).max() < 5e-5, size


# ---------------------------------------------------------------------------------------------
# what the page is told


@pytest.mark.parametrize("name", ["steps", "octaves", "octave_scale", "step_size", "jitter",
                                  "seed"])
def test_the_pages_limits_are_dream_settings_ranges(name):
    from onnxdream.browser.site import limits
    from onnxdream.core.errors import SettingsError
    from onnxdream.settings.options import DreamSettings

    lim = limits()[name]
    step = 1 if lim.get("integer") else 1e-9
    DreamSettings(**{name: lim["max"]}).validate()
    with pytest.raises(SettingsError):
        DreamSettings(**{name: lim["max"] + step}).validate()
    if lim.get("open_low"):
        DreamSettings(**{name: lim["min"] + 1e-6}).validate()
        with pytest.raises(SettingsError):
            DreamSettings(**{name: lim["min"]}).validate()
    else:
        DreamSettings(**{name: lim["min"]}).validate()
        with pytest.raises(SettingsError):
            DreamSettings(**{name: lim["min"] - step}).validate()


# ---------------------------------------------------------------------------------------------
# onnxdream web export


def test_web_export_writes_a_site(model_home, tmp_path):
    from onnxdream.exporters.graph import compile_gradient
    from onnxdream.exporters.graph.step import step_graph
    from onnxdream.runtime.opening import resolve_model_path

    ort = fake_ort(tmp_path)
    site = tmp_path / "site"
    proc = run_cli("web", "export", "-o", str(site), "--ort-dir", str(ort), "--layer",
                   "blocks.5", "--layer", "blocks.9:2", home=model_home)
    assert "wrote" in proc.stderr and "onnxdream web serve" in proc.stderr
    files = sorted(str(p.relative_to(site)) for p in site.rglob("*") if p.is_file())
    assert files == ["app.css", "graphs/resize.onnx", "graphs/step-0-blocks.5.onnx",
                     "graphs/step-1-blocks.9_2.onnx", "index.html", "manifest.json",
                     "onnxdream.mjs", "ort/LICENSE", "ort/ort-wasm-simd-threaded.mjs",
                     "ort/ort-wasm-simd-threaded.wasm", "ort/ort.wasm.min.mjs"]
    m = json.loads((site / "manifest.json").read_text())
    assert m["model"]["name"] == "efficientnet-lite0" and m["model"]["dynamic_hw"]
    assert [entry["name"] for entry in m["layers"]] == ["blocks.5", "blocks.9:2"]
    assert m["layers"][1]["objective"] == "2*mean(blocks.9)"
    assert m["layers"][1]["argv_layers"] == ["blocks.9:2"] and m["default_layer"] == "blocks.5"
    assert m["ort"] == {"base": "ort/", "version": "1.30.0", "webgpu": False, "available": True,
                        "reason": ""}
    assert m["target"] == "default" and m["defaults"]["steps"] == 10
    assert "MIT License" in (site / "ort" / "LICENSE").read_text()
    assert 'data-onnxdream="site"' in (site / "index.html").read_text()
    # the step graph is the one the CUDA loop compiles: same function
    graph = onnx.load(str(site / "graphs" / "step-0-blocks.5.onnx"))
    assert [i.name for i in graph.graph.input][:3] == ["x", "shift", "step_size"]
    want = step_graph(compile_gradient(resolve_model_path("efficientnet-lite0"), ["blocks.5"]))
    x = np.random.default_rng(0).random((1, 3, 40, 56), np.float32)
    feeds = {"x": x, "shift": np.array([5, 50], np.int64),
             "step_size": np.array([0.006], np.float32)}
    for got, ref in zip(_session(graph).run(None, feeds), _session(want).run(None, feeds)):
        np.testing.assert_array_equal(got, ref)

    # a second export replaces the first whole (WebGPU files, portable graphs)
    run_cli("web", "export", "-o", str(site), "--ort-dir", str(ort / "dist"), "--webgpu",
            home=model_home)
    m = json.loads((site / "manifest.json").read_text())
    assert m["target"] == "portable" and m["ort"]["webgpu"] and len(m["layers"]) == 1
    assert (site / "ort" / "ort.webgpu.min.mjs").is_file()
    assert not (site / "graphs" / "step-1-blocks.9_2.onnx").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".site")]  # no leftovers


@pytest.mark.parametrize("case,needles", [
    ("no-ort", ["needs onnxruntime-web's runtime files", "npm pack onnxruntime-web@1.30.0",
                "--ort-dir"]),
    ("no-webgpu", ["does not hold onnxruntime-web's ort.webgpu.min.mjs"]),
    ("occupied", ["exists and is not an onnxdream site"]),
    ("layer", ["unknown layer 'blocks.99'"]),
])
def test_web_export_errors_are_one_line(model_home, tmp_path, monkeypatch, case, needles):
    monkeypatch.delenv("ONNXDREAM_ORT_DIR", raising=False)
    out = tmp_path / "site"
    args = ["web", "export", "-o", str(out)]
    if case != "no-ort":
        args += ["--ort-dir", str(fake_ort(tmp_path, webgpu=case != "no-webgpu"))]
    if case == "no-webgpu":
        args.append("--webgpu")
    if case == "occupied":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    if case == "layer":
        args += ["--layer", "blocks.99"]
    proc = run_cli(*args, home=model_home, check=False)
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip()
    assert err.startswith("error:") and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    if case == "occupied":
        assert (out / "notes.txt").read_text() == "mine"
    elif out.exists():
        assert not any(out.iterdir())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".site")]


# ---------------------------------------------------------------------------------------------
# the server's /web routes (in-process)


def _app(tmp_path, ort_dir=None):
    pytest.importorskip("fastapi", reason="the server needs the [serve] extra")
    from onnxdream.server.app import ServerConfig, create_app

    config = ServerConfig(workers=1, ort_dir=ort_dir, cache_mb=64)
    return create_app(config)


def _get(app, *paths):
    import asyncio

    import httpx

    async def main():
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost",
                                     timeout=60) as c:
            return [await c.get(p) for p in paths]
    try:
        return asyncio.run(main())
    finally:
        app.state.jobs.stop()


def test_server_without_ort_files_says_why_the_browser_path_is_off(model_home, tmp_path):
    manifest, ort, page, docs_free, module = _get(
        _app(tmp_path), "/web/manifest.json", "/web/ort/ort.wasm.min.mjs", "/", "/health",
        "/static/browser-dream.mjs")
    assert module.headers["content-type"].startswith("text/javascript")
    assert manifest.status_code == 200
    body = manifest.json()
    assert body["ort"]["available"] is False and "--ort-dir" in body["ort"]["reason"]
    assert body["layers"][0]["name"] == "blocks.5"
    assert ort.status_code == 404 and "--ort-dir" in ort.json()["error"]
    csp = page.headers["content-security-policy"]
    assert "script-src 'self' 'wasm-unsafe-eval'" in csp and "worker-src 'self'" in csp
    assert page.headers["cross-origin-opener-policy"] == "same-origin"
    assert page.headers["cross-origin-embedder-policy"] == "require-corp"
    assert "wasm-unsafe-eval" not in docs_free.headers["content-security-policy"]
    assert 'type="module" src="/static/browser-dream.mjs"' in page.text


def test_server_serves_step_graphs_and_runtime_files(model_home, tmp_path):
    ort = fake_ort(tmp_path) / "dist"
    app = _app(tmp_path, ort)
    q = "model=efficientnet-lite0&layer=blocks.9&target=portable"
    manifest, step, resize, wasm, mjs, lic, bad, unknown, layer = _get(
        app, f"/web/manifest.json?{q}", f"/web/step.onnx?{q}", "/web/resize.onnx",
        "/web/ort/ort-wasm-simd-threaded.wasm", "/web/ort/ort.webgpu.min.mjs", "/web/ort/LICENSE",
        "/web/ort/ort.all.min.mjs", "/web/manifest.json?nope=1",
        "/web/manifest.json?layer=blocks.99")
    m = manifest.json()
    assert m["ort"] == {"base": "/web/ort/", "version": "1.30.0", "webgpu": True,
                        "available": True, "reason": ""}
    assert m["layers"] == [{"name": "blocks.9", "graph": f"/web/step.onnx?{q}",
                            "objective": "1*mean(blocks.9)", "terms": ["blocks.9"],
                            "argv_layers": ["blocks.9:1"]}]
    assert m["resize"] == "/web/resize.onnx" and m["target"] == "portable"
    graph = onnx.load_from_string(step.content)
    assert [i.name for i in graph.graph.input][:3] == ["x", "shift", "step_size"]
    assert json.loads({p.key: p.value for p in graph.metadata_props}[
        "onnxdream.compiled"])["target"] == "portable"
    onnx.load_from_string(resize.content)
    assert wasm.headers["content-type"] == "application/wasm"
    assert mjs.headers["content-type"].startswith("text/javascript")
    assert "wasm-unsafe-eval" in mjs.headers["content-security-policy"]  # a worker's own CSP
    assert mjs.headers["cross-origin-embedder-policy"] == "require-corp"
    assert "MIT License" in lic.text
    assert bad.status_code == 404 and unknown.status_code == 400
    assert layer.status_code == 400 and "unknown layer 'blocks.99'" in layer.json()["error"]


def test_the_makefile_reads_the_one_version_constant():
    """`make test` fetches onnxruntime-web at engine/browser/site.py's ORT_WEB_VERSION (read by
    sed)."""
    import re

    from helpers import REPO
    from onnxdream.browser.site import ORT_WEB_VERSION

    src = (REPO / "engine" / "browser" / "site.py").read_text()
    assert re.findall(r'^ORT_WEB_VERSION = "(.*)"$', src, re.M) == [ORT_WEB_VERSION]
    assert "ORT_WEB_VERSION = \"\\(.*\\)\"" in (REPO / "Makefile").read_text()


@pytest.mark.timeout(60)
def test_portable_googlenet_equals_the_default_graph(tmp_path):
    """torchvision's GoogLeNet (random weights) → inception4c: the model whose default graph
    OpenVINO refused (ScatterND add) and WebGPU cannot run (MaxPool Indices)."""
    pytest.importorskip("torchvision", reason="the GoogLeNet export needs onnxdream[torch]")
    from onnxdream.exporters import export_torchvision
    from onnxdream.exporters.graph import compile_gradient
    from onnxdream.exporters.graph.compiler import portability_problems

    path = export_torchvision("googlenet", tmp_path / "googlenet.onnx", "none").path
    default = compile_gradient(path, ["inception4c"])
    portable = compile_gradient(path, ["inception4c"], target="portable")
    assert not [p for p in portability_problems(default) if "ScatterND" in p]
    assert portability_problems(portable) == []
    a, b = _session(default), _session(portable)
    for h, w in ((96, 128), (225, 223)):
        x = np.random.default_rng(1).random((1, 3, h, w), np.float32)
        (oa, ga), (ob, gb) = a.run(None, {"image": x}), b.run(None, {"image": x})
        np.testing.assert_allclose(ob, oa, rtol=1e-6)
        assert np.abs(gb - ga).max() <= 1e-5 * np.abs(ga).max(), (h, w)


def test_web_serve_refuses_a_folder_that_is_not_a_site(model_home, tmp_path):
    proc = run_cli("web", "serve", str(tmp_path), "--port", "0", home=model_home, check=False)
    assert proc.returncode == 2 and "is not a site written by `onnxdream web export`" in \
        proc.stderr and "Traceback" not in proc.stderr
