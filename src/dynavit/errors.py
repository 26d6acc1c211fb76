"""User-facing errors: one line that names the problem and how to fix it."""


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
