"""The committed context of a decoding batch: the KV cache, the position of every column, the masks.

Columns: every row has `pad[i]` pad columns, then its prompt, then its blocks; `length` is the number
of columns in the cache. Every row shares the columns, so a batch runs as one tensor.

Notable choices:
- The cache only ever holds causally computed (= AR) keys/values: a denoising pass appends the
  block's keys/values and crops them right after.
- Causal passes (prefill, commit, verification) hand the model no mask at all while no column is
  hidden, so its own causal attention (and its fast kernels) runs. Hidden columns are left padding
  and, in exact mode with a batch, drafts one row rejected while another kept them; then the mask
  is built for the new rows only (`masks.cached_rows`, O(n * length)), on the model's device.
- Positions are per row (`next_pos`): a hidden column takes no position, so a row that rejected
  part of a block continues exactly where its accepted tokens end.
- The same context can serve the next prompt (chat): `restart` keeps the longest cached prefix
  the new prompt shares and `prefill` forwards only the rest (batch size 1). `ids` lists exactly the
  columns the cache holds, each computed by a causal pass: a block's denoising columns are cropped
  right after, rejected drafts leave with `keep_last`, and a reply's last block is listed only where
  a pass computed it (exact mode's verification; never after the last denoised block or the AR
  step's last token): the next prompt forwards the rest as prompt tokens. A
  sliding-window layer past its window cannot drop columns: such a cache starts again.
- A batch whose prompts all begin with the same tokens can start from their keys/values computed
  earlier (`Prefix`, the server's prefix cache): those columns come first, shared by every row, and
  each row's padding sits between them and the rest of its prompt (`gap`).
- A trained drafter (nbdiff.drafter.decoding) sets `keep_hidden_states`: every pass then keeps the
  AR hidden states and positions of its columns, and the drafter's own cache, one column per column
  here, is a `follower` cropped whenever this cache is.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Sequence

import torch
from transformers.cache_utils import DynamicLayer

from nbdiff.errors import NBDiffError
from nbdiff.method.masks import cached_rows, to_model_mask


class GrowingLayer(DynamicLayer):
    """A full-attention cache layer that appends into spare room (doubling) instead of concatenating.

    `keys`/`values` are views of the first columns of the room ([B, heads, capacity, dim]), so an
    append writes only the new columns; a crop (DynamicLayer.crop) shortens the view and the next
    append overwrites what was cropped. Whoever keeps a layer's keys/values past a crop must copy
    them (the prefix cache's `index_select` does). Anything that puts other tensors in `keys`/`values`
    (row surgery, index selects) is noticed at the next append, which starts a new room from them.
    The lean forward's decoder layers (nbdiff.cpu_kernel.fast_forward) write into the room in C++.
    """

    _room: tuple[torch.Tensor, torch.Tensor] | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._room = None

    def _holds(self) -> bool:
        """Whether keys/values are still the first columns of the room."""
        if self._room is None:
            return False
        for t, room in zip((self.keys, self.values), self._room):
            if (t.dim() != 4 or t.data_ptr() != room.data_ptr() or t.stride() != room.stride()
                    or t.shape[:2] != room.shape[:2] or t.shape[-1] != room.shape[-1]):
                return False
        return True

    def reserve(self, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Room for these new columns: (key room, value room, columns used), the rooms holding at least used + n."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        used, n = self.get_seq_length(), key_states.shape[-2]
        if not self._holds() or used + n > self._room[0].shape[-2]:
            self._grow(key_states, value_states, used, used + n)
        return self._room[0], self._room[1], used

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        k, v, used = self.reserve(key_states, value_states)
        n = key_states.shape[-2]
        k[:, :, used : used + n] = key_states
        v[:, :, used : used + n] = value_states
        self.keys, self.values = k[:, :, : used + n], v[:, :, : used + n]
        return self.keys, self.values

    def _grow(self, key_states: torch.Tensor, value_states: torch.Tensor, used: int, need: int) -> None:
        room = max(256, 2 * need)
        k = key_states.new_empty(*key_states.shape[:2], room, key_states.shape[-1])
        v = value_states.new_empty(*value_states.shape[:2], room, value_states.shape[-1])
        if used:
            k[:, :, :used] = self.keys
            v[:, :, :used] = self.values
        self._room = (k, v)
        self.keys, self.values = k[:, :, :used], v[:, :, :used]

    def keep(self, cols: torch.Tensor) -> None:
        """Keep only these columns (in order)."""
        if not self.is_initialized:
            return
        keys, values = self.keys.index_select(2, cols), self.values.index_select(2, cols)
        self._room = None
        self.keys = self.values = torch.tensor([], dtype=keys.dtype, device=keys.device)
        if len(cols):
            self.update(keys, values)


def growing_cache(config):
    """A DynamicCache for `config` whose full-attention layers are `GrowingLayer`s (sliding ones stay)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=config)
    cache.layers = [GrowingLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


def cache_kwarg(model) -> str:
    """The name of the model's cache argument: transformers renamed `past_key_values` to `cache` in 5.x."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@dataclass
class Prefix:
    """Keys/values of the first tokens of a prompt, computed earlier: one [1, heads, n, dim] pair per layer."""

    tokens: tuple[int, ...]
    layers: list[tuple[torch.Tensor, torch.Tensor]]

    @property
    def nbytes(self) -> int:
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self.layers)


class CachedContext:
    """A DynamicCache plus the bookkeeping for left padding, hidden columns and per-row positions."""

    def __init__(self, model, prompts: Sequence[Sequence[int]], pad_token_id: int = 0, prefix: Prefix | None = None):
        self.model = model
        self.device = model.device
        self.pad_token_id = pad_token_id
        self.cache = growing_cache(model.config)
        self.length = 0
        self.forwards = 0
        self.ids: list[list[int]] = []  # token id of every cached column, per row (host)
        # a trained drafter reads the AR hidden states of every causal pass and keeps a cache of its own,
        # column for column with this one (nbdiff.drafter.decoding): it is cropped with this cache
        self.keep_hidden_states = False
        self.hidden_states = None  # the last pass's hidden states (embeddings first), when kept
        self.last_positions: torch.Tensor | None = None  # [B, n] positions of the last pass's columns
        self.followers: dict = {}  # key -> object with .length and .crop(length)
        self._cache_kwarg = cache_kwarg(model)
        self.restart(prompts, prefix)

    def restart(self, prompts: Sequence[Sequence[int]], prefix: Prefix | None = None) -> None:
        """Take new prompts. A single prompt keeps the cached columns it starts with (chat's next turn).

        prefix: keys/values of tokens every prompt begins with (and goes on past); they become the
        first columns of every row and `prefill` forwards only the rest.
        """
        if not prompts or any(len(p) == 0 for p in prompts):
            raise NBDiffError("every prompt needs at least one token", "pass a non-empty prompt")
        gap = len(prefix.tokens) if prefix is not None else 0
        if gap and any(len(p) <= gap or tuple(p[:gap]) != prefix.tokens for p in prompts):
            raise NBDiffError("a cached prefix must begin every prompt and leave at least one token after it")
        width = max(len(p) for p in prompts)
        pads = [width - len(p) for p in prompts]
        rows = [list(p[:gap]) + [self.pad_token_id] * pad + list(p[gap:]) for pad, p in zip(pads, prompts)]
        self.gap = gap  # pad columns sit after the shared prefix: [gap, gap + pad)
        keep = 0
        if gap:
            self._load(prefix, len(rows))
            keep = gap
        elif self.length and len(rows) == 1 and len(self.ids) == 1:
            old = self.ids[0]
            cached = min(len(old), self.cache.get_seq_length())  # a listed token is reused only with its keys/values
            while keep < min(cached, width - 1) and old[keep] == rows[0][keep]:
                keep += 1  # at least one prompt token is forwarded again: its logits start the reply
            if keep < self.cache.get_seq_length() and not self._croppable():
                keep = 0  # a sliding-window layer past its window cannot go back: compute the prompt again
                self._new_cache()
        self._crop_to(keep)
        self.length = keep
        self.reused = keep
        self.ids = [row[:keep] for row in rows]
        self.pad = torch.tensor(pads, device=self.device)  # [B]
        self.prompt_ids = torch.tensor(rows, dtype=torch.long, device=self.device)  # [B, P]
        self.hidden = self._pad_columns(torch.arange(keep, device=self.device))  # [B, length]
        self.any_hidden = any(pads)  # known on the host: no device sync to decide the mask path
        # [B] next column's position: after a shared prefix every row has `gap` visible columns
        self.next_pos = torch.full_like(self.pad, gap) if gap else (torch.full_like(self.pad, keep) - self.pad).clamp_(min=0)

    def _pad_columns(self, cols: torch.Tensor) -> torch.Tensor:
        """[B, n]: which of these columns are a row's padding."""
        return (cols[None] >= self.gap) & (cols[None] < self.gap + self.pad[:, None])

    def _croppable(self) -> bool:
        """Whether every cache layer can drop its last columns (a sliding-window layer past its window cannot)."""
        return not any(getattr(layer, "is_sliding", False) and layer.get_seq_length() >= layer.sliding_window
                       for layer in getattr(self.cache, "layers", []))

    def _new_cache(self) -> None:
        """An empty cache (and no followers' columns)."""
        self.cache = growing_cache(self.model.config)
        for follower in self.followers.values():
            follower.crop(0)

    def _load(self, prefix: Prefix, rows: int) -> None:
        """Start a new cache from a prefix's keys/values, the same for every row."""
        self._new_cache()
        for i, (k, v) in enumerate(prefix.layers):
            k, v = k.to(self.device), v.to(self.device)
            self.cache.update(k.expand(rows, -1, -1, -1).contiguous(), v.expand(rows, -1, -1, -1).contiguous(), i)

    def _crop_to(self, length: int) -> None:
        extra = self.cache.get_seq_length() - length
        if extra > 0:
            self.cache.crop(-extra)  # transformers 5 takes the number of columns to drop
        for follower in self.followers.values():
            if follower.length > length:
                follower.crop(length)

    def forget(self) -> None:
        """Before prefill: drop the columns `restart` kept, so the prefill computes the whole prompt."""
        self._crop_to(0)
        self.length = self.reused = 0
        self.ids = [[] for _ in self.ids]
        self.hidden = self.hidden[:, :0]

    @property
    def batch_size(self) -> int:
        return self.prompt_ids.shape[0]

    def _positions(self, n: int) -> torch.Tensor:
        return self.next_pos[:, None] + torch.arange(n, device=self.device)[None]  # [B, n]

    def _mask(self, n: int, causal: bool, hidden_new: torch.Tensor | None = None):
        """The model mask for n new columns, or None where the model's own causal attention is exact."""
        if causal and not self.any_hidden:
            return None
        if hidden_new is None:
            hidden_new = torch.zeros(self.batch_size, n, dtype=torch.bool, device=self.device)
        hidden = torch.cat([self.hidden, hidden_new], dim=1)  # [B, length + n]
        return to_model_mask(cached_rows(hidden, self.length, causal), self.model)

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, mask, keep) -> torch.Tensor:
        extra = {"output_hidden_states": True} if self.keep_hidden_states else {}
        out = self.model(
            input_ids=ids,
            position_ids=positions,
            attention_mask=mask,
            use_cache=True,
            logits_to_keep=keep,
            **{self._cache_kwarg: self.cache},
            **extra,
        )
        self.forwards += 1
        if self.keep_hidden_states:
            self.hidden_states, self.last_positions = out.hidden_states, positions
        return out.logits

    @torch.no_grad()
    def prefill(self) -> torch.Tensor:
        """Causal forward of the prompt columns not cached yet. Returns the last logits [B, V]."""
        width = self.prompt_ids.shape[1]
        ids = self.prompt_ids[:, self.length :]  # [B, new]
        cols = torch.arange(self.length, width, device=self.device)
        past_pad = cols[None] >= self.gap + self.pad[:, None]  # [B, new]
        positions = torch.where(past_pad, cols[None] - self.pad[:, None], cols[None] * (cols[None] < self.gap))  # pad: 0
        hidden_new = self._pad_columns(cols)  # [B, new]
        logits = self._forward(ids, positions, self._mask(ids.shape[1], True, hidden_new), 1)  # [B, 1, V]
        self._append(ids, hidden_new)
        self.next_pos = width - self.pad
        return logits[:, -1]

    def _append(self, ids: torch.Tensor, hidden_new: torch.Tensor) -> None:
        self.hidden = torch.cat([self.hidden, hidden_new], dim=1)
        self.length += ids.shape[1]
        for row, new in zip(self.ids, ids.tolist()):
            row.extend(new)

    @torch.no_grad()
    def block_logits(self, block: torch.Tensor, keep: torch.Tensor | int = 0, rows=None) -> torch.Tensor:
        """Denoising forward of the active block [B, n]; the cache is left as it was.

        keep: 0 = logits at every block offset, or block offsets [s] / [B, s] to keep.
        rows: the mask from `denoise_rows(n)` (build it once per block and pass it to every step).
        Returns logits [B, n or s, V]; logits at offset j predict the token at offset j + 1.
        """
        n = block.shape[1]
        if rows is None:
            rows = self.denoise_rows(n)
        try:
            return self._forward(block, self._positions(n), rows, keep)
        finally:
            self._crop_to(self.length)  # drop the block's keys/values: they were not computed causally

    def denoise_rows(self, n: int):
        """The model mask of a denoising pass: cached columns visible unless hidden, the block bidirectional."""
        return self._mask(n, causal=False)

    @torch.no_grad()
    def causal(self, block: torch.Tensor, keep: int = 1) -> torch.Tensor:
        """Causal forward of a block [B, n] that stores its keys/values. Returns logits [B, keep or n, V]."""
        n = block.shape[1]
        logits = self._forward(block, self._positions(n), self._mask(n, True), keep)
        self._append(block, torch.zeros(block.shape, dtype=torch.bool, device=self.device))
        self.next_pos = self.next_pos + n
        return logits

    def commit(self, block: torch.Tensor) -> torch.Tensor:
        """Causal forward of a finished block [B, n] that stores its keys/values. Returns last logits [B, V]."""
        return self.causal(block, 1)[:, -1]

    def keep_last(self, n: int, kept: Sequence[int]) -> None:
        """After a causal pass of n columns, keep the first kept[i] of them for row i (exact mode).

        Columns no row keeps leave the cache; the others are hidden from the rows that rejected them.
        """
        most = max(kept)
        if most < n:
            self.length -= n - most
            self._crop_to(self.length)
            self.hidden = self.hidden[:, : self.length]
            for row in self.ids:
                del row[self.length :]
        start = self.length - most
        if any(k < most for k in kept):
            cols = torch.arange(most, device=self.device)
            dropped = cols[None] >= torch.tensor(kept, device=self.device)[:, None]  # [B, most]
            self.hidden[:, start:] |= dropped
            self.any_hidden = True
        self.next_pos = self.next_pos - torch.tensor([n - k for k in kept], device=self.device)
