"""Quality measures of generated replies, as `nbdiff bench` reports them.

- generative perplexity: exp(mean negative log-likelihood) of the reply's tokens given the prompt,
  scored by an AR model (the source model, or the same weights read causally at block size 1).
  Low is fluent text by the scorer's standards; repetition also scores low, hence distinct-2.
- distinct-2: distinct token bigrams / bigrams inside each reply (1.0 = no repeated pair).
- AR agreement: share of the AR greedy reply that a reply reproduces as a common prefix.

Aggregates over many replies are token-weighted sums (a long reply counts more than a short one),
like the speed figures, so a suite's row reads as one long reply.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def bigram_counts(tokens: Sequence[int]) -> tuple[int, int]:
    """(distinct bigrams, bigrams) of one reply."""
    pairs = list(zip(tokens, tokens[1:]))
    return len(set(pairs)), len(pairs)


def distinct2(replies: Sequence[Sequence[int]]) -> float:
    """Distinct bigrams over bigrams, summed over replies; NaN when no reply has two tokens."""
    distinct = total = 0
    for reply in replies:
        d, t = bigram_counts(reply)
        distinct += d
        total += t
    return distinct / total if total else float("nan")


def ar_agreement(replies: Sequence[Sequence[int]], references: Sequence[Sequence[int]]) -> float:
    """Common-prefix tokens over reference tokens, summed over pairs (1.0 = every AR reply reproduced)."""
    shared = sum(common_prefix(r, ref) for r, ref in zip(replies, references))
    total = sum(len(ref) for ref in references)
    return shared / total if total else float("nan")


@torch.no_grad()
def reply_nll(model, prompt: Sequence[int], reply: Sequence[int]) -> float:
    """Summed negative log-likelihood (nats) of `reply` after `prompt` under a causal forward of `model`.

    NaN if a reply token is outside the scorer's vocabulary (a different tokenizer).
    """
    if not reply:
        return 0.0
    vocab = model.get_input_embeddings().weight.shape[0]
    if max(reply) >= vocab or max(prompt) >= vocab:
        return float("nan")
    ids = torch.tensor([list(prompt) + list(reply)], device=model.device)  # [1, P + R]
    n = len(reply)
    # logits at P - 1 .. P + R - 2 predict the reply tokens
    logits = model(input_ids=ids, logits_to_keep=n + 1).logits[0, :-1].float()  # [R, V]
    target = ids[0, -n:]
    return float(torch.nn.functional.cross_entropy(logits, target, reduction="sum"))


def perplexity(nll_sum: float, tokens: int) -> float:
    """exp(nll / tokens); NaN without tokens."""
    if tokens <= 0 or math.isnan(nll_sum):
        return float("nan")
    return math.exp(nll_sum / tokens)
