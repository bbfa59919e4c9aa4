"""Block size 1 lanes, packed: every request's columns in one cache row, so joining prompts share the decode forward.

A `Lane` (nbdiff.serve.lane) gives each request a batch row (left padding, cache surgery to join
and leave) and prefills a joining group in a forward of its own, which every running request
waits for. At block size 1 (plain autoregressive decoding: the server's default for the default
model) requests are packed instead: the cache is a single row holding every request's columns
side by side, and each forward takes what every request needs next - its prompt (after any
cached prefix) when it has just joined, else its last token - as one flat sequence. A mask lets
each token see only its own request's columns, causally, and positions are per request, so a
request decodes as it would alone.

    lane = PackedLane(model, prompts, options, owners, eos_token_ids=eos)
    records = lane.run_block()                       # row -> BlockEvent with its one new token
    lane.admit(prompts, options, owners, prefix)     # rides in the next forward
    lane.release(rows)                               # their columns are dropped

Notable choices:
- A joining prompt costs the tokens it adds to a forward, not a forward: on a CPU a forward's
  fixed cost (reading every weight) is most of a decode step, so a lone prefill of a short prompt
  cost as much as a whole decode step of eight requests.
- Prompt tokens enter at most `prefill_chunk` (256) per forward, so a long prompt that joins
  holds the running requests up by one chunk at a time, not by its whole prefill.
- Leaving copies nothing until dead columns outnumber live ones; then one compaction.
- The cache appends into spare capacity (doubling; `GrowingLayer`), so a step does not copy every
  earlier column, and the lean forward runs its layers in one C++ call over it.
- Attention runs over all packed columns under a mask: cheap at the lengths a CPU server sees,
  and the reason block sizes above 1 (denoising passes with their own masks) keep `Lane`.
- Sampling per row is `Sampler.draw`, as in `Lane.pick` (the row's own generator, one draw per
  token), so a seeded request samples what it would alone.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from nbdiff.decode.context import GrowingLayer, Prefix, cache_kwarg
from nbdiff.decode.events import BlockEvent
from nbdiff.decode.options import DecodeOptions
from nbdiff.decode.sampling import choose
from nbdiff.method.masks import to_model_mask

from nbdiff.serve.lane import _lane_options, _sampler, lane_key


def packs(options: DecodeOptions) -> bool:
    """True for the settings a `PackedLane` decodes (plain autoregressive decoding)."""
    return options.block_size == 1 and not options.exact


class PackedLane:
    """Requests decoded at block size 1 in one packed cache row; `owners[i]` is the caller's handle of row i."""

    mergeable = True  # takes newcomers at every step

    def __init__(self, model, prompts: Sequence[Sequence[int]], options: Sequence[DecodeOptions], owners: list[Any], *,
                 eos_token_ids, prefix: Prefix | None = None, prefill_chunk: int = 256):
        from transformers import DynamicCache

        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.prefill_chunk = prefill_chunk
        self.model, self.device = model, model.device
        self.options = _lane_options(options[0])
        self.key = lane_key(options[0])
        self.eos = set(eos_token_ids or ())
        self.cache = DynamicCache(config=model.config)
        self.cache.layers = [GrowingLayer() for _ in self.cache.layers]
        self._cache_kwarg = cache_kwarg(model)
        self.owner_of = torch.empty(0, dtype=torch.long, device=self.device)  # [columns]: row id, -1 = dead
        self.forwards = 0
        self._next_id = 0
        self.ids: list[int] = []  # per row: its id in owner_of
        self.columns: list[list[int]] = []  # per row: the token of each of its columns, in order
        self.pending: list[list[int]] = []  # per row: tokens the next forward takes
        self.next_pos: list[int] = []
        self.owners: list[Any] = []
        self.limits: list[int] = []
        self.samplers: list = []
        self.produced: list[list[int]] = []
        self.reasons: list[str | None] = []
        self.joined: list[int] = []
        self.admit(prompts, options, owners, prefix)

    # ---- rows ----------------------------------------------------------------------------------

    @property
    def size(self) -> int:
        return len(self.owners)

    @property
    def live(self) -> bool:
        return bool(self.owners)  # rows leave the lists when released: every row left belongs to a request

    def done(self, i: int) -> bool:
        return self.reasons[i] is not None or len(self.produced[i]) >= self.limits[i]

    def forwards_of(self, i: int) -> int:
        return self.forwards - self.joined[i]

    def admit(self, prompts: Sequence[Sequence[int]], options: Sequence[DecodeOptions], owners: list[Any],
              prefix: Prefix | None = None) -> None:
        """Add rows; their prompts (after the cached prefix, whose keys/values become their first columns) ride in the next forward."""
        start = len(prefix.tokens) if prefix is not None else 0
        for prompt, option, owner in zip(prompts, options, owners):
            row = self._next_id
            self._next_id += 1
            if prefix is not None:
                for layer, (k, v) in zip(self.cache.layers, prefix.layers):
                    layer.update(k.to(self.device), v.to(self.device))
                self.owner_of = torch.cat([self.owner_of, torch.full((start,), row, device=self.device)])
            self.ids.append(row)
            self.columns.append(list(prompt[:start]))
            self.pending.append(list(prompt[start:]))
            self.next_pos.append(start)
            self.owners.append(owner)
            self.limits.append(option.max_new_tokens)
            self.samplers.append(_sampler(option, self.device))
            self.produced.append([])
            self.reasons.append(None)
            self.joined.append(self.forwards)

    def release(self, rows: Sequence[int]) -> None:
        """Drop rows at a step boundary: their columns die, and are compacted away once they outnumber the live ones."""
        gone = set(rows)
        if not gone:
            return
        dead = torch.tensor([self.ids[i] for i in gone], device=self.device)
        self.owner_of = torch.where(torch.isin(self.owner_of, dead), -1, self.owner_of)
        keep = [i for i in range(self.size) if i not in gone]
        for name in ("ids", "columns", "pending", "next_pos", "owners", "limits", "samplers", "produced", "reasons", "joined"):
            values = getattr(self, name)
            setattr(self, name, [values[i] for i in keep])
        alive = self.owner_of >= 0
        if 2 * int(alive.sum()) < len(self.owner_of):
            cols = alive.nonzero().squeeze(1)
            for layer in self.cache.layers:
                layer.keep(cols)
            self.owner_of = self.owner_of[cols]

    def row_kv(self, i: int) -> tuple[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]]:
        """Row i's tokens so far with their keys/values ([1, heads, n, dim] per layer): for the prefix cache."""
        cols = (self.owner_of == self.ids[i]).nonzero().squeeze(1)
        return tuple(self.columns[i]), [(l.keys.index_select(2, cols), l.values.index_select(2, cols)) for l in self.cache.layers]

    # ---- one step ------------------------------------------------------------------------------

    def run_block(self) -> dict[int, BlockEvent]:
        """One forward for every row that is not done; a row whose prompt is all in gets one new token.

        Prompt tokens go in at most `prefill_chunk` per forward (the first prompt always gets some),
        so a long prompt that joins delays the running requests by one chunk's forward at a time.
        Returns row -> its record.
        """
        tokens, positions, owner, last, fed, picking = [], [], [], [], [], []
        room = self.prefill_chunk
        for i in range(self.size):
            new = self.pending[i]
            if self.done(i) or not new:
                continue
            take = len(new) if len(new) == 1 else min(len(new), room)
            if take == 0:
                continue
            room -= take if len(new) > 1 else 0
            tokens += new[:take]
            positions += range(self.next_pos[i], self.next_pos[i] + take)
            owner += [self.ids[i]] * take
            fed.append((i, take))
            if take == len(new):
                last.append(len(tokens) - 1)
                picking.append(i)
        if not fed:
            return {}
        logits = self._forward(tokens, positions, owner, last)  # [rows picking, V]
        for i, take in fed:
            self.columns[i] += self.pending[i][:take]
            self.next_pos[i] += take
            self.pending[i] = self.pending[i][take:]
        records = {}
        for i, token in zip(picking, self._pick(logits, picking) if picking else []):
            self.produced[i].append(token)
            if token in self.eos:
                self.reasons[i] = "eos"
            self.pending[i] = [] if self.done(i) else [token]
            records[i] = BlockEvent(seq=i, block=len(self.produced[i]) - 1, tokens=[token], text="", last=self.done(i))
        return records

    @torch.no_grad()
    def _forward(self, tokens: list[int], positions: list[int], owner: list[int], last: list[int]) -> torch.Tensor:
        n = len(tokens)
        new_owner = torch.tensor(owner, device=self.device)
        order = torch.arange(n, device=self.device)
        cached = self.owner_of[None, :] == new_owner[:, None]  # [n, columns]: a token sees its own row's columns
        new = (new_owner[None, :] == new_owner[:, None]) & (order[None, :] <= order[:, None])  # and its own tokens, causally
        mask = to_model_mask(torch.cat([cached, new], dim=1), self.model)
        out = self.model(
            input_ids=torch.tensor([tokens], device=self.device),
            position_ids=torch.tensor([positions], device=self.device),
            attention_mask=mask,
            use_cache=True,
            logits_to_keep=torch.tensor(last, dtype=torch.long, device=self.device),
            **{self._cache_kwarg: self.cache},
        )
        self.forwards += 1
        self.owner_of = torch.cat([self.owner_of, new_owner])
        return out.logits[0]

    def _pick(self, logits: torch.Tensor, rows: list[int]) -> list[int]:
        """Greedy for every row, then each sampling row draws from its own generator (`Sampler.draw`, as `Lane.pick`)."""
        tokens, _ = choose(logits, temperature=0.0, rule=self.options.confidence)
        picked = tokens.tolist()
        for j, i in enumerate(rows):
            s = self.samplers[i]
            if s is not None:
                picked[j] = int(s.draw(logits[j : j + 1], self.options.confidence)[0][0])
        return picked
