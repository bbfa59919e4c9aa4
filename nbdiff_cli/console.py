"""Rich consoles, the error wrapper every command goes through, and text made safe to show.

Library code raises `NBDiffError`; here it becomes one red line (plus a dim hint) on stderr and
exit code 1. Nothing else in nbdiff_cli prints tracebacks at people.

The consoles do not interpret Rich markup: paths, values, hints and model output can hold `[...]`
and are printed literally. Styling goes through `style=` or `rich.text.Text`, never markup tags.
"""

from __future__ import annotations

import functools
import math
import re
import sys
from typing import Callable, TypeVar

import typer
from rich.console import Console
from rich.text import Text

console = Console(highlight=False, markup=False)
err_console = Console(stderr=True, highlight=False, markup=False)

F = TypeVar("F", bound=Callable)

# C0 controls except tab and newline, DEL, and C1 controls: they move the cursor, recolour or
# retitle the terminal when printed raw.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """Model output made safe for a terminal: control characters become visible escapes (`\\x1b`)."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def user_text(text: str) -> str:
    """Text from the command line or stdin as valid Unicode: undecodable bytes become U+FFFD.

    Python keeps bytes that are not UTF-8 as lone surrogates (surrogateescape); tokenizers refuse
    those with a TypeError.
    """
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate surrogateescape did not make
        raw = text.encode("utf-8", "replace")
    return raw.decode("utf-8", "replace")


def _check_finite(kwargs: dict) -> None:
    """nan and inf parse as floats but are no setting's value: refuse them for every float option."""
    from nbdiff.errors import NBDiffError

    for name, value in kwargs.items():
        if isinstance(value, float) and not math.isfinite(value):
            flag = "--" + name.replace("_", "-")
            raise NBDiffError(f"{flag} must be a finite number, got {value}", f"pass an ordinary number to {flag}")


def fail(message: str, hint: str | None = None, code: int = 1) -> "typer.Exit":
    """Print a one-line error (and hint) and return the Exit to raise."""
    err_console.print(Text.assemble(("error:", "bold red"), " ", message), soft_wrap=True)
    if hint:
        err_console.print(Text(f"hint: {hint}", style="dim"), soft_wrap=True)
    return typer.Exit(code)


def handle_errors(fn: F) -> F:
    """Turn NBDiffError (and OS-level errors) raised by a command into a clean exit."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from nbdiff.errors import NBDiffError

        try:
            _check_finite(kwargs)
            return fn(*args, **kwargs)
        except NBDiffError as exc:
            raise fail(exc.message, exc.hint) from None
        except FileNotFoundError as exc:
            raise fail(f"file not found: {exc.filename or exc}") from None
        except PermissionError as exc:
            raise fail(f"permission denied: {exc.filename or exc}") from None
        except OSError as exc:  # read-only filesystem, disk full, ...
            where = f"{exc.filename}: " if exc.filename else ""
            raise fail(f"{where}{exc.strerror or exc}") from None
        except KeyboardInterrupt:
            err_console.print("interrupted", style="yellow")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def stdout_is_tty() -> bool:
    return sys.stdout.isatty()
