"""Block-wise masking of the noised copy x_t (METHOD.md, "Noising").

For every block of every document a noise level t ~ U[eps, 1] is drawn, and each position of the
block is replaced by MASK with probability t, except the block's first token: at inference the
first token of a block always comes from an AR step, so it is never masked in training either.
With block size 1 nothing is ever masked and training is pure AR.
Deterministic under a `torch.Generator`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nbdiff.errors import NBDiffError


@dataclass
class NoisedBatch:
    """The noised copy and what was done to it; every tensor is [B, L]."""

    x_t: torch.Tensor
    """Token ids with MASK at masked positions."""
    masked: torch.Tensor
    """bool, True where the token was replaced by MASK."""
    t: torch.Tensor
    """float, the noise level of each position's block."""


def block_starts(position_ids: torch.Tensor, block_size: int) -> torch.Tensor:
    """bool [B, L]: True at the first token of each block (block = position // block_size)."""
    return position_ids % block_size == 0


def noise_blocks(
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    doc_ids: torch.Tensor,
    block_size: int,
    mask_token_id: int,
    *,
    eps: float = 1e-3,
    maskable: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> NoisedBatch:
    """Mask each block of each document with its own noise level.

    input_ids, position_ids, doc_ids: [B, L]; `position_ids` restart at 0 per document.
    maskable: optional bool [B, L], False where a token may never be masked (padding, a chat's
    prompt tokens). Block starts are never masked.
    """
    if not 0.0 < eps <= 1.0:
        raise NBDiffError(f"eps must be in (0, 1], got {eps}")
    B, L = input_ids.shape
    device = input_ids.device
    blk = torch.div(position_ids, block_size, rounding_mode="floor")
    # A block is identified by (document, block index); number them per row so each gets its own t.
    new_block = torch.ones(B, L, dtype=torch.bool, device=device)
    new_block[:, 1:] = (blk[:, 1:] != blk[:, :-1]) | (doc_ids[:, 1:] != doc_ids[:, :-1])
    block_index = new_block.long().cumsum(dim=1) - 1  # [B, L], 0..n_blocks-1 per row
    n_blocks = int(block_index.max().item()) + 1
    t_blocks = torch.rand(B, n_blocks, generator=generator, device=device) * (1.0 - eps) + eps
    t = torch.gather(t_blocks, 1, block_index)
    u = torch.rand(B, L, generator=generator, device=device)
    masked = (u < t) & ~block_starts(position_ids, block_size)
    if maskable is not None:
        masked &= maskable
    x_t = torch.where(masked, torch.full_like(input_ids, mask_token_id), input_ids)
    return NoisedBatch(x_t=x_t, masked=masked, t=t)


def complementary(noised: NoisedBatch, input_ids: torch.Tensor, position_ids: torch.Tensor,
                  block_size: int, mask_token_id: int, maskable: torch.Tensor | None = None) -> NoisedBatch:
    """The complementary view (Fast-dLLM v2): mask exactly the eligible positions `noised` kept.

    Together the two views put every eligible token under a loss once. Noise level is 1 - t.
    """
    eligible = ~block_starts(position_ids, block_size)
    if maskable is not None:
        eligible &= maskable
    masked = eligible & ~noised.masked
    x_t = torch.where(masked, torch.full_like(input_ids, mask_token_id), input_ids)
    return NoisedBatch(x_t=x_t, masked=masked, t=(1.0 - noised.t).clamp_min(1e-3))
