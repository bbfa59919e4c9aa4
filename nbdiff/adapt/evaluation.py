"""Held-out evaluation of an adapted model: MDM loss, AR loss and masked-token accuracy per block size.

The noise of every held-out row comes from a generator seeded by (seed, block size, row), so the
same rows get the same masks in every run and at every evaluation: numbers are comparable between
runs, recipes and models. L_MDM here is always the plain mean over masked tokens (no 1/t), so
it measures prediction quality whatever weighting the training used.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from nbdiff.adapt.data import PackedRows
from nbdiff.method.layout import parallel_losses
from nbdiff.method.losses import ar_targets
from nbdiff.method.noising import noise_blocks

EVAL_SEED = 20251206


def eval_block_sizes(target: int) -> list[int]:
    """1, 2, 4, ..., target."""
    sizes, b = [], 1
    while b <= target:
        sizes.append(b)
        b *= 2
    return sizes


def noise_row(rows: PackedRows, i: int, block_size: int, mask_token_id: int, seed: int, eps: float = 1e-3):
    """Noise row i with the generator of (seed, block size, row): the same mask in every run."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + block_size * 65_537 + i)
    return noise_blocks(rows.input_ids[i:i + 1], rows.position_ids[i:i + 1], rows.doc_ids[i:i + 1], block_size,
                        mask_token_id, eps=eps, maskable=rows.trainable[i:i + 1], generator=g)


@torch.no_grad()
def evaluate(model, rows: PackedRows, block_sizes: list[int], mask_token_id: int, context: str = "causal",
             batch_size: int = 4, seed: int = EVAL_SEED, autocast=None) -> dict:
    """Evaluate `model` on held-out packed rows.

    Returns {"ar": mean AR CE, "ar_tokens": n, "mdm": {b: mean MDM CE}, "acc": {b: masked accuracy},
    "mdm_tokens": {b: n}}. AR is read at the smallest block size (b = 1 in practice), where both
    context masks are token-causal, so it is the true AR loss and comparable across variants.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    ctx = autocast or nullcontext
    out = {"ar": float("nan"), "ar_tokens": 0, "mdm": {}, "acc": {}, "mdm_tokens": {}}
    ar_at = block_sizes[0]
    for b in block_sizes:
        mdm_sum, mdm_n, correct, ar_sum, ar_n = 0.0, 0, 0, 0.0, 0
        for start in range(0, len(rows), batch_size):
            idx = list(range(start, min(start + batch_size, len(rows))))
            noised = [noise_row(rows, i, b, mask_token_id, seed) for i in idx]
            x_t = torch.cat([n.x_t for n in noised]).to(device)  # [B, L]
            masked = torch.cat([n.masked for n in noised]).to(device)
            t = torch.cat([n.t for n in noised]).to(device)
            x_0 = rows.input_ids[idx].to(device)
            pos = rows.position_ids[idx].to(device)
            docs = rows.doc_ids[idx].to(device)
            target = ar_targets(rows.trainable[idx].to(device), pos, b, context) if b == ar_at else None
            with ctx():
                # hidden states, and the LM head only at the rows a loss reads (no [B, 2L, V] logits)
                parts = parallel_losses(model, x_t, x_0, pos, docs, masked, t, target, b, context)
            mdm_sum += float(parts.mdm) * parts.mdm_tokens
            mdm_n += parts.mdm_tokens
            correct += parts.mdm_correct
            if target is not None:
                ar_sum += float(parts.ar) * parts.ar_tokens
                ar_n += parts.ar_tokens
        if mdm_n:
            out["mdm"][b] = mdm_sum / mdm_n
            out["acc"][b] = correct / mdm_n
        out["mdm_tokens"][b] = mdm_n
        if b == ar_at:
            out["ar"] = ar_sum / ar_n if ar_n else float("nan")
            out["ar_tokens"] = ar_n
    if was_training:
        model.train()
    return out
