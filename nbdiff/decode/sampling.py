"""Choosing tokens and scoring how sure the model is: temperature, top-k, top-p and confidence rules.

The decoder calls `choose` on the logits of every candidate position, then `select_commits` to
decide which candidates become tokens at this step (METHOD.md: the most confident masked position
of the current sub-block, plus every one whose confidence exceeds the threshold).

Confidence rules (higher = surer, all in [0, 1] so one threshold serves every rule):
- prob: probability of the chosen token;
- entropy: exp(-H(p)), a monotone map of the negative entropy into (0, 1] (1 = one-hot);
- margin: top-1 minus top-2 probability.
With temperature 0 the token is the argmax and confidences come from softmax(logits).
"""

from __future__ import annotations

import torch

from nbdiff.decode.options import CONFIDENCE_RULES
from nbdiff.errors import NBDiffError


def filtered_probs(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Sampling distribution for logits [N, V]: temperature, then top-k, then top-p. Returns fp32 [N, V]."""
    logits = logits.float()
    if temperature > 0:
        logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # [N, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(-1)
        # drop a token when the mass before it already reaches top_p (the top token always stays)
        drop_sorted = (sorted_probs.cumsum(-1) - sorted_probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.softmax(-1)


def confidence(probs: torch.Tensor, tokens: torch.Tensor, rule: str) -> torch.Tensor:
    """Confidence of `tokens` [N] under `probs` [N, V] by `rule`; returns fp32 [N] in [0, 1]."""
    if rule == "prob":
        return probs.gather(-1, tokens[:, None])[:, 0]
    if rule == "entropy":
        # xlogy keeps 0 * log 0 = 0 for tokens removed by top-k/top-p
        entropy = -torch.special.xlogy(probs, probs).sum(-1)
        return torch.exp(-entropy)
    if rule == "margin":
        top2 = torch.topk(probs, min(2, probs.shape[-1]), dim=-1).values
        return top2[:, 0] - (top2[:, 1] if top2.shape[-1] > 1 else 0.0)
    raise NBDiffError(f"confidence must be one of {', '.join(CONFIDENCE_RULES)}, got {rule!r}")


def choose(
    logits: torch.Tensor,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    rule: str = "prob",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per row of logits [N, V]. Returns (tokens [N] long, confidences [N] fp32)."""
    if temperature == 0:
        probs = logits.float().softmax(-1)
        tokens = probs.argmax(-1)
    else:
        probs = filtered_probs(logits, temperature, top_k, top_p)
        tokens = torch.multinomial(probs, 1, generator=generator)[:, 0]
    return tokens, confidence(probs, tokens, rule)


def select_commits(conf: torch.Tensor, candidates: torch.Tensor, threshold: float) -> torch.Tensor:
    """Which candidates to commit at this step.

    conf: [B, S] confidences; candidates: bool [B, S] (masked positions of the current sub-block).
    Each row with a candidate commits its most confident one plus every candidate with
    confidence > threshold (strictly, so threshold 1.0 commits exactly one per step).
    Returns bool [B, S].
    """
    scored = conf.masked_fill(~candidates, float("-inf"))
    best = torch.zeros_like(candidates)
    best.scatter_(1, scored.argmax(1, keepdim=True), True)
    best &= candidates  # rows without candidates commit nothing
    return best | (candidates & (conf > threshold))
