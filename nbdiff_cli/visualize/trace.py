"""Traces: a decoding run as JSON lines, so it can be replayed without a model and shared.

Line 1 is a header: {"kind": "header", "format": "nbdiff-trace", "version": 1, "prompt": ...,
"options": {...DecodeOptions...}, "model": ...}. Every further line is one decoder event exactly as
`nbdiff.events.to_json` writes it, plus "t": seconds since the run started when the event left the
decoder. Replays read "t" for tokens/s, so a replay shows the recorded speed, not the replay's.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator

from nbdiff.errors import NBDiffError
from nbdiff.events import BlockEvent, Event, FinalEvent, StepEvent, event_from_json, to_json

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
        # a unique temporary name: a cancelled run may still be closing while the next one starts
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent or ".")
        self._tmp = Path(tmp)
        self._file = os.fdopen(fd, "w", encoding="utf-8")
        self._file.write(header.to_json() + "\n")

    def write(self, event: Event, t: float) -> None:
        self._file.write(event_line(event, t) + "\n")

    def close(self) -> None:
        if self._file.closed:
            return
        self._file.close()
        os.replace(self._tmp, self.path)


def read_trace(path: str | Path) -> tuple[TraceHeader, list[tuple[float, Event]]]:
    """The header (empty if the file has none) and every (t, event) of a trace file."""
    path = Path(path)
    if not path.is_file():
        raise NBDiffError(f"trace {path} not found", "record one with `nbdiff visualize MODEL --record FILE`")
    header = TraceHeader()
    events: list[tuple[float, Event]] = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                if number == 1 and json.loads(line).get("kind") == "header":
                    data = json.loads(line)
                    header = TraceHeader(data.get("prompt", ""), data.get("options", {}), data.get("model", ""))
                    continue
                events.append(parse_line(line))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                raise NBDiffError(
                    f"{path}:{number} is not a trace line ({type(exc).__name__}: {exc})",
                    "a trace is the JSON lines written by `nbdiff visualize --record`",
                ) from None
    if not events:
        raise NBDiffError(f"trace {path} holds no events", "record one with `nbdiff visualize MODEL --record FILE`")
    return header, events


def iter_events(path: str | Path) -> Iterator[tuple[float, Event]]:
    yield from read_trace(path)[1]
