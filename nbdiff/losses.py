"""The two NBDiff losses, read through the AR shift.

- L_MDM: cross-entropy at every masked position j of the noised copy, read from the noised logits
  at j - 1 (same block, because a block's first token is never masked).
- L_AR: next-token cross-entropy over the clean copy (logits at i predict token i + 1), never
  across a document boundary.
- L = L_MDM + lambda * L_AR (lambda = 0.5 in the paper).

Two ways to the same numbers: `mdm_loss` / `ar_loss` read full logits [B, L, V];
`chunked_cross_entropy` projects only the hidden states a loss reads through the LM head, a chunk
of rows at a time, so no [B, L, V] tensor exists (nbdiff.layout.parallel_losses uses it).

Weighting of L_MDM: 'none' averages over masked tokens (the paper shows no 1/t factor);
'inverse-t' weights each masked token by 1/t and divides by the number of eligible tokens, the
usual ELBO form of masked diffusion.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .errors import NBDiffError

WEIGHTINGS = ("none", "inverse-t")


@dataclass
class LossParts:
    """Scalar losses of one batch, plus the counts behind them (for honest averaging in logs)."""

    total: torch.Tensor
    mdm: torch.Tensor
    ar: torch.Tensor
    mdm_tokens: int
    ar_tokens: int
    mdm_correct: int
    """Masked positions whose argmax prediction is right (for masked-token accuracy)."""
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    """Further loss terms, already weighted and included in `total` (the trainer logs them by name)."""


def _shifted_ce(logits: torch.Tensor, targets: torch.Tensor, where: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CE of logits[:, j-1] against targets[:, j] for every j with where[:, j]; returns (ce, correct).

    logits: [B, L, V]; targets, where: [B, L]. Position 0 is never selected.
    """
    sel = where[:, 1:]  # target positions 1..L-1
    pred = logits[:, :-1][sel]  # [N, V]
    gold = targets[:, 1:][sel]  # [N]
    if pred.numel() == 0:
        zero = logits.sum() * 0.0  # keeps the graph (and DDP) happy
        return zero.reshape(1)[:0], torch.zeros(0, dtype=torch.bool, device=logits.device)
    ce = F.cross_entropy(pred.float(), gold, reduction="none")
    return ce, pred.argmax(-1) == gold


def mdm_loss(
    noised_logits: torch.Tensor,
    clean_ids: torch.Tensor,
    masked: torch.Tensor,
    t: torch.Tensor,
    weighting: str = "none",
    eligible: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int, int]:
    """L_MDM over masked positions. Returns (loss, number of masked tokens, number correct)."""
    check_weighting(weighting)
    ce, correct = _shifted_ce(noised_logits, clean_ids, masked)
    n = int(ce.numel())
    if n == 0:
        return noised_logits.sum() * 0.0, 0, 0
    return reduce_mdm(ce, t[:, 1:][masked[:, 1:]], weighting, eligible), n, int(correct.sum())


def check_weighting(weighting: str) -> None:
    if weighting not in WEIGHTINGS:
        raise NBDiffError(f"loss weighting must be one of {', '.join(WEIGHTINGS)}, got {weighting!r}")


def reduce_mdm(ce: torch.Tensor, t: torch.Tensor, weighting: str, eligible: torch.Tensor | None) -> torch.Tensor:
    """L_MDM from the per-token CE of the masked positions (ce, t: [N], N > 0)."""
    if weighting == "none":
        return ce.mean()
    denom = int(eligible[:, 1:].sum()) if eligible is not None else int(ce.numel())
    return (ce * (1.0 / t.float())).sum() / max(denom, 1)


def ar_loss(clean_logits: torch.Tensor, clean_ids: torch.Tensor, target_mask: torch.Tensor) -> tuple[torch.Tensor, int]:
    """L_AR: mean next-token CE at every position j with target_mask[:, j] (predicted from j - 1).

    target_mask must already exclude document starts (a token is not predicted from another
    document) and untrained tokens (padding, chat prompts).
    """
    ce, _ = _shifted_ce(clean_logits, clean_ids, target_mask)
    if ce.numel() == 0:
        return clean_logits.sum() * 0.0, 0
    return ce.mean(), int(ce.numel())


def ar_targets(trainable: torch.Tensor, position_ids: torch.Tensor, block_size: int, context: str) -> torch.Tensor:
    """Positions whose token L_AR may predict: bool [B, L].

    Never a document start (nothing precedes it in its document). With the block-causal clean copy
    (BD3-LM), the logits at j - 1 already see token j when both lie in one block, so only block
    starts are honest AR targets there; with NBDiff's causal clean copy every position is.
    """
    target = trainable & (position_ids > 0)
    if context == "block-causal":
        target &= position_ids % block_size == 0
    return target


def certainty_loss(noised_logits: torch.Tensor, clean_ids: torch.Tensor, masked: torch.Tensor,
                   temperature: float = 1.0) -> torch.Tensor:
    """Certainty forcing (dParallel, arXiv 2509.26488): entropy of softmax(logits / T) at the masked
    positions whose argmax is already the right token, summed and divided by the number of masked
    positions (L_MDM's denominator). Pushing right predictions to certainty lets the decoder commit
    more of them per forward; wrong ones are left to L_MDM.
    """
    sel = masked[:, 1:]
    pred = noised_logits[:, :-1][sel].float()  # [N, V]
    if pred.shape[0] == 0:
        return noised_logits.sum() * 0.0
    right = pred.argmax(-1) == clean_ids[:, 1:][sel]
    logp = F.log_softmax(pred[right] / temperature, dim=-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return entropy.sum() / pred.shape[0]


def combine(mdm: torch.Tensor, ar: torch.Tensor, ar_weight: float) -> torch.Tensor:
    """L = L_MDM + lambda * L_AR."""
    return mdm + ar_weight * ar if ar_weight else mdm


CHUNK_BYTES = 64 * 2**20
"""Size of one chunk's fp32 logits in `chunked_cross_entropy` (the only logits alive at once)."""


def chunked_cross_entropy(head, hidden: torch.Tensor, gold: torch.Tensor, vocab_size: int,
                          chunk_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row CE of head(hidden) against gold, computed a chunk of rows at a time.

    head: the LM head module (any wrapper around it, e.g. peft's trainable tokens, is honoured);
    hidden: [N, H] final hidden states; gold: [N] token ids. Returns (ce [N] float32, correct [N]
    bool: argmax == gold). With autograd on, each chunk runs under activation checkpointing: the
    graph keeps its [rows, H] input and recomputes the [rows, V] logits in backward, so gradients
    equal the dense path's while only one chunk of logits ever exists.
    """
    n = hidden.shape[0]
    rows = chunk_rows or max(16, CHUNK_BYTES // (4 * max(vocab_size, 1)))
    grad = torch.is_grad_enabled() and hidden.requires_grad
    ces, hits = [], []
    for lo in range(0, n, rows):
        h, g = hidden[lo:lo + rows], gold[lo:lo + rows]
        if grad:
            from torch.utils.checkpoint import checkpoint

            ce, hit = checkpoint(_head_ce, head, h, g, use_reentrant=False)
        else:
            ce, hit = _head_ce(head, h, g)
        ces.append(ce)
        hits.append(hit)
    if not ces:
        return hidden.new_zeros(0, dtype=torch.float32), torch.zeros(0, dtype=torch.bool, device=hidden.device)
    return torch.cat(ces), torch.cat(hits)


def _head_ce(head, h: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits = head(h).float()  # [rows, V]; float as in _shifted_ce
    with torch.no_grad():
        hit = logits.argmax(-1) == g
    return F.cross_entropy(logits, g, reduction="none"), hit
