"""Strict ``multipart/form-data`` parsing of an in-memory body, keeping every field's raw bytes.

Starlette's own form parser silently decodes a non-UTF-8 text field as Latin-1; the API must refuse such a
field instead (400), so the body (already read under the upload limit) is parsed here with python-multipart's
low-level parser and text fields are decoded by the caller.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from python_multipart.multipart import MultipartParser, parse_options_header


class FormError(ValueError):
    """The body is not well-formed multipart/form-data; the message says what was wrong."""


@dataclass
class Part:
    """One form part: its ``name``, ``filename`` (None for a plain field), ``content_type`` and raw ``data``."""

    name: str
    filename: str | None
    content_type: str | None
    data: bytes = b""
    chunks: list = field(default_factory=list, repr=False)


def boundary_of(content_type: str) -> bytes:
    """The boundary of a ``multipart/form-data`` Content-Type header; FormError if there is none."""
    ctype, params = parse_options_header(content_type)
    if ctype != b"multipart/form-data":
        raise FormError(f"expected multipart/form-data, got {ctype.decode('latin-1') or 'no content type'}")
    b = params.get(b"boundary")
    if not b:
        raise FormError("the multipart/form-data Content-Type has no boundary")
    return b


def parse_multipart(body: bytes, content_type: str, max_parts: int = 16) -> list[Part]:
    """Split ``body`` into its parts (at most ``max_parts``). Raises FormError on malformed input."""
    boundary = boundary_of(content_type)
    parts: list[Part] = []
    state: dict = {"headers": {}, "field": b"", "value": b"", "part": None}

    def on_part_begin() -> None:
        state["headers"] = {}
        if len(parts) >= max_parts:
            raise FormError(f"more than {max_parts} form parts")

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state["field"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        state["value"] += data[start:end]

    def on_header_end() -> None:
        state["headers"][state["field"].lower()] = state["value"]
        state["field"], state["value"] = b"", b""

    def on_headers_finished() -> None:
        disp = state["headers"].get(b"content-disposition")
        if disp is None:
            raise FormError("a form part has no Content-Disposition header")
        kind, opts = parse_options_header(disp)
        if kind != b"form-data" or b"name" not in opts:
            raise FormError("a form part's Content-Disposition is not form-data with a name")
        name = opts[b"name"].decode("utf-8", "replace")
        filename = opts[b"filename"].decode("utf-8", "replace") if b"filename" in opts else None
        ct = state["headers"].get(b"content-type")
        state["part"] = Part(name, filename, ct.decode("latin-1") if ct else None)

    def on_part_data(data: bytes, start: int, end: int) -> None:
        state["part"].chunks.append(bytes(data[start:end]))

    def on_part_end() -> None:
        p = state["part"]
        p.data = b"".join(p.chunks)
        p.chunks = []
        parts.append(p)
        state["part"] = None

    ended = []
    parser = MultipartParser(boundary, callbacks={
        "on_part_begin": on_part_begin, "on_part_data": on_part_data, "on_part_end": on_part_end,
        "on_header_field": on_header_field, "on_header_value": on_header_value, "on_header_end": on_header_end,
        "on_headers_finished": on_headers_finished, "on_end": lambda: ended.append(True)})
    try:
        parser.write(body)
        parser.finalize()
    except FormError:
        raise
    except Exception as e:  # python-multipart raises its own MultipartParseError / ValueError
        raise FormError(f"malformed multipart/form-data body ({str(e).splitlines()[0][:200] if str(e) else type(e).__name__})") from None
    if not ended:
        raise FormError("the multipart/form-data body is incomplete (no closing boundary)")
    return parts
