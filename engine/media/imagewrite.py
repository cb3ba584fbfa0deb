"""Writing dreams to image files: the output path checked before a dream is computed, the
format chosen by extension (PNG, JPEG, WebP), the dream's provenance embedded (PNG text chunks,
or an XMP packet in JPEG/WebP; :func:`onnxdream.media.imageio.read_metadata` reads them back), the
alpha channel put back, and the file written atomically (:func:`onnxdream.core.atomic.write_atomic`:
a failure leaves neither a partial file nor a temporary one, and an existing file is untouched
until the new one is complete). :func:`encode_image` gives the same bytes in memory (the
server's responses). Reading is :mod:`onnxdream.media.imageio`'s.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from PIL import Image, features
from PIL.PngImagePlugin import PngInfo

from onnxdream.core.errors import ImageError
from onnxdream.media.imageio import to_uint8

__all__ = ["OUTPUT_EXTENSIONS", "check_output_path", "encode_image", "save_image"]

#: The XMP namespace of the metadata packet in JPEG/WebP (``imageio.read_metadata`` finds it)
_XMP_NS = "urn:onnxdream:ns:1.0#"
_JPEG_SEGMENT_LIMIT = 65000  # a JPEG COM / APP1 segment holds at most 65533 bytes

#: Output extension → Pillow format.
OUTPUT_EXTENSIONS: dict[str, str] = {
    ".png": "PNG",
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".webp": "WEBP",
}


def check_output_path(path: str | os.PathLike[str]) -> str:
    """Check that ``path`` can take a dream before one is computed; returns the Pillow format.

    Raises:
        ImageError: unsupported extension, missing or non-writable parent directory, the path
            is a directory, or WebP support is missing from this Pillow.
    """
    p = Path(path)
    ext = p.suffix.lower()
    fmt = OUTPUT_EXTENSIONS.get(ext)
    if fmt is None:
        got = f"extension {ext!r}" if ext else "no extension"
        raise ImageError(
            f"cannot write {p}: {got} is not supported; use one of "
            f"{', '.join(OUTPUT_EXTENSIONS)}"
        )
    if fmt == "WEBP" and not features.check("webp"):
        raise ImageError(f"cannot write {p}: this Pillow was built without WebP support; "
                         "use .png or .jpg")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.exists():
        raise ImageError(f"cannot write {p}: the directory {parent} does not exist")
    if not parent.is_dir():
        raise ImageError(f"cannot write {p}: {parent} is not a directory")
    if p.is_dir():
        raise ImageError(f"cannot write {p}: it is a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ImageError(f"cannot write {p}: the directory {parent} is not writable")
    return fmt


def _as_alpha_u8(alpha: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    a = np.asarray(alpha)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.shape != hw:
        raise ImageError(f"alpha has shape {a.shape} but the image is {hw[0]} x {hw[1]}")
    return to_uint8(a)


def _xmp_packet(metadata: Mapping[str, str]) -> bytes:
    from xml.sax.saxutils import escape

    payload = escape(json.dumps(dict(metadata), ensure_ascii=False, sort_keys=True))
    return (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>'
        '<x:xmpmeta xmlns:x="adobe:ns:meta/">'
        '<rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        f'<rdf:Description rdf:about="" xmlns:onnxdream="{_XMP_NS}">'
        f"<onnxdream:parameters>{payload}</onnxdream:parameters>"
        "</rdf:Description></rdf:RDF></x:xmpmeta>"
        '<?xpacket end="w"?>'
    ).encode()


def _png_info(metadata: Mapping[str, str]) -> PngInfo:
    info = PngInfo()
    for key, value in metadata.items():
        key, value = str(key), str(value)
        try:
            key.encode("latin-1")
        except UnicodeEncodeError:
            raise ImageError(f"PNG metadata key {key!r} must be Latin-1 text") from None
        if not 1 <= len(key) <= 79:
            raise ImageError(f"PNG metadata key {key!r} must be 1 to 79 characters long")
        try:
            value.encode("latin-1")
            info.add_text(key, value)  # tEXt
        except UnicodeEncodeError:
            info.add_itxt(key, value)  # iTXt (UTF-8)
    return info


def _save_kwargs(fmt: str, metadata: Mapping[str, str] | None, quality: int) -> dict:
    kw: dict = {}
    if fmt == "PNG":
        kw["compress_level"] = 6
        if metadata:
            kw["pnginfo"] = _png_info(metadata)
    elif fmt == "JPEG":
        kw.update(quality=quality, subsampling=0 if quality >= 90 else 2, optimize=True)
        if metadata:
            comment = json.dumps(dict(metadata), ensure_ascii=False, sort_keys=True).encode("utf-8")
            xmp = _xmp_packet(metadata)
            # metadata that would not fit a JPEG segment is left out rather than failing the save
            if len(comment) <= _JPEG_SEGMENT_LIMIT:
                kw["comment"] = comment
            if len(xmp) <= _JPEG_SEGMENT_LIMIT:
                kw["xmp"] = xmp
    elif fmt == "WEBP":
        kw.update(quality=quality, method=4)
        if metadata:
            kw["xmp"] = _xmp_packet(metadata)
    return kw


def _output_format(fmt: str) -> str:
    """A Pillow output format from ``"PNG"``/``"png"``/``".png"``/``"jpg"`` …; ImageError else."""
    key = fmt.strip().lower()
    found = OUTPUT_EXTENSIONS.get(key if key.startswith(".") else f".{key}")
    if found is None:
        raise ImageError(f"cannot encode as {fmt!r}: use one of "
                         f"{', '.join(e.lstrip('.') for e in OUTPUT_EXTENSIONS)}")
    if found == "WEBP" and not features.check("webp"):
        raise ImageError("this Pillow was built without WebP support; use png or jpeg")
    return found


def _pil_image(rgb: np.ndarray, alpha: np.ndarray | None, fmt: str, what: str) -> Image.Image:
    """Float RGB in [0, 1] (+ alpha) → the Pillow image to encode (alpha dropped for JPEG)."""
    arr = np.asarray(rgb)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ImageError(f"cannot write {what}: expected an H x W x 3 RGB array, "
                         f"got shape {arr.shape}")
    pixels = to_uint8(arr)
    if alpha is not None and fmt in ("PNG", "WEBP"):
        a8 = _as_alpha_u8(alpha, pixels.shape[:2])
        return Image.fromarray(np.ascontiguousarray(np.dstack([pixels, a8])))  # RGBA
    if alpha is not None:
        _as_alpha_u8(alpha, pixels.shape[:2])  # still reject a mismatched alpha
    return Image.fromarray(np.ascontiguousarray(pixels))  # RGB


def _check_quality(quality: int) -> int:
    if not 1 <= int(quality) <= 100:
        raise ImageError(f"quality must be between 1 and 100, got {quality}")
    return int(quality)


def encode_image(
    rgb: np.ndarray,
    alpha: np.ndarray | None = None,
    format: str = "PNG",
    metadata: Mapping[str, str] | None = None,
    quality: int = 95,
) -> bytes:
    """Encode a float RGB image in [0, 1] (H x W x 3) as PNG, JPEG or WebP bytes, in memory.

    ``format``: a Pillow format or an extension (``"png"``, ``".jpg"``, ``"webp"``). Alpha and
    metadata are handled as in :func:`save_image` (the same bytes that it would write).

    Raises:
        ImageError: an unknown format, a malformed array or alpha, a bad quality.
    """
    fmt = _output_format(format)
    quality = _check_quality(quality)
    img = _pil_image(rgb, alpha, fmt, f"a {fmt} image")
    kwargs = _save_kwargs(fmt, metadata, quality)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def save_image(
    path: str | os.PathLike[str],
    rgb: np.ndarray,
    alpha: np.ndarray | None = None,
    metadata: Mapping[str, str] | None = None,
    quality: int = 95,
) -> Path:
    """Write a float RGB image in [0, 1] (H x W x 3) atomically; returns the path written.

    The format follows the extension (``.png``, ``.jpg``/``.jpeg``, ``.webp``). ``alpha`` (H x W
    in [0, 1]) is re-attached for PNG and WebP and dropped for JPEG. ``metadata`` goes into PNG
    tEXt/iTXt chunks; for JPEG and WebP it is stored as one JSON object in an XMP packet (and a
    JPEG comment). Floats become 8-bit by rounding to nearest after clipping to [0, 1].

    The image is written with :func:`onnxdream.core.atomic.write_atomic`, so a reader never sees a
    partial file and a failure leaves any existing file as it was.

    Raises:
        ImageError: unsupported extension or missing directory (before any work is done), a
            malformed array, or a write failure.
    """
    from onnxdream.core.atomic import write_atomic

    fmt = check_output_path(path)
    p = Path(path)
    quality = _check_quality(quality)
    img = _pil_image(rgb, alpha, fmt, str(p))
    kwargs = _save_kwargs(fmt, metadata, quality)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            img.save(fh, format=fmt, **kwargs)

    try:
        write_atomic(p, write)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        detail = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise ImageError(f"cannot write {p}: {detail}") from exc
    return p
