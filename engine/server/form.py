"""The HTTP API's request form and its schema: what a client may send to ``POST /dream`` and
``POST /jobs`` (multipart fields named like the CLI's options, parsed into
:class:`~onnxdream.settings.options.DreamSettings` or a video job's options) and how the OpenAPI
document describes it and the error bodies. :class:`ApiError` is a refused request (a status and one
sentence); :mod:`onnxdream.server.app` maps the library's error types to it and serves the app.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from onnxdream.core.errors import did_you_mean
from onnxdream.jobs.queue import ServerConfig
from onnxdream.jobs.video import VIDEO_FORMATS
from onnxdream.server.formstream import FilePart
from onnxdream.settings.build import from_options
from onnxdream.settings.options import ASCENT_FIELDS, AUTO, MAX_OCTAVES, DreamSettings

MAX_LAYERS = 8
FORMATS = {"png": ("image/png", "png"), "jpeg": ("image/jpeg", "jpg"),
           "jpg": ("image/jpeg", "jpg"), "webp": ("image/webp", "webp")}



class ApiError(Exception):
    """A request the server refuses: an HTTP status and one sentence."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def form_field(field: str) -> str:
    """A settings field as this API's form field names it."""
    return {"layers": "layer"}.get(field, field)


# ---------------------------------------------------------------------------------------------
# Form parsing


_TYPES: dict[str, type] = {"model": str, "objective": str, "pre_relu": bool, "octaves": str,
                           "octave_scale": float, "steps": int, "step_size": float,
                           "jitter": int, "tile_size": int, "normalize": str,
                           "grad_floor": float, "max_loss": float,
                           "seed": int, "format": str, "feather": int, "keep_colors": bool,
                           "init": str, "size": str, "seamless": bool}
#: A video job's own fields (onnxdream.jobs.video.VideoOptions, the CLI's `video` options).
_VIDEO_TYPES: dict[str, type] = {"flow": bool, "blend": str, "width": int, "start": float,
                                 "duration": float, "every": int}
#: Dream fields a video may keyframe ("0:10,5s:20"): kept as text for keyframed_settings.
_KEYFRAMED = ("steps", "step_size")
_FILES = ("image", "video")
#: file fields besides ``image`` (the creative controls' pictures); mask_layers repeats
UPLOADS = ("guide", "mask", "mask_layers")
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}
#: What a client that sends a video to /dream is told.
VIDEO_TO_JOBS = ("POST /dream takes photos only: send a video as the 'video' file of POST /jobs "
                 "and poll GET /jobs/{id} (progress in frames)")


def _convert(name: str, text: str) -> Any:
    kind = _TYPES.get(name) or _VIDEO_TYPES[name]
    text = text.strip()
    if len(text) > 200:
        raise ApiError(400, f"field '{name}' is too long ({len(text)} characters)")
    try:
        if kind is int:
            return int(text)
        if kind is float:
            value = float(text)
            if not math.isfinite(value):
                raise ValueError
            return value
    except ValueError:
        what = "an integer" if kind is int else "a finite number"
        raise ApiError(400, f"field '{name}' must be {what}, got {text[:40]!r}") from None
    if kind is bool:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise ApiError(400, f"field '{name}' must be true or false, got {text[:40]!r}")
    return text


@dataclass
class Form:
    """A parsed dream form: typed ``fields``, the ``layer`` values, the upload (an ``image``
    held in memory, or a ``video`` already on disk; None for a dream from ``init``), the
    creative controls' pictures (``pictures``: ``guide``, ``mask``, ``mask_layers`` bytes, in
    memory within the body limit), and for a video the keyframable fields as given (``keyed``:
    ``steps``, ``step_size``)."""

    fields: dict[str, Any]
    layers: list[str]
    upload: FilePart | None
    video: bool = False
    keyed: dict[str, str] = field(default_factory=dict)
    pictures: dict[str, Any] = field(default_factory=dict)


def parse_fields(items: list[tuple[str, Any]]) -> Form:
    """Multipart items (:class:`~onnxdream.server.formstream.FormReader`'s) → a :class:`Form`."""
    files = [(n.replace("-", "_").lower(), v) for n, v in items if isinstance(v, FilePart)]
    pictures: dict[str, Any] = {}
    uploads = []
    for name, value in files:
        if name in UPLOADS:  # the creative controls' pictures (mask_layers: a list)
            if name == "mask_layers":
                pictures.setdefault(name, []).append(value.read())
            elif name in pictures:
                raise ApiError(400, f"send one '{name}' file per request")
            else:
                pictures[name] = value.read()
        elif name in _FILES:
            uploads.append((name, value))
        else:
            raise ApiError(400, f"field '{value.name[:40]}' must be a plain value, not a file")
    if len(uploads) > 1:
        raise ApiError(400, "send one file per request: an 'image' or a 'video'")
    kind, upload = uploads[0] if uploads else ("image", None)
    video = kind == "video"
    form = Form({}, [], upload, video, pictures=pictures)
    known = [kind, "layer", *_TYPES, *UPLOADS, *(_VIDEO_TYPES if video else ())]
    for raw_name, value in items:
        if isinstance(value, FilePart):
            continue
        name = raw_name.replace("-", "_").lower()
        if name in _FILES or name in UPLOADS:
            raise ApiError(400, f"'{name}' must be a file upload (multipart/form-data)")
        if name == "layer":
            text = value.strip()
            if text:
                if len(text) > (2000 if video else 200):  # a video's may hold keyframes
                    raise ApiError(400, "a 'layer' value is too long")
                form.layers.append(text)
            continue
        if name in _VIDEO_TYPES and not video:
            raise ApiError(400, f"field '{name}' is for videos (a 'video' file sent to "
                                "POST /jobs), not photos")
        if name not in _TYPES and name not in _VIDEO_TYPES:
            raise ApiError(400, f"unknown field '{raw_name[:40]}' (fields: {', '.join(known)})"
                                f"{did_you_mean(name[:40], known)}")
        if name in form.fields or name in form.keyed:
            raise ApiError(400, f"field '{name}' is given twice")
        if not value.strip():
            continue
        if video and name in _KEYFRAMED:
            if len(value) > 2000:
                raise ApiError(400, f"field '{name}' is too long ({len(value)} characters)")
            form.keyed[name] = value.strip()
        elif video and name == "blend":
            if len(value) > 2000:
                raise ApiError(400, "field 'blend' is too long")
            form.fields[name] = value.strip()
        else:
            form.fields[name] = _convert(name, value)
    if len(form.layers) > MAX_LAYERS:
        raise ApiError(400, f"at most {MAX_LAYERS} 'layer' fields per dream, got "
                            f"{len(form.layers)}")
    if upload is None and not form.fields.get("init"):
        raise ApiError(400, "no 'image' file in the request: send multipart/form-data with "
                            "the photo in a field named 'image' (or a clip in 'video', to "
                            "POST /jobs; or init=noise and a size)")
    if upload is not None and form.fields.get("init"):
        raise ApiError(400, "init starts a dream without a photo: send no 'image' with it")
    if video and pictures:
        raise ApiError(400, f"'{next(iter(pictures))}' is for photos: a video job takes no "
                            "guide or mask")
    return form


def build_settings(fields: dict[str, Any], layers: list[str],
                   config: ServerConfig) -> DreamSettings:
    """Form values → a validated DreamSettings with its seed fixed (defaults from settings)."""
    given = {k: fields.get(k) for k in ("model", "objective", "pre_relu", "seed", *ASCENT_FIELDS,
                                        "feather", "keep_colors", "init", "size", "seamless")}
    if given["init"] and not given["size"]:
        given["size"] = "512x512"
    # the uploads by placeholder names (their content hashes go into the provenance)
    given["guide"] = "GUIDE" if "guide" in fields else None
    given["mask"] = "MASK" if "mask" in fields else None
    given["mask_layers"] = [f"MASK{i + 1}" for i in range(len(fields.get("mask_layers", [])))]
    settings = from_options(layers=layers or None, **given).with_seed()
    # octaves "auto" depend on the image: run_request checks those once it is decoded
    if settings.octaves != AUTO and settings.octaves * settings.steps > config.max_steps:
        raise ApiError(400, f"octaves x steps is {settings.octaves * settings.steps}, more than "
                            f"this server's limit of {config.max_steps}")
    return settings


# ---------------------------------------------------------------------------------------------
# OpenAPI: the multipart form of /dream and /jobs, and the error bodies


_VIDEO_HELP = {
    "video": "A clip (MP4, MOV, WebM, MKV, animated GIF, …; instead of 'image'): dreamed frame "
             "by frame into a video, its sound kept. At most the server's max_video_seconds "
             "(/health), each frame at most its max_pixels (or give 'width').",
    "flow": "Carry each frame's dream into the next along the optical flow (default true).",
    "blend": "How much of the previous frame's dream goes into the next, 0 to 1, or keyframes "
             "FRAME:VALUE / SECONDSs:VALUE, comma-separated (default 0.6 with flow, else 0).",
    "width": "Resize the frames to this width first (height follows; both made even).",
    "start": "Start this many seconds into the clip.",
    "duration": "Dream this many seconds (default: to the end).",
    "every": "Take every N-th frame.",
}


def form_schema(video: bool = False) -> dict[str, Any]:
    """The dream form as an OpenAPI requestBody (FastAPI cannot infer it: the form is read by
    hand, to refuse unknown fields and to admit the request before reading it). With ``video``
    (``POST /jobs``): a ``video`` file instead of the ``image``, its own fields, and
    ``layer``/``steps``/``step_size`` that may be keyframes."""
    kinds = {str: {"type": "string"}, int: {"type": "integer"}, float: {"type": "number"},
             bool: {"type": "boolean"}}
    props: dict[str, Any] = {
        "image": {"type": "string", "format": "binary",
                  "description": "The photo (PNG, JPEG, WebP, …)."},
        "layer": {"type": "array", "items": {"type": "string"}, "maxItems": MAX_LAYERS,
                  "description": "NAME or NAME:WEIGHT, repeatable; default: the model's."},
    }
    for name, kind in _TYPES.items():
        props[name] = dict(kinds[kind])
    props["octaves"] = {"oneOf": [{"type": "integer", "minimum": 1, "maximum": MAX_OCTAVES},
                                  {"type": "string", "enum": [AUTO]}],
                        "description": "A number, or auto (the default): from the photo's size"}
    props["format"] = {"type": "string", "enum": sorted(FORMATS)}
    props["init"] = {"type": "string", "enum": ["noise", "grey"],
                     "description": "Dream without a photo (send no image): its start."}
    props["size"] = {"type": "string", "description": "WIDTHxHEIGHT of a dream from init."}
    for name, text in (("guide", "A picture whose features the dream moves toward."),
                       ("mask", "White: dream, black: keep the photo, grey: part.")):
        props[name] = {"type": "string", "format": "binary", "description": text}
    props["mask_layers"] = {"type": "array", "items": {"type": "string", "format": "binary"},
                            "description": "Where each layer dreams, one picture per layer."}
    if not video:
        return {"requestBody": {"required": True, "content": {"multipart/form-data": {
            "schema": {"type": "object", "required": ["image"], "properties": props},
            "encoding": {"layer": {"style": "form", "explode": True}}}}}}
    props["image"]["description"] += " Send an 'image' or a 'video'."
    for name in ("init", "size", "guide", "mask", "mask_layers"):  # photos only
        props.pop(name)
    props["video"] = {"type": "string", "format": "binary", "description": _VIDEO_HELP["video"]}
    for name, kind in _VIDEO_TYPES.items():
        props[name] = {**kinds[kind], "description": _VIDEO_HELP[name]}
    props["blend"] = {"anyOf": [{"type": "number"}, {"type": "string"}],
                      "description": _VIDEO_HELP["blend"]}
    for name in _KEYFRAMED:
        props[name] = {"anyOf": [props[name], {"type": "string"}],
                       "description": "A value, or for a video keyframes FRAME:VALUE / "
                                      "SECONDSs:VALUE, comma-separated (e.g. 0:10,5s:20)."}
    props["layer"]["description"] += (" For a video also keyframes: 0:blocks.5,120:blocks.9 "
                                       "(layers of one key joined by +).")
    props["format"] = {"type": "string", "enum": sorted({*FORMATS, *VIDEO_FORMATS}),
                       "description": "png (default), jpeg or webp for a photo; mp4 (default), "
                                      "webm or gif for a video."}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {
        "schema": {"type": "object", "properties": props,
                   "anyOf": [{"required": ["image"]}, {"required": ["video"]}]},
        "encoding": {"layer": {"style": "form", "explode": True}}}}}}


_ERROR = {"content": {"application/json": {"schema": {
    "type": "object", "required": ["error"], "properties": {"error": {"type": "string"}},
    "additionalProperties": False}}}}
IMAGE_BODY = {"content": {media: {"schema": {"type": "string", "format": "binary"}}
                      for media in sorted({m for m, _ in FORMATS.values()})}}
RESULT_BODY = {"content": {media: {"schema": {"type": "string", "format": "binary"}}
                       for media in sorted({*(m for m, _ in FORMATS.values()),
                                            *VIDEO_FORMATS.values()})}}


def error_responses(*codes: int, **described: dict) -> dict[int | str, dict]:
    texts = {400: "Bad request (the message names the field)", 404: "Not found",
             409: "Not ready yet",
             413: "Too large (body, image; a video too long, too many pixels or too much disk)",
             415: "Not multipart/form-data", 422: "The dream's objective stopped being finite",
             499: "Cancelled", 500: "Internal error",
             501: "Videos are not available on this server (the message says why)",
             503: "Busy, out of space for videos, or shutting down (see Retry-After)"}
    out: dict[int | str, dict] = {c: {"description": texts[c], **_ERROR} for c in codes}
    for code, value in described.items():
        out[int(code.lstrip("_"))] = value
    return out


DREAM_ERRORS = (400, 413, 415, 422, 499, 500, 503)
JOB_VIEW = {"content": {"application/json": {"schema": {
    "type": "object", "required": ["id", "state", "progress"],
    "properties": {
        "id": {"type": "string"},
        "state": {"type": "string", "enum": ["queued", "running", "done", "failed", "cancelled"]},
        "progress": {"type": "number"}, "error": {"type": "string"},
        "eta_s": {"type": ["number", "null"], "description": "Seconds left (estimate)."},
        "kind": {"type": "string", "enum": ["video"], "description": "Only for a video job."},
        "frames_done": {"type": "integer", "description": "A video job's frames dreamed."},
        "frames_total": {"type": "integer",
                         "description": "A video job's frames (known to ±1 until done)."},
        "fps": {"type": "number", "description": "A video job's frames dreamed per second."},
        "stage": {"type": ["string", "null"], "enum": ["dream", "encode", None],
                  "description": "A video job's stage: dreaming frames, then encoding."},
        "frame_rate": {"type": "number", "description": "The output video's frame rate."}}}}}}
ERROR_OR_STATUS = {"content": {"application/json": {"schema": {
    "type": "object", "required": ["status", "error"],
    "properties": {"status": {"type": "string"}, "error": {"type": "string"}}}}}}


