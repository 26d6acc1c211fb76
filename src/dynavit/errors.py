"""User-facing errors: one line that names the problem and how to fix it."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path


class DynavitError(Exception):
    """An error caused by user input (a bad name, path, file or option).

    The CLI prints these as a single line and exits non-zero; anything else is a bug
    and keeps its traceback.
    """


class BadSampleError(DynavitError):
    """A dataset file that cannot be decoded; carries the path so it can be skipped and counted."""

    def __init__(self, path: object, reason: str) -> None:
        super().__init__(f"cannot read {path}: {reason}")
        self.path = path
        self.reason = reason


def check_writable(path: str | os.PathLike, *, folder: bool = False, option: str = "") -> Path:
    """Refuse, before any work, an output that cannot be written (minutes of work lost otherwise).

    ``folder``: the output is a folder (created here); else a file, whose folder is created and
    probed with a temporary file. Returns the path.
    """
    path = Path(path)
    what = f"{option} {path}" if option else str(path)
    if folder and path.exists() and not path.is_dir():
        raise DynavitError(f"cannot write to {what}: it is a file, not a folder")
    if not folder and path.is_dir():
        raise DynavitError(f"cannot write to {what}: it is a folder; give a file name")
    where = path if folder else path.parent
    try:
        where.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=where):
            pass
        if not folder and path.exists() and not os.access(path, os.W_OK):
            raise PermissionError(errno.EACCES, "permission denied")
    except OSError as e:
        raise DynavitError(f"cannot write to {what}: {e.strerror or e}") from None
    return path
