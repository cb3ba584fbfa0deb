"""What wraps every request of the app: the body size limit (:class:`BodyLimit`, pure ASGI, so
it also covers chunked uploads) and the security headers around the whole stack
(:class:`SecuredApp`)."""

from __future__ import annotations

from fastapi import FastAPI
from starlette.exceptions import HTTPException

from onnxdream.jobs.config import MB
from onnxdream.server.errors import error_response
from onnxdream.server.security import SecurityHeaders

__all__ = ["BodyLimit", "SecuredApp"]


class BodyLimit:
    """413 when Content-Length says too much, or once the streamed body passes the limit.

    ``larger`` maps a path to a higher limit for its POSTs (``/jobs``, which takes videos; the
    form reader holds other uploads to ``max_body``)."""

    def __init__(self, app, max_body: int, larger: dict[str, int] | None = None):
        self.app = app
        self.max_body = max_body
        self.larger = larger or {}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_body
        if scope.get("method") == "POST":
            limit = max(limit, self.larger.get(scope.get("path", ""), 0))
        what = "" if limit == self.max_body else " for videos"
        message = (f"the request body is larger than this server's limit{what} of "
                   f"{limit / MB:g} MB")
        for key, value in scope.get("headers", []):
            if key == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    await error_response(400, "bad Content-Length header")(scope, receive, send)
                    return
                if length > limit:
                    refused = error_response(413, message, {"Connection": "close"})
                    await refused(scope, receive, send)
                    return
        received = 0

        async def limited_receive():
            nonlocal received
            msg = await receive()
            if msg["type"] == "http.request":
                received += len(msg.get("body", b""))
                if received > limit:
                    raise HTTPException(413, message)
            return msg

        await self.app(scope, limited_receive, send)


class SecuredApp(FastAPI):
    """FastAPI with :class:`SecurityHeaders` around the whole stack (the 500s of Starlette's
    outermost error middleware included)."""

    def build_middleware_stack(self):
        return SecurityHeaders(super().build_middleware_stack(), self.state.csp_by_path)
