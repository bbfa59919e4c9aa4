"""The parallel adaptation layout: one forward over `[x_t ; x_0]` (length 2L).

Both halves share the position ids; the mask of `nbdiff.masks` keeps the noised copy inside its
block (plus earlier clean blocks) and the clean copy AR-causal. One pass gives the noised logits
(for L_MDM) and the clean logits (an exact AR forward, for L_AR).
"""

from __future__ import annotations

import torch

from .masks import packed_training_mask, to_model_mask


def parallel_forward(
    model,
    x_t: torch.Tensor,
    x_0: torch.Tensor,
    position_ids: torch.Tensor,
    doc_ids: torch.Tensor,
    block_size: int,
    context: str = "causal",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the 2L layout. x_t, x_0, position_ids, doc_ids: [B, L]. Returns (noised, clean) logits [B, L, V]."""
    L = x_t.shape[1]
    mask = packed_training_mask(position_ids, doc_ids, block_size, context).to(x_t.device)
    if block_size == 1 and torch.equal(x_t, x_0):
        # b = 1 masks nothing, and noised token i sees clean 0..i-1 plus itself: the same inputs as
        # clean token i, so both halves have the same logits. One causal pass of length L gives
        # them at half the cost (the clean quadrant of the mask keeps document boundaries).
        clean_mask = mask[:, L:, L:]  # [B, L, L]
        out = model(input_ids=x_0, position_ids=position_ids, attention_mask=to_model_mask(clean_mask, model),
                    use_cache=False)
        return out.logits, out.logits
    ids = torch.cat([x_t, x_0], dim=1)  # [B, 2L]
    pos = torch.cat([position_ids, position_ids], dim=1)  # [B, 2L]
    out = model(input_ids=ids, position_ids=pos, attention_mask=to_model_mask(mask, model), use_cache=False)
    logits = out.logits  # [B, 2L, V]
    return logits[:, :L], logits[:, L:]
