"""Rich consoles and the error wrapper every command goes through.

Library code raises `NBDiffError`; here it becomes one red line (plus a dim hint) on stderr and
exit code 1. Nothing else in nbdiff_cli prints tracebacks at people.
"""

from __future__ import annotations

import functools
import sys
from typing import Callable, TypeVar

import typer
from rich.console import Console

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)

F = TypeVar("F", bound=Callable)


def fail(message: str, hint: str | None = None, code: int = 1) -> "typer.Exit":
    """Print a one-line error (and hint) and return the Exit to raise."""
    err_console.print(f"[bold red]error:[/] {message}", markup=True, soft_wrap=True)
    if hint:
        err_console.print(f"[dim]hint: {hint}[/]", soft_wrap=True)
    return typer.Exit(code)


def handle_errors(fn: F) -> F:
    """Turn NBDiffError (and a few OS-level errors) raised by a command into a clean exit."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from nbdiff.errors import NBDiffError

        try:
            return fn(*args, **kwargs)
        except NBDiffError as exc:
            raise fail(exc.message, exc.hint) from None
        except FileNotFoundError as exc:
            raise fail(f"file not found: {exc.filename or exc}") from None
        except PermissionError as exc:
            raise fail(f"permission denied: {exc.filename or exc}") from None
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/]")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def stdout_is_tty() -> bool:
    return sys.stdout.isatty()
