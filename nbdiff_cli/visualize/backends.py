"""Where the visualizer's events come from. The app takes any of these (a swappable backend):

- `LiveBackend`: the real decoder, `nbdiff.api.load` + `nbdiff.api.stream` (there is no second decoder);
- `ReplayBackend`: a trace recorded with `--record`, no model needed;
- `FakeBackend`: synthetic events with the decoder's shape, for tests and `--demo`.

`prepare()` (model loading) and `run()` are called in the app's thread worker, never on the UI
thread. `run()` yields `(t, event)`: t = seconds since the run started when the event was made.
Once `cancel` is set a backend stops before its next forward pass (it may still yield the
closing block and final records, as the decoder does).
"""

from __future__ import annotations

import random
import threading
import time
import zlib
from pathlib import Path
from typing import Any, Iterator, Protocol

from nbdiff.decode.options import DecodeOptions
from nbdiff.decode.events import BlockEvent, Event, FinalEvent, StepEvent

from nbdiff_cli.visualize.trace import read_trace

Timed = tuple[float, Event]


class Backend(Protocol):
    name: str
    """Shown in the title bar (model folder, trace file, 'demo')."""
    replay: bool
    """True when runs ignore the prompt and options (a recorded trace)."""

    def prepare(self) -> None: ...

    def run(self, prompt: str, options: DecodeOptions, cancel: threading.Event) -> Iterator[Timed]: ...


class LiveBackend:
    """Loads a model folder once (in the worker) and streams the real decoder's events."""

    replay = False

    def __init__(self, model: str, *, quantize: str | None = None, device: str = "auto",
                 dtype: str = "auto", system: str | None = None) -> None:
        self.name = str(model)
        self.model_path = model
        self.quantize = quantize
        self.device = device
        self.dtype = dtype
        self.system = system
        self.model: Any = None
        self.tokenizer: Any = None
        self._lock = threading.Lock()

    @classmethod
    def from_loaded(cls, model: Any, tokenizer: Any, name: str = "model", system: str | None = None) -> "LiveBackend":
        backend = cls(name, system=system)
        backend.model, backend.tokenizer = model, tokenizer
        return backend

    @property
    def loaded(self) -> bool:
        return self.model is not None

    def prepare(self) -> None:
        with self._lock:
            if self.model is None:
                from nbdiff import api

                self.model, self.tokenizer = api.load(
                    self.model_path, quantize=self.quantize, device=self.device, dtype=self.dtype
                )

    def run(self, prompt: str, options: DecodeOptions, cancel: threading.Event) -> Iterator[Timed]:
        from nbdiff import api

        self.prepare()
        start = time.perf_counter()
        events = api.stream(self.model, self.tokenizer, prompt, options, cancel=cancel, system=self.system)
        for event in events:  # the decoder checks `cancel` before every forward pass
            yield time.perf_counter() - start, event


class ReplayBackend:
    """Plays a recorded trace; the prompt and options come from its header."""

    replay = True

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.name = f"replay {self.path.name}"
        self.header, self.events = read_trace(self.path)  # bad traces fail before the app starts

    @property
    def prompt(self) -> str:
        return self.header.prompt

    @property
    def options(self) -> DecodeOptions:
        known = set(DecodeOptions.field_names())
        return DecodeOptions(**{k: v for k, v in self.header.options.items() if k in known})

    def prepare(self) -> None:
        pass

    def run(self, prompt: str, options: DecodeOptions, cancel: threading.Event) -> Iterator[Timed]:
        for timed in self.events:
            if cancel.is_set():
                return
            yield timed


_WORDS = (
    "the", " block", " diffusion", " model", " unmasks", " several", " tokens", " at", " once", ",",
    " while", " an", " autoregressive", " one", " writes", " a", " single", " token", " per", " step",
    ".", " Each", " block", " sees", " its", " past", " causally", " and", " itself", " fully", "\n",
)


class FakeBackend:
    """Deterministic synthetic events shaped like the decoder's (for tests and demos).

    It follows the commit rule of METHOD.md on made-up confidences: the first token of each block
    comes from an AR step, then each step commits the most confident masked position of the current
    sub-block plus every one above the threshold. `delay` seconds pass per forward (0 = instant);
    the recorded times are synthetic (`step_seconds` per forward) so replays are reproducible.
    """

    replay = False

    def __init__(self, delay: float = 0.0, step_seconds: float = 0.05, default_block_size: int = 8) -> None:
        self.name = "demo"
        self.delay = delay
        self.step_seconds = step_seconds
        self.default_block_size = default_block_size
        self.runs = 0

    def prepare(self) -> None:
        pass

    def run(self, prompt: str, options: DecodeOptions, cancel: threading.Event) -> Iterator[Timed]:
        self.runs += 1
        b = options.block_size or self.default_block_size
        sub = max(1, options.sub_blocks if b % options.sub_blocks == 0 else 1)
        seed = options.seed if options.seed is not None else zlib.crc32(prompt.encode())
        rng = random.Random(seed)
        n_blocks = -(-options.max_new_tokens // b)
        forwards, steps, denoise, made, texts = 1, 0, 0, 0, []  # forwards starts at 1: the prefill
        reason = "length"

        def tick() -> float:
            if self.delay:
                time.sleep(self.delay)
            return forwards * self.step_seconds

        for block in range(n_blocks):
            size = min(b, options.max_new_tokens - made)
            tokens = [rng.randrange(len(_WORDS)) for _ in range(size)]
            masked = set(range(1, size))
            # AR step: the first token comes from the previous pass's logits (no extra forward)
            steps += 1
            yield tick(), StepEvent(0, block, steps, [0], [tokens[0]], [_WORDS[tokens[0]]], [1.0],
                                    len(masked), size, 0, ar=True)
            while masked:
                if cancel.is_set():
                    break
                part = b // sub
                current = min(p // part for p in masked)
                window = sorted(p for p in masked if p // part == current)
                conf = {p: rng.random() ** 0.5 for p in window}
                best = max(window, key=conf.__getitem__)
                chosen = sorted({best} | {p for p in window if conf[p] > options.threshold})
                masked -= set(chosen)
                forwards += 1
                denoise += 1
                steps += 1
                yield tick(), StepEvent(0, block, steps, chosen, [tokens[p] for p in chosen],
                                        [_WORDS[tokens[p]] for p in chosen], [round(conf[p], 4) for p in chosen],
                                        len(masked), size, current)
            text = "".join(_WORDS[t] for t in tokens[:size])
            texts.append(text)
            made += size
            yield tick(), BlockEvent(0, block, tokens[:size], text)
            if cancel.is_set():
                reason = "cancelled"
                break
            if made < options.max_new_tokens:
                forwards += 1  # the causal commit pass (the last block needs none)
        seconds = forwards * self.step_seconds
        yield seconds, FinalEvent(
            new_tokens=made, forwards=forwards, tokens_per_forward=round(made / forwards, 4),
            seconds=round(seconds, 4), tokens_per_second=round(made / seconds, 4), finish_reason=reason,
            texts=["".join(texts)], finish_reasons=[reason], steps=denoise, prompt_tokens=len(prompt.split()),
        )
