"""A lane: one running decoding batch whose rows come and go at block boundaries.

`Lane` is the decoder's `Decoding` (nbdiff.decode.decoder) with rows that change: `run_block` is
one turn of `decode()`'s loop, `admit` prefills a group of new prompts and merges them into the
batch (nbdiff.serve.rows), `release` drops rows. Everything inside a block (the AR step, the
denoising steps, the commit or verification pass, the EOS rule) is the decoder's own code, so a
row decodes as it would alone.

What is per row here, and per batch in `decode()`:
- the token budget (`limits`: a request's max_tokens);
- sampling (temperature, top-k, top-p and a generator seeded by the request's seed). A row draws
  from its own generator only at the steps where it has something open, as it would alone. Exact
  mode verifies with the lane's sampling settings, so requests in exact mode that sample only share
  a lane with requests of the same settings (see `lane_key`).
Everything else (block size, threshold, exact mode, ...) is the lane's: requests that differ there
run in different lanes.

Notable choices:
- A row in its last block may have fewer tokens left than the block is wide (the others have
  more): the offsets past its budget are hidden from its denoising queries, so it sees the block
  it would have had alone.
- A lane whose cache cannot be merged (sliding-window layers, a trained drafter's own cache) takes
  no newcomers and keeps finished rows in place as done rows until all are done; the engine runs
  such lanes side by side.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Sequence

import torch

from nbdiff.decode.context import CachedContext, Prefix
from nbdiff.decode.decoder import Decoding
from nbdiff.decode.events import BlockEvent
from nbdiff.decode.options import DecodeOptions
from nbdiff.decode.sampling import choose

from nbdiff.serve.rows import can_merge, merge, select

PER_ROW = ("max_new_tokens", "seed", "temperature", "top_k", "top_p")


@dataclass
class Sampler:
    """A row's own sampling settings (None in a lane's list = greedy)."""

    temperature: float
    top_k: int
    top_p: float
    generator: torch.Generator

    def draw(self, logits: torch.Tensor, rule: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens and confidences for logits [N, V], from this row's own generator (one draw per call)."""
        return choose(logits, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, rule=rule,
                      generator=self.generator)


def lane_key(options: DecodeOptions) -> tuple:
    """Requests with equal keys can share a batch."""
    shared = [f for f in DecodeOptions.field_names() if f not in PER_ROW]
    key = tuple(getattr(options, f) for f in shared)
    if options.exact and options.temperature > 0:  # verification samples with the lane's settings
        key += (options.temperature, options.top_k, options.top_p, options.seed)
    return key


def _lane_options(options: DecodeOptions) -> DecodeOptions:
    """The lane's DecodeOptions: shared fields of the first request; sampling per row unless exact."""
    if options.exact and options.temperature > 0:
        return replace(options, max_new_tokens=1 << 30)
    return replace(options, max_new_tokens=1 << 30, seed=0, temperature=0.0, top_k=0, top_p=1.0)


def _sampler(options: DecodeOptions, device) -> Sampler | None:
    if options.temperature == 0 or options.exact:
        return None
    generator = torch.Generator(device=device)
    if options.seed is not None:
        generator.manual_seed(options.seed)
    else:
        generator.seed()
    return Sampler(options.temperature, options.top_k, options.top_p, generator)


class Lane(Decoding):
    """A batch of rows sharing block columns; `owners[i]` is whatever the caller attached to row i."""

    def __init__(self, model, prompts: Sequence[Sequence[int]], options: Sequence[DecodeOptions], owners: list[Any], *,
                 mask_token_id: int, eos_token_ids, pad_token_id: int, prefix: Prefix | None = None):
        super().__init__(model, prompts, _lane_options(options[0]), mask_token_id=mask_token_id,
                         eos_token_ids=eos_token_ids, pad_token_id=pad_token_id, cancel=None, context=None,
                         prefix=prefix)  # every prompt begins with the prefix's cached tokens: prefill only the rest
        self.key = lane_key(options[0])
        self.limits = [o.max_new_tokens for o in options]
        self.samplers = [_sampler(o, self.ctx.device) for o in options]
        self.owners = list(owners)
        self.block: Any = None  # the open block while one is being decoded
        self.last_logits = self.ctx.prefill()  # [B, V]
        self.joined = [0] * len(owners)  # ctx.forwards when each row joined (its prefill counted apart)
        self.mergeable = can_merge(self.ctx) and self.trained is None

    # ---- per-row budget and sampling -------------------------------------------------------

    def done(self, i: int) -> bool:
        return self.reasons[i] is not None or len(self.produced[i]) >= self.limits[i]

    def remaining(self, i: int) -> int:
        return 0 if self.done(i) else self.limits[i] - len(self.produced[i])

    def open_block(self, width, first, first_conf):
        block, events = super().open_block(width, first, first_conf)
        short = False
        for i in range(len(first)):  # the lane's budget is unbounded: apply each row's own
            if 0 < self.remaining(i) < block.limit[i]:
                block.limit[i] = self.remaining(i)
                block.filled[i, block.limit[i]:] = True
                short = short or block.limit[i] < width
        if short and width > 1:
            # A row in its last, shorter block must not see the offsets past its budget (alone, its
            # block would end there): hide them from its denoising queries.
            past = torch.arange(width)[None] >= torch.tensor(block.limit)[:, None]  # [B, width]
            block.rows = self.ctx._mask(width, causal=False, hidden_new=past.to(self.ctx.device))
        self.block = block
        return block, events

    def pick(self, logits: torch.Tensor, greedy: bool = False):
        tokens, conf = super().pick(logits, greedy)  # the lane's settings: greedy unless exact sampling
        if greedy:
            return tokens, conf
        for i, s in enumerate(self.samplers):
            if s is None or (self.block is not None and not bool((~self.block.filled[i]).any())):
                continue  # greedy row, or nothing open in its block: no draw (as when it runs alone)
            t, c = s.draw(logits[i].reshape(-1, logits.shape[-1]), self.options.confidence)
            tokens[i], conf[i] = t.reshape(tokens.shape[1:]), c.reshape(conf.shape[1:])
        return tokens, conf

    # ---- one block -------------------------------------------------------------------------

    def run_block(self) -> dict[int, BlockEvent]:
        """Decode one block for every row (one turn of decode()'s loop). Returns row -> its BlockEvent."""
        o = self.options
        first, first_conf = self.first_tokens()
        width = min(o.block_size, max(self.remaining(i) for i in range(len(first))))
        drafts = self.drafts(first, width)
        if drafts is not None:
            width = 1 + max(len(d) for d in drafts[0])
        block, _ = self.open_block(width, first, first_conf)
        steps = self.apply_drafts(block, *drafts) if drafts is not None else \
            self.denoise(block, o.draft_steps if o.exact else None)
        for _ in steps:  # the step records are for viewers; a server sends text per block
            pass
        records = {e.seq: e for e in (self.verify(block) if o.exact else self.finish(block))}
        self.block = None
        return records

    # ---- rows coming and going -------------------------------------------------------------

    @property
    def size(self) -> int:
        return len(self.owners)

    def admit(self, prompts: Sequence[Sequence[int]], options: Sequence[DecodeOptions], owners: list[Any],
              prefix: Prefix | None = None) -> None:
        """Prefill new prompts (one forward for the group) and add them as rows at this block boundary."""
        group = CachedContext(self.ctx.model, prompts, self.pad_id, prefix)
        logits = group.prefill()  # [k, V]
        before = self.ctx.forwards
        k = len(owners)
        self.samplers += [_sampler(o, self.ctx.device) for o in options]
        if self.first is not None:  # exact mode after a verification: first tokens are decided, add the new rows'
            new_first, new_conf = self._pick_rows(logits, k)
            self.first = (self.first[0] + new_first, self.first[1] + new_conf)
            self.last_logits = None
        else:
            self.last_logits = torch.cat([self.last_logits, logits])
        merge(self.ctx, group)
        self.ctx.forwards = before  # the group's prefill is counted on its own rows
        self.prompts += [list(p) for p in prompts]
        self.produced += [[] for _ in range(k)]
        self.reasons += [None] * k
        self.step_count += [0] * k
        self.lookup_cap += [None] * k
        self.limits += [o.max_new_tokens for o in options]
        self.owners += owners
        self.joined += [before - 1] * k  # minus one: the prefill forward belongs to them too

    def _pick_rows(self, logits: torch.Tensor, k: int) -> tuple[list[int], list[float]]:
        """First tokens of k new rows (the last k samplers) from their prefill logits [k, V]."""
        saved = self.samplers
        self.samplers = saved[-k:]
        try:
            tokens, conf = self.pick(logits)
        finally:
            self.samplers = saved
        return tokens.tolist(), conf.tolist()

    def release(self, rows: Sequence[int]) -> None:
        """Drop rows (finished or cancelled) at a block boundary.

        A lane that cannot merge (sliding-window caches, a trained drafter's own cache) keeps them in
        place as finished rows, which the decoder skips, until every row is done.
        """
        gone = set(rows)
        if not self.mergeable:
            for i in gone:
                self.reasons[i] = self.reasons[i] or "released"
                self.owners[i] = None
            return
        keep = [i for i in range(self.size) if i not in gone]
        if not keep:
            self.owners = []
            return
        select(self.ctx, keep)
        if self.first is None:
            self.last_logits = self.last_logits[torch.tensor(keep, device=self.ctx.device)]
        else:  # exact mode: verification decided the first tokens; the prefill's logits are spent
            self.last_logits = None
            self.first = ([self.first[0][i] for i in keep], [self.first[1][i] for i in keep])
        for name in ("prompts", "produced", "reasons", "step_count", "lookup_cap", "limits", "samplers", "owners", "joined"):
            values = getattr(self, name)
            setattr(self, name, [values[i] for i in keep])

    def row_kv(self, i: int) -> tuple[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]]:
        """Row i's visible tokens with their keys/values ([1, heads, n, dim] per layer): for the prefix cache."""
        ctx = self.ctx
        cols = (~ctx.hidden[i]).nonzero().squeeze(1)
        tokens = tuple(ctx.ids[i][c] for c in cols.tolist())
        return tokens, [(l.keys[i : i + 1].index_select(2, cols), l.values[i : i + 1].index_select(2, cols))
                        for l in ctx.cache.layers]

    @property
    def live(self) -> bool:
        """Some row still belongs to a request."""
        return any(owner is not None for owner in self.owners) and not self.ended

    def forwards_of(self, i: int) -> int:
        """Forward passes row i took part in (its group's prefill included)."""
        return self.ctx.forwards - self.joined[i]
