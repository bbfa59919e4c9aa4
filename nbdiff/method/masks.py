"""Where every attention mask of nbdiff is built: training (parallel 2L layout) and decoding.

Conventions: a mask is a bool tensor, True = the query (row) may attend to the key (column).
`to_model_mask` turns one into what a transformers model's attention implementation honours:
bool for `sdpa`, additive float for `eager` (eager *adds* the mask, so a bool mask would be
silently ignored there).

Training layout (METHOD.md): one sequence `[x_t ; x_0]` of length 2L, both halves with the same
position ids. With `block(i) = pos(i) // b`:

    query \\ key   noised j                    clean j
    noised i       block(i) == block(j)  M_BD  block(j) < block(i)  M_OBC
    clean i        never                       j <= i  M_CC  (block-causal: block(j) <= block(i))

Packed sequences: several documents share one row; position ids restart at every document and a
token never attends across a document boundary, so each document is laid out in blocks of its own.
"""

from __future__ import annotations

import torch

from nbdiff.errors import NBDiffError

CONTEXTS = ("causal", "block-causal")


def _check(block_size: int, context: str) -> None:
    if block_size < 1:
        raise NBDiffError(f"block size must be >= 1, got {block_size}")
    if context not in CONTEXTS:
        raise NBDiffError(f"context must be one of {', '.join(CONTEXTS)}, got {context!r}")


def packed_training_mask(
    position_ids: torch.Tensor, doc_ids: torch.Tensor, block_size: int, context: str = "causal"
) -> torch.Tensor:
    """Training mask for a batch of packed rows.

    position_ids: [B, L] position of each token inside its document (restarts at 0 per document).
    doc_ids: [B, L] document id of each token (any integers; equal = same document).
    Returns bool [B, 2L, 2L]: rows/cols 0..L-1 the noised copy, L..2L-1 the clean copy.
    """
    _check(block_size, context)
    if position_ids.shape != doc_ids.shape or position_ids.dim() != 2:
        raise NBDiffError("position_ids and doc_ids must both be [batch, seq_len]")
    B, L = position_ids.shape
    blk = torch.div(position_ids, block_size, rounding_mode="floor")
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]  # [B, L, L]
    q_blk, k_blk = blk[:, :, None], blk[:, None, :]
    m_bd = same_doc & (q_blk == k_blk)
    m_obc = same_doc & (k_blk < q_blk)
    if context == "causal":
        idx = torch.arange(L, device=position_ids.device)
        m_cc = same_doc & (idx[None, None, :] <= idx[None, :, None])
    else:
        m_cc = same_doc & (k_blk <= q_blk)
    never = torch.zeros_like(m_bd)
    top = torch.cat([m_bd, m_obc], dim=2)
    bottom = torch.cat([never, m_cc], dim=2)
    return torch.cat([top, bottom], dim=1)


def training_mask(seq_len: int, block_size: int, context: str = "causal") -> torch.Tensor:
    """Mask of the parallel layout `[x_t ; x_0]` for one document of `seq_len` tokens.

    Returns bool [2*seq_len, 2*seq_len], True = may attend. `seq_len` need not be a multiple of
    `block_size` (the last block is partial). `context="block-causal"` gives BD3-LM's clean copy.
    """
    if seq_len < 1:
        raise NBDiffError(f"seq_len must be >= 1, got {seq_len}")
    pos = torch.arange(seq_len)[None]
    return packed_training_mask(pos, torch.zeros_like(pos), block_size, context)[0]


def training_mask_mod(position_ids: torch.Tensor, doc_ids: torch.Tensor, block_size: int,
                      context: str = "causal", clean_only: bool = False):
    """The rule of `packed_training_mask` as a flex-attention `mask_mod(b, h, q, k) -> bool`.

    Same table, evaluated per (query, key) index instead of stored, so `training_block_mask` can
    skip whole tiles the rule forbids. clean_only: the [L, L] clean quadrant alone (the b = 1 pass).
    """
    _check(block_size, context)
    L = position_ids.shape[1]
    blk = torch.div(position_ids, block_size, rounding_mode="floor")  # [B, L]

    def mask_mod(b, h, q, k):
        q_clean, k_clean = (q >= L, k >= L) if not clean_only else (q >= 0, k >= 0)
        qi, ki = q % L, k % L  # token index inside its half
        same_doc = doc_ids[b, qi] == doc_ids[b, ki]
        qb, kb = blk[b, qi], blk[b, ki]
        cc = (ki <= qi) if context == "causal" else (kb <= qb)
        noised_q = ~q_clean & ((~k_clean & (qb == kb)) | (k_clean & (kb < qb)))  # M_BD | M_OBC
        return same_doc & (noised_q | (q_clean & k_clean & cc))

    return mask_mod


def training_block_mask(position_ids: torch.Tensor, doc_ids: torch.Tensor, block_size: int,
                        context: str = "causal", clean_only: bool = False, tile: int = 128):
    """A flex-attention BlockMask of the training layout (equal to `packed_training_mask`)."""
    from torch.nn.attention.flex_attention import create_block_mask

    B, L = position_ids.shape
    n = L if clean_only else 2 * L
    mod = training_mask_mod(position_ids, doc_ids, block_size, context, clean_only)
    return create_block_mask(mod, B, None, n, n, device=str(position_ids.device), BLOCK_SIZE=tile)


def decoding_mask(context_len: int, block_len: int) -> torch.Tensor:
    """Context-causal mask of one uncached forward over `context + active block`.

    Context tokens attend causally; active-block tokens see the whole context and the whole block.
    Returns bool [C+B, C+B]. (The cached decoder uses the last B rows of this mask.)
    """
    n = context_len + block_len
    mask = torch.ones(n, n, dtype=torch.bool).tril_()
    mask[context_len:, :] = True
    return mask


def left_padded(rows: torch.Tensor, pad: torch.Tensor, first_query: int) -> torch.Tensor:
    """Apply left padding to mask rows shared by a batch.

    rows: bool [n, K], queries at columns [first_query, first_query + n) over keys [0, K).
    pad: [B] number of pad columns at the start of each row. Pad keys are hidden; a pad query
    sees only itself (a fully masked row would make sdpa return NaN). Returns bool [B, n, K].
    """
    n, k = rows.shape
    cols = torch.arange(k, device=rows.device)
    key_ok = cols[None, :] >= pad[:, None]  # [B, K]
    mask = rows[None] & key_ok[:, None, :]  # [B, n, K]
    q_cols = torch.arange(first_query, first_query + n, device=rows.device)  # [n]
    pad_query = q_cols[None, :] < pad[:, None]  # [B, n]
    self_key = q_cols[:, None] == cols[None, :]  # [n, K]
    return mask | (pad_query[:, :, None] & self_key[None])


def cached_rows(hidden: torch.Tensor, first_query: int, causal: bool) -> torch.Tensor:
    """Mask rows of the queries at columns [first_query, K) of a cached decoding pass, in O(n*K).

    hidden: bool [B, K], columns no query may see (left padding, rejected drafts); K = first_query
    + n covers the cached columns and the n new ones. Cached columns are visible unless hidden; the
    new ones are seen causally (`causal=True`: prefill, commit, verification) or all at once (a
    denoising pass: the block is bidirectional). A query on a hidden column (a pad query) sees only
    itself, since a fully masked row would make sdpa return NaN. Returns bool [B, n, K] on
    hidden's device; the rows of `decoding_mask` with `left_padded` applied, without the K x K tensor.
    """
    _, k = hidden.shape
    cols = torch.arange(k, device=hidden.device)  # [K]
    q_cols = cols[first_query:]  # [n]
    mask = ~hidden[:, None, :]  # [B, 1, K]
    if causal:
        mask = mask & (cols[None, :] <= q_cols[:, None])[None]  # [B, n, K]
    else:
        mask = mask.expand(-1, k - first_query, -1)
    self_key = q_cols[:, None] == cols[None, :]  # [n, K]
    return mask | (hidden[:, first_query:, None] & self_key[None])


def to_model_mask(mask: torch.Tensor, model, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Turn a bool mask [Q, K] or [B, Q, K] into the 4-D mask the model's attention honours.

    sdpa: bool [B, 1, Q, K]. eager: additive float (0 where allowed, dtype-min elsewhere).
    Other implementations (flash attention, flex attention) ignore or mishandle dense custom
    masks, so they are refused with a hint.
    """
    if mask.dtype != torch.bool:
        raise NBDiffError("to_model_mask expects a bool mask (True = may attend)")
    if mask.dim() == 2:
        mask = mask[None]
    mask4 = mask[:, None]
    impl = attention_implementation(model)
    if impl == "sdpa":
        return mask4
    if impl == "eager":
        if dtype is None:
            dtype = next(model.parameters()).dtype
        if not dtype.is_floating_point:  # quantized weights: compute dtype is float
            dtype = torch.float32
        out = torch.zeros(mask4.shape, dtype=dtype, device=mask4.device)
        return out.masked_fill_(~mask4, torch.finfo(dtype).min)
    raise NBDiffError(
        f"attention implementation {impl!r} does not honour custom 4-D masks",
        "load the model with attn_implementation='sdpa' (or 'eager')",
    )


def attention_implementation(model) -> str:
    # DDP/FSDP wrappers hide the model (and its config) behind `.module`
    config = getattr(model, "config", None) or getattr(getattr(model, "module", None), "config", None) or model
    return getattr(config, "_attn_implementation", None) or "eager"
