"""Exact mode with a trained drafter: one drafter forward drafts the block, the AR pass verifies it.

    prefill (AR, causal, hidden states kept)  -> the first token; features of the prompt columns
    per block:
        absorb: fuse the AR hidden states of the columns the last AR pass added (and kept), project
                them into every draft layer's keys/values: the drafter's FeatureCache grows by the
                accepted tokens only
        draft:  ONE drafter forward of [first token, MASK, ...] at the block's positions against the
                cached features; draft = argmax at offsets 1..b-1 (mapped back to AR ids)
        width:  keep the draft while the product of its draft probabilities stays above
                `draft_threshold` (0 = the whole block): a verify of fewer columns costs less
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
otherwise; the drafter's forward is skipped when every row found a match.
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


@dataclass
class Drafts:
    """Per row: draft tokens (AR ids) to verify and their draft probabilities."""

    tokens: list[list[int]]
    confidences: list[list[float]]


class TrainedDrafting:
    """The drafter side of one decode() run: its feature cache (on the context) and its forwards."""

    def __init__(self, drafter: Drafter, ctx, *, lookup: bool = False, draft_threshold: float = 0.0):
        self.drafter, self.lookup, self.draft_threshold = drafter, lookup, draft_threshold
        self.forwards = 0
        ctx.keep_hidden_states = True
        cache = ctx.followers.get(drafter)
        if cache is None or cache.length < ctx.length:  # a kept prefix without features: compute it again
            cache = FeatureCache()
            ctx.followers = {drafter: cache}
            if ctx.length:
                ctx.forget()
        self.cache = cache

    @torch.no_grad()
    def absorb(self, ctx) -> None:
        """Features of the columns the last AR pass added and the context kept."""
        new = ctx.length - self.cache.length
        if new <= 0:
            return
        states = self.drafter.select(ctx.hidden_states)  # each [B, n, H], n >= new
        feats = self.drafter.fuse([h[:, :new] for h in states])  # [B, new, H]
        self.drafter.extend(self.cache, feats, ctx.last_positions[:, :new])
        ctx.hidden_states = None  # every layer's states of the pass: not kept longer than needed

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
        """Per row, how many leading draft tokens to verify: while the product of their probabilities > threshold."""
        if self.draft_threshold <= 0:
            return [conf.shape[1]] * conf.shape[0]
        return (conf.cumprod(1) > self.draft_threshold).long().cumprod(1).sum(1).tolist()

    def drafts(self, ctx, first: Sequence[int], width: int, histories: Sequence[Sequence[int] | None]) -> Drafts:
        """Per row a draft of at most width - 1 tokens (rows whose history is None get none)."""
        self.absorb(ctx)  # every AR pass's kept columns, also when no drafter forward follows
        B = len(first)
        tokens: list[list[int]] = [[] for _ in range(B)]
        confs: list[list[float]] = [[] for _ in range(B)]
        need = [h is not None for h in histories]
        if self.lookup:
            for i, h in enumerate(histories):
                if h is None:
                    continue
                found, size = ngram_match(h, width - 1)
                if found and size >= LOOKUP_MIN_MATCH:
                    tokens[i], confs[i], need[i] = found, [1.0] * len(found), False
        if width > 1 and any(need):
            ids, conf = self.model_drafts(ctx, first, width)
            for i, k in enumerate(self.checked(conf)):
                if need[i]:
                    tokens[i], confs[i] = ids[i, :k].tolist(), conf[i, :k].tolist()
        return Drafts(tokens, confs)
