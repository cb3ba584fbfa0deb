"""What every HTTP response of ``onnxdream serve`` carries, and what no error body may carry.

- :func:`content_security_policy` is THE place the page's Content-Security-Policy is defined:
  only the page's own files run (``engine/static/*.js``, ``*.css``: no inline script or style,
  nothing from another origin), images may be this server's or ``blob:``/``data:`` URLs (the
  dream is shown from a blob), video and audio this server's or ``blob:`` (a dreamed video
  plays from a blob, the chosen clip previews from one), requests go back to this server only,
  and no site may frame the page. The browser path (issue 16: "dream in this browser") extends
  it for the page, its files and onnxruntime-web's (:data:`BROWSER_CSP`: WebAssembly compiles,
  same-origin workers), and every response but ``/docs`` carries
  :data:`CROSS_ORIGIN_ISOLATION` (COOP/COEP: the page is cross-origin isolated, so
  SharedArrayBuffer and WebAssembly threads work).
- :class:`SecurityHeaders` (pure ASGI, wrapped around the whole app, so error responses,
  the body limit's 413 and the host check's 400 get them too) adds ``X-Content-Type-Options:
  nosniff``, the CSP, ``X-Frame-Options: DENY`` (for browsers without ``frame-ancestors``),
  ``Referrer-Policy: no-referrer`` and ``Cross-Origin-Resource-Policy: same-origin``.
- :class:`PathScrubber` takes server filesystem paths out of messages: the model home and the
  compiled-graph cache, the operator's model files (replaced by their model names), the
  installation; and, as a fallback, any absolute path that exists on this machine.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

from onnxdream.core.static import PACKAGE_ROOT

__all__ = ["BASE_CSP", "BROWSER_CSP", "BROWSER_PATHS", "CROSS_ORIGIN_ISOLATION", "DOCS_CSP",
           "PathScrubber", "SecurityHeaders", "content_security_policy",
           "security_headers"]

#: The page's policy, one directive per key (see :func:`content_security_policy`).
BASE_CSP: dict[str, str] = {
    "default-src": "'none'",
    "script-src": "'self'",
    "style-src": "'self'",
    "img-src": "'self' blob: data:",
    "media-src": "'self' blob:",
    "connect-src": "'self'",
    "form-action": "'self'",
    "base-uri": "'none'",
    "frame-ancestors": "'none'",
}

#: Only for ``/docs`` when the operator turns it on (``onnxdream serve --docs``): FastAPI's
#: Swagger UI page loads its script and style from the jsDelivr CDN and starts with an inline
#: script. Everything else keeps :data:`BASE_CSP`.
DOCS_CSP: dict[str, str] = {
    "script-src": "'self' https://cdn.jsdelivr.net 'unsafe-inline'",
    "style-src": "'self' https://cdn.jsdelivr.net",
    "img-src": "'self' data: https://fastapi.tiangolo.com",
}

#: Cross-origin isolation for pages that need SharedArrayBuffer (threaded WebAssembly, the
#: browser path of issue 16): on every response but ``/docs`` (whose CDN files would be blocked).
CROSS_ORIGIN_ISOLATION: dict[str, str] = {
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Embedder-Policy": "require-corp",
}

#: The browser path's additions (issue 16), for the page, its files and onnxruntime-web's
#: (:data:`BROWSER_PATHS`): onnxruntime-web compiles WebAssembly ('wasm-unsafe-eval': no eval
#: of JavaScript) and runs its threads in module workers from this server ('self'; a worker
#: takes the CSP of its own script's response, hence /web/ too).
BROWSER_CSP: dict[str, str] = {
    "script-src": "'self' 'wasm-unsafe-eval'",
    "worker-src": "'self'",
}
#: Paths (exact, or prefixes ending in "/") that get :data:`BROWSER_CSP`.
BROWSER_PATHS = ("/", "/static/", "/web/")


def content_security_policy(extra: Mapping[str, str] | None = None) -> str:
    """:data:`BASE_CSP` with the directives in ``extra`` replacing (or adding to) it."""
    directives = {**BASE_CSP, **(extra or {})}
    return "; ".join(f"{k} {v}" for k, v in directives.items())


def security_headers(csp: str | None = None, extra: Mapping[str, str] | None = None
                     ) -> list[tuple[bytes, bytes]]:
    """The headers every response carries (ASGI form), with ``csp`` (default: the page's)."""
    headers = {
        "X-Content-Type-Options": "nosniff",
        "Content-Security-Policy": csp or content_security_policy(),
        "X-Frame-Options": "DENY",
        "Referrer-Policy": "no-referrer",
        "Cross-Origin-Resource-Policy": "same-origin",
        **(extra or {}),
    }
    return [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]


class SecurityHeaders:
    """ASGI middleware: :func:`security_headers` on every HTTP response (a response's own
    header of the same name wins), with :data:`CROSS_ORIGIN_ISOLATION`. ``policies`` maps a
    path to its CSP (``/docs``: without cross-origin isolation); :data:`BROWSER_PATHS` get
    :data:`BROWSER_CSP`."""

    def __init__(self, app, policies: Mapping[str, str] | None = None):
        self.app = app
        self.default = security_headers(extra=CROSS_ORIGIN_ISOLATION)
        self.browser = security_headers(content_security_policy(BROWSER_CSP),
                                        CROSS_ORIGIN_ISOLATION)
        self.by_path = {path: security_headers(csp) for path, csp in (policies or {}).items()}

    def headers_for(self, path: str) -> list[tuple[bytes, bytes]]:
        if path in self.by_path:
            return self.by_path[path]
        if any(path == p or (p.endswith("/") and p != "/" and path.startswith(p))
               for p in BROWSER_PATHS):
            return self.browser
        return self.default

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = self.headers_for(scope.get("path", ""))

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                present = {k.lower() for k, _ in message.get("headers", [])}
                message = {**message, "headers": list(message.get("headers", [])) +
                           [(k, v) for k, v in headers if k not in present]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


# ---------------------------------------------------------------------------------------------
# Paths out of messages

# an absolute POSIX path: "/" after a space, quote or bracket (not inside a URL or a word)
_ABS_PATH = re.compile(r"(?<![\w.:/~-])/[^\s'\"`,;()<>\[\]{}]+")
_API_ROUTES = ("/jobs", "/models", "/dream", "/health", "/static", "/web", "/docs",
               "/openapi.json")


class PathScrubber:
    """Replaces server filesystem paths in a message (see the module docstring)."""

    def __init__(self, named: Mapping[str | os.PathLike, str] | None = None,
                 roots: Iterable[str | os.PathLike] = ()):
        pairs: dict[str, str] = {}
        for path, name in (named or {}).items():
            for form in _forms(path):
                pairs[form] = name
        for root in roots:
            for form in _forms(root):
                pairs.setdefault(form, "…")
        # longest first, so that a file inside a root is replaced whole; whole path components
        # only ("/srv/x" is not replaced inside "/srv/xy")
        self._pairs = [(re.compile(r"(?<![\w.~-])" + re.escape(path) + r"(?![\w.~-])"), name)
                       for path, name in sorted(pairs.items(), key=lambda kv: -len(kv[0]))]

    @classmethod
    def for_server(cls, model_paths: Mapping[str, Path], cache_dir: Path,
                   *more: str | os.PathLike) -> PathScrubber:
        """Operator models by name; the model home, the cache, the installation, the
        temporary and home directories and ``more`` (the video jobs' folder) as "…"."""
        from onnxdream.models import model_home

        named = {path: f"'{name}'" for name, path in model_paths.items()}
        roots = [cache_dir, model_home(), *more, *(p.parent for p in model_paths.values()),
                 PACKAGE_ROOT, sys.prefix, sys.base_prefix,
                 tempfile.gettempdir(), Path.home(), Path.cwd()]
        return cls(named, [r for r in roots if str(r) not in ("/", "")])

    def __call__(self, text: str) -> str:
        for pattern, name in self._pairs:
            text = pattern.sub(lambda _m, name=name: name, text)
        return _ABS_PATH.sub(_generic, text)


def _forms(path: str | os.PathLike) -> list[str]:
    """The spellings of ``path`` a message may use: as given, absolute, and resolved."""
    p = Path(path).expanduser()
    forms = {str(path), str(p)}
    try:
        forms.add(str(p.absolute()))
        forms.add(str(p.resolve()))
    except (OSError, RuntimeError):
        pass
    return [f for f in forms if len(f) > 1]


def _generic(match: re.Match) -> str:
    text = match.group(0)
    if text.startswith(_API_ROUTES):
        return text
    first = "/" + text.lstrip("/").split("/", 1)[0]
    return "…" if os.path.exists(first) else text

