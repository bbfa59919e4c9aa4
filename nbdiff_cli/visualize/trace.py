"""Traces: a decoding run as JSON lines, so it can be replayed without a model and shared.

Line 1 is a header: {"kind": "header", "format": "nbdiff-trace", "version": 1, "prompt": ...,
"options": {...DecodeOptions...}, "model": ...}. Every further line is one decoder event exactly as
`nbdiff.decode.events.to_json` writes it, plus "t": seconds since the run started when the event left the
decoder. Replays read "t" for tokens/s, so a replay shows the recorded speed, not the replay's.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from nbdiff.errors import NBDiffError
from nbdiff.fsutil import atomic_file
from nbdiff.decode.events import BlockEvent, Event, FinalEvent, StepEvent, event_from_json, to_json

_RECORDS = {"step": StepEvent, "block": BlockEvent, "final": FinalEvent}
FORMAT = "nbdiff-trace"
VERSION = 1


@dataclass
class TraceHeader:
    prompt: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    model: str = ""

    def to_json(self) -> str:
        return json.dumps(
            {"kind": "header", "format": FORMAT, "version": VERSION, "prompt": self.prompt,
             "options": self.options, "model": self.model},
            ensure_ascii=False,
        )


def event_line(event: Event, t: float) -> str:
    # "t" first so a trace reads well with `head`; the rest is to_json's record unchanged.
    return json.dumps({"t": round(t, 4), **json.loads(to_json(event))}, ensure_ascii=False)


def parse_line(line: str) -> tuple[float, Event]:
    data = json.loads(line)
    t = float(data.pop("t", 0.0))
    # fields this version's records do not know (a trace from a newer nbdiff) are dropped
    cls = _RECORDS.get(data.get("kind", ""))
    if cls is not None:
        known = {f.name for f in fields(cls)}
        data = {k: v for k, v in data.items() if k in known}
    return t, event_from_json(data)


class TraceWriter:
    """Writes one run to `path`: into a temporary sibling, renamed when closed (no half files)."""

    def __init__(self, path: str | Path, header: TraceHeader) -> None:
        self.path = Path(path)
        # atomic_file's temporary name is unique: a cancelled run may still be closing while the next starts
        self._commit = contextlib.ExitStack()
        tmp = self._commit.enter_context(atomic_file(self.path))
        self._file = open(tmp, "w", encoding="utf-8")
        self._file.write(header.to_json() + "\n")

    def write(self, event: Event, t: float) -> None:
        self._file.write(event_line(event, t) + "\n")

    def close(self) -> None:
        if self._file.closed:
            return
        self._file.close()
        self._commit.close()  # renames the temporary onto self.path


def read_trace(path: str | Path) -> tuple[TraceHeader, list[tuple[float, Event]]]:
    """The header (empty if the file has none) and every (t, event) of a trace file."""
    path = Path(path)
    if not path.is_file():
        raise NBDiffError(f"trace {path} not found", "record one with `nbdiff visualize MODEL --record FILE`")
    header = TraceHeader()
    events: list[tuple[float, Event]] = []
    hint = "a trace is the JSON lines written by `nbdiff visualize --record`"
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise NBDiffError(f"{path}:{number} is not UTF-8 text, so not a trace", hint) from None
            if not line.strip():
                continue
            try:
                data = json.loads(line)
                if not isinstance(data, dict):
                    raise TypeError(f"a JSON {type(data).__name__}, not an object")
                if number == 1 and data.get("kind") == "header":
                    header = TraceHeader(data.get("prompt", ""), data.get("options", {}), data.get("model", ""))
                    continue
                events.append(parse_line(line))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
                raise NBDiffError(f"{path}:{number} is not a trace line ({type(exc).__name__}: {exc})", hint) from None
    if not events:
        raise NBDiffError(f"trace {path} holds no events", "record one with `nbdiff visualize MODEL --record FILE`")
    return header, events
