"""The parallel adaptation layout: one forward over `[x_t ; x_0]` (length 2L).

Both halves share the position ids; the mask of `nbdiff.method.masks` keeps the noised copy inside its
block (plus earlier clean blocks) and the clean copy AR-causal. One pass gives the noised logits
(for L_MDM) and the clean logits (an exact AR forward, for L_AR).

Two entry points:
- `parallel_losses` (training and evaluation): the model returns final hidden states, and only the
  rows a loss reads go through the LM head, in chunks (nbdiff.method.losses.chunked_cross_entropy): the
  noised half before every masked token, the clean half before every AR target. No [B, 2L, V]
  tensor exists, so memory no longer grows with the vocabulary.
- `parallel_forward`: full logits of both halves (tests, consistency checks, the dense reference).

Attention: a dense bool mask for sdpa/eager; with flex attention (`nbdiff.method.attention`), a BlockMask
built from the same rule, which skips the tiles the rule forbids.
"""

from __future__ import annotations

import torch

from nbdiff.method.losses import LossParts, ar_loss, check_weighting, chunked_cross_entropy, mdm_loss, reduce_mdm
from nbdiff.method.masks import attention_implementation, packed_training_mask, to_model_mask, training_block_mask


def training_attention_mask(model, position_ids: torch.Tensor, doc_ids: torch.Tensor, block_size: int,
                            context: str = "causal", clean_only: bool = False):
    """The 2L mask ([L, L] clean quadrant if clean_only) in the form the model's attention takes."""
    if attention_implementation(model) == "flex_attention":
        return training_block_mask(position_ids, doc_ids, block_size, context, clean_only)
    mask = packed_training_mask(position_ids, doc_ids, block_size, context).to(position_ids.device)
    if clean_only:
        L = position_ids.shape[1]
        mask = mask[:, L:, L:]  # [B, L, L]
    return to_model_mask(mask, model)


def _one_pass(block_size: int, x_t: torch.Tensor, x_0: torch.Tensor) -> bool:
    # b = 1 masks nothing, and noised token i sees clean 0..i-1 plus itself: the same inputs as
    # clean token i, so both halves have the same outputs. One causal pass of length L gives them
    # at half the cost (the clean quadrant of the mask keeps document boundaries).
    return block_size == 1 and torch.equal(x_t, x_0)


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
    if _one_pass(block_size, x_t, x_0):
        mask = training_attention_mask(model, position_ids, doc_ids, block_size, context, clean_only=True)
        out = model(input_ids=x_0, position_ids=position_ids, attention_mask=mask, use_cache=False)
        return out.logits, out.logits
    ids = torch.cat([x_t, x_0], dim=1)  # [B, 2L]
    pos = torch.cat([position_ids, position_ids], dim=1)  # [B, 2L]
    mask = training_attention_mask(model, position_ids, doc_ids, block_size, context)
    out = model(input_ids=ids, position_ids=pos, attention_mask=mask, use_cache=False)
    logits = out.logits  # [B, 2L, V]
    return logits[:, :L], logits[:, L:]


def parallel_hidden(model, x_t: torch.Tensor, x_0: torch.Tensor, position_ids: torch.Tensor, doc_ids: torch.Tensor,
                    block_size: int, context: str = "causal") -> tuple[torch.Tensor, torch.Tensor]:
    """Final hidden states of the 2L layout (after the last norm): (noised, clean), each [B, L, H]."""
    L = x_t.shape[1]
    if _one_pass(block_size, x_t, x_0):
        mask = training_attention_mask(model, position_ids, doc_ids, block_size, context, clean_only=True)
        hidden = _final_hidden(model, x_0, position_ids, mask)
        return hidden, hidden
    ids = torch.cat([x_t, x_0], dim=1)  # [B, 2L]
    pos = torch.cat([position_ids, position_ids], dim=1)  # [B, 2L]
    mask = training_attention_mask(model, position_ids, doc_ids, block_size, context)
    hidden = _final_hidden(model, ids, pos, mask)  # [B, 2L, H]
    return hidden[:, :L], hidden[:, L:]


def _final_hidden(model, ids: torch.Tensor, pos: torch.Tensor, mask) -> torch.Tensor:
    # Through the whole model (so DDP, peft and gradient checkpointing wrappers all apply), asking
    # for logits of the last position only; transformers ties hidden_states[-1] to the normed output.
    out = model(input_ids=ids, position_ids=pos, attention_mask=mask, use_cache=False,
                output_hidden_states=True, logits_to_keep=1)
    return out.hidden_states[-1]


def _unwrapped(model):
    return getattr(model, "module", model)  # DDP


def supports_hidden_path(model) -> bool:
    """Whether `parallel_losses` may read hidden states and apply the LM head itself.

    Not under FSDP (the head's weights are sharded outside the root forward) nor for heads that
    post-process logits (soft-capping, scaling), which the hidden path would skip.
    """
    inner = _unwrapped(model)
    if "FSDP" in type(inner).__name__ or "FullyShardedDataParallel" in type(inner).__name__:
        return False
    config = getattr(inner, "config", None)
    if config is None or inner.get_output_embeddings() is None:
        return False
    return not any(getattr(config, k, None) not in (None, 1.0) for k in
                   ("final_logit_softcapping", "logit_scale", "logits_scaling"))


def parallel_losses(
    model,
    x_t: torch.Tensor,
    x_0: torch.Tensor,
    position_ids: torch.Tensor,
    doc_ids: torch.Tensor,
    masked: torch.Tensor,
    t: torch.Tensor,
    ar_target: torch.Tensor | None,
    block_size: int,
    context: str = "causal",
    weighting: str = "none",
    eligible: torch.Tensor | None = None,
    ar_weight: float = 0.5,
    chunk_rows: int | None = None,
) -> LossParts:
    """L_MDM and L_AR of one batch through the 2L layout, without full logits.

    Same values and gradients as `mdm_loss(noised) + ar_loss(clean)` on `parallel_forward`'s
    logits (tests/test_layout.py). ar_target None skips L_AR (and its head rows). Falls back to
    the dense path where `supports_hidden_path` says no.
    """
    check_weighting(weighting)
    if not supports_hidden_path(model):
        return _dense_losses(model, x_t, x_0, position_ids, doc_ids, masked, t, ar_target, block_size, context,
                             weighting, eligible, ar_weight)
    noised_h, clean_h = parallel_hidden(model, x_t, x_0, position_ids, doc_ids, block_size, context)
    # the shift: hidden state at j - 1 predicts token j, for targets j = 1..L-1
    sel_m = masked[:, 1:]
    rows = [noised_h[:, :-1][sel_m]]  # [N_mdm, H]
    gold = [x_0[:, 1:][sel_m]]
    if ar_target is not None:
        sel_a = ar_target[:, 1:]
        rows.append(clean_h[:, :-1][sel_a])  # [N_ar, H]
        gold.append(x_0[:, 1:][sel_a])
    n_mdm = rows[0].shape[0]
    inner = _unwrapped(model)
    ce, hit = chunked_cross_entropy(inner.get_output_embeddings(), torch.cat(rows), torch.cat(gold),
                                    inner.config.vocab_size, chunk_rows)
    zero = noised_h.sum() * 0.0  # an empty loss still joins the graph (DDP expects every gradient)
    mdm = reduce_mdm(ce[:n_mdm], t[:, 1:][sel_m], weighting, eligible) if n_mdm else zero
    n_ar = ce.shape[0] - n_mdm
    ar = ce[n_mdm:].mean() if n_ar else zero
    total = mdm + ar_weight * ar if ar_weight else mdm
    return LossParts(total=total, mdm=mdm, ar=ar, mdm_tokens=n_mdm, ar_tokens=n_ar,
                     mdm_correct=int(hit[:n_mdm].sum()))


def _dense_losses(model, x_t, x_0, position_ids, doc_ids, masked, t, ar_target, block_size, context, weighting,
                  eligible, ar_weight) -> LossParts:
    noised, clean = parallel_forward(model, x_t, x_0, position_ids, doc_ids, block_size, context)
    mdm, n_mdm, correct = mdm_loss(noised, x_0, masked, t, weighting, eligible)
    ar, n_ar = ar_loss(clean, x_0, ar_target) if ar_target is not None else (clean.sum() * 0.0, 0)
    total = mdm + ar_weight * ar if ar_weight else mdm
    return LossParts(total=total, mdm=mdm, ar=ar, mdm_tokens=n_mdm, ar_tokens=n_ar, mdm_correct=correct)
