"""Dreaming in the browser: a static site (``onnxdream web export``) and the server's browser path.

The browser runs the very step graph the CUDA loop runs (:mod:`onnxdream.exporters.graph.step`:
jitter roll, gradient, ``mean|g|`` normalisation, clip, as one ONNX graph) on onnxruntime-web,
WebAssembly by default and WebGPU where the browser has it. JavaScript only orchestrates: octave
sizes (the resolver's rule, mirrored in ``static/browser-dream.mjs`` and checked equal by the
tests), the octave resize (one ONNX ``Resize`` graph equal to
:func:`onnxdream.media.imageio.resize`), the jitter (numpy's ``default_rng(seed).integers`` ported
bit for bit, so a seed gives the CLI's rolls), and the PNG with the CLI's provenance text chunks.

An exported site is::

    index.html            the page (choose a photo: it is read locally, never uploaded)
    onnxdream.mjs         the one ES module (engine + page; no bundler)
    app.css               the page's style
    manifest.json         model, layers -> graph files, defaults, the resolver rule
    graphs/*.onnx         one step graph per layer, and resize.onnx
    ort/                  onnxruntime-web's runtime files (MIT; ort/LICENSE)

:func:`manifest` builds the manifest for the site and for ``onnxdream serve`` (whose page
offers "dream in this browser" with the same module, graphs compiled on request and cached).

onnxruntime-web's files are not part of this package: :func:`find_ort_dir` takes an unpacked
``onnxruntime-web`` npm package (``npm pack onnxruntime-web@1.30.0`` and ``tar xzf`` it), from
``--ort-dir`` or ``$ONNXDREAM_ORT_DIR``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from onnxdream import __version__
from onnxdream.core.atomic import AtomicTarget
from onnxdream.core.errors import DependencyError, ModelError, OnnxDreamError
from onnxdream.core.static import STATIC
from onnxdream.settings.options import ASCENT_FIELDS, MAX_OCTAVES, MIN_OCTAVE_SIDE, DreamSettings
from onnxdream.settings.provenance import control_metadata
from onnxdream.settings.resolve import BATCH_PIXELS, MIN_AUTO_OCTAVES, step_size_for

__all__ = ["LIMITS", "MANIFEST_FORMAT", "ORT_DIR_ENV", "ORT_WEB_VERSION", "OrtWebMissingError",
           "SiteResult", "WebLayer", "export_site", "find_ort_dir", "manifest", "objective_of",
           "ort_files", "resize_graph_bytes", "serve_site", "site_server", "step_graph_for"]

#: The onnxruntime-web release the page is written and tested against (the Makefile fetches it).
ORT_WEB_VERSION = "1.30.0"
ORT_DIR_ENV = "ONNXDREAM_ORT_DIR"
#: Version of the manifest's layout (bump when a key changes meaning).
MANIFEST_FORMAT = 1
MODULE = "browser-dream.mjs"  # in static/; the site's onnxdream.mjs

#: onnxruntime-web's files per backend: the entry module, its Emscripten loader and the binary.
#: WASM (SIMD + threads; one thread without cross-origin isolation) is ``ort.wasm.min.mjs``;
#: WebGPU is the native WebGPU provider of ``ort.webgpu.min.mjs`` (not the JSEP bundles
#: ``ort.min.mjs``/``ort.all.min.mjs``, which gave wrong numbers on compiled graphs).
ORT_FILES = {
    "wasm": ("ort.wasm.min.mjs", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm"),
    "webgpu": ("ort.webgpu.min.mjs", "ort-wasm-simd-threaded.asyncify.mjs",
               "ort-wasm-simd-threaded.asyncify.wasm"),
}

#: The settings the browser takes, with the ranges DreamSettings.validate accepts (the tests
#: check they agree); [low, high], ``open_low``: low itself is refused.
LIMITS = {
    "steps": {"min": 1, "max": 10_000, "integer": True},
    "octaves": {"min": 1, "max": 12, "integer": True},
    "octave_scale": {"min": 1.0, "max": 4.0, "open_low": True},
    "step_size": {"min": 0.0, "max": 10.0, "open_low": True},
    "jitter": {"min": 0, "max": 4096, "integer": True},
    "seed": {"min": 0, "max": 2**32 - 1, "integer": True, "optional": True},
}

ORT_LICENSE = """MIT License

Copyright (c) Microsoft Corporation.

Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
in the Software without restriction, including without limitation the rights
to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE.

(onnxruntime-web {version}: https://www.npmjs.com/package/onnxruntime-web, the "license" field
of its package.json and the header of every .min.mjs file.)
"""


def limits() -> dict:
    """:data:`LIMITS`, with ``auto`` on the octaves (the resolver decides them)."""
    out = {k: dict(v) for k, v in LIMITS.items()}
    out["octaves"]["auto"] = True
    return out


class OrtWebMissingError(DependencyError):
    """onnxruntime-web's runtime files are not where they were looked for."""

    def __init__(self, message: str):
        super().__init__(message, field="ort_dir")


def ort_hint() -> str:
    return (f"get them with `npm pack onnxruntime-web@{ORT_WEB_VERSION} && tar xzf "
            f"onnxruntime-web-{ORT_WEB_VERSION}.tgz` and pass --ort-dir package (or set "
            f"{ORT_DIR_ENV})")


def find_ort_dir(given: str | os.PathLike | None = None, *, webgpu: bool = False) -> Path:
    """The folder holding onnxruntime-web's runtime files (``dist/`` of the npm package).

    ``given`` (else ``$ONNXDREAM_ORT_DIR``) may be the unpacked package (``package/``, with
    ``dist/`` inside) or its ``dist/`` itself. OrtWebMissingError, saying how to get them, when
    neither is given or the files are not there (the WebGPU ones too with ``webgpu``).
    """
    text = str(given) if given is not None else os.environ.get(ORT_DIR_ENV, "").strip()
    if not text:
        raise OrtWebMissingError(f"the site needs onnxruntime-web's runtime files: {ort_hint()}")
    root = Path(text).expanduser()
    need = ort_files(webgpu)
    for d in (root / "dist", root, root / "package" / "dist"):
        if all((d / f).is_file() for f in need):
            return d
    missing = [f for f in need if not (root / "dist" / f).is_file() and not (root / f).is_file()]
    raise OrtWebMissingError(f"{root} does not hold onnxruntime-web's {', '.join(missing)}: "
                             f"{ort_hint()}")


def ort_version(ort_dir: Path) -> str:
    """The onnxruntime-web version of a dist folder (its package.json), else the expected one."""
    for p in (ort_dir.parent / "package.json", ort_dir / "package.json"):
        with contextlib.suppress(OSError, ValueError):
            return str(json.loads(p.read_text(encoding="utf-8"))["version"])
    return ORT_WEB_VERSION


def ort_files(webgpu: bool) -> tuple[str, ...]:
    """The runtime files a page needs (WASM always; the WebGPU set with ``webgpu``)."""
    return ORT_FILES["wasm"] + (ORT_FILES["webgpu"] if webgpu else ())


# ---------------------------------------------------------------------------------------------
# graphs


@dataclass(frozen=True)
class WebLayer:
    """One choice in the page's layer list: a step graph and what the provenance says of it."""

    name: str  # what the page shows and settings.layer names
    graph: str  # the step graph's URL, relative to the manifest
    objective: str  # Objective.describe()
    terms: tuple[str, ...]  # the terms' layers (provenance's onnxdream:layers)
    argv_layers: tuple[str, ...]  # NAME:WEIGHT specs of the reproducing command

    def to_json(self) -> dict:
        return {"name": self.name, "graph": self.graph, "objective": self.objective,
                "terms": list(self.terms), "argv_layers": list(self.argv_layers)}


def web_layer(name: str, graph: str, objective) -> WebLayer:
    return WebLayer(name, graph, objective.describe(), tuple(t.layer for t in objective.terms),
                    tuple(f"{t.layer}:{t.weight:g}" for t in objective.terms))


def objective_of(proto, info, layers: Sequence[str], objective: str = "mean"):
    """The Objective of ``layers`` + ``objective`` on a loaded model (LayerError/ObjectiveError
    when they do not fit it)."""
    from onnxdream.exporters.graph.contract import LOGITS
    from onnxdream.exporters.graph.layers import layer_names, resolve_layer
    from onnxdream.runtime.gradient import objective_for

    obj = objective_for(info, layer_names(proto, info.layers), list(layers),
                        objective).check_weights()
    for term in obj.terms:  # unknown layers fail now, before any compile
        if term.layer != LOGITS:
            resolve_layer(info.layers, term.layer, proto)
    return obj


def step_graph_for(proto, objective, *, pre_relu: bool = False, border: int = 0,
                   target: str = "default"):
    """The step graph (ModelProto) of a loaded dreamable model for ``objective``: the compiled
    gradient graph wrapped by :func:`~onnxdream.exporters.graph.step.step_graph`."""
    from onnxdream.exporters.graph import compile_gradient
    from onnxdream.exporters.graph.step import step_graph

    return step_graph(compile_gradient(proto, objective, pre_relu=pre_relu, border=border,
                                       target=target))


_resize_lock = threading.Lock()
_resize_bytes: bytes | None = None


def resize_graph_bytes() -> bytes:
    """The serialized octave-resize graph (built once per process)."""
    global _resize_bytes
    with _resize_lock:
        if _resize_bytes is None:
            from onnxdream.exporters.graph.step import resize_graph

            _resize_bytes = resize_graph().SerializeToString()
        return _resize_bytes


# ---------------------------------------------------------------------------------------------
# the manifest


def resolver_rule() -> dict:
    """The resolver's constants the page's octave rule needs (see ``octaveSizes`` in the module).
    ``min_auto_octaves``/``max_octaves`` apply to ``octaves: "auto"``."""
    return {"min_octave_side": MIN_OCTAVE_SIDE, "min_auto_octaves": MIN_AUTO_OCTAVES,
            "max_octaves": MAX_OCTAVES, "batch_pixels": BATCH_PIXELS}


def manifest(*, model: str, info, layers: Sequence[WebLayer], ort_base: str | None,
             ort_version_: str = ORT_WEB_VERSION, webgpu: bool = False, resize: str,
             target: str = "default", pre_relu: bool = False, border: int = 0,
             objective: str = "mean", reason: str = "") -> dict:
    """The page's description of what it can dream (JSON-able). ``ort_base``: the runtime
    files' URL (None: not available; ``reason`` says why)."""
    d = DreamSettings()
    return {
        "format": MANIFEST_FORMAT,
        "onnxdream": __version__,
        "model": {"name": model, "native_size": list(info.native_size),
                  "dynamic_hw": bool(info.dynamic_hw), "license": info.license or "",
                  "source": info.source or ""},
        "layers": [layer.to_json() for layer in layers],
        "default_layer": layers[0].name if layers else None,
        "objective": objective, "pre_relu": bool(pre_relu), "border": int(border),
        "target": target,
        "resize": resize,
        "ort": {"base": ort_base, "version": ort_version_, "webgpu": bool(webgpu),
                "available": ort_base is not None, "reason": reason},
        "defaults": {"octaves": d.octaves, "octave_scale": d.octave_scale, "steps": d.steps,
                     "step_size": step_size_for(d, info), "jitter": d.jitter,
                     "normalize": d.normalize},
        "resolver": resolver_rule(),
        # provenance the page writes as it is: the ascent fields (their order) and the creative
        # controls' keys, which the page does not offer
        "ascent_fields": list(ASCENT_FIELDS),
        "controls_metadata": control_metadata(d),
        "limits": limits(),
    }


# ---------------------------------------------------------------------------------------------
# the static site


@dataclass
class SiteResult:
    path: Path
    layers: list[str]
    bytes: int
    files: list[str] = field(default_factory=list)
    webgpu: bool = False
    target: str = "default"


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")[:60] or "layer"


def _is_site(path: Path) -> bool:
    with contextlib.suppress(OSError, ValueError):
        return "format" in json.loads((path / "manifest.json").read_text(encoding="utf-8"))
    return False


def export_site(out: str | os.PathLike, *, model: str = DreamSettings.model,
                layers: Sequence[str] = (), objective: str = "mean",
                ort_dir: str | os.PathLike | None = None, webgpu: bool = False,
                target: str | None = None,
                progress: Callable[[str], None] | None = None) -> SiteResult:
    """Write a static site that dreams with ``model`` in the browser (see the module docstring).

    ``layers``: each one is a choice in the page (its own step graph); default: one choice, the
    model's default layers. ``webgpu`` adds onnxruntime-web's WebGPU files (27 MB) and, unless
    ``target`` says otherwise, compiles the portable graphs (WebGPU has no MaxPool Indices).
    ``out`` is replaced whole if it holds a previous export; another non-empty folder is
    refused. Nothing is left half-written: the site is built beside ``out`` and renamed.
    """
    from onnxdream.exporters.graph.compiler import TARGETS
    from onnxdream.runtime.opening import open_model

    say = progress or (lambda _msg: None)
    target = target or ("portable" if webgpu else "default")
    if target not in TARGETS:
        raise ModelError(f"unknown target {target!r}: use {' or '.join(TARGETS)}",
                         field="target")
    dist = find_ort_dir(ort_dir, webgpu=webgpu)
    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not _is_site(out))):
        raise OnnxDreamError(f"{out} exists and is not an onnxdream site: choose a new or "
                             "empty folder", field="output")
    parent = out.absolute().parent
    if not parent.is_dir():
        raise OnnxDreamError(f"cannot write {out}: the folder {parent} does not exist",
                             field="output")
    opened = open_model(model)
    path, proto, info = opened.path, opened.proto, opened.info
    if not info.dynamic_hw:
        raise ModelError(f"{model} takes only {info.native_size[1]}x{info.native_size[0]} "
                         "images; the browser dreams any size, so it needs a model with a "
                         "dynamic input size", field="model")
    choices = [[spec] for spec in layers] or [info.require_default_layers()]
    objectives = [objective_of(proto, info, specs, objective) for specs in choices]  # all first
    name = path.name if Path(str(model)).suffix == ".onnx" else str(model)  # no local paths
    with AtomicTarget(out, directory=True, mode=0o755) as swap:  # the old export goes only now
        tmp = swap.tmp
        (tmp / "graphs").mkdir()
        (tmp / "ort").mkdir()
        entries = []
        for k, (specs, obj) in enumerate(zip(choices, objectives)):
            say(f"compiling the step graph for {', '.join(specs)} ({target})")
            graph = step_graph_for(proto, obj, target=target)
            file = f"graphs/step-{k}-{_slug('+'.join(specs))}.onnx"
            (tmp / file).write_bytes(graph.SerializeToString())
            entries.append(web_layer("+".join(specs), file, obj))
        (tmp / "graphs" / "resize.onnx").write_bytes(resize_graph_bytes())
        say(f"copying onnxruntime-web from {dist}")
        for f in ort_files(webgpu):
            shutil.copyfile(dist / f, tmp / "ort" / f)
        version = ort_version(dist)
        (tmp / "ort" / "LICENSE").write_text(ORT_LICENSE.format(version=version),
                                             encoding="utf-8")
        shutil.copyfile(STATIC / MODULE, tmp / "onnxdream.mjs")
        shutil.copyfile(STATIC / "app.css", tmp / "app.css")
        shutil.copyfile(STATIC / "site.html", tmp / "index.html")
        data = manifest(model=name, info=info, layers=entries, ort_base="ort/",
                        ort_version_=version, webgpu=webgpu, resize="graphs/resize.onnx",
                        target=target, objective=objective)
        (tmp / "manifest.json").write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
        files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
        size = sum((tmp / f).stat().st_size for f in files)
    return SiteResult(out, [e.name for e in entries], size, files, webgpu, target)


# ---------------------------------------------------------------------------------------------
# a local static server with the headers the site wants


def site_server(root: str | os.PathLike, host: str = "127.0.0.1", port: int = 8080,
                isolate: bool = True):
    """An HTTP server (not started: ``serve_forever()``, then ``shutdown()``) for the site at
    ``root``, with COOP/COEP (cross-origin isolation, so WASM runs threaded) unless ``isolate``
    is False, and the right types for .mjs/.wasm. Its URL: ``server.url``."""
    import functools
    import http.server

    class Handler(http.server.SimpleHTTPRequestHandler):
        extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map,
                          ".mjs": "text/javascript", ".js": "text/javascript",
                          ".wasm": "application/wasm", ".onnx": "application/octet-stream",
                          ".json": "application/json"}

        def end_headers(self):
            if isolate:
                self.send_header("Cross-Origin-Opener-Policy", "same-origin")
                self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
                self.send_header("Cross-Origin-Resource-Policy", "same-origin")
            self.send_header("Cache-Control", "no-cache")
            super().end_headers()

        def log_message(self, fmt, *args):
            pass

    root = Path(root)
    if not _is_site(root):
        raise OnnxDreamError(f"{root} is not a site written by `onnxdream web export`",
                             field="site")
    server = http.server.ThreadingHTTPServer(
        (host, port), functools.partial(Handler, directory=str(root)))
    server.daemon_threads = True
    server.url = f"http://{host}:{server.server_address[1]}/"
    return server


def serve_site(root: str | os.PathLike, host: str = "127.0.0.1", port: int = 8080,
               isolate: bool = True, ready: Callable[[str], None] | None = None) -> None:
    """Serve the site at ``root`` until interrupted (see :func:`site_server`)."""
    server = site_server(root, host, port, isolate)
    if ready is not None:
        ready(server.url)
    try:
        server.serve_forever()
    finally:
        server.server_close()
