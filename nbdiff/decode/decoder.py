"""The NBDiff block decoder: a generator of `nbdiff.decode.events` records (METHOD.md, "Decoding loop").

    prefill prompt (causal, into the KV cache)  -> last logits give block 0's first token (AR step)
    for each block:
        denoise: forward the block against the cache (bidirectional inside the block, cache not
                 extended), read masked position j from logits at j - 1, commit the most confident
                 masked position of the current sub-block plus every one above the threshold
        commit:  one causal forward of the finished block that stores its keys/values; its last
                 logits give the next block's first token (AR step)
    exact mode (`options.exact`): the denoising steps (or the n-gram drafter, or a trained drafter's one
        forward: nbdiff.drafter.decoding) only draft the block;
        the commit pass verifies it (`nbdiff.decode.exact`), keeps the longest prefix AR agrees with, and
        AR's token after that prefix starts the next block. The output is the AR output.

The parts: `CachedContext` (nbdiff.decode.context) owns the cache, positions and masks; a `Block` is the
state of the active block; `Decoding` holds one run and has one method per step (AR step,
denoising step, draft, finish or verify); `decode()` is the loop over them. Text and timing are
added by the streaming layer (`nbdiff.api.stream`): the records this module yields carry token ids,
empty texts and zero seconds.

Notable choices:
- Logits only where used: prefill and commit keep the last position, a denoising step keeps the
  `sub_block_size` positions that predict the current sub-block (`logits_to_keep`).
- The commit pass is NOT folded into the next block's first denoising step: that step needs the
  next block's first token, which only the commit pass's logits give, so a folded pass would
  denoise with MASK at offset 0 and change the results. Cost per block = steps + 1 commit.
- No commit pass after the last block (nothing would use it). Every forward is counted.
- Batches: prompts are left-padded to a common length so every row's blocks share columns.
- EOS ends a row: positions after the first EOS of a block are dropped (not denoised, not emitted).
- `max_new_tokens` not a multiple of the block size: the last block is shorter.
- Host round trips: bookkeeping (which offsets are filled, EOS) lives on the host; each step copies
  its chosen tokens and confidences back once, and block tokens go to the device once per step.
- With block size 1 there is nothing to denoise: prefill + one commit per token = greedy AR.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch

from nbdiff.decode.context import CachedContext, Prefix
from nbdiff.decode.drafters import ngram_draft
from nbdiff.errors import NBDiffError
from nbdiff.decode.events import BlockEvent, Event, FinalEvent, StepEvent
from nbdiff.decode.exact import near_ties, verify_greedy, verify_sampled
from nbdiff.decode.options import DecodeOptions
from nbdiff.decode.plan import NGRAM, DraftingPlan, plan_drafting
from nbdiff.decode.sampling import choose, confidence, select_commits

__all__ = ["CachedContext", "decode"]


@dataclass
class Block:
    """The active block of every row."""

    index: int
    tokens: torch.Tensor
    """[B, n] long, on the model device: committed tokens, MASK where still open."""
    filled: torch.Tensor
    """[B, n] bool, on the host: committed, or never to be decoded (after an EOS, past the row's limit)."""
    eos_at: list[int]
    """Offset of the first EOS per row (n = none)."""
    limit: list[int]
    """Tokens this block may give each row (0 = the row has finished)."""
    drafted: list[int] = field(default_factory=list)
    """Per row, offsets holding its first token or a draft (the n-gram drafter may propose fewer than n)."""
    steps: int = 0
    """Denoising forwards spent on this block."""
    rows: Any = None
    """The denoising mask, built at the block's first step and reused by the others."""

    @property
    def n(self) -> int:
        return self.tokens.shape[1]

    @property
    def open(self) -> bool:
        return not bool(self.filled.all())


@dataclass
class Stats:
    """Exact-mode counters over a run."""

    verified: int = 0
    """Row-blocks that went through a verification pass."""
    drafted: int = 0
    accepted: int = 0
    accepted_at: list[int] = field(default_factory=list)
    """accepted_at[k]: row-blocks whose draft token at offset k + 1 was accepted."""
    near_ties: int = 0
    """Greedy verification: kept tokens whose top two logits were within the dtype's rounding (nbdiff.decode.exact)."""


def _eos_set(eos_token_ids) -> set[int]:
    if eos_token_ids is None:
        return set()
    if isinstance(eos_token_ids, int):
        return {eos_token_ids}
    return {int(t) for t in eos_token_ids}


class Decoding:
    """One decode() run: its context, sampling generator and what every row has produced."""

    def __init__(self, model, prompts, options: DecodeOptions, *, mask_token_id: int, eos_token_ids,
                 pad_token_id: int, cancel: threading.Event | None, context: CachedContext | None,
                 prefix: Prefix | None = None, plan: DraftingPlan | None = None):
        b = options.block_size
        if b is None:
            raise NBDiffError("decode() needs options.block_size", "pass block_size or load a converted model")
        self.plan = plan if plan is not None else plan_drafting(model, options)  # what drafts: decided there only
        drafts_alone = self.plan.kind == NGRAM or self.plan.trained
        if b > 1 and (mask_token_id is None or mask_token_id < 0) and not drafts_alone:
            raise NBDiffError(
                f"block size {b} needs a mask token, and this model has none",
                "run `nbdiff convert` on the model folder first, or use --block-size 1",
            )
        if context is None:  # prefix: keys/values every prompt begins with (the server's prefix cache)
            context = CachedContext(model, prompts, pad_token_id, prefix)
        else:
            context.restart(prompts, prefix)
        self.ctx = context
        self.forwards_before = context.forwards  # a context kept from earlier calls (chat) counts theirs too
        self.options = options
        self.mask_id, self.pad_id = mask_token_id, pad_token_id
        self.eos = _eos_set(eos_token_ids)
        self.cancel = cancel
        self.prompts = [list(p) for p in prompts]
        B = self.ctx.batch_size
        self.generator = torch.Generator(device=self.ctx.device)
        if options.seed is not None:
            self.generator.manual_seed(options.seed)
        else:
            self.generator.seed()
        self.produced: list[list[int]] = [[] for _ in range(B)]
        self.reasons: list[str | None] = [None] * B
        self.step_count = [0] * B
        self.denoise_forwards = 0
        self.block_index = 0
        self.cancelled = False
        self.ended = False
        self.stats = Stats(accepted_at=[0] * max(b - 1, 0))
        # the plan's lookup_follows: per row, the longest lookup draft to verify next (None: the block's width)
        self.lookup_cap: list[int | None] = [None] * B
        self.last_logits: torch.Tensor | None = None  # [B, V] logits that give the next block's first token
        self.first: tuple[list[int], list[float]] | None = None  # exact mode: next first tokens, decided by verification
        self.trained = self._trained_drafting() if self.plan.trained else None
        self.ctx.keep_hidden_states = self.trained is not None
        if self.trained is None:  # a drafter's cache kept from an earlier call would stop following this one
            self.ctx.followers = {}

    def _trained_drafting(self):
        """Exact mode's trained drafter (nbdiff.drafter.decoding): the plan's, its cache on the context."""
        from nbdiff.drafter.decoding import TrainedDrafting

        drafter = self.plan.drafter
        if self.mask_id is None or self.mask_id < 0:  # a plain AR model: the block's filler is the drafter's mask
            self.mask_id = drafter.config.mask_token_id
        return TrainedDrafting(drafter, self.ctx, lookup=self.plan.lookup_first, draft_threshold=self.plan.draft_threshold,
                               costs=self.plan.verify_costs, drafter_cost=self.plan.drafter_cost, gate=self.plan.draft_gate)

    # ---- small helpers ---------------------------------------------------------------------

    def pick(self, logits: torch.Tensor, greedy: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens and confidences for logits [..., V] (greedy for exact-mode drafts: see nbdiff.decode.exact)."""
        o = self.options
        shape = logits.shape[:-1]
        tokens, conf = choose(
            logits.reshape(-1, logits.shape[-1]), temperature=0.0 if greedy else o.temperature, top_k=o.top_k,
            top_p=o.top_p, rule=o.confidence, generator=self.generator,
        )
        return tokens.reshape(shape), conf.reshape(shape)

    def stop_requested(self) -> bool:
        if self.cancel is not None and self.cancel.is_set():
            self.cancelled = True
        return self.cancelled

    def done(self, i: int) -> bool:
        return self.reasons[i] is not None or len(self.produced[i]) >= self.options.max_new_tokens

    def _step(self, i: int, block: Block, offs: list[int], toks: list[int], confs: list[float],
              sub_block: int = 0, ar: bool = False) -> StepEvent:
        self.step_count[i] += 1
        return StepEvent(
            seq=i, block=block.index, step=self.step_count[i], positions=offs, tokens=toks, texts=[""] * len(toks),
            confidences=confs, masks_left=int((~block.filled[i]).sum()), block_size=block.n, sub_block=sub_block, ar=ar,
        )

    # ---- AR step ---------------------------------------------------------------------------

    def first_tokens(self) -> tuple[list[int], list[float]]:
        """Every row's next first token: from the verification (exact) or the last logits (AR step)."""
        if self.first is not None:
            return self.first
        tokens, conf = self.pick(self.last_logits)
        return tokens.tolist(), conf.tolist()

    def open_block(self, width: int, first: list[int], first_conf: list[float]) -> tuple[Block, list[StepEvent]]:
        """A new block of `width` columns holding every row's first token; the AR step's records."""
        B = len(first)
        limit = [0 if self.done(i) else self.options.max_new_tokens - len(self.produced[i]) for i in range(B)]
        rows = [[t] + [self.mask_id if width > 1 else self.pad_id] * (width - 1) for t in first]
        filled = torch.zeros(B, width, dtype=torch.bool)
        block = Block(self.block_index, None, filled, [width] * B, limit, [width] * B)  # type: ignore[arg-type]
        events = []
        for i in range(B):
            if limit[i] == 0:
                rows[i] = [self.pad_id] * width
                filled[i] = True
                continue
            filled[i, 0] = True
            filled[i, limit[i] :] = True  # past this row's token budget: never decoded
            if first[i] in self.eos:
                block.eos_at[i] = 0
                filled[i] = True
        block.tokens = torch.tensor(rows, dtype=torch.long, device=self.ctx.device)
        for i in range(B):
            if limit[i]:
                events.append(self._step(i, block, [0], [first[i]], [float(first_conf[i])], ar=True))
        return block, events

    # ---- denoising (or drafting) -----------------------------------------------------------

    def window(self, block: Block, whole: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(sub-block index [B], block offsets [B, s]) predicted at this step; whole = every offset."""
        n, filled = block.n, block.filled
        sub = self.options.block_size // self.options.sub_blocks
        first_open = (~filled).float().argmax(1)  # [B]
        sub_idx = torch.where(filled.all(1), torch.zeros_like(first_open), first_open // sub)
        if whole:
            return sub_idx, torch.arange(n).expand(len(filled), n)
        return sub_idx, sub_idx[:, None] * sub + torch.arange(sub)[None]

    def denoise(self, block: Block, cap: int | None = None) -> Iterator[StepEvent]:
        """Denoising steps until the block is filled (at most `cap` steps: the last commits every open offset)."""
        n = block.n
        while block.open and not self.stop_requested():
            last = cap is not None and block.steps >= cap - 1
            sub_idx, offsets = self.window(block, whole=last)
            keep = (offsets - 1).clamp(0, n - 1)  # shift: offset j is read from logits at j - 1
            keep = keep[0] if bool((keep == keep[0]).all()) else keep
            if block.rows is None:
                block.rows = self.ctx.denoise_rows(n)
            logits = self.ctx.block_logits(block.tokens, keep.to(self.ctx.device), block.rows)  # [B, s, V]
            self.denoise_forwards += 1
            block.steps += 1
            tokens, conf = self.pick(logits, greedy=self.options.exact)
            chosen = torch.stack([tokens.float(), conf]).cpu()  # the step's one host round trip (ids < 2**24)
            yield from self.apply(block, offsets, chosen[0].long(), chosen[1], sub_idx, commit_all=last)

    def apply(self, block: Block, offsets: torch.Tensor, tokens: torch.Tensor, conf: torch.Tensor,
              sub_idx: torch.Tensor, commit_all: bool = False) -> Iterator[StepEvent]:
        """Commit the chosen candidates (host tensors [B, s]) into the block; the EOS rule; one record per row."""
        n = block.n
        candidates = (offsets < n) & ~block.filled.gather(1, offsets.clamp(max=n - 1))
        chosen = candidates if commit_all else select_commits(conf, candidates, self.options.threshold)
        where_rows, where_offs, values, events = [], [], [], []
        for i in range(chosen.shape[0]):
            if not bool(chosen[i].any()):
                continue
            idx = chosen[i].nonzero()[:, 0]
            offs, toks, confs = offsets[i, idx].tolist(), tokens[i, idx].tolist(), conf[i, idx].tolist()
            block.filled[i, offs] = True
            for off, tok in zip(offs, toks):
                if tok in self.eos and off < block.eos_at[i]:
                    block.eos_at[i] = off
            if block.eos_at[i] < n:  # nothing after the first EOS is decoded or kept
                block.filled[i, block.eos_at[i] :] = True
                kept = [k for k, o in enumerate(offs) if o <= block.eos_at[i]]
                offs, toks, confs = [offs[k] for k in kept], [toks[k] for k in kept], [confs[k] for k in kept]
            where_rows += [i] * len(offs)
            where_offs += offs
            values += toks
            events.append(self._step(i, block, offs, toks, confs, sub_block=int(sub_idx[i])))
        if values:  # one host-to-device copy per step
            block.tokens[torch.tensor(where_rows), torch.tensor(where_offs)] = torch.tensor(values, device=self.ctx.device)
        yield from events

    def drafts(self, first: list[int], width: int, first_conf: list[float] | None = None
               ) -> tuple[list[list[int]], list[list[float]] | None] | None:
        """Exact mode's drafts made before the block opens: per row up to width - 1 tokens (and their
        confidences) from the n-gram lookup or the trained drafter (gated by the first tokens' confidences
        `first_conf`); None = the block's denoising drafts it."""
        o = self.options
        if not o.exact or not (self.trained is not None or self.plan.kind == NGRAM):
            return None
        histories = [None if self.done(i) or first[i] in self.eos else self.prompts[i] + self.produced[i] + [first[i]]
                     for i in range(len(first))]
        if self.trained is not None:
            found = self.trained.drafts(self.ctx, first, width, histories, first_conf)
            return found.tokens, found.confidences
        caps = [width - 1 if c is None else min(width - 1, c) for c in self.lookup_cap]
        return [[] if h is None else ngram_draft(h, cap) for h, cap in zip(histories, caps)], None

    def apply_drafts(self, block: Block, drafts: list[list[int]], confs: list[list[float]] | None = None) -> Iterator[StepEvent]:
        """Put drafts made before the block opened into it (no denoising forward) as one step per row."""
        B, n = block.tokens.shape
        tokens = torch.full((B, n - 1), self.mask_id, dtype=torch.long)
        conf = torch.ones(B, n - 1)
        for i, d in enumerate(drafts):
            tokens[i, : len(d)] = torch.tensor(d, dtype=torch.long)
            if confs is not None:
                conf[i, : len(d)] = torch.tensor(confs[i], dtype=torch.float32)
        known = torch.arange(n - 1)[None] < torch.tensor([len(d) for d in drafts])[:, None]
        block.filled[:, 1:] |= ~known  # offsets with no draft stay unverified
        block.drafted = [1 + len(d) for d in drafts]
        offsets = torch.arange(1, n).expand(B, n - 1)
        yield from self.apply(block, offsets, tokens, conf, torch.zeros(B, dtype=torch.long), True)

    # ---- finishing a block -----------------------------------------------------------------

    def block_records(self, block: Block, before: list[int], ending: bool, drafted=None, accepted=None):
        for i in range(len(before)):
            if block.limit[i] == 0:
                continue
            yield BlockEvent(
                seq=i, block=block.index, tokens=self.produced[i][before[i] :], text="",
                drafted=drafted[i] if drafted else [], accepted=accepted[i] if accepted else 0,
                last=ending or self.done(i),
            )

    def keep(self, block: Block, tokens: list[list[int]], kept: list[int]) -> list[int]:
        """Append kept[i] tokens of the block to row i; mark EOS. Returns the lengths before."""
        before = [len(p) for p in self.produced]
        for i, k in enumerate(kept):
            self.produced[i].extend(tokens[i][:k])
            if block.eos_at[i] < k:
                self.reasons[i] = "eos"
        return before

    def ending(self) -> bool:
        """After a block: every row has finished, or a cancel came (checked here, before the next pass)."""
        self.ended = self.stop_requested() or all(self.done(i) for i in range(len(self.produced)))
        return self.ended

    def finish(self, block: Block) -> Iterator[BlockEvent]:
        """Keep each row's tokens up to its first EOS (after a cancel: the contiguous committed prefix),
        then commit the block with a causal pass unless decoding ends."""
        tokens = block.tokens.tolist()
        kept = []
        for i in range(len(tokens)):
            upto = min(block.n, block.eos_at[i] + 1) if block.limit[i] else 0
            if self.cancelled and upto:
                open_ = (~block.filled[i]).nonzero()
                upto = min(upto, int(open_[0]) if len(open_) else block.n)
            kept.append(upto)
        before = self.keep(block, tokens, kept)
        ending = self.ending()
        yield from self.block_records(block, before, ending)
        if not ending:
            self.last_logits = self.ctx.commit(block.tokens)
            self.block_index += 1

    def verify(self, block: Block) -> Iterator[BlockEvent]:
        """Exact mode: the causal pass checks the draft; keep the accepted prefix; AR's next token starts the next block."""
        tokens = block.tokens.tolist()
        B, n = block.tokens.shape
        # drafted tokens to check per row: the filled offsets after the first token, up to an EOS or the budget
        checks = [0 if not block.limit[i] or self.cancelled
                  else min(block.drafted[i], block.eos_at[i] + 1, block.limit[i]) - 1 for i in range(B)]
        if self.cancelled:  # a cancelled draft is unverified: only the AR token is kept
            kept = [1 if block.limit[i] else 0 for i in range(B)]
            before = self.keep(block, tokens, kept)
            self.ended = True
            yield from self.block_records(block, before, True, [[] for _ in range(B)], [0] * B)
            return
        if max(checks) == 0 and all(block.limit[i] <= 1 or block.eos_at[i] == 0 for i in range(B) if block.limit[i]):
            kept, accepted = [1 if block.limit[i] else 0 for i in range(B)], [0] * B  # nothing to verify or follow: no pass
        else:
            logits = self.ctx.causal(block.tokens, keep=n)  # [B, n, V]
            checks_t = torch.tensor(checks, device=self.ctx.device)
            if self.options.temperature == 0:
                acc, nxt, dist = verify_greedy(logits, block.tokens, checks_t)
                # [B]: kept tokens decided by a near-tie, where the pass can round unlike one-token steps (the plan)
                ties = near_ties(logits, acc, self.ctx.model.dtype) if self.plan.counts_near_ties else torch.zeros_like(acc)
            else:
                o = self.options
                acc, nxt, dist = verify_sampled(logits, block.tokens, checks_t, temperature=o.temperature,
                                                top_k=o.top_k, top_p=o.top_p, generator=self.generator)
                ties = torch.zeros_like(acc)  # sampled tokens: no argmax to tie
            conf = confidence(dist, nxt, self.options.confidence)
            packed = torch.stack([acc.float(), nxt.float(), conf, ties.float()]).cpu()  # the pass's one host round trip
            accepted = [int(a) for a in packed[0]]
            self.stats.near_ties += sum(int(t) for t, limit in zip(packed[3], block.limit) if limit)
            kept = [accepted[i] + 1 if block.limit[i] else 0 for i in range(B)]
            self.ctx.keep_last(n, kept)
            self.first = ([int(t) for t in packed[1]], packed[2].tolist())
        if self.trained is not None:  # lookup's keep chance per row (combined drafting)
            self.trained.observe(accepted, checks)
        if self.plan.lookup_follows:  # a row's next lookup draft: one token longer than this one's accepted run
            for i in range(B):
                if checks[i]:
                    self.lookup_cap[i] = accepted[i] + 1
        for i in range(B):
            if block.limit[i]:
                self.stats.verified += 1
                self.stats.drafted += checks[i]
                self.stats.accepted += accepted[i]
                for k in range(accepted[i]):
                    self.stats.accepted_at[k] += 1
        before = self.keep(block, tokens, kept)
        drafted = [tokens[i][1 : 1 + checks[i]] for i in range(B)]
        yield from self.block_records(block, before, self.ending(), drafted, accepted)
        self.block_index += 1

    def final(self) -> FinalEvent:
        if self.trained is not None:  # the last pass's columns join the drafter's cache too (a chat's next turn)
            self.trained.absorb(self.ctx)
        for i, reason in enumerate(self.reasons):
            if reason is None:
                self.reasons[i] = "cancelled" if self.cancelled else "length"
        new_tokens = sum(len(p) for p in self.produced)
        forwards = self.ctx.forwards - self.forwards_before  # this call's forwards only
        s = self.stats
        return FinalEvent(
            new_tokens=new_tokens, forwards=forwards, tokens_per_forward=new_tokens / max(forwards, 1),
            seconds=0.0, tokens_per_second=0.0, finish_reason=self.reasons[0], texts=[],
            finish_reasons=list(self.reasons), steps=self.denoise_forwards,
            prompt_tokens=sum(len(p) for p in self.prompts), tokens=self.produced, block_size=self.options.block_size,
            drafted=s.drafted, accepted=s.accepted, accepted_at=list(s.accepted_at), verified_blocks=s.verified,
            accepted_length=(s.verified + s.accepted) / s.verified if s.verified else 0.0,
            reused_tokens=self.ctx.reused, drafter_forwards=self.trained.forwards if self.trained is not None else 0,
            drafter_gated=self.trained.gated if self.trained is not None else 0,
            near_ties=s.near_ties, plan=self.plan.to_dict(),
        )


def decode(
    model,
    prompts: Sequence[Sequence[int]],
    options: DecodeOptions,
    *,
    mask_token_id: int,
    eos_token_ids: int | Sequence[int] | None = None,
    pad_token_id: int = 0,
    cancel: threading.Event | None = None,
    context: CachedContext | None = None,
    plan: DraftingPlan | None = None,
) -> Iterator[Event]:
    """Decode a batch of token-id prompts; yields StepEvent / BlockEvent records, then one FinalEvent.

    `options.block_size` must be set (the API fills it from the model folder). Setting `cancel` stops
    before the next forward pass. `context`: a CachedContext to continue (chat keeps one across
    turns; its cached prefix shared with the new prompt is not computed again). `plan`: the drafting
    plan resolved by the caller (nbdiff.api.stream); None resolves it here (nbdiff.decode.plan).
    """
    run = Decoding(model, prompts, options, mask_token_id=mask_token_id, eos_token_ids=eos_token_ids,
                   pad_token_id=pad_token_id, cancel=cancel, context=context, plan=plan)
    o = run.options
    run.last_logits = run.ctx.prefill()  # [B, V]
    while True:
        first, first_conf = run.first_tokens()
        width = min(o.block_size, max(o.max_new_tokens - len(p) for p, r in zip(run.produced, run.reasons) if r is None))
        drafts = run.drafts(first, width, first_conf)
        if drafts is not None:
            width = 1 + max(len(d) for d in drafts[0])
        block, events = run.open_block(width, first, first_conf)
        yield from events
        if drafts is not None:
            yield from run.apply_drafts(block, *drafts)
        else:
            yield from run.denoise(block, o.draft_steps if o.exact else None)
        yield from (run.verify(block) if o.exact else run.finish(block))
        if run.ended:
            break
    yield run.final()
