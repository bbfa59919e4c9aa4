"""Exact mode with a trained drafter: one drafter forward drafts the block, the AR pass verifies it.

    prefill (AR, causal, hidden states kept)  -> the first token; features of the prompt columns
    per block:
        collect: keep the chosen AR layers' outputs of the columns the last AR pass added (and kept)
        gate:   a row whose block's first token the model gave less than the plan's `draft_gate`
                confidence gets no drafter draft (lookup's, or none: a one-token pass, block size 1's step)
        absorb: where a drafter forward follows, fuse everything collected since the last one and
                project it into every draft layer's keys/values (one product for several columns):
                the drafter's FeatureCache grows by the accepted tokens only
        draft:  ONE drafter forward of [first token, MASK, ...] at the block's positions against the
                cached features; draft = argmax at offsets 1..b-1 (mapped back to AR ids)
        width:  the leading draft tokens whose product of draft probabilities stays above
                `draft_threshold` (0 = the whole block): a verify of fewer columns costs less; with the
                plan's verify costs (nbdiff.decode.plan.COST_CUT, off by default) of those the count
                that gives the most expected tokens per cost (`best_length`)
        verify: the AR causal pass of exact mode (`nbdiff.decode.exact`); keep the accepted prefix
                plus AR's token; the AR cache drops the rejected columns and hides them per row

The drafter's columns are the AR context's columns, one for one (left padding and rejected
columns included), so its mask is the context's `hidden` mask: a row never sees a padded or
rejected column, and its block sits at the row's own positions (`next_pos`). The feature cache
lives on the CachedContext (`followers`), so it is cropped with it and a chat's next turn reuses
the features of its kept prefix.

Lossless: greedy output is AR's greedy output whatever the draft, since every kept token is
checked against AR's argmax. Sampling: drafts are taken by argmax, so they are deterministic given
the verified prefix (q is one-hot) and the speculative rule of `nbdiff.decode.exact.verify_sampled`
keeps exactly AR's distribution (the DFlash reference samples AR at every position and accepts
where the draft matches its sample instead; for a one-hot draft both accept token x with
probability p(x)).

Combined drafting ("lookup+..."): per row, prompt lookup (`nbdiff.decode.drafters`) when its
n-gram match is at least LOOKUP_MIN_MATCH tokens long (it costs no forward), the trained drafter
otherwise; the drafter's forward is skipped when every row found a match. With verify costs in the
plan, a lookup draft, which has no probabilities of its own, has each token given the row's running
keep chance of lookup tokens in this call, (kept + 1) / (tried + 2), and `best_length` cuts it too.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from nbdiff.decode.drafters import ngram_match
from nbdiff.decode.options import LOOKUP, TRAINED
from nbdiff.drafter.folder import bundled_drafter, load_drafter
from nbdiff.drafter.model import Drafter, FeatureCache
from nbdiff.errors import NBDiffError

LOOKUP_MIN_MATCH = 2
"""Combined drafting uses prompt lookup when its n-gram match has at least this many tokens."""

_LOADED: "weakref.WeakKeyDictionary[Any, dict[str, Drafter]]" = weakref.WeakKeyDictionary()


def split_spec(spec: Any) -> tuple[bool, Any]:
    """(lookup first?, the trained part: 'trained', a folder or a Drafter)."""
    if isinstance(spec, (str, Path)) and str(spec).startswith(LOOKUP):
        return True, str(spec)[len(LOOKUP):] or TRAINED
    return False, spec


def drafter_path(model, part: Any) -> Path:
    """The folder named by `part` ('trained' = the model folder's drafter/)."""
    if str(part) == TRAINED:
        found = bundled_drafter(model)
        if found is None:
            raise NBDiffError("this model folder has no trained drafter (drafter/ subfolder)",
                              "pass --drafter DIR, or train one with `nbdiff adapt MODEL --target drafter`")
        return found
    return Path(part).expanduser()


def loaded_drafter(model, part: Any) -> Drafter:
    """The Drafter named by `part` ('trained', a folder, or a loaded Drafter) for this model; a folder loads once per model.

    Called by the drafting plan (nbdiff.decode.plan), which decides which drafter runs."""
    if isinstance(part, Drafter):
        return part
    path = str(drafter_path(model, part).resolve())
    per_model = _LOADED.setdefault(model, {})
    if path not in per_model:
        per_model[path] = load_drafter(path, model)
    return per_model[path]


def best_length(chances: Sequence[float], costs: Sequence[float], extra: float = 0.0) -> int:
    """How many leading draft tokens to verify (0..len(chances)): the count m with the most expected tokens per
    cost, (1 + the sum of the first m products of keep chances) / (costs[m] + extra), where costs[m] is what a
    verify of m + 1 tokens costs against one token and `extra` what drafting cost (the drafter's forward).
    The first, smallest m wins a tie."""
    best, best_rate = 0, 1.0 / (costs[0] + extra)
    expected = chance = 1.0
    for m, p in enumerate(chances, 1):
        chance *= p
        expected += chance
        rate = expected / (costs[m] + extra)
        if rate > best_rate:
            best, best_rate = m, rate
    return best


@dataclass
class Drafts:
    """Per row: draft tokens (AR ids) to verify and their draft probabilities."""

    tokens: list[list[int]]
    confidences: list[list[float]]


class TrainedDrafting:
    """The drafter side of one decode() run: its feature cache (on the context) and its forwards."""

    def __init__(self, drafter: Drafter, ctx, *, lookup: bool = False, draft_threshold: float = 0.0,
                 costs: Sequence[float] = (), drafter_cost: float = 0.0, gate: float = 0.0):
        self.drafter, self.lookup, self.draft_threshold, self.gate = drafter, lookup, draft_threshold, gate
        self.gated = 0  # row steps the first-token gate left without a drafter draft
        # no costs, or a threshold of 0 (verify every draft token): drafts are not cut by cost
        self.costs = tuple(costs) if draft_threshold > 0 else ()
        self.drafter_cost = drafter_cost
        self.forwards = 0
        B = ctx.batch_size
        self.looked = [False] * B  # rows whose last draft came from prompt lookup
        self.lookup_kept, self.lookup_tried = [0] * B, [0] * B  # lookup tokens kept / checked up to a rejection
        ctx.keep_hidden_states = True
        cache = ctx.followers.get(drafter)
        if cache is None or cache.length < ctx.length:  # a kept prefix without features: compute it again
            cache = FeatureCache()
            ctx.followers = {drafter: cache}
            if ctx.length:
                ctx.forget()
        self.cache = cache
        self.pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # collected columns not absorbed yet

    def collect(self, ctx) -> None:
        """Keep the drafter's inputs from the columns the last AR pass added and the context kept (the chosen layers'
        outputs, concatenated); `absorb` turns them into features only when a drafter forward needs them, so steps
        that draft by lookup, or that the first-token gate skips, cost no drafter arithmetic."""
        new = ctx.length - self.cache.length - sum(positions.shape[1] for _, positions in self.pending)
        if new <= 0:
            return
        states = self.drafter.select(ctx.hidden_states)  # each [B, n, H], n >= new
        self.pending.append((torch.cat([h[:, :new] for h in states], -1), ctx.last_positions[:, :new]))
        ctx.hidden_states = None  # every layer's states of the pass: not kept longer than needed

    @torch.no_grad()
    def absorb(self, ctx) -> None:
        """Fuse the collected columns into features and project them into the drafter's cache (one product for all
        the columns collected since the last drafter forward)."""
        self.collect(ctx)
        if not self.pending:
            return
        states, positions = (torch.cat(parts, 1) for parts in zip(*self.pending))  # [B, n, k * H], [B, n]
        self.pending = []
        self.drafter.extend(self.cache, self.drafter.fuse_concatenated(states), positions)

    def _mask(self, ctx, width: int) -> torch.Tensor | None:
        """[B, 1, width, C + width] bool: the context's visible columns, then the whole block; None if all visible."""
        if not ctx.any_hidden:
            return None
        B = ctx.batch_size
        seen = torch.cat([~ctx.hidden, torch.ones(B, width, dtype=torch.bool, device=ctx.device)], 1)
        return seen[:, None, None, :].expand(B, 1, width, seen.shape[1])

    @torch.no_grad()
    def model_drafts(self, ctx, first: Sequence[int], width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One drafter forward. Returns (draft ids [B, width - 1] in AR ids, their draft probabilities), on the host."""
        mask_id = self.drafter.config.mask_token_id
        block = torch.tensor([[t] + [mask_id] * (width - 1) for t in first], device=ctx.device)  # [B, width]
        pos = ctx.next_pos[:, None] + torch.arange(width, device=ctx.device)[None]  # [B, width]
        logits = self.drafter(block, pos, attn_mask=self._mask(ctx, width), cache=self.cache, logits_from=1)  # [B, w-1, Vd]
        self.forwards += 1
        conf, idx = logits.float().softmax(-1).max(-1)
        packed = torch.stack([self.drafter.to_full_vocab(idx).float(), conf]).cpu()  # one host round trip
        return packed[0].long(), packed[1]

    def checked(self, conf: torch.Tensor) -> list[int]:
        """Per row, how many leading draft tokens to verify: of those whose product of probabilities stays above the
        threshold, the count `best_length` picks with the plan's verify costs and the drafter forward's cost."""
        if self.draft_threshold <= 0:  # 0: every draft token, whatever it costs
            return [conf.shape[1]] * conf.shape[0]
        upto = (conf.cumprod(1) > self.draft_threshold).long().cumprod(1).sum(1).tolist()
        if not self.costs:
            return upto
        return [best_length(row[:k], self.costs, self.drafter_cost) for row, k in zip(conf.tolist(), upto)]

    def lookup_chance(self, i: int) -> float:
        """Row i's running keep chance of a lookup token in this call."""
        return (self.lookup_kept[i] + 1) / (self.lookup_tried[i] + 2)

    def observe(self, accepted: Sequence[int], checks: Sequence[int]) -> None:
        """After a verify: rows whose draft came from lookup count its tokens kept and tried (read only where
        drafts are cut by cost)."""
        if not self.costs:
            return
        for i, (looked, kept, checked) in enumerate(zip(self.looked, accepted, checks)):
            if looked and checked:
                self.lookup_kept[i] += kept
                self.lookup_tried[i] += min(kept + 1, checked)

    def drafts(self, ctx, first: Sequence[int], width: int, histories: Sequence[Sequence[int] | None],
               first_conf: Sequence[float] | None = None) -> Drafts:
        """Per row a draft of at most width - 1 tokens (rows whose history is None get none). `first_conf`: the
        model's confidence in each row's first token; a row below the gate gets no drafter draft this step."""
        self.collect(ctx)  # every AR pass's kept columns, also when no drafter forward follows
        B = len(first)
        tokens: list[list[int]] = [[] for _ in range(B)]
        confs: list[list[float]] = [[] for _ in range(B)]
        need = [h is not None for h in histories]
        self.looked = [False] * B  # this step's rows drafted by lookup
        if self.lookup:
            for i, h in enumerate(histories):
                if h is None:
                    continue
                found, size = ngram_match(h, width - 1)
                if not found or size < LOOKUP_MIN_MATCH:
                    continue
                if self.costs:
                    found = found[:best_length([self.lookup_chance(i)] * len(found), self.costs)]
                if found:  # (a lookup draft cut to nothing: the drafter's turn)
                    tokens[i], confs[i], need[i] = found, [1.0] * len(found), False
                    self.looked[i] = True
        if self.gate > 0 and first_conf is not None and width > 1:
            for i, c in enumerate(first_conf):
                if need[i] and c < self.gate:
                    need[i] = False
                    self.gated += 1
        if width > 1 and any(need):
            self.absorb(ctx)
            ids, conf = self.model_drafts(ctx, first, width)
            for i, k in enumerate(self.checked(conf)):
                if need[i]:
                    tokens[i], confs[i] = ids[i, :k].tolist(), conf[i, :k].tolist()
        return Drafts(tokens, confs)
