"""The NBDiff block decoder: a generator of `nbdiff.events` records (METHOD.md, "Decoding loop").

    prefill prompt (causal, into the KV cache)  -> last logits give block 0's first token (AR step)
    for each block:
        denoise: forward the block against the cache (bidirectional inside the block, cache not
                 extended), read masked position j from logits at j - 1, commit the most confident
                 masked position of the current sub-block plus every one above the threshold
        commit:  one causal forward of the finished block that stores its keys/values; its last
                 logits give the next block's first token (AR step)

Notable choices:
- Exact cache: a denoising forward appends the block's keys/values and they are cropped right
  after, so the cache only ever holds committed, causally computed (= AR) keys/values.
- Logits only where used: prefill and commit keep the last position, a denoising step keeps the
  `sub_block_size` positions that predict the current sub-block (`logits_to_keep`).
- The commit pass is NOT folded into the next block's first denoising step: that step needs the
  next block's first token, which only the commit pass's logits give, so a folded pass would
  denoise with MASK at offset 0 and change the results. Cost per block = steps + 1 commit.
- No commit pass after the last block (nothing would use it). Every forward is counted.
- Batches: prompts are left-padded to a common length so every row's blocks share columns; a pad
  query row attends only to itself (a fully masked row would make sdpa return NaN).
- EOS ends a row: positions after the first EOS of a block are dropped (not denoised, not emitted).
- `max_new_tokens` not a multiple of the block size: the last block is shorter.
- With block size 1 there is nothing to denoise: prefill + one commit per token = greedy AR.
"""

from __future__ import annotations

import inspect
import threading
import time
from typing import Callable, Iterator, Sequence

import torch

from .decoding import DecodeOptions
from .errors import NBDiffError
from .events import BlockEvent, Event, FinalEvent, StepEvent
from .masks import decoding_mask, left_padded, to_model_mask
from .sampling import choose, select_commits


class CachedContext:
    """The committed context of a batch: a DynamicCache plus the bookkeeping for left padding.

    Columns: every row has `pad[i]` pad columns, then its prompt, then its blocks; `length` is the
    number of columns in the cache. Position of a column = column - pad[i].
    """

    def __init__(self, model, prompts: Sequence[Sequence[int]], pad_token_id: int = 0):
        from transformers import DynamicCache

        if not prompts or any(len(p) == 0 for p in prompts):
            raise NBDiffError("every prompt needs at least one token", "pass a non-empty prompt")
        self.model = model
        self.device = model.device
        width = max(len(p) for p in prompts)
        self.pad = torch.tensor([width - len(p) for p in prompts], device=self.device)  # [B]
        rows = [[pad_token_id] * (width - len(p)) + list(p) for p in prompts]
        self.prompt_ids = torch.tensor(rows, dtype=torch.long, device=self.device)  # [B, P]
        self.cache = DynamicCache(config=model.config)
        self.length = 0
        self.forwards = 0
        # transformers renamed `past_key_values` to `cache` in 5.x; use whichever this model takes
        params = inspect.signature(model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"

    @property
    def batch_size(self) -> int:
        return self.prompt_ids.shape[0]

    def _positions(self, n: int) -> torch.Tensor:
        cols = torch.arange(self.length, self.length + n, device=self.device)  # [n]
        return (cols[None] - self.pad[:, None]).clamp_(min=0)  # [B, n]; pad columns get 0

    def _attention(self, rows: torch.Tensor) -> torch.Tensor:
        """Per-row mask for queries at columns [length, length + n) over keys [0, length + n).

        rows: bool [n, length + n] from nbdiff.masks. Pad key columns are hidden; a pad query row
        sees only itself. Returns the model's 4-D mask [B, 1, n, length + n].
        """
        return to_model_mask(left_padded(rows.to(self.device), self.pad, self.length), self.model)

    def _forward(self, ids: torch.Tensor, rows: torch.Tensor, keep) -> torch.Tensor:
        out = self.model(
            input_ids=ids,
            position_ids=self._positions(ids.shape[1]),
            attention_mask=self._attention(rows),
            use_cache=True,
            logits_to_keep=keep,
            **{self._cache_kwarg: self.cache},
        )
        self.forwards += 1
        return out.logits

    @torch.no_grad()
    def prefill(self) -> torch.Tensor:
        """Causal forward of the prompts into the cache. Returns the last logits [B, V]."""
        width = self.prompt_ids.shape[1]
        logits = self._forward(self.prompt_ids, decoding_mask(width, 0), 1)  # [B, 1, V]
        self.length = width
        return logits[:, -1]

    @torch.no_grad()
    def block_logits(self, block: torch.Tensor, keep: torch.Tensor | int = 0, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Denoising forward of the active block [B, n]; the cache is left as it was.

        keep: 0 = logits at every block offset, or block offsets [s] / [B, s] to keep.
        rows: the mask rows (pass the same tensor for every step of a block to avoid rebuilding).
        Returns logits [B, n or s, V]; logits at offset j predict the token at offset j + 1.
        """
        n = block.shape[1]
        if rows is None:
            rows = self.denoise_rows(n)
        try:
            return self._forward(block, rows, keep)
        finally:
            self.cache.crop(-n)  # drop the block's keys/values: they were not computed causally

    def denoise_rows(self, n: int) -> torch.Tensor:
        return decoding_mask(self.length, n)[self.length :]  # [n, length + n]

    @torch.no_grad()
    def commit(self, block: torch.Tensor) -> torch.Tensor:
        """Causal forward of a finished block [B, n] that stores its keys/values. Returns last logits [B, V]."""
        n = block.shape[1]
        rows = decoding_mask(self.length + n, 0)[self.length :]  # causal rows [n, length + n]
        logits = self._forward(block, rows, 1)
        self.length += n
        return logits[:, -1]


def _eos_set(eos_token_ids) -> set[int]:
    if eos_token_ids is None:
        return set()
    if isinstance(eos_token_ids, int):
        return {eos_token_ids}
    return {int(t) for t in eos_token_ids}


class _Text:
    """Incremental detokenization of one row: a block's text is what its tokens add to the whole."""

    def __init__(self, detokenize: Callable[[list[int]], str] | None):
        self.detokenize = detokenize
        self.sent = ""

    def delta(self, tokens: list[int], final: bool) -> str:
        if self.detokenize is None:
            return ""
        full = self.detokenize(tokens)
        # a multi-byte character split across blocks decodes as U+FFFD until its last byte arrives
        stable = full if final else full.rstrip("\ufffd")
        new = stable[len(self.sent) :] if stable.startswith(self.sent) else stable
        self.sent = stable
        return new


def decode(
    model,
    prompts: Sequence[Sequence[int]],
    options: DecodeOptions,
    *,
    mask_token_id: int,
    eos_token_ids: int | Sequence[int] | None = None,
    pad_token_id: int = 0,
    detokenize: Callable[[list[int]], str] | None = None,
    token_text: Callable[[int], str] | None = None,
    cancel: threading.Event | None = None,
) -> Iterator[Event]:
    """Decode a batch of token-id prompts; yields StepEvent / BlockEvent records, then one FinalEvent.

    `options.block_size` must be set (the API fills it from the model folder). `detokenize` turns
    a row's tokens (EOS excluded) into text, `token_text` one token into text; without them the
    records carry empty strings. Setting `cancel` stops before the next forward pass.
    """
    b = options.block_size
    if b is None:
        raise NBDiffError("decode() needs options.block_size", "pass block_size or load a converted model")
    if b > 1 and (mask_token_id is None or mask_token_id < 0):
        raise NBDiffError(
            f"block size {b} needs a mask token, and this model has none",
            "run `nbdiff convert` on the model folder first, or use --block-size 1",
        )
    sub = b // options.sub_blocks  # sub-block size
    eos = _eos_set(eos_token_ids)
    start = time.perf_counter()
    ctx = CachedContext(model, prompts, pad_token_id)
    B, device = ctx.batch_size, ctx.device
    generator = torch.Generator(device=device)
    if options.seed is not None:
        generator.manual_seed(options.seed)
    else:
        generator.seed()

    def pick(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = logits.shape[:-1]
        tokens, conf = choose(
            logits.reshape(-1, logits.shape[-1]),
            temperature=options.temperature,
            top_k=options.top_k,
            top_p=options.top_p,
            rule=options.confidence,
            generator=generator,
        )
        return tokens.reshape(shape), conf.reshape(shape)

    def texts_of(tokens: list[int]) -> list[str]:
        return [token_text(t) if token_text else "" for t in tokens]

    produced: list[list[int]] = [[] for _ in range(B)]
    reasons: list[str | None] = [None] * B
    texts = [_Text(detokenize) for _ in range(B)]
    steps = [0] * B
    denoise_forwards = 0
    generated = 0  # block columns generated so far (shared by all rows)
    block_index = 0
    cancelled = False
    last_logits = ctx.prefill()  # [B, V]

    while True:
        n = min(b, options.max_new_tokens - generated)
        active = [reasons[i] is None for i in range(B)]
        block = torch.full((B, n), mask_token_id if n > 1 else pad_token_id, dtype=torch.long, device=device)
        filled = torch.zeros(B, n, dtype=torch.bool, device=device)  # committed, or dropped after EOS
        eos_at = [n] * B  # offset of the first EOS in the block (n = none)

        # AR step: the block's first token from the previous forward's last logits
        first, first_conf = pick(last_logits)
        block[:, 0] = first
        filled[:, 0] = True
        for i in range(B):
            if not active[i]:
                block[i] = pad_token_id
                filled[i] = True
                continue
            tok = int(first[i])
            if tok in eos:
                eos_at[i] = 0
                filled[i] = True
            steps[i] += 1
            yield StepEvent(
                seq=i, block=block_index, step=steps[i], positions=[0], tokens=[tok], texts=texts_of([tok]),
                confidences=[float(first_conf[i])], masks_left=int((~filled[i]).sum()), block_size=n,
                sub_block=0, ar=True,
            )

        # denoising steps until every row's block is filled
        rows = ctx.denoise_rows(n) if not bool(filled.all()) else None
        slot = torch.arange(sub, device=device)  # [s]
        while not bool(filled.all()):
            if cancel is not None and cancel.is_set():
                cancelled = True
                break
            # current sub-block of each row = the one holding its first unfilled offset
            first_open = (~filled).float().argmax(1)  # [B]
            sub_idx = torch.where(filled.all(1), torch.zeros_like(first_open), first_open // sub)  # [B]
            offsets = sub_idx[:, None] * sub + slot[None]  # [B, s] block offsets being predicted
            keep = (offsets - 1).clamp(0, n - 1)  # shift: offset j is read from logits at j - 1
            keep_arg = keep[0] if bool((keep == keep[0]).all()) else keep
            logits = ctx.block_logits(block, keep_arg, rows)  # [B, s, V]
            denoise_forwards += 1
            tokens, conf = pick(logits)  # [B, s]
            in_block = offsets < n
            safe = offsets.clamp(max=n - 1)
            candidates = in_block & ~filled.gather(1, safe)
            commit = select_commits(conf, candidates, options.threshold)  # [B, s]
            for i in range(B):
                if not bool(commit[i].any()):
                    continue
                where = commit[i].nonzero()[:, 0]
                offs = offsets[i, where].tolist()
                toks = tokens[i, where].tolist()
                confs = conf[i, where].tolist()
                block[i, offs] = tokens[i, where]
                filled[i, offs] = True
                for off, tok in zip(offs, toks):
                    if tok in eos and off < eos_at[i]:
                        eos_at[i] = off
                if eos_at[i] < n:  # nothing after the first EOS is decoded or kept
                    filled[i, eos_at[i] :] = True
                    keep_mask = [o <= eos_at[i] for o in offs]
                    offs = [o for o, k in zip(offs, keep_mask) if k]
                    toks = [t for t, k in zip(toks, keep_mask) if k]
                    confs = [c for c, k in zip(confs, keep_mask) if k]
                steps[i] += 1
                yield StepEvent(
                    seq=i, block=block_index, step=steps[i], positions=offs, tokens=toks, texts=texts_of(toks),
                    confidences=confs, masks_left=int((~filled[i]).sum()), block_size=n,
                    sub_block=int(sub_idx[i]),
                )

        # the block is finished (or cancelled): keep each row's tokens up to its first EOS
        before = [len(p) for p in produced]
        for i in range(B):
            if not active[i]:
                continue
            upto = min(n, eos_at[i] + 1)
            if cancelled:  # keep the contiguous committed prefix only
                open_ = (~filled[i]).nonzero()
                upto = min(upto, int(open_[0]) if len(open_) else n)
            produced[i].extend(block[i, :upto].tolist())
            if eos_at[i] < upto:
                reasons[i] = "eos"
        generated += n
        ending = cancelled or all(r is not None for r in reasons) or generated >= options.max_new_tokens
        if not ending and cancel is not None and cancel.is_set():
            cancelled = ending = True
        for i in range(B):
            if not active[i]:
                continue
            kept = [t for t in produced[i] if t not in eos]
            yield BlockEvent(
                seq=i, block=block_index, tokens=produced[i][before[i] :],
                text=texts[i].delta(kept, final=ending or reasons[i] is not None),
            )
        if ending:
            break
        last_logits = ctx.commit(block)
        block_index += 1

    for i in range(B):
        if reasons[i] is None:
            reasons[i] = "cancelled" if cancelled else "length"
    seconds = time.perf_counter() - start
    new_tokens = sum(len(p) for p in produced)
    yield FinalEvent(
        new_tokens=new_tokens,
        forwards=ctx.forwards,
        tokens_per_forward=new_tokens / max(ctx.forwards, 1),
        seconds=seconds,
        tokens_per_second=new_tokens / seconds if seconds > 0 else 0.0,
        finish_reason=reasons[0],
        texts=[texts[i].sent if detokenize else "" for i in range(B)],
        finish_reasons=list(reasons),
        steps=denoise_forwards,
        prompt_tokens=sum(len(p) for p in prompts),
        tokens=produced,
        block_size=b,
    )

