"""Where the package's static files are: the page, its scripts and the example photo
(``engine/static``, package data of ``onnxdream.static``). The one owner of that path."""

from __future__ import annotations

from pathlib import Path

__all__ = ["PACKAGE_ROOT", "STATIC"]

#: The installed ``onnxdream`` package (the ``engine/`` folder in a checkout).
PACKAGE_ROOT = Path(__file__).resolve().parent.parent
#: The static files served by ``onnxdream serve`` and copied into exported sites.
STATIC = PACKAGE_ROOT / "static"
