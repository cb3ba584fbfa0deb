"""The routes that describe the server and its models: the page (``/``), ``/health``,
``/models``, a model's layers and its layer atlas."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from onnxdream import __version__
from onnxdream.core.errors import ModelError
from onnxdream.core.static import STATIC
from onnxdream.jobs.atlas_cache import ThumbnailMissing
from onnxdream.jobs.config import MB
from onnxdream.jobs.video import VIDEO_FORMATS
from onnxdream.models import DEFAULT_MODEL, list_zoo
from onnxdream.server.context import ServerContext
from onnxdream.server.form import ERROR_OR_STATUS, ApiError, error_responses
from onnxdream.settings.options import DreamSettings
from onnxdream.settings.resolve import step_size_for

__all__ = ["add_model_routes"]


def add_model_routes(app: FastAPI, ctx: ServerContext) -> None:
    """Register the page, health and model routes of ``ctx``'s server on ``app``."""
    config, models, jobs, area = ctx.config, ctx.models, ctx.jobs, ctx.area
    scrub = ctx.errors.scrub
    video_unavailable = ctx.video_unavailable
    health_check, atlas = ctx.health, ctx.atlas

    def video_status() -> dict[str, Any]:
        """Whether this server dreams videos, and within which limits (for /health)."""
        if video_unavailable is not None:
            return {"available": False, "reason": video_unavailable}
        return {"available": True, "formats": list(VIDEO_FORMATS),
                "max_seconds": config.max_video_seconds,
                "max_mb": round(config.max_video_body / MB, 2),
                "disk_mb": {"used": round(area.used / MB, 1),
                            "limit": round(config.max_video_disk / MB, 1)}}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index():
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"),
                            headers={"Cache-Control": "no-cache"})

    @app.get("/health", responses={503: {"description": "The server cannot dream now",
                                         **ERROR_OR_STATUS}})
    async def health():
        problem = await run_in_threadpool(health_check.problem)
        body = {"status": "ok" if problem is None else "unavailable", "version": __version__,
                "provider": models.provider(), "device": config.device,
                "workers": config.workers, "queue": jobs.stats(),
                "max_pixels": config.max_pixels, "max_body_mb": round(config.max_body / MB, 2),
                "max_memory_mb": config.max_memory_mb, "video": video_status(),
                "models": models.loaded()}
        if problem is not None:
            body["error"] = scrub(problem)
            return JSONResponse(body, status_code=503, headers={"Retry-After": "30"})
        return body

    @app.get("/models")
    async def list_models():
        rows = [{"name": e.name, "default": e.name == DEFAULT_MODEL, "source": "zoo",
                 "installed": e.installed, "input_size": e.input_size,
                 "default_layers": list(e.default_layers),
                 "recommended_layers": list(e.recommended_layers), "step_size": e.step_size,
                 "description": e.description, "license": e.license} for e in list_zoo()]
        rows += [{"name": name, "default": False, "source": "file", "installed": True,
                  "input_size": None, "default_layers": None, "recommended_layers": None,
                  "step_size": None, "description": f"{path.name}", "license": None}
                 for name, path in config.model_paths.items()]
        return {"models": rows, "default": DEFAULT_MODEL}

    @app.get("/models/{name}/layers", responses=error_responses(400, 404))
    async def model_layers(name: str):
        try:
            models.source(name)
        except ModelError as exc:
            raise ApiError(404, str(exc)) from None
        info = await run_in_threadpool(models.info, name)
        return {"model": name, "layers": list(info.layers),
                "default_layers": list(info.default_layers),
                "recommended_layers": list(info.recommended_layers),
                "step_size": step_size_for(DreamSettings(), info)}

    @app.get("/models/{name}/atlas", responses=error_responses(
        404, 500, 503, _202={"description": "Some thumbnails are still being made (see "
                                            "Retry-After); the ones so far are listed"}))
    async def model_atlas(name: str):
        try:
            models.source(name)
        except ModelError as exc:
            raise ApiError(404, str(exc)) from None
        status, body, headers = await run_in_threadpool(atlas.status, name)
        return JSONResponse(body, status_code=status,
                            headers={"Cache-Control": "no-store", **headers})

    @app.get("/models/{name}/atlas/{file}", response_class=Response, responses=error_responses(
        404, 500, _200={"description": "The thumbnail", "content": {
            "image/png": {"schema": {"type": "string", "format": "binary"}}}}))
    async def atlas_thumbnail(name: str, file: str):
        try:
            models.source(name)
            if not file.endswith(".png"):
                raise ThumbnailMissing(f"no thumbnail '{file[:80]}': thumbnails end in .png")
            path = await run_in_threadpool(atlas.thumbnail, name, file[:-len(".png")])
        except (ModelError, ThumbnailMissing) as exc:
            raise ApiError(404, str(exc)) from None
        # the URL carries the model's digest (?v=), so a thumbnail may be kept a long time
        return FileResponse(path, media_type="image/png",
                            headers={"Cache-Control": "public, max-age=86400"})
