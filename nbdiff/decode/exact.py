"""Exact mode: verify a drafted block with the model's own causal pass, so the output is the AR output.

The causal pass that commits a block computes, at every block offset j, the AR model's distribution
p_j of the token at offset j + 1. Drafted tokens are checked left to right against it:

- greedy: keep a draft token while it equals argmax p_j; at the first mismatch AR's own token
  replaces it and the rest of the draft is dropped;
- sampling: keep draft token x with probability min(1, p_j(x) / q_j(x)) and, at the first
  rejection, sample from the residual max(0, p_j - q_j) renormalised (speculative sampling,
  Leviathan et al. 2023). Drafts here are deterministic given the verified prefix (q_j is one-hot
  at x: the denoising steps and a trained drafter pick argmax, the n-gram drafter looks tokens
  up), so the rule reads: keep x with probability p_j(x), else sample from p_j with x removed. A draft *sampled* in the
  diffusion's confidence order would condition on later positions, which breaks the
  independence the rule's proof needs; a deterministic draft is exact for any schedule.

Either way the token after the accepted prefix (AR's correction, or the bonus token after a
fully accepted draft) comes from the same pass and becomes the next block's first token.

What "the AR output" means per dtype. In fp32 nbdiff's CPU products give a row the same bits whatever
shares its product, so greedy exact output equals block size 1's token for token (tests/test_exact.py).
In bf16/fp16 a verify pass of n tokens rounds unlike n one-token steps, so a position's logits differ
from block size 1's by a few units in the last place (ulps). Greedy exact output then equals block
size 1's *in the same dtype* up to the first near-tie: a kept token whose top two logits were within
NEAR_TIE_ULPS ulps of the dtype at the top logit's magnitude, where the other computation may pick the
runner-up. `near_ties` counts them (FinalEvent.near_ties; vLLM and SGLang report the same kind of
count for speculative decoding): a reply with none is block size 1's reply.

Near-ties per dtype, as reported (--json, bench): bf16/fp16, and any dtype off the CPU, count them at every
greedy verify pass; fp32 on the CPU reports 0 without looking, since there a near-tie cannot change a token
(`nbdiff.decode.plan.verify_rounds_like_steps` decides, once per call; the top-2 over the vocabulary it
skips cost about 2 ms a pass on the 0.5B's 151,936 logits).
"""

from __future__ import annotations

import torch

from nbdiff.decode.sampling import filtered_probs


def accepted_prefix(match: torch.Tensor, checks: torch.Tensor) -> torch.Tensor:
    """Leading True count of match [B, m], looking at the first checks[i] entries of row i. Returns [B]."""
    limit = torch.arange(match.shape[1], device=match.device)[None] < checks[:, None]
    return (match & limit).long().cumprod(1).sum(1)


def verify_greedy(logits: torch.Tensor, block: torch.Tensor, checks: torch.Tensor):
    """logits [B, n, V] of the causal pass over block [B, n]; checks [B] draft tokens to verify per row.

    Returns (accepted [B], next token [B], its distribution [B, V]).
    """
    ar = logits.argmax(-1)  # [B, n]
    accepted = accepted_prefix(ar[:, :-1] == block[:, 1:], checks)
    rows = torch.arange(block.shape[0], device=block.device)
    return accepted, ar[rows, accepted], logits[rows, accepted].float().softmax(-1)


def verify_sampled(logits: torch.Tensor, block: torch.Tensor, checks: torch.Tensor, *, temperature: float,
                   top_k: int, top_p: float, generator: torch.Generator):
    """The speculative-sampling rule for one-hot drafts; same arguments and result as verify_greedy."""
    B, n, V = logits.shape
    p = filtered_probs(logits.reshape(B * n, V), temperature, top_k, top_p).view(B, n, V)
    draft = block[:, 1:]  # [B, n - 1]
    p_draft = p[:, :-1].gather(-1, draft[..., None])[..., 0]  # [B, n - 1]
    u = torch.rand(p_draft.shape, generator=generator, device=p.device)
    accepted = accepted_prefix(u < p_draft, checks)
    rows = torch.arange(B, device=p.device)
    dist = p[rows, accepted]  # [B, V]: AR's distribution after the accepted prefix
    if n > 1:
        rejected = accepted < checks  # [B]
        x = draft[rows, accepted.clamp(max=n - 2)]
        residual = dist.scatter(-1, x[:, None], 0.0)
        residual = residual / residual.sum(-1, keepdim=True).clamp_min(1e-30)
        dist = torch.where(rejected[:, None], residual, dist)
    nxt = torch.multinomial(dist, 1, generator=generator)[:, 0]
    return accepted, nxt, dist


NEAR_TIE_ULPS = 4
"""A kept token is a near-tie when its top two logits are at most this many ulps apart (ulps of the
model's dtype at the top logit's magnitude). Measured on tiny random models in bf16: where an exact reply
first left block size 1's, the top-2 margin was 0-2 ulps (12 of 144 replies; docs/benchmarks/exact-mode.md,
"The drafting plan and near-ties"); 4 leaves room for a deeper model's larger rounding."""


def near_ties(logits: torch.Tensor, accepted: torch.Tensor, dtype: torch.dtype, ulps: float = NEAR_TIE_ULPS) -> torch.Tensor:
    """Per row, how many of the pass's positions 0..accepted[i] (the ones whose argmax gave a kept token:
    the accepted drafts and the token after them) had top-2 logits within `ulps` ulps of `dtype`.

    logits [B, n, V] of the verify pass, accepted [B]. Returns [B] long.
    """
    top = logits.topk(2, dim=-1).values.float()  # [B, n, 2]
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else torch.finfo(torch.float32).eps
    tiny = torch.finfo(torch.float32).tiny
    ulp = eps * torch.exp2(torch.floor(torch.log2(top[..., 0].abs().clamp_min(tiny))))  # [B, n]: one ulp at top1
    near = (top[..., 0] - top[..., 1]) <= ulps * ulp  # [B, n]
    upto = torch.arange(logits.shape[1], device=logits.device)[None] <= accepted[:, None]  # [B, n]
    return (near & upto).sum(1)
