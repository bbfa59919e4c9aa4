"""`nbdiff chat MODEL`: multi-turn chat that prints each block as the decoder commits it.

Commands: /help, /clear, /set NAME VALUE (any decoding option), /set (show them), /exit.
A line of three double quotes starts and ends multi-line input. Ctrl-C stops the current reply
(the decoder stops at its next forward) and keeps the session; Ctrl-D / end of input exits.
Works with stdin from a pipe: lines are read with readline when stdin is not a terminal.
Decoding runs in a worker thread that posts events to a queue, so Ctrl-C always reaches the
main thread and becomes the decoder's cancel event.
"""

from __future__ import annotations

import math
import queue
import sys
import threading
from typing import Optional

import typer

from rich.text import Text

from nbdiff_cli.console import console, printable, user_text
from nbdiff_cli.generate import figures
from nbdiff_cli.models import load_for_decoding
from nbdiff_cli.options import Hardware, ModelArg, decoding_options

HELP = """commands:
  /help              this help
  /clear             forget the conversation
  /set NAME VALUE    change a decoding option, e.g. /set threshold 0.8, /set block_size 8, /set exact on
  /set               show the decoding options
  /exit              leave (Ctrl-D works too)
  \"\"\"                start / end multi-line input
Ctrl-C stops the current reply."""

FENCE = '"""'


def _read_line(prompt: str) -> str:
    """One line of input without its newline; EOFError at end of input."""
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        return user_text(input(prompt))
    console.print(prompt, end="", markup=False, highlight=False)
    # read bytes and decode them here: bytes that are not UTF-8 become U+FFFD instead of an error
    raw = getattr(sys.stdin, "buffer", None)
    line = raw.readline().decode("utf-8", "replace") if raw is not None else sys.stdin.readline()
    if not line:
        console.print()
        raise EOFError
    return user_text(line.rstrip("\r\n"))


def _read_message() -> str:
    """A user message: one line, or the lines between two lines of three double quotes."""
    line = _read_line(">>> ")
    if not line.strip().startswith(FENCE):
        return line
    first = line.strip()[len(FENCE):]
    if first.endswith(FENCE):  # """one line"""
        return first[: -len(FENCE)]
    lines = [first] if first else []
    while True:
        line = _read_line("... ")
        if line.rstrip().endswith(FENCE):
            lines.append(line.rstrip()[: -len(FENCE)])
            return "\n".join(lines).strip("\n")
        lines.append(line)


def parse_set(options, text: str):
    """Apply `/set NAME VALUE` to options; returns the new (validated) options or raises NBDiffError."""
    from dataclasses import fields

    from nbdiff.errors import NBDiffError

    parts = text.split(maxsplit=1)
    if len(parts) != 2:
        raise NBDiffError("usage: /set NAME VALUE", "e.g. /set threshold 0.8")
    name, raw = parts[0].replace("-", "_"), parts[1].strip()
    kinds = {f.name: str(f.type) for f in fields(options)}
    if name not in kinds:
        raise NBDiffError(f"unknown option {name!r}", f"options: {', '.join(kinds)}")
    kind = kinds[name]
    if raw.lower() in ("none", "default") and "None" in kind:
        value = None
    elif kind == "bool":
        if raw.lower() not in ("on", "off", "true", "false", "1", "0", "yes", "no"):
            raise NBDiffError(f"{name} is on or off, got {raw!r}", f"e.g. /set {name} on")
        value = raw.lower() in ("on", "true", "1", "yes")
    else:
        try:
            value = float(raw) if "float" in kind else int(raw) if "int" in kind else raw
        except ValueError:
            raise NBDiffError(f"{name} needs a number, got {raw!r}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise NBDiffError(f"{name} must be a finite number, got {raw!r}")
    return options.with_(**{name: value})


def _stats(final) -> str:
    """The turn's figures (its own forwards and time: the kept cache of earlier turns is not counted)."""
    return figures(final) + ("" if final.finish_reason != "cancelled" else ", stopped")


def _reply(model, tokenizer, messages, options, system, session=None, plan=None):
    """Stream one reply; returns (text, final or None). Ctrl-C cancels and still returns what was said.

    `session` (nbdiff.api.Session) keeps the KV cache: the next turn computes only its new tokens.
    `plan`: the turn's drafting plan, resolved once before the reply (nbdiff.api.resolve)."""
    from nbdiff.api import stream
    from nbdiff.decode.events import BlockEvent, FinalEvent

    events: queue.Queue = queue.Queue()
    cancel = threading.Event()

    def work():
        try:
            for event in stream(model, tokenizer, messages, options, cancel=cancel, system=system, session=session,
                                plan=plan):
                events.put(event)
        except BaseException as exc:  # handed to the main thread, which reports it
            events.put(exc)
        events.put(None)

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    parts, final, error = [], None, None
    while True:
        try:
            item = events.get(timeout=0.1)
        except queue.Empty:
            continue
        except KeyboardInterrupt:
            if not cancel.is_set():
                console.out("")  # the terminal echoed ^C after the text: end that line here
            cancel.set()  # the decoder stops before its next forward; keep draining
            continue
        if item is None:
            break
        if isinstance(item, BaseException):
            error = item
        elif isinstance(item, BlockEvent) and not cancel.is_set():  # nothing is shown after ^C
            parts.append(item.text)
            console.out(printable(item.text), end="", highlight=False)  # never markup; controls escaped
        elif isinstance(item, FinalEvent):
            final = item
    worker.join()
    if error is not None:
        raise error
    if not cancel.is_set():
        console.out("")
    return "".join(parts), final


@decoding_options()
def chat(
    model: ModelArg = None,
    *,
    options=None,
    hardware: Hardware = Hardware(),
    system: Optional[str] = None,
) -> None:
    """Chat with a model; each block is printed as it is committed. /help lists the commands."""
    from nbdiff.api import Session, resolve
    from nbdiff.errors import NBDiffError
    from nbdiff.threads import in_passing_thread

    # kept: the conversation's cache serves every turn, so --dtype auto loads fp32 on a CPU (a fresh call's replies)
    mdl, tok = load_for_decoding(model, hardware.device, hardware.dtype, hardware.quantize, exact=options.exact, kept=True)
    session = Session()  # the KV cache of the conversation, kept across turns
    templated = bool(getattr(tok, "chat_template", None))
    console.print(Text.assemble(
        ("nbdiff chat", "bold"), " ", "" if templated else "(no chat template: plain continuation) ",
        ("/help for commands, Ctrl-D to leave", "dim"),
    ))
    messages: list[dict] = []
    said: set[str] = set()  # notes already shown (each is said once per session)
    while True:
        try:
            text = _read_message()
        except EOFError:
            break
        except KeyboardInterrupt:
            console.print("\n(Ctrl-D or /exit to leave)", style="dim")
            continue
        stripped = text.strip()
        if not stripped:
            continue
        if stripped.startswith("/"):
            command, _, rest = stripped.partition(" ")
            if command in ("/exit", "/quit"):
                break
            if command == "/help":
                console.print(HELP, markup=False, highlight=False)
            elif command == "/clear":
                messages.clear()
                session.clear()
                console.print("conversation cleared", style="dim")
            elif command == "/set":
                if not rest.strip():
                    for name, value in options.to_dict().items():
                        console.print(f"  {name} = {value!r}", markup=False, highlight=False)
                    continue
                try:
                    options = parse_set(options, rest)
                    name = rest.split()[0].replace("-", "_")
                    console.print(f"set {name} = {getattr(options, name)!r}", style="dim")
                except NBDiffError as exc:
                    console.print(f"error: {exc}", style="red", markup=False, highlight=False)
            else:
                console.print(f"unknown command {command} (/help lists them)", style="red", markup=False, highlight=False)
            continue
        messages.append({"role": "user", "content": text})
        try:
            # the turn's plan: resolved once, handed to the reply; off the main thread, as the reply (nbdiff.threads)
            resolved, plan, notes = in_passing_thread(resolve, mdl, options)
            for note in notes:  # e.g. block size above the adapted one: said once, before the reply
                if note not in said:
                    said.add(note)
                    console.print(f"note: {note}", style="yellow", markup=False, highlight=False)
            reply, final = _reply(mdl, tok, messages, resolved, system, session=session, plan=plan)
        except NBDiffError as exc:
            messages.pop()
            console.print(f"error: {exc}", style="red", markup=False, highlight=False)
            continue
        messages.append({"role": "assistant", "content": reply})
        if final is not None:
            for note in final.notes:
                if note not in said:
                    said.add(note)
                    console.print(f"note: {note}", style="yellow", markup=False, highlight=False)
            console.print(_stats(final), style="dim", markup=False, highlight=False)
    console.print("bye", style="dim")
