"""Reading the photos that get dreamed (writing them is :mod:`onnxdream.media.imagewrite`'s).

The ascent works on float32 RGB arrays, H x W x 3, values in [0, 1]. This module turns whatever a
user hands in (RGBA, greyscale, 16-bit, palette, CMYK, rotated phone JPEGs) into that, keeps the
alpha channel aside so it can be put back, resizes (the octaves), and reads back the metadata a
dream's file carries.

Safety:

- Decompression bombs are refused with :class:`~onnxdream.core.errors.ImageError` before any pixel
is
  decoded (``max_pixels``, default 128 megapixels). Pillow's global ``Image.MAX_IMAGE_PIXELS`` is
  only changed for the duration of one open-and-decode, under a module lock (so concurrent
  ``load_image`` calls decode one at a time), and restored afterwards.
- Truncated files are errors, never half-grey images: the image is fully decoded with
  ``img.load()`` while ``ImageFile.LOAD_TRUNCATED_IMAGES`` is held at False.
- Only raster formats are opened (no EPS, which would run Ghostscript).
- Writing (atomic, with the metadata embedded) is :mod:`onnxdream.media.imagewrite`'s; this module
  reads that metadata back (:func:`read_metadata`).

The library raises; it never prints or exits.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import threading
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from onnxdream.core.errors import ImageError, ImageTooLargeError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "LoadedImage",
    "READ_FORMATS",
    "image_size",
    "load_image",
    "load_image_bytes",
    "read_metadata",
    "read_png_metadata",
    "resize",
    "to_uint8",
]

#: Largest image (width x height) that :func:`load_image` decodes unless told otherwise.
DEFAULT_MAX_PIXELS = 128_000_000

#: Formats :func:`load_image` will open (Pillow format names; JPEG includes the MPO files many
#: phones write). Vector/script formats (EPS, which runs Ghostscript) are deliberately absent.
#: Formats this Pillow was built without are skipped.
READ_FORMATS: tuple[str, ...] = (
    "PNG",
    "JPEG",
    "WEBP",
    "AVIF",
    "BMP",
    "DIB",
    "GIF",
    "TIFF",
    "PPM",
    "TGA",
    "ICO",
)


# Pillow's decoder limits are process-wide; this lock makes our temporary changes to them
# invisible to other load_image calls running in other threads.
_PIL_LOCK = threading.Lock()

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "box": Image.Resampling.BOX,
    "bilinear": Image.Resampling.BILINEAR,
    "hamming": Image.Resampling.HAMMING,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}

_available_formats: tuple[str, ...] | None = None


def _read_formats() -> tuple[str, ...]:
    """READ_FORMATS that this Pillow can open (registers all plugins once)."""
    global _available_formats
    if _available_formats is None:
        Image.init()
        _available_formats = tuple(f for f in READ_FORMATS if f in Image.OPEN)
    return _available_formats


#: The metadata packet :mod:`onnxdream.media.imagewrite` puts into JPEG/WebP files (XMP)
_XMP_RE = re.compile(rb"<onnxdream:parameters>(.*?)</onnxdream:parameters>", re.DOTALL)


@dataclass(frozen=True, eq=False)
class LoadedImage:
    """A decoded image, ready for the ascent.

    Attributes:
        rgb: float32 array, H x W x 3, C-contiguous, values in [0, 1].
        alpha: float32 array, H x W, values in [0, 1], or None when the image had no transparency.
        mode: the Pillow mode of the file as stored (``"RGBA"``, ``"I;16"``, ``"P"`` ...).
        size: ``(width, height)`` after EXIF orientation was applied (Pillow's order).
        format: the Pillow format name (``"PNG"``, ``"JPEG"`` ...), if known.
    """

    rgb: np.ndarray
    alpha: np.ndarray | None
    mode: str
    size: tuple[int, int]
    format: str | None = None

    @property
    def width(self) -> int:
        return self.size[0]

    @property
    def height(self) -> int:
        return self.size[1]


# --------------------------------------------------------------------------------------------
# Reading


@contextlib.contextmanager
def _pil_limits(max_pixels: int | None) -> Iterator[None]:
    """Pillow's bomb limit at ``max_pixels`` and truncated images refused, for one decode."""
    with _PIL_LOCK:
        old_max = Image.MAX_IMAGE_PIXELS
        old_truncated = ImageFile.LOAD_TRUNCATED_IMAGES
        Image.MAX_IMAGE_PIXELS = max_pixels
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        try:
            with warnings.catch_warnings():
                # Pillow warns between 1x and 2x the limit and raises above; refuse both.
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                yield
        finally:
            Image.MAX_IMAGE_PIXELS = old_max
            ImageFile.LOAD_TRUNCATED_IMAGES = old_truncated


def _bomb_error(name: str, exc: Exception | None, pixels: int | None,
                limit: int) -> ImageTooLargeError:
    if pixels is None and exc is not None:
        m = re.search(r"\((\d+) pixels\)", str(exc))
        pixels = int(m.group(1)) if m else None
    return ImageTooLargeError(name, pixels, limit)


def _open_and_decode(fp, name: str, max_pixels: int | None) -> Image.Image:
    """Open, check the size from the header, and fully decode the first frame."""
    if max_pixels is not None and max_pixels < 1:
        raise ImageError(f"max_pixels must be a positive integer or None, got {max_pixels!r}")
    try:
        with _pil_limits(max_pixels):
            img = Image.open(fp, formats=_read_formats())
            w, h = img.size
            if max_pixels is not None and w * h > max_pixels:
                raise _bomb_error(name, None, w * h, max_pixels)
            img.load()
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _bomb_error(name, exc, None, max_pixels or 0) from exc
    except UnidentifiedImageError as exc:
        supported = ", ".join(f for f in _read_formats() if f != "DIB")
        raise ImageError(
            f"{name} is not an image in a supported format ({supported})"
        ) from exc
    except MemoryError as exc:
        raise ImageError(f"{name} is too large to decode in the available memory") from exc
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as exc:
        detail = str(exc).strip().rstrip(".") or type(exc).__name__
        if "truncated" in detail.lower() or isinstance(exc, EOFError):
            raise ImageError(f"{name} is truncated or incomplete ({detail})") from exc
        raise ImageError(f"{name} is corrupt or cannot be decoded ({detail})") from exc
    return img


def _exif_transpose(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation tag; an unreadable EXIF block leaves the image as stored."""
    try:
        return ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - broken EXIF must not make a valid photo unreadable
        return img


def _to_float_arrays(img: Image.Image) -> tuple[np.ndarray, np.ndarray | None]:
    """Pillow image of any mode → (rgb float32 HxWx3 in [0,1], alpha float32 HxW or None)."""
    mode = img.mode
    alpha: np.ndarray | None = None

    if mode.startswith("I;16") or mode in ("I", "F"):
        grey = _scale_wide_grey(img)
        rgb = np.repeat(grey[:, :, None], 3, axis=2)
        return np.ascontiguousarray(rgb), None

    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif mode == "PA":
        img = img.convert("RGBA")
    elif mode in ("RGBa", "La"):  # premultiplied alpha
        img = img.convert("RGBA" if mode == "RGBa" else "LA")
    elif mode == "1":
        img = img.convert("L")
    elif mode == "L" and "transparency" in img.info:
        img = img.convert("LA")
    elif mode == "RGB" and "transparency" in img.info:
        img = img.convert("RGBA")
    elif mode not in ("RGB", "RGBA", "L", "LA"):
        # CMYK (naive conversion, ICC profiles are not applied), YCbCr, LAB, HSV, RGBX ...
        img = img.convert("RGB")

    arr = np.asarray(img)
    if img.mode == "L":
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    elif img.mode == "LA":
        alpha = arr[:, :, 1]
        arr = np.repeat(arr[:, :, :1], 3, axis=2)
    elif img.mode == "RGBA":
        alpha = arr[:, :, 3]
        arr = arr[:, :, :3]

    rgb = arr.astype(np.float32)
    rgb *= np.float32(1.0 / 255.0)
    rgb = np.ascontiguousarray(rgb)
    if alpha is not None:
        a = alpha.astype(np.float32)
        a *= np.float32(1.0 / 255.0)
        alpha = np.ascontiguousarray(a)
    return rgb, alpha


def _scale_wide_grey(img: Image.Image) -> np.ndarray:
    """16-bit, 32-bit integer and float greyscale → float32 HxW in [0, 1].

    - ``I;16*``: divided by 65535 (full 16-bit precision, no clipping at 255).
    - ``I``: Pillow's mode for 16-bit PNG/PGM greyscale in some versions; treated as 16-bit,
      divided by 65535 and clipped to [0, 1].
    - ``F``: kept as is when its values lie in [0, 1]; otherwise divided by 255 when they fit in
      8 bits, else by 65535; then clipped. NaNs become 0.
    """
    mode = img.mode
    if mode.startswith("I;16"):
        arr = np.asarray(img).astype(np.float32)
        arr *= np.float32(1.0 / 65535.0)
        return arr
    if mode == "I":
        arr = np.asarray(img).astype(np.float32)
        arr *= np.float32(1.0 / 65535.0)
        np.clip(arr, 0.0, 1.0, out=arr)
        return arr
    arr = np.array(img, dtype=np.float32)  # mode "F"
    np.nan_to_num(arr, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
    hi = float(arr.max()) if arr.size else 0.0
    if hi > 255.0:
        arr *= np.float32(1.0 / 65535.0)
    elif hi > 1.0:
        arr *= np.float32(1.0 / 255.0)
    np.clip(arr, 0.0, 1.0, out=arr)
    return arr


def _decode_to_loaded(fp, name: str, max_pixels: int | None) -> LoadedImage:
    img = _open_and_decode(fp, name, max_pixels)
    try:
        mode, fmt = img.mode, img.format
        img = _exif_transpose(img)
        try:
            rgb, alpha = _to_float_arrays(img)
        except (OSError, ValueError) as exc:
            raise ImageError(f"{name} has pixel mode {mode} that cannot be converted to RGB "
                             f"({exc})") from exc
        h, w = rgb.shape[:2]
        return LoadedImage(rgb=rgb, alpha=alpha, mode=mode, size=(w, h), format=fmt)
    finally:
        img.close()


def load_image(path: str | os.PathLike[str], *,
               max_pixels: int | None = DEFAULT_MAX_PIXELS) -> LoadedImage:
    """Read an image file into float32 RGB in [0, 1] (plus alpha, if it has one).

    Args:
        path: the image file.
        max_pixels: refuse images with more pixels than this (width x height), from the header,
            before decoding. None disables the check (only for trusted files).

    Raises:
        ImageError: the file is missing, a directory, not an image, truncated or corrupt, or
            larger than ``max_pixels``.
    """
    p = Path(path)
    name = str(p)
    if not p.exists():
        raise ImageError(f"{name} does not exist")
    if p.is_dir():
        raise ImageError(f"{name} is a directory, not an image file")
    try:
        fh = open(p, "rb")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise ImageError(f"{name} cannot be opened ({exc.strerror or exc})") from exc
    with fh:
        return _decode_to_loaded(fh, name, max_pixels)


def load_image_bytes(
    data: bytes, *, name: str = "the uploaded image", max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> LoadedImage:
    """Like :func:`load_image`, for an image held in memory (e.g. an HTTP upload)."""
    if not data:
        raise ImageError(f"{name} is empty")
    return _decode_to_loaded(io.BytesIO(data), name, max_pixels)


def image_size(data: bytes, *, name: str = "the uploaded image",
               max_pixels: int | None = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """``(width, height)`` of an encoded image from its header alone (after EXIF rotation),
    without decoding its pixels: ImageError if it is not an image in a supported format,
    ImageTooLargeError past ``max_pixels``. A truncated body is found only by decoding."""
    if not data:
        raise ImageError(f"{name} is empty")
    try:
        with _pil_limits(max_pixels), Image.open(io.BytesIO(data), formats=_read_formats()) as img:
            w, h = img.size
            try:
                orientation = img.getexif().get(0x0112, 1)
            except Exception:  # noqa: BLE001 - broken EXIF: as stored (like the decoder)
                orientation = 1
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _bomb_error(name, exc, None, max_pixels or 0) from exc
    except UnidentifiedImageError as exc:
        supported = ", ".join(f for f in _read_formats() if f != "DIB")
        raise ImageError(f"{name} is not an image in a supported format ({supported})") from exc
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as exc:
        detail = str(exc).strip().rstrip(".") or type(exc).__name__
        raise ImageError(f"{name} is corrupt or cannot be decoded ({detail})") from exc
    if max_pixels is not None and w * h > max_pixels:
        raise _bomb_error(name, None, w * h, max_pixels)
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


# --------------------------------------------------------------------------------------------
# Array helpers


def to_uint8(rgb: np.ndarray) -> np.ndarray:
    """Float image in [0, 1] → uint8 in [0, 255], rounding to nearest; clipped; NaN → 0.

    A uint8 input is returned unchanged.
    """
    a = np.asarray(rgb)
    if a.dtype == np.uint8:
        return a
    out = np.empty(a.shape, np.uint8)
    rows = max(1, (1 << 22) // max(1, a[0].size))  # ~16 MB of float32 at a time
    for i in range(0, a.shape[0], rows):
        scaled = a[i:i + rows].astype(np.float32) * np.float32(255.0)
        np.nan_to_num(scaled, copy=False, nan=0.0, posinf=255.0, neginf=0.0)
        np.clip(scaled, 0.0, 255.0, out=scaled)
        np.rint(scaled, out=scaled)
        out[i:i + rows] = scaled
    return out


def resize(
    rgb: np.ndarray, size: tuple[int, int], *, resample: str = "bicubic",
    box: tuple[float, float, float, float] | None = None
) -> np.ndarray:
    """Resize a float image to ``size = (height, width)``, in float32, channel by channel.

    Uses Pillow's ``"F"`` (32-bit float) mode, so there is no 8-bit quantisation and no new
    dependency. The default is bicubic (Keys, a = -0.5): smooth for the octave up-sampling of
    DeepDream, with less ringing than Lanczos, and antialiased when shrinking because Pillow widens
    the kernel by the scale factor. Like every cubic filter it can overshoot [0, 1] slightly at
    hard edges; the result is not clipped (the ascent clips after each step).

    Accepts H x W or H x W x C arrays; returns a new C-contiguous float32 array (a copy even when
    the size is unchanged). ``box``: the source region ``(x0, y0, x1, y1)`` to resize (Pillow's;
    the filter still reads the pixels around it), default the whole image.
    """
    a = np.asarray(rgb)
    if a.ndim not in (2, 3):
        raise ValueError(f"resize expects an H x W or H x W x C array, got shape {a.shape}")
    h, w = (int(size[0]), int(size[1]))
    if h < 1 or w < 1:
        raise ValueError(f"resize target must be at least 1 x 1, got {size}")
    try:
        flt = _RESAMPLE[resample]
    except KeyError:
        raise ValueError(
            f"unknown resample filter {resample!r}; use one of {', '.join(_RESAMPLE)}"
        ) from None
    if a.shape[:2] == (h, w) and box is None:
        return np.array(a, dtype=np.float32, order="C", copy=True)
    if a.ndim == 2:
        return _resize_plane(a, h, w, flt, box)
    out = np.empty((h, w, a.shape[2]), dtype=np.float32)
    for c in range(a.shape[2]):
        out[:, :, c] = _resize_plane(a[:, :, c], h, w, flt, box)
    return out


def _resize_plane(plane: np.ndarray, h: int, w: int, flt: Image.Resampling,
                  box: tuple[float, float, float, float] | None = None) -> np.ndarray:
    img = Image.fromarray(np.ascontiguousarray(plane, dtype=np.float32))  # mode "F"
    return np.asarray(img.resize((w, h), flt, box=box), dtype=np.float32)


# --------------------------------------------------------------------------------------------
# Metadata


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The text metadata of an image written by :func:`onnxdream.media.imagewrite.save_image` (or
    any PNG's text chunks).

    PNG: all tEXt/zTXt/iTXt chunks. JPEG/WebP: the JSON object in onnxdream's XMP packet (or the
    JPEG comment). Returns ``{}`` when there is none. Only the header is parsed, not the pixels.
    """
    p = Path(path)
    if not p.is_file():
        raise ImageError(f"{p} does not exist" if not p.exists() else f"{p} is not a file")
    try:
        with open(p, "rb") as fh:
            if fh.read(8) == _PNG_SIGNATURE:
                return _png_text_chunks(fh)
        # other formats: Pillow parses the metadata with the header; no pixels are decoded
        with _pil_limits(None), Image.open(p, formats=_read_formats()) as img:
            info = dict(img.info)
    except ImageError:
        raise
    except UnidentifiedImageError as exc:
        raise ImageError(f"{p} is not an image in a supported format") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(f"cannot read metadata from {p} ({exc})") from exc

    xmp = info.get("xmp")
    if isinstance(xmp, str):
        xmp = xmp.encode("utf-8")
    if isinstance(xmp, bytes):
        m = _XMP_RE.search(xmp)
        if m:
            from xml.sax.saxutils import unescape

            found = _json_object(unescape(m.group(1).decode("utf-8", "replace")))
            if found is not None:
                return found
    comment = info.get("comment")
    if isinstance(comment, bytes):
        comment = comment.decode("utf-8", "replace")
    if isinstance(comment, str):
        found = _json_object(comment)
        if found is not None:
            return found
    return {}


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_MAX_TEXT_CHUNK = 16 * 1024 * 1024  # bytes, after decompression


def _png_text_chunks(fh) -> dict[str, str]:
    """tEXt/zTXt/iTXt chunks of a PNG (before and after the image data), without decoding pixels."""
    out: dict[str, str] = {}
    while True:
        head = fh.read(8)
        if len(head) < 8:
            return out  # no IEND: keep what was found
        length = int.from_bytes(head[:4], "big")
        kind = head[4:8]
        if kind == b"IEND":
            return out
        if kind not in (b"tEXt", b"zTXt", b"iTXt") or length > _MAX_TEXT_CHUNK:
            fh.seek(length + 4, os.SEEK_CUR)  # skip the body and its CRC
            continue
        body = fh.read(length)
        fh.seek(4, os.SEEK_CUR)
        if len(body) < length:
            return out
        try:
            key, value = _png_text_chunk(kind, body)
        except (ValueError, zlib.error, UnicodeDecodeError):
            continue  # one unreadable chunk does not hide the others
        out[key] = value


def _png_text_chunk(kind: bytes, body: bytes) -> tuple[str, str]:
    key_raw, sep, rest = body.partition(b"\0")
    if not sep:
        raise ValueError("no keyword separator")
    key = key_raw.decode("latin-1")
    if kind == b"tEXt":
        return key, rest.decode("latin-1")
    if kind == b"zTXt":
        return key, _inflate(rest[1:]).decode("latin-1")  # rest[0]: compression method
    # iTXt: compression flag, method, language tag \0, translated keyword \0, text
    flag = rest[0]
    _lang, _, rest = rest[2:].partition(b"\0")
    _translated, _, text = rest.partition(b"\0")
    return key, (_inflate(text) if flag else text).decode("utf-8")


def _inflate(data: bytes) -> bytes:
    d = zlib.decompressobj()
    out = d.decompress(data, _MAX_TEXT_CHUNK)
    if d.unconsumed_tail:
        raise ValueError("text chunk too large")
    return out


def _json_object(text: str) -> dict[str, str] | None:
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    if not isinstance(obj, dict):
        return None
    return {str(k): str(v) for k, v in obj.items()}


def read_png_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The text chunks of a PNG as a dict (also reads onnxdream's JPEG/WebP metadata).

    Same as :func:`read_metadata`; kept under this name for callers that only deal in PNG.
    """
    return read_metadata(path)
