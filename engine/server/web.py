"""The server's browser path (issue 16): its page dreams "in this browser" with the same module as
an exported site (``static/browser-dream.mjs``) and the models this server already offers.

Routes (registered by :func:`add_browser_routes`):

- ``GET /web/manifest.json?model=M&layer=L&objective=O&target=T`` the page's manifest
  (:func:`onnxdream.browser.site.manifest`) for that dream objective: its one layer entry points at
- ``GET /web/step.onnx?...`` (same query), the compiled step graph, compiled on first request
  (one compile at a time) and kept in the compiled-graph cache under its budget;
- ``GET /web/resize.onnx`` the octave resize graph;
- ``GET /web/ort/FILE`` onnxruntime-web's runtime files and licence, when the server was given
  them (``onnxdream serve --ort-dir``); without them the manifest says why the browser path is
  off and the page disables it.

The step graphs hold the models' weights: an operator who starts the server with ``--ort-dir``
hands them to every client of the page (as an exported site does).
"""

from __future__ import annotations

import threading
from pathlib import Path

import onnx
from fastapi import Request
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from onnxdream.browser.site import (
    ORT_FILES,
    ort_files,
    ort_hint,
    ort_version,
    resize_graph_bytes,
    step_graph_for,
    web_layer,
)
from onnxdream.browser.site import manifest as build_manifest
from onnxdream.core.errors import ModelError
from onnxdream.exporters.graph.contract import LOGITS, load_model
from onnxdream.exporters.graph.layers import resolve_layer
from onnxdream.jobs.config import ServerConfig
from onnxdream.runtime.graph_cache import graph_key
from onnxdream.runtime.model_cache import ModelCache
from onnxdream.server.form import ApiError
from onnxdream.settings.build import from_options
from onnxdream.settings.options import DreamSettings

__all__ = ["add_browser_routes"]

TYPES = {".mjs": "text/javascript", ".wasm": "application/wasm", "": "text/plain"}
_compile_lock = threading.Lock()  # one step-graph compile at a time (each holds ~100s of MB)


def _query(request: Request) -> tuple[DreamSettings, str]:
    """The dream objective of a /web query (validated like a dream's form) and the target."""
    q = request.query_params
    unknown = set(q) - {"model", "layer", "objective", "target"}
    if unknown:
        raise ApiError(400, f"unknown parameter '{sorted(unknown)[0][:40]}' (parameters: model, "
                            "layer, objective, target)")
    target = q.get("target", "default")
    if target not in ("default", "portable"):
        raise ApiError(400, f"target must be default or portable, got {target[:20]!r}")
    settings = from_options(model=q.get("model") or None,
                                          layers=q.getlist("layer") or None,
                                          objective=q.get("objective") or None)
    return settings, target


def add_browser_routes(app, config: ServerConfig, models: ModelCache) -> None:
    """Register the /web routes on ``app`` (see the module docstring)."""
    ort_dir: Path | None = config.ort_dir
    webgpu = ort_dir is not None and all((ort_dir / f).is_file() for f in ORT_FILES["webgpu"])
    served = set(ort_files(webgpu)) | {"LICENSE"} if ort_dir is not None else set()
    version = ort_version(ort_dir) if ort_dir is not None else None
    off = "" if ort_dir is not None else (
        "dreaming in this browser needs onnxruntime-web's files on the server: start it with "
        "--ort-dir (" + ort_hint().split(" and pass")[0] + ")")

    def step_file(settings: DreamSettings, target: str) -> Path | bytes:
        """The cached step graph's file (compiled now if missing), or its bytes when the cache
        cannot take it."""
        objective = models.objective(settings)
        path = models.path(settings.model)
        name = graph_key(path, objective, settings.pre_relu, settings.border,
                         target)[:-5] + "-step.onnx"
        found, _ = models.compiled.get_or_compile(name, lambda: step_graph_for(
            load_model(path), objective, pre_relu=settings.pre_relu, border=settings.border,
            target=target), lock=_compile_lock)
        return found

    @app.get("/web/manifest.json", include_in_schema=False)
    async def web_manifest(request: Request):
        settings, target = _query(request)
        info = await run_in_threadpool(models.info, settings.model)
        known = await run_in_threadpool(models.layer_names, settings.model)
        objective = await run_in_threadpool(models.objective, settings)
        for term in objective.terms:  # an unknown layer: 400 now, not when the graph is fetched
            if term.layer != LOGITS and term.layer not in known:
                resolve_layer(info.layers, term.layer, onnx.ModelProto())  # the LayerError
        query = request.url.query
        entry = web_layer(",".join(settings.layers) or "+".join(t.layer for t in objective.terms),
                          f"/web/step.onnx?{query}", objective)
        body = build_manifest(model=settings.model, info=info, layers=[entry],
                              ort_base="/web/ort/" if ort_dir is not None else None,
                              ort_version_=version or "", webgpu=webgpu,
                              resize="/web/resize.onnx", target=target,
                              objective=settings.objective, reason=off)
        return JSONResponse(body, headers={"Cache-Control": "no-cache"})

    @app.get("/web/step.onnx", include_in_schema=False)
    async def web_step(request: Request):
        settings, target = _query(request)
        if ort_dir is None:
            raise ApiError(404, off)
        found = await run_in_threadpool(step_file, settings, target)
        if isinstance(found, Path):
            try:
                return Response(found.read_bytes(), media_type="application/octet-stream",
                                headers={"Cache-Control": "no-cache"})
            except OSError:  # evicted by another process just now: compile again, in memory
                raise ModelError("the compiled graph was removed meanwhile; try again") from None
        return Response(found, media_type="application/octet-stream",
                        headers={"Cache-Control": "no-cache"})

    @app.get("/web/resize.onnx", include_in_schema=False)
    async def web_resize():
        return Response(resize_graph_bytes(), media_type="application/octet-stream",
                        headers={"Cache-Control": "max-age=3600"})

    @app.get("/web/ort/{name}", include_in_schema=False)
    async def web_ort(name: str):
        if name not in served:
            raise ApiError(404, off or f"no runtime file '{name[:60]}' here")
        if name == "LICENSE":
            from onnxdream.browser.site import ORT_LICENSE

            return Response(ORT_LICENSE.format(version=version), media_type="text/plain")
        return FileResponse(ort_dir / name, media_type=TYPES[Path(name).suffix],
                            headers={"Cache-Control": "max-age=86400"})
