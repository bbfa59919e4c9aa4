"""The server's prefix cache: keys/values of recent prompts and replies, so a request that begins the
same way (the chat template's system prompt, the next turn of a conversation) prefills only what is new.

    cache = PrefixCache(max_bytes=512 << 20)
    prefix = cache.lookup(prompt_ids)   # the longest cached start of the prompt, or None
    lane = Lane(..., prefix=prefix)     # its rows start from those keys/values (CachedContext)
    cache.store(*lane.row_kv(row))      # after its first step, and when a request ends (prompt + reply)

Notable choices:
- An entry is one row's visible columns: tokens at consecutive positions from 0, each key/value
  computed causally from the tokens before it, which is all a later prompt needs to reuse a start
  of it. Hidden columns (padding, rejected drafts) are left out.
- An entry that is the start of another is dropped (the longer one answers for both); least
  recently used entries go first when the byte budget or the entry count is reached.
- A reused prefix leaves at least one prompt token to forward: its logits start the reply.
- Reused keys/values were computed in another batch, so they can differ from a fresh prefill's in
  the last bits (as rows of different batch sizes already do); greedy replies stay the same text in
  practice, and the serve tests check it with the cache on.
- Only for plain full-attention caches (sliding-window layers and a trained drafter's own cache
  need every column computed in place): `usable` says so.
"""

from __future__ import annotations

import collections
from typing import Sequence

import torch

from nbdiff.decode.context import Prefix
from nbdiff.serve.rows import plain_cache


def usable(model) -> bool:
    """True when the model's cache is plain full-attention layers (a prefix can seed it)."""
    from transformers import DynamicCache

    return plain_cache(DynamicCache(config=model.config))


def _common(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class PrefixCache:
    """Keys/values of recent token sequences, least recently used first out."""

    def __init__(self, max_bytes: int, *, min_tokens: int = 4, max_entries: int = 256):
        self.max_bytes, self.min_tokens, self.max_entries = max_bytes, min_tokens, max_entries
        self.entries: collections.OrderedDict[tuple[int, ...], Prefix] = collections.OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.reused_tokens = 0

    def lookup(self, prompt: Sequence[int]) -> Prefix | None:
        """The longest cached start of `prompt` (at least `min_tokens`, at most all but its last token)."""
        best, length = None, 0
        for key in self.entries:
            n = min(_common(key, prompt), len(prompt) - 1)
            if n > length:
                best, length = key, n
        if best is None or length < self.min_tokens:
            return None
        self.entries.move_to_end(best)
        self.hits += 1
        self.reused_tokens += length
        entry = self.entries[best]
        return Prefix(tuple(prompt[:length]), [(k[:, :, :length], v[:, :, :length]) for k, v in entry.layers])

    def store(self, tokens: tuple[int, ...], layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Keep a row's tokens and their keys/values ([1, heads, n, dim] per layer; `Lane.row_kv`)."""
        if len(tokens) < self.min_tokens:
            return
        for key in self.entries:
            if len(key) >= len(tokens) and key[: len(tokens)] == tokens:  # already held
                self.entries.move_to_end(key)
                return
        for key in [k for k in self.entries if tokens[: len(k)] == k]:  # starts of this one
            self._drop(key)
        entry = Prefix(tokens, layers)
        if entry.nbytes > self.max_bytes:
            return
        self.entries[tokens] = entry
        self.bytes += entry.nbytes
        while self.bytes > self.max_bytes or len(self.entries) > self.max_entries:
            self._drop(next(iter(self.entries)))

    def _drop(self, key: tuple[int, ...]) -> None:
        self.bytes -= self.entries.pop(key).nbytes

    def stats(self) -> dict[str, int]:
        return {"entries": len(self.entries), "bytes": self.bytes, "hits": self.hits, "reused_tokens": self.reused_tokens}


def group_by_prefix(prompts: Sequence[Sequence[int]], cache: PrefixCache | None) -> list[tuple[Prefix | None, list[int]]]:
    """Split requests (by index) into groups that share one cached prefix (None: prefill in full)."""
    groups: dict[tuple[int, ...] | None, tuple[Prefix | None, list[int]]] = {}
    for i, prompt in enumerate(prompts):
        prefix = cache.lookup(prompt) if cache is not None else None
        key = prefix.tokens if prefix is not None else None
        groups.setdefault(key, (prefix, []))[1].append(i)
    return list(groups.values())

