"""Request bodies to images, checked before they are decoded: body size, content type, pixel counts.

Every refusal is a ``RequestError`` with the HTTP status and a message that says what was wrong.
Three limits are checked from what arrives before any pixel is allocated:

- the body, counted as it streams (``BodyLimit``), whatever its kind (raw, multipart, chunked):
  a declared Content-Length is only a promise;
- the image's own pixel count, from its header (decompression bombs);
- the image the model's transform would make of it (``transform.work_size``) and the aspect
  ratio: a thin image passes a pixel count but its resize does not (shorter side to 256 makes
  a 1x16000 PNG of 131 bytes a 256x4096000 image).
"""

from __future__ import annotations

import io
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Protocol

from PIL import Image, UnidentifiedImageError

from dynavit.data.transforms import rgb

IMAGE_TYPES = ("image/jpeg", "image/png", "image/webp", "image/bmp", "image/gif", "image/tiff",
               "application/octet-stream")
MAX_ASPECT = 32.0  # long side / short side: a 360-degree panorama is 2-8, a 1-pixel line is what an attack sends

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class RequestError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


class Transform(Protocol):
    def work_size(self, w: int, h: int) -> tuple[int, int]: ...


def check_size(w: int, h: int, max_pixels: int, transform: Transform | None = None,
               max_aspect: float = MAX_ASPECT) -> None:
    """Refuse a w x h image by its header: 413 for too many pixels (as sent or once transformed), 422 for the shape."""
    if w <= 0 or h <= 0 or w * h > max_pixels:
        raise RequestError(413, f"image is {w}x{h} = {w * h} pixels; this server accepts at most {max_pixels}")
    aspect = max(w, h) / min(w, h)
    if aspect > max_aspect:
        raise RequestError(422, f"image is {w}x{h}, an aspect ratio of {aspect:.0f}:1; this server accepts at "
                                f"most {max_aspect:g}:1")
    if transform is not None:
        tw, th = transform.work_size(w, h)
        if tw * th > max_pixels:
            raise RequestError(413, f"image is {w}x{h}, which the model's transform makes {tw}x{th} = {tw * th} "
                                    f"pixels; this server accepts at most {max_pixels}")


def decode_image(data: bytes, max_pixels: int, transform: Transform | None = None,
                 max_aspect: float = MAX_ASPECT) -> Image.Image:
    """RGB image from bytes, checked by ``check_size`` first; 400 for non-images and truncated files."""
    return decode(open_image(data, max_pixels, transform, max_aspect))


def open_image(data: bytes, max_pixels: int, transform: Transform | None = None,
               max_aspect: float = MAX_ASPECT) -> Image.Image:
    """The image in ``data``, its header read and checked (``check_size``), no pixel decoded yet."""
    if not data:
        raise RequestError(400, "the request has no image (empty body)")
    try:
        img = Image.open(io.BytesIO(data))  # reads the header only
    except Image.DecompressionBombError as e:  # PIL's own ceiling, above ours
        raise RequestError(413, f"{e}; this server accepts at most {max_pixels} pixels") from None
    except (UnidentifiedImageError, OSError, ValueError):
        raise RequestError(400, "the body is not an image this server can decode (JPEG, PNG, WebP, BMP, ...)"
                           ) from None
    check_size(*img.size, max_pixels, transform, max_aspect)
    return img


def decode(img: Image.Image) -> Image.Image:
    """The pixels of an opened image, in RGB; 400 for truncated or corrupt data."""
    try:
        img.load()
        return rgb(img)
    except (OSError, ValueError, SyntaxError) as e:
        raise RequestError(400, f"the image could not be decoded (truncated or corrupt: {e})") from None


async def read_image_bytes(request: Any, limit: int) -> bytes:
    """The image bytes of a request (raw image body or multipart ``image`` field), at most ``limit``."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        try:
            form = await request.form(max_files=1, max_fields=8)
        except RequestError:  # the body limit, counted as the parts streamed in
            raise
        except Exception as e:  # noqa: BLE001 - malformed multipart of any kind is the client's error
            raise RequestError(400, f"malformed multipart body: {e}") from None
        upload = form.get("image") or form.get("file")
        if upload is None or isinstance(upload, str):
            raise RequestError(422, "multipart body needs an 'image' file field")
        data = await upload.read(limit + 1)
    elif ctype in IMAGE_TYPES or ctype.startswith("image/"):
        buf = bytearray()  # appending to bytes would copy the whole body once per chunk
        async for chunk in request.stream():
            buf += chunk
            if len(buf) > limit:
                break
        data = bytes(buf)
    else:
        raise RequestError(415, f"content type {ctype or '(none)'!r} is not accepted; send image bytes "
                                "(image/jpeg, image/png, ...) or multipart/form-data with an 'image' field")
    if len(data) > limit:
        raise RequestError(413, f"body exceeds the limit of {limit} bytes")
    return data


class BodyLimit:
    """ASGI middleware: counts body bytes as they arrive and stops reading past ``limit`` with a 413.

    The count is on what the socket delivers, so it holds for chunked bodies and for multipart,
    which the form parser would otherwise spool to disk in full before anyone looked at a size.
    The 413 is raised from ``receive`` (the app's ``RequestError`` handler answers it); one that
    escapes a handler is answered here, if the response has not started.
    """

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        seen = 0
        started = False

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise RequestError(413, f"body exceeds the limit of {self.limit} bytes")
            return message

        async def watched(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, watched)
        except RequestError as e:
            if started:
                raise
            body = json.dumps({"error": e.message}).encode()
            await send({"type": "http.response.start", "status": e.status,
                        "headers": [(b"content-type", b"application/json"), (b"connection", b"close"),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
