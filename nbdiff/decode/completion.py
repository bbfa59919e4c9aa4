"""Raw-text completion with stop strings, through the decoder: what evaluations need.

`complete` continues a batch of plain texts (no chat template) with `nbdiff.api.stream`, so any
decoding option works exactly as in `generate` and `chat`. Each text is cut at its earliest stop
string; decoding is cancelled as soon as every row has produced a stop string or EOS (the
decoder stops before its next forward pass, so a few tokens past the stop may be decoded).
"""

from __future__ import annotations

import threading
from typing import Callable, Sequence

from nbdiff.decode.events import BlockEvent, FinalEvent


def first_stop(text: str, until: Sequence[str]) -> int | None:
    """Index of the earliest stop string in `text`, or None."""
    hits = [text.find(s) for s in until if s]
    hits = [h for h in hits if h >= 0]
    return min(hits) if hits else None


def cut(text: str, until: Sequence[str]) -> str:
    """`text` up to (not including) its earliest stop string."""
    at = first_stop(text, until)
    return text if at is None else text[:at]


def complete(
    model, tokenizer, prompts: Sequence[str], options, until: Sequence[str] = (),
    stop: Callable[[str], int | None] | None = None,
) -> tuple[list[str], FinalEvent]:
    """Continue each raw prompt; returns (texts cut at the earliest stop, the decoder's FinalEvent).

    `stop(text)`, when given, is a further stop rule: the index to cut the text at, or None.
    """
    def cut_at(text: str) -> int | None:
        hits = [h for h in (first_stop(text, until), stop(text) if stop else None) if h is not None]
        return min(hits) if hits else None

    from nbdiff.api import eos_ids, stream

    eos = set(eos_ids(model, tokenizer))
    cancel = threading.Event()
    texts = [""] * len(prompts)
    done = [False] * len(prompts)
    final = None
    for event in stream(model, tokenizer, list(prompts), options, cancel=cancel, raw=True):
        if isinstance(event, BlockEvent):
            texts[event.seq] += event.text
            if any(t in eos for t in event.tokens) or cut_at(texts[event.seq]) is not None:
                done[event.seq] = True
            if all(done):
                cancel.set()  # every row has what it needs
        elif isinstance(event, FinalEvent):
            final = event
    assert final is not None  # the decoder always ends with a FinalEvent
    return [text if cut_at(text) is None else text[: cut_at(text)] for text in final.texts], final
