"""The two NBDiff losses, read through the AR shift.

- L_MDM: cross-entropy at every masked position j of the noised copy, read from the noised logits
  at j - 1 (same block, because a block's first token is never masked).
- L_AR: next-token cross-entropy over the clean copy (logits at i predict token i + 1), never
  across a document boundary.
- L = L_MDM + lambda * L_AR (lambda = 0.5 in the paper).

Two ways to the same numbers: `mdm_loss` / `ar_loss` read full logits [B, L, V];
`chunked_cross_entropy` projects only the hidden states a loss reads through the LM head, a chunk
of rows at a time, so no [B, L, V] tensor exists (nbdiff.method.layout.parallel_losses uses it).

Weighting of L_MDM: 'none' averages over masked tokens (the paper shows no 1/t factor);
'inverse-t' weights each masked token by 1/t and divides by the number of eligible tokens, the
usual ELBO form of masked diffusion.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from nbdiff.errors import NBDiffError
from nbdiff.adapt.recipe import WEIGHTINGS  # the allowed values live with the recipe (importable without torch)


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

    head: the LM head module; hidden: [N, H] final hidden states; gold: [N] token ids. Returns
    (ce [N] float32, correct [N] bool: argmax == gold). Only one chunk's [rows, V] logits exist at
    a time, in forward and backward:
    - a frozen head (LoRA; peft's trainable-token rows on a tied head included) goes through a
      fused linear + CE that computes each row's gradient while its logits are at hand, so the
      backward pass needs neither the logits nor a second projection, and the head's weight
      gradient is formed only for the trainable rows;
    - any other head (fully trained, or a wrapper we do not know) runs each chunk under
      activation checkpointing: the graph keeps [rows, H] and recomputes the logits in backward.
    Both give the dense path's values and gradients (tests/test_layout.py).
    """
    rows = chunk_rows or max(16, CHUNK_BYTES // (4 * max(vocab_size, 1)))
    frozen = _frozen_head(head)
    if frozen is not None:
        weight, trainable_rows, bias = frozen
        need_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
        return _LinearCrossEntropy.apply(hidden, weight, bias, trainable_rows, gold, rows, need_grad)
    grad = torch.is_grad_enabled() and hidden.requires_grad
    ces, hits = [], []
    for lo in range(0, hidden.shape[0], rows):
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


def _frozen_head(head):
    """(weight [V, H], trainable row ids [k], bias) of a head whose weight is frozen except for
    peft trainable-token rows; None for any other head."""
    if isinstance(head, torch.nn.Linear):
        if head.weight.requires_grad or (head.bias is not None and head.bias.requires_grad):
            return None
        return head.weight, None, head.bias
    adapter = getattr(head, "token_adapter", None)  # peft TrainableTokensWrapper around a tied LM head
    base = getattr(adapter, "base_layer", None)
    if (not isinstance(base, torch.nn.Linear) or base.weight.requires_grad or adapter.merged
            or adapter.disable_adapters or not hasattr(adapter, "get_merged_weights")):
        return None
    active = adapter.active_adapters
    if not active:
        return base.weight, None, None
    # peft's forward is F.linear(x, merged weight) with no bias; the merged weight carries the deltas
    ids = torch.cat([adapter.token_indices[a] if torch.is_tensor(adapter.token_indices[a])
                     else torch.tensor(adapter.token_indices[a]) for a in active]).to(base.weight.device)
    return adapter.get_merged_weights(active), ids, None


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    kind = t.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else t.dtype


class _LinearCrossEntropy(torch.autograd.Function):
    """CE of (hidden @ weight.T + bias) per row, chunked, with the row gradients formed in forward.

    ce_i depends on hidden_i alone, so d ce_i / d hidden_i = (softmax_i - onehot_i) @ weight can be
    computed while chunk i's logits exist and scaled by the incoming gradient later. Likewise for
    the few trainable rows of weight (peft trainable tokens): d ce_i / d weight_r = (p_ir - [r is
    gold]) * hidden_i, kept as the [N, k] probabilities of those rows. Matmuls run in the autocast
    dtype when autocast is on (as the dense path's would), softmax and CE in fp32.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, rows, gold, chunk, need_grad):
        n = hidden.shape[0]
        dtype = _compute_dtype(hidden)
        w = weight.detach().to(dtype)  # [V, H]; one cast per call, not per chunk
        b = bias.detach().to(dtype) if bias is not None else None
        ce = torch.empty(n, dtype=torch.float32, device=hidden.device)
        hit = torch.empty(n, dtype=torch.bool, device=hidden.device)
        grad_rows = weight.requires_grad and rows is not None and need_grad
        d_hidden = torch.empty_like(hidden) if need_grad else None  # [N, H]
        d_rows = hidden.new_empty((n, rows.numel()), dtype=torch.float32) if grad_rows else None  # [N, k]
        for lo in range(0, n, chunk):
            hi = min(n, lo + chunk)
            g = gold[lo:hi]
            logits = hidden[lo:hi].detach().to(dtype) @ w.T  # [c, V]
            if b is not None:
                logits = logits + b
            logits = logits.float()
            lse = torch.logsumexp(logits, dim=-1)  # [c]
            ce[lo:hi] = lse - logits.gather(1, g[:, None]).squeeze(1)
            hit[lo:hi] = logits.argmax(-1) == g
            if need_grad:
                p = logits.sub_(lse[:, None]).exp_()  # softmax, in place
                p[torch.arange(hi - lo, device=p.device), g] -= 1.0
                d_hidden[lo:hi] = (p.to(dtype) @ w).to(hidden.dtype)
                if grad_rows:
                    d_rows[lo:hi] = p[:, rows]
        ctx.mark_non_differentiable(hit)
        ctx.grad_rows = grad_rows
        ctx.weight_meta = (weight.shape, weight.dtype)
        ctx.save_for_backward(d_hidden, d_rows, hidden if grad_rows else None, rows if grad_rows else None)
        return ce, hit

    @staticmethod
    def backward(ctx, grad_ce, _grad_hit):
        d_hidden, d_rows, hidden, rows = ctx.saved_tensors
        g = grad_ce.float()[:, None]  # [N, 1]
        grad_hidden = (d_hidden.float() * g).to(d_hidden.dtype) if d_hidden is not None else None
        grad_weight = None
        if ctx.grad_rows:
            shape, dtype = ctx.weight_meta
            grad_weight = torch.zeros(shape, dtype=dtype, device=d_rows.device)
            grad_weight[rows] = ((d_rows * g).T @ hidden.float()).to(dtype)  # [k, H]
        return grad_hidden, grad_weight, None, None, None, None, None
