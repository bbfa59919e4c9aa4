"""The attention masks, element by element against METHOD.md's table."""

import pytest
import torch

from nbdiff.errors import NBDiffError
from nbdiff.method.masks import decoding_mask, packed_training_mask, to_model_mask, training_mask
from nbdiff.testing import tiny_model


def table_rule(q: int, k: int, L: int, b: int, context: str) -> bool:
    """METHOD.md's table read literally for query index q and key index k of the 2L layout."""
    q_noised, k_noised = q < L, k < L
    i, j = q % L, k % L
    bi, bj = i // b, j // b
    if q_noised and k_noised:
        return bi == bj  # M_BD
    if q_noised and not k_noised:
        return bj < bi  # M_OBC
    if not q_noised and k_noised:
        return False
    return j <= i if context == "causal" else bj <= bi  # M_CC / block-causal


CASES = [(1, 1), (4, 1), (8, 2), (8, 4), (7, 2), (10, 4), (5, 8), (13, 3 + 1), (16, 16)]


@pytest.mark.parametrize("L,b", CASES)
@pytest.mark.parametrize("context", ["causal", "block-causal"])
def test_training_mask_matches_table(L, b, context):
    mask = training_mask(L, b, context)
    assert mask.shape == (2 * L, 2 * L) and mask.dtype == torch.bool
    for q in range(2 * L):
        for k in range(2 * L):
            assert bool(mask[q, k]) == table_rule(q, k, L, b, context), (q, k)


def test_block_size_one_clean_half_is_causal_and_noised_half_sees_only_itself():
    L = 6
    mask = training_mask(L, 1)
    assert torch.equal(mask[L:, L:], torch.ones(L, L, dtype=torch.bool).tril())
    assert torch.equal(mask[:L, :L], torch.eye(L, dtype=torch.bool))
    # noised i sees clean j < i: exactly the AR context, so a b=1 noised token is predicted like AR
    assert torch.equal(mask[:L, L:], torch.ones(L, L, dtype=torch.bool).tril(-1))
    assert not mask[L:, :L].any()


def test_context_causal_differs_from_block_causal_only_in_clean_half():
    a, b = training_mask(8, 4, "causal"), training_mask(8, 4, "block-causal")
    assert torch.equal(a[:8], b[:8])
    assert not torch.equal(a[8:, 8:], b[8:, 8:])
    # block-causal lets token 8+0 see token 8+3 (same block); causal does not
    assert not a[8, 11] and b[8, 11]


def test_partial_last_block():
    mask = training_mask(7, 4)  # blocks [0..3], [4..6]
    assert mask[6, 4] and mask[4, 6]  # bidirectional inside the partial block
    assert mask[6, 7 + 3] and not mask[6, 7 + 4]  # sees clean block 0, not its own clean block


def test_packed_documents_never_see_each_other():
    # two documents in one row: lengths 5 and 3, positions restart per document
    pos = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2]])
    doc = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1]])
    L, b = 8, 2
    m = packed_training_mask(pos, doc, b)[0]
    d = doc[0]
    for q in range(2 * L):
        for k in range(2 * L):
            if d[q % L] != d[k % L]:
                assert not m[q, k], (q, k)
    # the second document is laid out exactly like a document of its own
    alone = training_mask(3, b)
    idx = torch.tensor([5, 6, 7, 13, 14, 15])
    assert torch.equal(m[idx][:, idx], alone)


def test_decoding_mask():
    m = decoding_mask(3, 2)
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [1, 1, 1, 0, 0],
            [1, 1, 1, 1, 1],
            [1, 1, 1, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(m, expected)


def test_bad_arguments():
    with pytest.raises(NBDiffError):
        training_mask(4, 0)
    with pytest.raises(NBDiffError):
        training_mask(4, 2, "bidirectional")
    with pytest.raises(NBDiffError):
        training_mask(0, 2)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_model_mask_is_honoured(impl):
    """The same bool mask gives the same logits through sdpa (bool) and eager (additive float)."""
    model = tiny_model("llama", attn_implementation=impl)
    ids = torch.arange(3, 11)[None]
    pos = torch.arange(8)[None]
    mask = decoding_mask(4, 4)
    out = model(input_ids=ids, position_ids=pos, attention_mask=to_model_mask(mask, model)).logits
    causal = model(input_ids=ids, position_ids=pos).logits
    # context rows are causal: identical to the default causal forward
    torch.testing.assert_close(out[0, :4], causal[0, :4], rtol=1e-5, atol=1e-5)
    # block rows see later block tokens: different from causal
    assert not torch.allclose(out[0, 4], causal[0, 4], atol=1e-4)
    if impl == "eager":
        assert to_model_mask(mask, model).dtype == torch.float32


def test_left_padded_hides_pad_keys_and_keeps_pad_queries_alive():
    from nbdiff.method.masks import left_padded

    rows = torch.ones(3, 3, dtype=torch.bool).tril()  # causal over 3 columns, queries at 0..2
    out = left_padded(rows, torch.tensor([0, 2]), 0)
    assert torch.equal(out[0], rows)
    # row 1: columns 0 and 1 are padding; each pad query sees only itself, the real token none of them
    assert torch.equal(out[1], torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=torch.bool))
    assert out.any(dim=-1).all()  # no fully masked query row


def test_cached_rows_equal_the_full_mask_rows_with_left_padding():
    from nbdiff.method.masks import cached_rows, left_padded

    pad = torch.tensor([0, 3])
    for length, n in [(0, 6), (6, 1), (6, 4)]:
        hidden = torch.arange(length + n)[None] < pad[:, None]  # [B, K]: the pad columns
        for causal in (True, False):
            full = decoding_mask(length + n, 0) if causal else decoding_mask(length, n)
            want = left_padded(full[length:], pad, length)
            assert torch.equal(cached_rows(hidden, length, causal), want), (length, n, causal)
