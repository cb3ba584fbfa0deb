"""The routes that dream: ``POST /dream`` (wait for the image), ``POST /jobs`` (a photo or a
video, queued), and a job's status, result and deletion. A request is admitted before its body
is read, then parsed and checked (:func:`add_job_routes`' ``read_request``) before it is queued."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from onnxdream.dream.controls import Controls
from onnxdream.jobs.queue import (
    CANCELLED,
    DONE,
    FAILED,
    QUEUED,
    RUNNING,
    SHUTDOWN,
    DreamRequest,
    Job,
)
from onnxdream.jobs.video import VIDEO_FORMATS, prepare_video
from onnxdream.server.context import ServerContext
from onnxdream.server.errors import refusal
from onnxdream.server.form import (
    DREAM_ERRORS,
    FORMATS,
    IMAGE_BODY,
    JOB_VIEW,
    RESULT_BODY,
    VIDEO_TO_JOBS,
    ApiError,
    build_settings,
    error_responses,
    form_schema,
    parse_fields,
)
from onnxdream.server.formstream import FilePart, FormReader
from onnxdream.settings.video import VideoOptions

__all__ = ["add_job_routes"]


def add_job_routes(app: FastAPI, ctx: ServerContext) -> None:
    """Register the dream and job routes of ``ctx``'s server on ``app``."""
    config, models, jobs, area = ctx.config, ctx.models, ctx.jobs, ctx.area
    error, respond, scrub = ctx.errors.error, ctx.errors.respond, ctx.errors.scrub
    video_unavailable = ctx.video_unavailable

    async def read_request(request: Request, *, videos: bool = False):
        """The form → a checked request (call within an admission): a DreamRequest (the image
        held encoded, its header read) or, with ``videos`` (``POST /jobs``), a VideoRequest
        (the clip streamed into its job's folder as it arrives, then probed and checked)."""
        ctype = request.headers.get("content-type", "")
        if not ctype.startswith("multipart/form-data"):
            raise ApiError(415, "send multipart/form-data with the photo in a field named "
                                "'image'" + (" (or a clip in 'video')" if videos else ""))
        upload: dict[str, Any] = {}  # the video's space, path and open file, once it arrives

        def on_file(reader: FormReader, part: FilePart):
            if upload:  # after a video nothing more may come (its limit is the video's)
                raise ApiError(400, "send one file per request: an 'image' or a 'video'")
            if part.name.replace("-", "_").lower() != "video":
                return None  # a photo: in memory, within max_body
            if not videos:
                raise ApiError(400, VIDEO_TO_JOBS)
            if video_unavailable is not None:
                raise ApiError(501, video_unavailable)
            try:
                length = int(request.headers.get("content-length", ""))
            except ValueError:
                length = config.max_video_body
            space = upload["space"] = area.new_space(min(length, config.max_video_body))
            upload["path"] = space.path / f"upload{_suffix(part.filename)}"
            upload["file"] = open(upload["path"], "wb")  # noqa: SIM115 - closed below
            reader.limit = config.max_video_body
            return upload["file"]

        try:
            try:
                reader = FormReader(ctype, limit=config.max_body, on_file=on_file)
                try:
                    items = await reader.read(request.stream())
                except ClientDisconnect:
                    raise ApiError(400, "the upload was cut off (the client went away)") from None
                form = parse_fields(items)
            finally:
                if "file" in upload:
                    upload["file"].close()
            if form.video:
                f = form.fields
                options = VideoOptions.from_fields(f)
                return await run_in_threadpool(prepare_video, upload["space"], upload["path"],
                                               options, f, form.layers, form.keyed, config,
                                               models)
        except BaseException:
            if "space" in upload:
                upload["space"].release()
            raise
        fields, layers, upload = form.fields, form.layers, form.upload
        if upload is not None and upload.content_type.lower().startswith("video/"):
            raise ApiError(400, "the 'image' file is a video: " + (
                "send it as the 'video' file" if videos else VIDEO_TO_JOBS))
        fmt = str(fields.get("format", "png")).lower()
        if fmt not in FORMATS:
            raise ApiError(400, f"format must be png, jpeg or webp for a photo, got "
                                f"{fmt[:20]!r}")
        settings = build_settings({**fields, **form.pictures}, layers, config)
        models.source(settings.model)  # an allowed name, or ModelError now
        controls = await run_in_threadpool(lambda: Controls.from_bytes(
            max_pixels=config.max_pixels, **form.pictures)) if form.pictures else None
        req = await run_in_threadpool(  # the header only: decoded when the dream starts
            DreamRequest.from_bytes, settings, fmt,
            upload.read() if upload is not None else None, config.max_pixels, controls,
            memory_mb=config.dream_memory_mb, max_steps=config.max_steps)
        # bad layer/objective: 400 now; a compile runs one at a time, within the admission
        await run_in_threadpool(models.get, settings)
        return req

    async def submit(request: Request, *, track: bool, videos: bool = False) -> Job:
        """Admit first (a full queue: 503 before the body is even read), then read and check."""
        with jobs.admit() as admission:
            req = await read_request(request, videos=videos)
            try:
                return jobs.submit(req, track=track, admission=admission)
            except BaseException:
                req.release()  # a video's folder, if the queue refuses it after all
                raise

    def video_response(job: Job) -> Response:
        path = job.result_path
        if path is None or not path.is_file():
            return error(404, f"job {job.id}'s video is gone (deleted or expired)")
        ext = job.request.fmt
        return FileResponse(path, media_type=VIDEO_FORMATS[ext],
                            filename=f"dream-{job.id[:8]}.{ext}", content_disposition_type="inline",
                            headers=result_headers(job))

    def image_response(job: Job) -> Response:
        media, ext = FORMATS[job.request.fmt]
        headers = {"Content-Disposition": f'inline; filename="dream-{job.id[:8]}.{ext}"',
                   **result_headers(job)}
        return Response(job.result, media_type=media, headers=headers)

    def result_headers(job: Job) -> dict[str, str]:
        """What every dream's response says of it: its seed, provider and seconds (no caching)."""
        return {"X-Onnxdream-Seed": str(job.request.settings.seed),
                "X-Onnxdream-Provider": job.provider or "",
                "X-Onnxdream-Seconds": f"{(job.finished or 0) - (job.started or 0):.2f}",
                "Cache-Control": "no-store"}

    def failed_response(job: Job) -> JSONResponse:
        if job.state == CANCELLED:
            if job.shutdown:
                return error(503, SHUTDOWN, {"Retry-After": "10"})
            return error(499, job.error or "cancelled")
        if job.exception is not None:
            return respond(refusal(job.exception))
        return error(500, job.error or "the dream failed")

    def job_view(job: Job, position: int | None = None) -> dict[str, Any]:
        body = job.view(position)
        if "error" in body:
            body["error"] = scrub(body["error"])
        return body

    @app.post("/dream", openapi_extra=form_schema(), response_class=Response,
              responses=error_responses(*DREAM_ERRORS, _200={"description": "The dreamed image",
                                                      **IMAGE_BODY}))
    async def dream_now(request: Request):
        job = await submit(request, track=False)
        future = asyncio.wrap_future(job.future)
        while not future.done():
            await asyncio.wait({future}, timeout=1.0)
            if not future.done() and await request.is_disconnected():
                jobs.cancel(job)  # nobody is waiting for it any more
                return error(499, "the client went away")
        if job.state == DONE:
            return image_response(job)
        return failed_response(job)

    @app.post("/jobs", status_code=202, openapi_extra=form_schema(video=True),
              responses=error_responses(*DREAM_ERRORS, 501, _202={"description": "Queued",
                                                           **JOB_VIEW}))
    async def create_job(request: Request):
        job = await submit(request, track=True, videos=True)
        body = job_view(job)
        body["url"] = f"/jobs/{job.id}"
        body["result_url"] = f"/jobs/{job.id}/result"
        return JSONResponse(body, status_code=202, headers={"Location": f"/jobs/{job.id}"})

    @app.get("/jobs/{job_id}", responses=error_responses(404, _200={"description": "The job",
                                                             **JOB_VIEW}))
    async def job_status(job_id: str):
        job, position = jobs.get(job_id)
        return job_view(job, position)

    @app.get("/jobs/{job_id}/result", response_class=Response,
             responses=error_responses(*DREAM_ERRORS, 404, 409, _200={
                 "description": "The dreamed image, or video (range requests work)",
                 **RESULT_BODY}))
    async def job_result(job_id: str):
        job, _ = jobs.get(job_id)
        if job.state == DONE:
            return video_response(job) if job.request.kind == "video" else image_response(job)
        if job.state == FAILED:
            return failed_response(job)
        return error(409, f"job {job.id} is {job.state}: poll /jobs/{job.id} until its "
                          "state is done", {"Retry-After": "1"})

    @app.delete("/jobs/{job_id}", responses=error_responses(404))
    async def delete_job(job_id: str):
        job, _ = jobs.get(job_id)
        previous = job.state
        jobs.cancel(job)
        return {"id": job.id, "state": CANCELLED if previous in (QUEUED, RUNNING) else previous,
                "deleted": True}


def _suffix(filename: str) -> str:
    """The upload's extension, if it looks like one (FFmpeg probes the content anyway)."""
    suffix = Path(filename or "").suffix.lower()
    return suffix if re.fullmatch(r"\.[a-z0-9]{1,8}", suffix) else ""
