"""The one exception type the library raises for bad input.

Every message is one line that says what is wrong; `hint` says what to do next. The CLI prints
both and exits non-zero; Python callers can catch `NBDiffError` alone.
"""

from __future__ import annotations


class NBDiffError(Exception):
    """A user-facing error: `message` says what is wrong, `hint` what to do about it."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} ({self.hint})"


def first_line(exc: BaseException) -> str:
    """`Type: first line of the message`, for one-line errors about third-party failures."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
