"""``multipart/form-data`` read as it arrives: fields in memory, files in memory or on disk.

The server's forms (``POST /dream``, ``POST /jobs``) are read with :class:`FormReader`
rather than Starlette's ``request.form()``, which spools every file to the system's temporary
directory. Here the front end decides, when a file part's headers arrive and before any of its
bytes are read, where the bytes go: :attr:`FormReader.on_file` may refuse the part (raise), keep
it in memory (return None: a photo, bounded by the body limit) or hand back an open file to
stream it into (a video, written to its job's folder in a worker thread, never held in memory).
It may also raise :attr:`FormReader.limit`, the most bytes the whole body may have (a video
upload is allowed more than a photo).

Bounded: at most ``max_fields`` plain fields of ``max_field_bytes`` each, ``max_files`` files,
``limit`` bytes in all. A malformed body is a :class:`FormError` (400); too large, a
:class:`FormError` with status 413. Errors raised by ``on_file`` pass through unchanged. Uses
python-multipart (the ``[serve]`` extra) and anyio (Starlette's), no web framework.
"""

from __future__ import annotations

import codecs
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import BinaryIO

try:  # python-multipart >= 0.0.13 is python_multipart; older releases were `multipart`
    import python_multipart as _multipart
    from python_multipart.exceptions import FormParserError
    from python_multipart.multipart import parse_options_header
except ModuleNotFoundError:  # pragma: no cover
    import multipart as _multipart
    from multipart.exceptions import FormParserError
    from multipart.multipart import parse_options_header

__all__ = ["FilePart", "FormError", "FormReader", "MB"]

MB = 1024 * 1024


class FormError(Exception):
    """The body is not a form this server reads: an HTTP ``status`` and one sentence."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclass(eq=False)
class FilePart:
    """One uploaded file: its form field, the client's file name and type, its size, and its
    bytes (``data``, in memory) or the open file they were written to (``file``)."""

    name: str
    filename: str
    content_type: str
    size: int = 0
    data: bytearray | None = None
    file: BinaryIO | None = None

    def read(self) -> bytes:
        """The bytes of an in-memory part."""
        return bytes(self.data or b"")


@dataclass(eq=False)
class _Part:
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    name: str = ""
    file: FilePart | None = None
    text: bytearray = field(default_factory=bytearray)


#: ``on_file(reader, part) -> an open binary file | None``: called when a file part's headers
#: have arrived, before its bytes; may raise to refuse it, or change ``reader.limit``.
OnFile = Callable[["FormReader", FilePart], "BinaryIO | None"]


class FormReader:
    """Reads one multipart body; see the module docstring."""

    def __init__(self, content_type: str, *, limit: int, on_file: OnFile | None = None,
                 max_fields: int = 64, max_files: int = 4, max_field_bytes: int = 64 * 1024):
        ctype, params = parse_options_header(content_type)
        if ctype != b"multipart/form-data":
            raise FormError(415, "send multipart/form-data")
        boundary = params.get(b"boundary")
        if not boundary:
            raise FormError(400, "the multipart Content-Type has no boundary")
        charset = params.get(b"charset", b"utf-8").decode("latin-1")
        try:
            self.charset = codecs.lookup(charset).name
        except LookupError:
            self.charset = "utf-8"
        self.boundary = boundary
        self.limit = limit
        self.on_file = on_file
        self.max_fields, self.max_files = max_fields, max_files
        self.max_field_bytes = max_field_bytes
        self.received = 0
        self.items: list[tuple[str, str | FilePart]] = []
        self.files: list[FilePart] = []
        self._fields = 0
        self._part = _Part()
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._writes: list[tuple[BinaryIO, bytes]] = []
        self._ended = False

    # -- parser callbacks
    def _decode(self, data: bytes) -> str:
        try:
            return data.decode(self.charset)
        except UnicodeDecodeError:
            return data.decode("latin-1")

    def _on_part_begin(self) -> None:
        self._part = _Part()

    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]
        if len(self._header_value) > 8192:
            raise FormError(400, "a multipart header is too long")

    def _on_header_end(self) -> None:
        if len(self._part.headers) >= 16:
            raise FormError(400, "a multipart part has too many headers")
        self._part.headers.append((bytes(self._header_name).lower(), bytes(self._header_value)))
        self._header_name.clear()
        self._header_value.clear()

    def _on_headers_finished(self) -> None:
        headers = dict(self._part.headers)
        _, options = parse_options_header(headers.get(b"content-disposition", b""))
        if b"name" not in options:
            raise FormError(400, "a multipart part has no name (Content-Disposition: form-data; "
                                 "name=...)")
        self._part.name = self._decode(options[b"name"])[:200]
        if b"filename" not in options:
            self._fields += 1
            if self._fields > self.max_fields:
                raise FormError(400, f"too many fields (at most {self.max_fields})")
            return
        if len(self.files) >= self.max_files:
            raise FormError(400, f"too many files (at most {self.max_files})")
        ctype = self._decode(headers.get(b"content-type", b"")).strip()[:200]
        part = FilePart(self._part.name, self._decode(options[b"filename"])[:200], ctype)
        self.files.append(part)
        part.file = self.on_file(self, part) if self.on_file is not None else None
        if part.file is None:
            part.data = bytearray()
        self._part.file = part

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        part = self._part.file
        if part is None:
            if len(self._part.text) + len(chunk) > self.max_field_bytes:
                raise FormError(400, f"field '{self._part.name[:40]}' is longer than "
                                     f"{self.max_field_bytes // 1024} KB")
            self._part.text += chunk
        else:
            part.size += len(chunk)
            if part.file is not None:
                self._writes.append((part.file, bytes(chunk)))
            else:
                part.data += chunk

    def _on_part_end(self) -> None:
        part = self._part
        if part.file is None:
            self.items.append((part.name, self._decode(bytes(part.text))))
        else:
            self.items.append((part.name, part.file))

    def _on_end(self) -> None:
        self._ended = True

    # -- reading
    def _check_size(self) -> None:
        if self.received > self.limit:
            raise FormError(413, f"the request body is larger than this server's limit of "
                                 f"{self.limit / MB:g} MB")

    async def read(self, stream: AsyncIterator[bytes]) -> list[tuple[str, str | FilePart]]:
        """Parse the whole body from ``stream`` → ``[(field, text | FilePart)]`` in order.
        Files given to ``on_file`` are written (in a worker thread) and flushed, not closed."""
        from anyio import to_thread

        parser = _multipart.MultipartParser(self.boundary, {
            "on_part_begin": self._on_part_begin, "on_part_data": self._on_part_data,
            "on_part_end": self._on_part_end, "on_header_field": self._on_header_field,
            "on_header_value": self._on_header_value, "on_header_end": self._on_header_end,
            "on_headers_finished": self._on_headers_finished, "on_end": self._on_end})
        try:
            async for chunk in stream:
                self.received += len(chunk)
                parser.write(chunk)
                self._check_size()  # after the chunk's part headers: on_file may raise it
                if self._writes:
                    writes, self._writes = self._writes, []
                    await to_thread.run_sync(_write_all, writes)
            parser.finalize()
        except FormParserError:
            raise FormError(400, "the multipart body is malformed") from None
        if not self._ended:
            raise FormError(400, "the multipart body ended early (no closing boundary)")
        files = {p.file for p in self.files if p.file is not None}
        if files:
            await to_thread.run_sync(_flush_all, files)
        return self.items


def _write_all(writes: list[tuple[BinaryIO, bytes]]) -> None:
    for fh, data in writes:
        fh.write(data)


def _flush_all(files) -> None:
    for fh in files:
        fh.flush()
