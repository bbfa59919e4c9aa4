"""Self-distillation data: the model answers prompts, and the answers become `nbdiff adapt` data.

    prompts = read_prompts("assets/prompts/distill.jsonl")
    for progress in distill(model, tokenizer, prompts, "data.jsonl", batch_size=16):
        ...                                   # DistillProgress after every batch

Notable choices:
- Output: one chat record per line, `{"messages": [..., {"role": "assistant", "content": reply}],
  "id": ..., "finish": "eos"|"length", "tokens": n}`, the format `nbdiff.adapt.data` reads (only the
  assistant reply is trained).
- Resumable: a prompt's id is a hash of its messages; prompts whose id is already in the output
  are skipped. Records are appended one line per `write` and flushed (and fsynced) after every
  batch; a torn last line from an interrupted run is cut off before appending again.
- Batched, three ways (`backend`): "engine" (the default) hands every prompt to the serving
  engine (nbdiff.serve.engine: continuous batching, block-size-1 requests packed into one forward),
  so a row that ends is refilled at once and no forward is spent on finished rows; "nbdiff" sorts
  prompts by token length (inside windows of 8 batches) and runs each batch as one left-padded
  `nbdiff.api.generate` call at block size 1 (every row waits for the batch's longest reply); "hf"
  is transformers `generate()` on the same batches. Greedy replies are the model's greedy replies in
  all three (tested against `nbdiff.generate` one prompt at a time).
- Replies cut by `max_new_tokens` are kept by default (`keep_truncated`): they are still the
  model's own text, and dropping them would bias the data towards short replies.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from nbdiff.errors import NBDiffError

BACKENDS = ("engine", "nbdiff", "hf")


@dataclass
class Prompt:
    id: str
    messages: list[dict]


@dataclass
class DistillProgress:
    """Where a distillation run stands (yielded after every batch)."""

    done: int
    """Prompts answered in this run so far."""
    todo: int
    """Prompts this run has to answer (skipped ones not counted)."""
    skipped: int
    """Prompts already answered in the output before this run."""
    new_tokens: int
    """Reply tokens generated in this run."""
    seconds: float
    truncated: int = 0
    """Replies cut by max_new_tokens."""

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


def prompt_id(messages: list[dict]) -> str:
    text = json.dumps([[m.get("role"), m.get("content")] for m in messages], ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _as_messages(record, where: str) -> list[dict]:
    if isinstance(record, str):
        return [{"role": "user", "content": record}]
    if isinstance(record, dict):
        if isinstance(record.get("prompt"), str):
            msgs = [{"role": "user", "content": record["prompt"]}]
            if isinstance(record.get("system"), str):
                msgs.insert(0, {"role": "system", "content": record["system"]})
            return msgs
        msgs = record.get("messages")
        if isinstance(msgs, list) and msgs and all(isinstance(m, dict) and "role" in m and "content" in m for m in msgs):
            if msgs[-1]["role"] == "assistant":  # a finished conversation: answer its last user turn again
                msgs = msgs[:-1]
            if msgs and msgs[-1]["role"] == "user":
                return [{"role": m["role"], "content": m["content"]} for m in msgs]
    raise NBDiffError(f"{where}: not a prompt", 'each line should be {"prompt": "..."} or {"messages": [... ending with a user turn]}')


def read_prompts(path: str | Path, limit: int | None = None) -> list[Prompt]:
    """Prompts from a .jsonl file ({"prompt": ...} or {"messages": [...]}) or a text file (one per line).

    Empty lines are skipped; duplicates (same messages) are kept once.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise NBDiffError(f"prompt file {path} does not exist", "pass --prompts FILE (.jsonl or .txt)")
    out: list[Prompt] = []
    seen: set[str] = set()
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            if path.suffix == ".jsonl":
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    raise NBDiffError(f"{path}:{n}: not valid JSON", "one JSON object per line") from None
            else:
                record = line
            messages = _as_messages(record, f"{path}:{n}")
            key = prompt_id(messages)
            if key not in seen:
                seen.add(key)
                out.append(Prompt(key, messages))
            if limit is not None and len(out) >= limit:
                break
    if not out:
        raise NBDiffError(f"{path} has no prompts", "write one prompt per line")
    return out


def answered_ids(out: str | Path) -> set[str]:
    """Ids of the prompts already answered in an output file (a torn last line is ignored)."""
    path = Path(out)
    ids: set[str] = set()
    if not path.is_file():
        return ids
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and isinstance(record.get("id"), str):
                ids.add(record["id"])
    return ids


def _cut_torn_line(path: Path) -> None:
    """Drop an unfinished last line (an interrupted write) so the next append starts clean."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        data_end = size
        step = 1 << 16
        while data_end > 0:  # find the last newline from the end
            start = max(0, data_end - step)
            f.seek(start)
            chunk = f.read(data_end - start)
            i = chunk.rfind(b"\n")
            if i >= 0:
                f.truncate(start + i + 1)
                return
            data_end = start
        f.truncate(0)


def _generate_batch(model, tokenizer, batch: list[Prompt], backend: str, temperature: float,
                    max_new_tokens: int, seed: int | None) -> list[tuple[list[int], str]]:
    """(reply token ids without EOS, finish reason) per prompt."""
    from nbdiff.api import encode, eos_ids, generate

    if backend == "nbdiff":
        _, final = generate(model, tokenizer, [p.messages for p in batch], block_size=1, temperature=temperature,
                            max_new_tokens=max_new_tokens, seed=seed)
        eos = set(eos_ids(model, tokenizer))
        replies = []
        for ids, reason in zip(final.tokens, final.finish_reasons or [final.finish_reason] * len(batch)):
            ids = [t for t in ids]
            while ids and ids[-1] in eos:
                ids.pop()
            replies.append((ids, reason))
        return replies
    # transformers generate(): left-padded batch, same stopping ids
    prompts = [encode(tokenizer, p.messages) for p in batch]
    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=model.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=model.device)
    eos = eos_ids(model, tokenizer)
    kwargs = dict(max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad)
    if temperature > 0:
        if seed is not None:
            torch.manual_seed(seed)
        kwargs.update(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
    else:
        kwargs.update(do_sample=False, temperature=None, top_k=None, top_p=None)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    replies = []
    for row in out[:, width:].tolist():
        cut = next((i for i, t in enumerate(row) if t in eos), None)
        replies.append((row[:cut], "eos") if cut is not None else (row, "length"))
    return replies


def _engine_replies(model, tokenizer, todo: list[Prompt], batch_size: int, temperature: float,
                    max_new_tokens: int, seed: int | None,
                    deadline: float | None = None) -> Iterator[tuple[Prompt, str, int, str]]:
    """(prompt, reply text, reply tokens without EOS, finish reason) in the order replies end, from the engine.

    The engine keeps `batch_size` rows decoding and admits the next prompt as soon as a row ends
    (prompts are handed over a batch ahead). After `deadline` (time.monotonic()) no prompt is handed
    over any more (the first batch always is) and the rows still decoding finish. Prompt i samples with seed + i (its own
    generator, as alone). The engine hands out text (what it sends a client): the text `generate()` decodes.
    """
    import queue

    from nbdiff.api import encode
    from nbdiff.decode.options import DecodeOptions
    from nbdiff.serve.engine import Delta, Done, Engine, Job

    ended: queue.Queue = queue.Queue()
    engine = Engine(model, tokenizer, max_batch=batch_size, max_queue=batch_size, prefix_cache_bytes=64 << 20)
    engine.start()

    def submit(i: int, prompt: Prompt) -> None:
        options = DecodeOptions(block_size=1, temperature=temperature, max_new_tokens=max_new_tokens,
                                seed=None if seed is None else seed + i)
        parts: list[str] = []

        def sink(item):  # called on the engine's thread
            if isinstance(item, Delta):
                parts.append(item.text)
            elif isinstance(item, Done):
                ended.put((prompt, "".join(parts), item))

        engine.submit(Job(encode(tokenizer, prompt.messages), options), sink)

    try:
        waiting, in_flight, started = iter(enumerate(todo)), 0, 0
        while True:  # the first batch always starts, so every run makes progress
            while in_flight < 2 * batch_size and (deadline is None or time.monotonic() < deadline
                                                  or started < batch_size):
                nxt = next(waiting, None)
                if nxt is None:
                    break
                submit(*nxt)
                in_flight, started = in_flight + 1, started + 1
            if not in_flight:
                break
            prompt, text, done = ended.get()
            in_flight -= 1
            if done.finish_reason not in ("stop", "length"):
                raise NBDiffError(f"decoding failed: {done.error or done.finish_reason}")
            reason = "eos" if done.finish_reason == "stop" else "length"
            # completion_tokens counts the EOS that ended the reply; the record counts reply tokens
            yield prompt, text, done.completion_tokens - (reason == "eos"), reason
    finally:
        engine.close()


def distill(
    model,
    tokenizer,
    prompts: list[Prompt],
    out: str | Path,
    *,
    temperature: float = 0.0,
    max_new_tokens: int = 256,
    batch_size: int = 16,
    seed: int | None = 0,
    backend: str = "engine",
    keep_truncated: bool = True,
    time_limit: float = 0.0,
) -> Iterator[DistillProgress]:
    """Answer every prompt not yet in `out` and append the chat records; yields progress per batch.

    `time_limit` (minutes, engine backend, 0 = none): no new prompt starts after it; the rows
    decoding then finish and are written, so a run in time-boxed chunks loses no reply half-made.
    """
    from nbdiff.api import encode

    if backend not in BACKENDS:
        raise NBDiffError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if batch_size < 1:
        raise NBDiffError(f"--batch-size must be >= 1, got {batch_size}")
    if max_new_tokens < 1:
        raise NBDiffError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    path = Path(out).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    _cut_torn_line(path)
    done_ids = answered_ids(path)
    todo = [p for p in prompts if p.id not in done_ids]
    skipped = len(prompts) - len(todo)
    # sort by prompt length inside windows of 8 batches: a batch pads little, and a run stopped
    # early has answered a sample of the file's order, not only its shortest prompts
    lengths = {p.id: len(encode(tokenizer, p.messages)) for p in todo}
    window = batch_size * 8
    todo = [p for w in range(0, len(todo), window) for p in sorted(todo[w : w + window], key=lambda p: lengths[p.id])]
    progress = DistillProgress(done=0, todo=len(todo), skipped=skipped, new_tokens=0, seconds=0.0)
    start = time.perf_counter()
    yield progress
    if backend == "engine":
        deadline = time.monotonic() + 60 * time_limit if time_limit > 0 else None
        yield from _distill_engine(model, tokenizer, todo, path, progress, start, temperature=temperature,
                                   max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed,
                                   keep_truncated=keep_truncated, deadline=deadline)
        return
    with open(path, "a", encoding="utf-8") as f:
        for i in range(0, len(todo), batch_size):
            batch = todo[i : i + batch_size]
            batch_seed = None if seed is None else seed + i
            replies = _generate_batch(model, tokenizer, batch, backend, temperature, max_new_tokens, batch_seed)
            for prompt, (ids, reason) in zip(batch, replies):
                progress.new_tokens += len(ids)
                if reason == "length":
                    progress.truncated += 1
                    if not keep_truncated:
                        continue
                text = tokenizer.decode(ids, skip_special_tokens=True)
                f.write(_record(prompt, text, len(ids), reason))
            f.flush()
            os.fsync(f.fileno())
            progress.done += len(batch)
            progress.seconds = time.perf_counter() - start
            yield progress


def _record(prompt: Prompt, text: str, tokens: int, reason: str) -> str:
    record = {"messages": prompt.messages + [{"role": "assistant", "content": text}], "id": prompt.id,
              "finish": reason, "tokens": tokens}
    return json.dumps(record, ensure_ascii=False) + "\n"


def _distill_engine(model, tokenizer, todo: list[Prompt], path: Path, progress: DistillProgress, start: float, *,
                    temperature: float, max_new_tokens: int, batch_size: int, seed: int | None,
                    keep_truncated: bool, deadline: float | None) -> Iterator[DistillProgress]:
    """The engine backend: each record appended, flushed and fsynced as its reply ends."""
    with open(path, "a", encoding="utf-8") as f:
        for n, (prompt, text, tokens, reason) in enumerate(
                _engine_replies(model, tokenizer, todo, batch_size, temperature, max_new_tokens, seed, deadline), 1):
            progress.new_tokens += tokens
            if reason == "length":
                progress.truncated += 1
            if reason != "length" or keep_truncated:
                f.write(_record(prompt, text, tokens, reason))
            progress.done += 1
            f.flush()
            os.fsync(f.fileno())
            progress.seconds = time.perf_counter() - start
            yield progress
