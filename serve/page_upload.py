"""An image query's upload, read within the page's limits.

Uploads are capped in bytes while they stream in: a declared length over the cap is refused before a
byte is read, and a body without one is counted chunk by chunk, so nothing past the cap is pulled off
the connection, held or spooled to disk. The image is then capped in pixels (the extractor's
decompression-bomb check) while it is decoded. Every refusal is a 4xx with a one-line reason.
"""
from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Query, Request
from PIL import Image
from starlette.datastructures import UploadFile
from starlette.types import Message, Receive

from medembed.extract.imaging import DEFAULT_DECODE, DecodeOptions, decode_image
from medembed.extract.imaging.dicom import DICOM_SUFFIXES
from medembed.extract.imaging.nifti import NIFTI_SUFFIXES
from medembed.extract.worker import describe_error

FORM_FRAMING = 16 * 2**10  # a multipart form's boundaries and part headers, allowed on top of the image's bytes


def _too_large(limit: int) -> HTTPException:
    return HTTPException(413, f"upload is larger than {limit} bytes")


def _counted(receive: Receive, cap: int, limit: int) -> Receive:
    """`receive` counting the body's bytes as they arrive: a 413 as soon as they pass `cap`, so at most
    one chunk past the cap is ever pulled off the connection and nothing past it is kept."""
    seen = 0

    async def counted() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > cap:
                raise _too_large(limit)
        return message

    return counted


def _declared_length(request: Request) -> int | None:
    value = request.headers.get("content-length")
    if value is None:
        return None
    if not value.strip().isdigit():
        raise HTTPException(400, f"Content-Length: {value!r} is not a byte count")
    return int(value)


def upload_name(name: str | None) -> str:
    """What a raw-body upload is called while it is decoded and in messages: "upload", plus the NIfTI
    or DICOM suffix of the name the client gave (`?name=scan.nii.gz`), which is what tells a NIfTI
    volume or a DICOM file without the Part 10 preamble apart (other formats are known by their
    content). Nothing else of a file name is kept: it may name a patient."""
    lower = (name or "").lower()
    return "upload" + next((s for s in (*NIFTI_SUFFIXES, *DICOM_SUFFIXES) if lower.endswith(s)), "")


async def upload_name_param(name: str | None = Query(None, max_length=255)) -> str:
    """The `name` query parameter of an upload, kept as `upload_name` keeps it."""
    return upload_name(name)


UploadName = Annotated[str, Depends(upload_name_param)]


def _is_form(request: Request) -> bool:
    return request.headers.get("content-type", "").split(";")[0].strip().lower() == "multipart/form-data"


async def read_upload(request: Request, limit: int, name: str = "upload") -> tuple[bytes, str]:
    """The uploaded image's bytes and a name for messages, never more than `limit` bytes read.

    The body is the image file itself (what the page sends), or a multipart form whose `file` part is
    (`curl -F file=@x.png`; the form's framing may add FORM_FRAMING bytes). A Content-Length over the
    cap is refused before anything is read; otherwise the body is counted while it streams in, since a
    spooled upload checked only at its end can fill the disk first. `name` is a raw body's name (see
    `upload_name`); a form's file part carries its own."""
    form = _is_form(request)
    cap = limit + (FORM_FRAMING if form else 0)
    declared = _declared_length(request)
    if declared is not None and declared > cap:
        raise _too_large(limit)
    body = Request(request.scope, _counted(request.receive, cap, limit))
    if not form:
        data = bytearray()
        async for chunk in body.stream():
            data += chunk
        return bytes(data), name
    async with body.form(max_files=1, max_fields=8) as fields:
        part = fields.get("file")
        if not isinstance(part, UploadFile):
            raise HTTPException(400, "file: the form has no file part named 'file' (or send the image's bytes as "
                                     "the request body)")
        data = await part.read(limit + 1)
    if len(data) > limit:
        raise _too_large(limit)
    return data, part.filename or "upload"


def decode_upload(data: bytes, name: str, max_pixels: int, options: DecodeOptions = DEFAULT_DECODE) -> Image.Image:
    """An uploaded image (a DICOM file too, windowed as the pool was), or a 400 with the one-line
    reason it is not one (never a traceback)."""
    try:
        return decode_image(data, name, options, max_pixels=max_pixels)
    except Exception as e:  # noqa: BLE001 - any decode failure is one reason
        raise HTTPException(400, f"{name}: {describe_error(e)}") from None
