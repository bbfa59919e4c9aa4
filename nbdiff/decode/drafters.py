"""Drafters for exact mode besides diffusion: a draft is any guess the verification pass can check.

`ngram_draft` is prompt-lookup decoding (as in transformers' `prompt_lookup_num_tokens`): find the
most recent earlier occurrence of the sequence's last few tokens in the prompt and the reply so far,
and propose the tokens that followed it. Replies that quote, repeat or edit their input (chat, code
editing, lists) draft well this way; a miss costs nothing but a shorter block.
"""

from __future__ import annotations

from typing import Sequence


def ngram_draft(history: Sequence[int], max_len: int, max_ngram: int = 3) -> list[int]:
    """Up to `max_len` tokens that followed the latest earlier match of history's last n-gram.

    Tries n-grams of `max_ngram` tokens down to 1; the longest n with a match wins. Returns [] when
    nothing matches.
    """
    return ngram_match(history, max_len, max_ngram)[0]


def ngram_match(history: Sequence[int], max_len: int, max_ngram: int = 3) -> tuple[list[int], int]:
    """`ngram_draft`'s tokens and the length n of the n-gram that matched (0 = no match)."""
    if max_len <= 0 or len(history) < 2:
        return [], 0
    h = list(history)
    for size in range(min(max_ngram, len(h) - 1), 0, -1):
        tail = h[-size:]
        # latest start whose match leaves at least one following token before the tail itself
        for start in range(len(h) - size - 1, -1, -1):
            if h[start : start + size] == tail:
                return h[start + size : start + size + max_len], size
    return [], 0
