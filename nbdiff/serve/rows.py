"""Rows joining and leaving a decoding batch between blocks: surgery on a `CachedContext`.

A batch shares its columns (nbdiff.decode.context): every row has left padding, then its prompt,
then its blocks. A group of new requests is prefilled in a context of its own and then `merge`d:
the shorter of the two contexts gets hidden pad columns on the left (zero keys and values that
no query sees) so both have the same length, and the rows are stacked. `select` keeps some rows
and `trim`s the left columns that every remaining row hides, so a long-lived batch does not keep
the padding of requests that left.

Positions are per row (`next_pos`) and never depend on the column, so padding a row on the left
changes no position: a row decodes exactly as it would in a batch of its own (the decoder tests
prove that left-padded rows give the tokens of the row alone).
"""

from __future__ import annotations

from typing import Sequence

import torch

from nbdiff.decode.context import CachedContext
from nbdiff.errors import NBDiffError


def plain_cache(cache) -> bool:
    """True when every layer of a transformers cache is a full (non-sliding) layer of plain key/value tensors
    (a GrowingLayer's keys/values are views of its room; one put in their place starts a new room)."""
    from transformers.cache_utils import DynamicLayer

    from nbdiff.decode.context import GrowingLayer

    return all(type(layer) in (DynamicLayer, GrowingLayer) for layer in cache.layers)


def can_merge(ctx: CachedContext) -> bool:
    """True when rows can join and leave this context's cache (`plain_cache`)."""
    return plain_cache(ctx.cache)


def _pad_left(ctx: CachedContext, extra: int) -> None:
    """Put `extra` hidden pad columns before every row's columns."""
    if extra <= 0:
        return
    for layer in ctx.cache.layers:
        if layer.is_initialized and layer.keys.numel():
            k, v = layer.keys, layer.values  # [B, H, L, D]
            layer.keys = torch.cat([k.new_zeros(*k.shape[:2], extra, k.shape[3]), k], dim=2)
            layer.values = torch.cat([v.new_zeros(*v.shape[:2], extra, v.shape[3]), v], dim=2)
    B = ctx.batch_size
    pads = torch.ones(B, extra, dtype=torch.bool, device=ctx.device)
    ctx.hidden = torch.cat([pads, ctx.hidden], dim=1)  # [B, length + extra]
    ctx.ids = [[ctx.pad_token_id] * extra + row for row in ctx.ids]
    ctx.pad = ctx.pad + extra
    ctx.length += extra
    ctx.any_hidden = True


def merge(ctx: CachedContext, new: CachedContext) -> None:
    """Append the rows of `new` (prefilled, same model) to `ctx`, in place; `new` is used up."""
    if ctx.model is not new.model:
        raise NBDiffError("rows of different models cannot share a batch")
    width = max(ctx.length, new.length)
    _pad_left(ctx, width - ctx.length)
    _pad_left(new, width - new.length)
    for mine, theirs in zip(ctx.cache.layers, new.cache.layers):
        mine.keys = torch.cat([mine.keys, theirs.keys], dim=0)
        mine.values = torch.cat([mine.values, theirs.values], dim=0)
    ctx.hidden = torch.cat([ctx.hidden, new.hidden], dim=0)
    ctx.ids += new.ids
    ctx.pad = torch.cat([ctx.pad, new.pad])
    ctx.next_pos = torch.cat([ctx.next_pos, new.next_pos])
    ctx.prompt_ids = torch.cat([ctx.prompt_ids[:, :0], new.prompt_ids[:, :0]])  # [B, 0]: only batch_size reads it now
    ctx.any_hidden = ctx.any_hidden or new.any_hidden
    ctx.forwards += new.forwards


def select(ctx: CachedContext, rows: Sequence[int]) -> None:
    """Keep only `rows` (indices into the batch, in order), in place, then trim shared padding."""
    index = torch.tensor(list(rows), dtype=torch.long, device=ctx.device)
    ctx.cache.batch_select_indices(index)
    ctx.hidden = ctx.hidden[index]
    ctx.ids = [ctx.ids[i] for i in rows]
    ctx.pad = ctx.pad[index]
    ctx.next_pos = ctx.next_pos[index]
    ctx.prompt_ids = ctx.prompt_ids[index, :0]
    trim(ctx)


def trim(ctx: CachedContext) -> None:
    """Drop the leading columns that every row hides (padding left behind by rows that went)."""
    if not ctx.length or not ctx.batch_size:
        return
    visible = ~ctx.hidden  # [B, length]
    first_seen = torch.where(visible.any(1), visible.float().argmax(1), torch.full_like(ctx.pad, ctx.length))
    cut = int(first_seen.min())
    if cut:
        for layer in ctx.cache.layers:
            if layer.is_initialized and layer.keys.numel():
                layer.keys = layer.keys[:, :, cut:]
                layer.values = layer.values[:, :, cut:]
        ctx.hidden = ctx.hidden[:, cut:]
        ctx.ids = [row[cut:] for row in ctx.ids]
        ctx.pad = (ctx.pad - cut).clamp_(min=0)
        ctx.length -= cut
    ctx.any_hidden = bool(ctx.hidden.any())
