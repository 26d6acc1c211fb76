"""Request bodies to images, checked before they are decoded: size, content type, pixel count.

Every refusal is a ``RequestError`` with the HTTP status and a message that says what was wrong.
Decompression bombs are refused from the header, before any pixel is allocated.
"""

from __future__ import annotations

import io
from typing import Any

from PIL import Image, UnidentifiedImageError

IMAGE_TYPES = ("image/jpeg", "image/png", "image/webp", "image/bmp", "image/gif", "image/tiff",
               "application/octet-stream")


class RequestError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """RGB image from bytes; 400 for non-images and truncated files, 413 for too many pixels."""
    if not data:
        raise RequestError(400, "the request has no image (empty body)")
    try:
        img = Image.open(io.BytesIO(data))  # reads the header only
    except Image.DecompressionBombError as e:  # PIL's own ceiling, above ours
        raise RequestError(413, f"{e}; this server accepts at most {max_pixels} pixels") from None
    except (UnidentifiedImageError, OSError, ValueError):
        raise RequestError(400, "the body is not an image this server can decode (JPEG, PNG, WebP, BMP, ...)"
                           ) from None
    w, h = img.size
    if w * h > max_pixels or w <= 0 or h <= 0:
        raise RequestError(413, f"image is {w}x{h} = {w * h} pixels; this server accepts at most {max_pixels}")
    try:
        img.load()
        return img.convert("RGB")
    except (OSError, ValueError, SyntaxError) as e:
        raise RequestError(400, f"the image could not be decoded (truncated or corrupt: {e})") from None


async def read_image_bytes(request: Any, limit: int) -> bytes:
    """The image bytes of a request (raw image body or multipart ``image`` field), at most ``limit``."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        try:
            form = await request.form(max_files=1, max_fields=8)
        except Exception as e:  # noqa: BLE001 - malformed multipart of any kind is the client's error
            raise RequestError(400, f"malformed multipart body: {e}") from None
        upload = form.get("image") or form.get("file")
        if upload is None or isinstance(upload, str):
            raise RequestError(422, "multipart body needs an 'image' file field")
        data = await upload.read(limit + 1)
    elif ctype in IMAGE_TYPES or ctype.startswith("image/"):
        data = b""
        async for chunk in request.stream():
            data += chunk
            if len(data) > limit:
                break
    else:
        raise RequestError(415, f"content type {ctype or '(none)'!r} is not accepted; send image bytes "
                                "(image/jpeg, image/png, ...) or multipart/form-data with an 'image' field")
    if len(data) > limit:
        raise RequestError(413, f"body exceeds the limit of {limit} bytes")
    return data
