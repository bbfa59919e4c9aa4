"""Which token becomes the mask token, and the embedding row it gets.

Order of preference: the tokenizer's own mask token, a mask-like special token (`<|mask|>`,
`<mask>`, `[MASK]`, ...), a reserved/unused special token (e.g. Llama-3
`<|reserved_special_token_N|>`; the last one, least likely to get a role later), else `<|mask|>`
is added. An added token takes a padded embedding row when config.vocab_size leaves one, else the
embeddings (and an untied lm_head) grow by one row. Its row is the mean of the real rows, not random.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from nbdiff.errors import NBDiffError

DEFAULT_MASK_TOKEN = "<|mask|>"
# Mask-like special tokens reused as they are, in order of preference.
MASK_LIKE = ("<|mask|>", "<mask>", "[MASK]", "<|MASK|>", "<MASK>")
# Special tokens a vocabulary reserves and never uses (Llama-3, Mistral v3, others).
RESERVED = re.compile(r"reserved_special_token|^<\|reserved|^\[control_\d+\]$|^<unused\d+>$|^\[unused\d+\]$")


@dataclass
class MaskChoice:
    token: str
    token_id: int
    how: str
    """'reused' (mask-like token), 'reserved' (unused special token), 'added' or 'added+resized'."""


def _special_tokens(tokenizer) -> dict[str, int]:
    """Text -> id of every special (added, special=True) token, plus the named special tokens."""
    out: dict[str, int] = {}
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    for idx, added in decoder.items():
        if getattr(added, "special", False):
            out[str(added)] = int(idx)
    for text in getattr(tokenizer, "all_special_tokens", []) or []:
        idx = tokenizer.convert_tokens_to_ids(text)
        if isinstance(idx, int) and idx >= 0:
            out.setdefault(text, idx)
    return out


def _requested(tokenizer, requested: str, specials: dict[str, int]) -> MaskChoice:
    if not requested:
        raise NBDiffError("--mask-token is empty", f"omit it to use {DEFAULT_MASK_TOKEN}")
    if requested in specials:
        return MaskChoice(requested, specials[requested], "reused")
    ordinary = tokenizer.get_vocab().get(requested)
    if ordinary is not None:
        raise NBDiffError(
            f"--mask-token {requested!r} is an ordinary token of the vocabulary (id {ordinary})",
            f"pick a special token or a new text such as {DEFAULT_MASK_TOKEN}",
        )
    return MaskChoice(requested, -1, "added")


def _automatic(tokenizer, specials: dict[str, int]) -> MaskChoice:
    existing = getattr(tokenizer, "mask_token", None)
    for text in ((existing,) if existing else ()) + MASK_LIKE:
        if text in specials:
            return MaskChoice(text, specials[text], "reused")
    reserved = sorted((idx, text) for text, idx in specials.items() if RESERVED.search(text))
    if reserved:
        idx, text = reserved[-1]  # the last reserved token is the least likely to get a role later
        return MaskChoice(text, idx, "reserved")
    return MaskChoice(DEFAULT_MASK_TOKEN, -1, "added")


def choose_mask_token(tokenizer, requested: str | None = None) -> MaskChoice:
    """Pick (or add to `tokenizer`) the mask token; see the module docstring for the order."""
    specials = _special_tokens(tokenizer)
    choice = _automatic(tokenizer, specials) if requested is None else _requested(tokenizer, requested, specials)
    tokenizer.add_special_tokens({"mask_token": choice.token})
    token_id = tokenizer.convert_tokens_to_ids(choice.token)
    if choice.token_id >= 0 and token_id != choice.token_id:  # pragma: no cover - tokenizer oddity
        raise NBDiffError(f"the tokenizer maps {choice.token!r} to {token_id}, expected {choice.token_id}")
    choice.token_id = int(token_id)
    return choice


def with_mask_row(t: torch.Tensor, new_rows: int, mask_id: int, n_real: int, init: bool) -> torch.Tensor:
    """Grow `t` ([rows, ...]) to `new_rows` rows; new rows (and row `mask_id` if `init`) = mean of real rows."""
    rows = t.shape[0]
    if new_rows == rows and not init:
        return t
    # mean over real token rows only ([n_real, hidden] -> [hidden]); padded rows are arbitrary
    mean = t[: max(1, min(n_real, rows))].float().mean(dim=0).to(t.dtype)
    if new_rows > rows:
        grown = torch.empty((new_rows, *t.shape[1:]), dtype=t.dtype)
        grown[:rows] = t
        grown[rows:] = mean
        t = grown
    else:
        t = t.clone()
    if init:
        t[mask_id] = mean
    return t
