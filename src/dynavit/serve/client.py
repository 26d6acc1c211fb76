"""A client of ``dynavit serve``: send one image with its budget, get the server's answer.

An answer is read up to ``MAX_ANSWER_BYTES``: a server (or anything listening on its address)
cannot make the client read without end.
"""

from __future__ import annotations

import json
import mimetypes
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from dynavit.errors import DynavitError

MAX_ANSWER_BYTES = 32 * 2**20  # a capped segmentation mask is at most ~1.4 MB of base64


def _read(resp: Any) -> bytes:
    data = resp.read(MAX_ANSWER_BYTES + 1)
    if len(data) > MAX_ANSWER_BYTES:
        raise DynavitError(f"the server's answer exceeds {MAX_ANSWER_BYTES} bytes")
    return data


def infer(image: str | Path, url: str = "http://127.0.0.1:8000", *, latency_ms: float | None = None,
          energy_mj: float | None = None, gmacs: float | None = None, config: str | None = None,
          token: str | None = None, timeout: float = 60) -> dict[str, Any]:
    """POST ``image`` to ``url``/v1/infer; the server's JSON answer, or a one-line error naming its status."""
    image = Path(image)
    if not image.is_file():
        raise DynavitError(f"image {image} does not exist")
    params = {k: v for k, v in (("latency_ms", latency_ms), ("energy_mj", energy_mj), ("gmacs", gmacs),
                                ("config", config)) if v is not None}
    req = urllib.request.Request(f"{url.rstrip('/')}/v1/infer?{urllib.parse.urlencode(params)}",
                                 data=image.read_bytes(), method="POST",
                                 headers={"Content-Type": mimetypes.guess_type(image.name)[0] or
                                          "application/octet-stream"})
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(_read(resp))
    except urllib.error.HTTPError as e:
        try:
            msg = json.loads(_read(e)).get("error", e.reason)
        except (ValueError, AttributeError, DynavitError):
            msg = e.reason
        raise DynavitError(f"server answered {e.code}: {msg}") from None
    except urllib.error.URLError as e:
        raise DynavitError(f"cannot reach {url}: {e.reason}") from None
    except ValueError:
        raise DynavitError(f"the answer from {url} is not JSON") from None


__all__ = ["infer"]
