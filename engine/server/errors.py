"""The server's errors: the library's typed errors → HTTP statuses (by type, never by a
message's text), and THE error response of the app, ``{"error": message}`` with the server's
paths taken out of the message (:class:`~onnxdream.server.security.PathScrubber`)."""

from __future__ import annotations

import logging
from collections.abc import Callable

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from onnxdream.core.errors import (
    DependencyError,
    ImageTooLargeError,
    MemoryBudgetError,
    NonFiniteError,
    OnnxDreamError,
    SettingsError,
    VideoTooLargeError,
)
from onnxdream.jobs.queue import JobError, QueueFull, ShuttingDown, UnknownJob
from onnxdream.jobs.video import WorkSpaceFull
from onnxdream.server.form import ApiError, form_field
from onnxdream.server.formstream import FormError

__all__ = ["Errors", "error_response", "refusal"]

log = logging.getLogger("onnxdream.server")


def refusal(exc: BaseException) -> ApiError:
    """The response for an error, chosen by its type (never by its message's text)."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, FormError):
        return ApiError(exc.status, exc.message)
    if isinstance(exc, (QueueFull, WorkSpaceFull)):
        return ApiError(503, str(exc), {"Retry-After": str(exc.retry_after)})
    if isinstance(exc, ShuttingDown):
        return ApiError(503, str(exc), {"Retry-After": "10"})
    if isinstance(exc, UnknownJob):
        return ApiError(404, str(exc))
    if isinstance(exc, ImageTooLargeError):  # too many pixels, or a decompression bomb
        return ApiError(413, f"{exc.summary}; send a smaller image")
    if isinstance(exc, MemoryBudgetError):  # the image cannot be dreamed within the budget
        return ApiError(413, f"{exc}; send a smaller image")
    if isinstance(exc, VideoTooLargeError):  # too long, too many pixels, too much disk
        return ApiError(413, str(exc))
    if isinstance(exc, DependencyError):  # e.g. video without the [video] extra
        return ApiError(501, str(exc))
    if isinstance(exc, SettingsError):
        return ApiError(400, exc.named(form_field(exc.field)))
    if isinstance(exc, NonFiniteError):  # well-formed, but this dream cannot be computed
        return ApiError(422, str(exc))
    if isinstance(exc, OnnxDreamError):
        return ApiError(400, str(exc))
    return ApiError(500, f"internal error: {type(exc).__name__}")


def error_response(status: int, message: str,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """An error response, ``{"error": message}`` (the app's handlers take server paths out of
    ``message`` first: :meth:`Errors.error`)."""
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class Errors:
    """The app's error responses, every message scrubbed of server paths by ``scrub``."""

    def __init__(self, scrub: Callable[[str], str]):
        self.scrub = scrub

    def error(self, status: int, message: str,
              headers: dict[str, str] | None = None) -> JSONResponse:
        """THE error response of this app: server paths are taken out of every message."""
        return error_response(status, self.scrub(message), headers)

    def respond(self, err: ApiError) -> JSONResponse:
        return self.error(err.status, err.message, err.headers)

    def install(self, app: FastAPI) -> None:
        """Register the handlers: refused requests by their type, HTTP errors, validation
        errors, and anything else as a 500 (logged with its traceback, never sent)."""
        error, respond = self.error, self.respond

        async def refused(request, exc: Exception):
            return respond(refusal(exc))  # an ApiError as it is; the others by their type

        for kind in (ApiError, OnnxDreamError, JobError, FormError):
            app.add_exception_handler(kind, refused)

        @app.exception_handler(HTTPException)
        async def http_error(request, exc: HTTPException):
            return error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

        @app.exception_handler(RequestValidationError)
        async def validation_error(request, exc: RequestValidationError):
            first = exc.errors()[0] if exc.errors() else {}
            where = ".".join(str(x) for x in first.get("loc", ()))
            return error(422, f"{where}: {first.get('msg', 'invalid request')}")

        @app.exception_handler(Exception)
        async def internal_error(request, exc: Exception):
            log.exception("unhandled error on %s %s", request.method, request.url.path)
            return error(500, f"internal error: {type(exc).__name__}")
