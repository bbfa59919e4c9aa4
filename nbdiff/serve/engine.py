"""The serving engine: one thread that decodes every admitted request, block by block, in batches.

    engine = Engine(model, tokenizer, max_batch=8, max_queue=64).start()
    ticket = engine.submit(Job(prompt_ids, options, stop=("\\n\\n",)), sink)   # sink(Delta | Done)
    ticket.cancel()                                                         # the client went away

Loop: admit queued requests (up to `max_batch` rows in all), run one block of every lane
(nbdiff.serve.lane), hand each row's new text to its sink, drop the rows that finished, repeat.
Requests that arrive while others decode join at the next block boundary; a request's decoding
settings pick its lane (requests with another block size or exact mode run beside, not inside).

Notable choices:
- Stop strings are matched on the text, across blocks; text that could be the start of a stop
  string is held back until it is clear, so the stop text is never sent. The usage counts the
  tokens up to the one that completes the stop string.
- A full queue refuses at once (`QueueFull`, with a retry estimate); a request that waits in the
  queue past its time limit gets an error; one that decodes past it ends with what it has
  (finish reason "length", `timed_out`).
- Prompts that begin like a recent prompt or conversation (nbdiff.serve.prefixes) start from its
  cached keys/values and prefill only the rest; `prefix_cache_bytes=0` turns that off.
- Sinks are called from the engine thread and must not block (the web layer hands items to its
  event loop). The library never prints: everything leaves through the sinks and `stats()`.
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

from nbdiff.api import _Text, eos_ids
from nbdiff.decode.completion import first_stop
from nbdiff.decode.options import DecodeOptions
from nbdiff.errors import NBDiffError
from nbdiff.loading import model_settings
from nbdiff.method.masks import attention_implementation

from nbdiff.serve.lane import Lane, lane_key
from nbdiff.serve.packed import PackedLane, packs
from nbdiff.serve.prefixes import PrefixCache, group_by_prefix, usable


@dataclass
class Job:
    """One request as the engine sees it: token ids and fully resolved options."""

    prompt: list[int]
    options: DecodeOptions
    """block_size set; max_new_tokens is the request's budget."""
    stop: tuple[str, ...] = ()
    time_limit: float | None = None
    """Seconds from submission; None = no limit."""


@dataclass
class Delta:
    """New reply text for one request."""

    text: str


@dataclass
class Done:
    """The end of one request (always the last item a sink gets)."""

    finish_reason: str
    """'stop' (EOS or a stop string), 'length' (max tokens or the time limit), 'cancelled', 'error'."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    forwards: int = 0
    """Forward passes this request took part in (its prefill included)."""
    block_size: int = 0
    seconds: float = 0.0
    """From submission to the end."""
    queued_seconds: float = 0.0
    timed_out: bool = False
    error: str | None = None
    """Why the request failed ('error' finish), one line."""

    @property
    def tokens_per_forward(self) -> float:
        return self.completion_tokens / self.forwards if self.forwards else 0.0


class QueueFull(NBDiffError):
    """The queue is full: try again in `retry_after` seconds."""

    def __init__(self, retry_after: int):
        super().__init__("the server is busy: every row and queue place is taken", f"retry in {retry_after} s")
        self.retry_after = retry_after


class Ticket:
    """A submitted request: `cancel()` frees its row (or queue place) at the next block boundary."""

    def __init__(self, engine: "Engine"):
        self._engine = engine
        self.cancelled = threading.Event()

    def cancel(self) -> None:
        self.cancelled.set()
        self._engine._wake()


@dataclass(eq=False)
class _Request:
    """A job in flight: its sink, its text so far and what has been sent."""

    job: Job
    sink: Callable[[object], None]
    ticket: Ticket
    text: _Text
    submitted: float = field(default_factory=time.monotonic)
    admitted: float = 0.0
    sent: int = 0
    tokens: list[int] = field(default_factory=list)
    remember: bool = False
    """Put its prompt in the prefix cache after its first token, and its conversation when it ends."""
    stored: bool = False

    def expired(self, now: float) -> bool:
        return self.job.time_limit is not None and now - self.submitted > self.job.time_limit

    def send(self, item) -> None:
        try:
            self.sink(item)
        except Exception:  # a sink whose client went away must not stop the engine
            self.ticket.cancelled.set()


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of `text` that begins some stop string (not sent until clear)."""
    longest = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:k]):
                longest = k
                break
    return longest


class Engine:
    """Continuous batching over the block decoder. Thread-safe `submit`; decoding on its own thread."""

    def __init__(self, model, tokenizer, *, max_batch: int = 8, max_queue: int = 64, prefix_cache_bytes: int = 512 << 20):
        if max_batch < 1 or max_queue < 0 or prefix_cache_bytes < 0:
            raise NBDiffError(f"max_batch must be >= 1 and max_queue, prefix_cache_bytes >= 0, got {max_batch}, "
                              f"{max_queue} and {prefix_cache_bytes}")
        plain = usable(model)  # full-attention cache layers: prefixes can seed them, requests can be packed
        self.prefixes = PrefixCache(prefix_cache_bytes) if prefix_cache_bytes and plain else None
        self.packing = plain and attention_implementation(model) in ("sdpa", "eager")  # packed lanes need a dense mask
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        settings = model_settings(model)
        self.mask_id = settings.mask_token_id if settings is not None else -1
        self.eos = eos_ids(model, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        eos = set(self.eos)
        self._detokenize = lambda ids: tokenizer.decode([t for t in ids if t not in eos], skip_special_tokens=True)
        self._queue: collections.deque[_Request] = collections.deque()
        self._lanes: list[Lane] = []
        self._cond = threading.Condition()
        self._closed = False
        self._active = 0
        self._served = 0
        self._cancelled = 0
        self._peak = 0
        self._mean_seconds = 1.0
        self._thread: threading.Thread | None = None

    # ---- the caller's side -----------------------------------------------------------------

    def start(self) -> "Engine":
        self._thread = threading.Thread(target=self._loop, name="nbdiff-serve-engine", daemon=True)
        self._thread.start()
        return self

    def close(self, timeout: float = 10.0) -> None:
        """Stop the loop; requests still queued or running end with an error."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, job: Job, sink: Callable[[object], None]) -> Ticket:
        """Queue a job; `sink` gets Delta items and then one Done. Raises QueueFull when full."""
        ticket = Ticket(self)
        request = _Request(job, sink, ticket, _Text(self._detokenize))
        with self._cond:
            if self._closed:
                raise NBDiffError("the server is shutting down", "retry on a running server")
            if len(self._queue) >= self.max_queue + max(0, self.max_batch - self._active):
                raise QueueFull(self.retry_after())
            self._queue.append(request)
            self._cond.notify_all()
        return ticket

    def stats(self) -> dict[str, int]:
        with self._cond:
            cached = self.prefixes.stats() if self.prefixes is not None else {}
            return {"active": self._active, "queued": len(self._queue), "lanes": len(self._lanes),
                    "served": self._served, "cancelled": self._cancelled, "peak_active": self._peak,
                    "max_batch": self.max_batch, "max_queue": self.max_queue,
                    **{f"prefix_cache_{k}": v for k, v in cached.items()}}

    def retry_after(self) -> int:
        """Seconds until a queue place is likely free: the mean request time, at least 1."""
        return max(1, round(self._mean_seconds))

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    # ---- the engine thread -----------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self._queue and not self._lanes:
                    self._cond.wait()
                if self._closed:
                    break
                newcomers = self._take()
            self._admit(newcomers)
            for lane in list(self._lanes):
                self._turn(lane)
        self._shut_down()

    def _take(self) -> list[_Request]:
        """Requests to admit now (called with the lock): FIFO up to the free rows; drop cancelled or expired ones."""
        now = time.monotonic()
        taken = []
        while self._queue and self._active + len(taken) < self.max_batch:
            request = self._queue.popleft()
            if request.ticket.cancelled.is_set():
                request.send(Done("cancelled"))
            elif request.expired(now):
                request.send(Done("error", error=f"the request waited longer than its time limit "
                                                 f"({request.job.time_limit:g} s) for a free row"))
            else:
                taken.append(request)
        for request in list(self._queue):  # ones still waiting may have timed out or gone
            if request.ticket.cancelled.is_set() or request.expired(now):
                self._queue.remove(request)
                request.send(Done("cancelled") if request.ticket.cancelled.is_set() else
                             Done("error", error=f"the request waited longer than its time limit "
                                                 f"({request.job.time_limit:g} s) for a free row"))
        self._active += len(taken)
        self._peak = max(self._peak, self._active)
        return taken

    def _admit(self, newcomers: list[_Request]) -> None:
        """Prefill the newcomers and put them in a lane of their settings (one forward per group)."""
        groups: dict[tuple, list[_Request]] = {}
        for request in newcomers:
            groups.setdefault(lane_key(request.job.options), []).append(request)
        for key, group in groups.items():
            now = time.monotonic()
            for request in group:
                request.admitted = now
            cache = None if group[0].job.options.trained_drafter else self.prefixes  # a drafter reads every column
            for prefix, rows in group_by_prefix([r.job.prompt for r in group], cache):
                self._join([group[i] for i in rows], key, prefix)

    def _join(self, group: list[_Request], key: tuple, prefix) -> None:
        """Add one group (after its cached prefix) to a lane that takes newcomers, or start a lane."""
        lane = next((l for l in self._lanes if l.key == key and l.mergeable), None)
        try:
            if lane is None:
                lane = self._new_lane(group, prefix)
                self._lanes.append(lane)
            else:
                lane.admit([r.job.prompt for r in group], [r.job.options for r in group], group, prefix)
            for request in group:  # later requests may begin like these prompts
                request.remember = self.prefixes is not None and lane.mergeable
        except Exception as exc:  # noqa: BLE001 - the server keeps serving; the requests get the reason
            self._fail(group + ([r for r in lane.owners if r is not None] if lane is not None else []), exc)
            if lane is not None and lane in self._lanes:
                self._lanes.remove(lane)

    def _new_lane(self, group: list[_Request], prefix=None) -> Lane | PackedLane:
        prompts, options = [r.job.prompt for r in group], [r.job.options for r in group]
        if self.packing and packs(options[0]):
            return PackedLane(self.model, prompts, options, list(group), eos_token_ids=self.eos, prefix=prefix)
        return Lane(self.model, prompts, options, list(group), mask_token_id=self.mask_id, eos_token_ids=self.eos,
                    pad_token_id=self.pad_id, prefix=prefix)

    def _turn(self, lane: Lane) -> None:
        """One block of one lane; send the text; drop the rows that are done. A failure fails the lane's requests."""
        try:
            records = lane.run_block()
            now = time.monotonic()
            gone = []
            for i, request in enumerate(lane.owners):
                if request is None:  # a released row of a lane that keeps its rows in place
                    continue
                record = records.get(i)
                done = self._advance(lane, i, request, record.tokens if record else [], now)
                first = done is None and not request.stored and request.tokens  # its prompt is all in
                if request.remember and (first or (done is not None and done.finish_reason != "cancelled")):
                    self.prefixes.store(*lane.row_kv(i))  # its prompt; at its end, the conversation so far
                    request.stored = True
                if done is not None:
                    request.send(done)
                    gone.append(i)
                    self._finished(done)
            lane.release(gone)
        except Exception as exc:  # noqa: BLE001 - the server keeps serving; the requests get the reason
            self._fail([r for r in lane.owners if r is not None], exc)
            lane.owners = []
        if not lane.live:
            self._lanes.remove(lane)

    def _advance(self, lane: Lane, i: int, request: _Request, tokens: list[int], now: float) -> Done | None:
        """Take row i's new tokens: send the text that is clear; a Done when the request ends."""
        if request.ticket.cancelled.is_set():
            return self._done(lane, i, request, "cancelled", now)
        start = len(request.tokens)
        request.tokens += tokens
        finished = lane.done(i)
        request.text.delta(tokens, finished)
        full = request.text.sent
        stops = request.job.stop
        at = first_stop(full, stops) if stops else None
        if at is not None:
            self._send_text(request, full[:at])
            request.tokens = request.tokens[: self._tokens_until(request.tokens, start, stops)]
            return self._done(lane, i, request, "stop", now)
        if finished:
            self._send_text(request, full)
            return self._done(lane, i, request, "stop" if lane.reasons[i] == "eos" else "length", now)
        self._send_text(request, full[: len(full) - _held_back(full, stops)])
        if request.expired(now):
            self._send_text(request, full)
            return self._done(lane, i, request, "length", now, timed_out=True)
        return None

    def _send_text(self, request: _Request, upto: str) -> None:
        if len(upto) > request.sent:
            request.send(Delta(upto[request.sent :]))
            request.sent = len(upto)

    def _tokens_until(self, tokens: list[int], start: int, stops: Sequence[str]) -> int:
        """How many tokens it takes for a stop string to appear (searched from the last block's first)."""
        for k in range(start + 1, len(tokens) + 1):
            if first_stop(self._detokenize(tokens[:k]), stops) is not None:
                return k
        return len(tokens)

    def _done(self, lane: Lane, i: int, request: _Request, reason: str, now: float, timed_out: bool = False) -> Done:
        return Done(reason, prompt_tokens=len(request.job.prompt), completion_tokens=len(request.tokens),
                    forwards=lane.forwards_of(i), block_size=lane.options.block_size,
                    seconds=now - request.submitted, queued_seconds=request.admitted - request.submitted,
                    timed_out=timed_out)

    def _finished(self, done: Done) -> None:
        with self._cond:
            self._active -= 1
            self._served += 1
            self._cancelled += done.finish_reason == "cancelled"
            self._mean_seconds = 0.8 * self._mean_seconds + 0.2 * done.seconds

    def _fail(self, requests: list[_Request], exc: Exception) -> None:
        message = exc.message if isinstance(exc, NBDiffError) else f"{type(exc).__name__}: {exc}"
        for request in dict.fromkeys(requests):  # once each, in order
            request.send(Done("error", prompt_tokens=len(request.job.prompt), error=message))
            self._finished(Done("error"))

    def _shut_down(self) -> None:
        with self._cond:
            waiting = list(self._queue)
            self._queue.clear()
        running = [r for lane in self._lanes for r in lane.owners if r is not None]
        self._lanes = []
        for request in waiting + running:
            request.send(Done("error", error="the server is shutting down"))
