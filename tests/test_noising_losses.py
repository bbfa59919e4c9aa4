"""Noising, losses and the curriculum."""

import math

import pytest
import torch
import torch.nn.functional as F

from nbdiff.method.curriculum import BlockCurriculum
from nbdiff.errors import NBDiffError
from nbdiff.method.losses import ar_loss, combine, mdm_loss
from nbdiff.method.noising import complementary, noise_blocks

MASK = 99


def _rows(L=64, n=3):
    ids = torch.arange(L).repeat(n, 1) % 50 + 1
    pos = torch.arange(L).repeat(n, 1)
    return ids, pos, torch.zeros_like(pos)


def test_noising_is_deterministic_under_a_generator():
    ids, pos, doc = _rows()
    a = noise_blocks(ids, pos, doc, 8, MASK, generator=torch.Generator().manual_seed(1))
    b = noise_blocks(ids, pos, doc, 8, MASK, generator=torch.Generator().manual_seed(1))
    c = noise_blocks(ids, pos, doc, 8, MASK, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a.x_t, b.x_t) and torch.equal(a.t, b.t)
    assert not torch.equal(a.masked, c.masked)


def test_block_starts_never_masked_and_t_constant_per_block():
    ids, pos, doc = _rows(L=40)
    n = noise_blocks(ids, pos, doc, 8, MASK, generator=torch.Generator().manual_seed(0))
    assert not n.masked[:, ::8].any()
    assert torch.equal(n.x_t[n.masked], torch.full((int(n.masked.sum()),), MASK))
    assert torch.equal(n.x_t[~n.masked], ids[~n.masked])
    for start in range(0, 40, 8):
        blk = n.t[:, start : start + 8]
        assert torch.equal(blk, blk[:, :1].expand_as(blk))
    assert ((n.t >= 1e-3) & (n.t <= 1.0)).all()


def test_block_size_one_masks_nothing():
    ids, pos, doc = _rows()
    n = noise_blocks(ids, pos, doc, 1, MASK, generator=torch.Generator().manual_seed(0))
    assert not n.masked.any() and torch.equal(n.x_t, ids)


def test_mask_rate_follows_t():
    ids, pos, doc = _rows(L=4096, n=8)
    n = noise_blocks(ids, pos, doc, 4096, MASK, generator=torch.Generator().manual_seed(0))
    rate = n.masked.float().mean(dim=1)
    assert torch.allclose(rate, n.t[:, 0], atol=0.05)


def test_packed_documents_restart_blocks_and_respect_maskable():
    ids = torch.arange(1, 11)[None]
    pos = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4]])
    doc = torch.tensor([[0] * 5 + [1] * 5])
    maskable = torch.ones_like(ids, dtype=torch.bool)
    maskable[0, 6] = False
    for seed in range(20):
        n = noise_blocks(ids, pos, doc, 2, MASK, maskable=maskable, generator=torch.Generator().manual_seed(seed))
        assert not n.masked[0, [0, 2, 4, 5, 7, 9]].any()  # block starts of both documents
        assert not n.masked[0, 6]


def test_complementary_covers_every_eligible_token_once():
    ids, pos, doc = _rows(L=32)
    n = noise_blocks(ids, pos, doc, 8, MASK, generator=torch.Generator().manual_seed(0))
    c = complementary(n, ids, pos, 8, MASK)
    eligible = pos % 8 != 0
    assert torch.equal(n.masked | c.masked, eligible)
    assert not (n.masked & c.masked).any()


def test_mdm_loss_reads_through_the_shift():
    V = 7
    clean = torch.tensor([[1, 2, 3, 4]])
    masked = torch.tensor([[False, False, True, False]])
    logits = torch.zeros(1, 4, V)
    logits[0, 1, 3] = 5.0  # position 1 predicts the token at position 2 (= 3)
    loss, n, correct = mdm_loss(logits, clean, masked, torch.full((1, 4), 0.5))
    assert n == 1 and correct == 1
    expected = F.cross_entropy(logits[0, 1:2], torch.tensor([3]))
    torch.testing.assert_close(loss, expected)
    # inverse-t: weight 1/t = 2, divided by the eligible count (3 non-first positions here)
    eligible = torch.tensor([[False, True, True, True]])
    loss_w, _, _ = mdm_loss(logits, clean, masked, torch.full((1, 4), 0.5), "inverse-t", eligible)
    torch.testing.assert_close(loss_w, expected * 2 / 3)


def test_mdm_loss_without_masked_tokens_is_zero_with_graph():
    logits = torch.randn(1, 4, 5, requires_grad=True)
    loss, n, _ = mdm_loss(logits, torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.bool), torch.ones(1, 4))
    assert n == 0 and loss.item() == 0.0
    loss.backward()


def test_ar_loss_and_combination():
    V = 5
    logits = torch.randn(2, 6, V)
    ids = torch.randint(0, V, (2, 6))
    target = torch.ones(2, 6, dtype=torch.bool)
    target[:, 0] = False
    loss, n = ar_loss(logits, ids, target)
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1))
    assert n == 10
    torch.testing.assert_close(loss, ref)
    mdm = torch.tensor(2.0)
    assert combine(mdm, loss, 0.5).item() == pytest.approx(2.0 + 0.5 * loss.item())
    assert combine(mdm, loss, 0.0).item() == 2.0
    with pytest.raises(NBDiffError):
        mdm_loss(logits, ids, target, torch.ones(2, 6), "sqrt")


def test_curriculum_formula():
    c = BlockCurriculum(b0=1, ratio=2, start=100, interval=50, b_max=32)
    sizes = [c.block_size_at(s) for s in (0, 99, 100, 149, 150, 200, 250, 300, 350, 10_000)]
    assert sizes == [1, 1, 1, 1, 2, 4, 8, 16, 32, 32]
    for s in range(0, 600, 7):
        assert c.block_size_at(s) == min(32, 2 ** math.floor(max(0, s - 100) / 50))


def test_curriculum_staged_and_parse():
    c = BlockCurriculum.parse("1,2,4,8,16,32", 32, 2500)
    assert c.stages[0] == (0, 1) and c.stages[-1] == (2500, 32)
    assert c.block_size_at(499) == 1 and c.block_size_at(500) == 2 and c.block_size_at(2499) == 16
    assert c.final_block_size == 32
    assert BlockCurriculum.parse("none", 8, 100).block_size_at(0) == 8
    e = BlockCurriculum.parse("0:1,10:4", 4, 0)
    assert [e.block_size_at(s) for s in (0, 9, 10)] == [1, 1, 4]


@pytest.mark.parametrize("spec,size", [("1,2,3", 3), ("1,2,4", 8), ("a,b", 4), ("4,2", 2), ("5:1,10:2", 2)])
def test_curriculum_bad_specs(spec, size):
    with pytest.raises(NBDiffError):
        BlockCurriculum.parse(spec, size, 100)


@pytest.mark.parametrize("context", ["causal", "block-causal"])
@pytest.mark.parametrize("L,b", [(12, 4), (9, 2), (8, 1)])
def test_ar_targets_never_visible_to_their_predictor(context, L, b):
    """The logits at j - 1 of the clean copy must not see token j, or L_AR leaks the answer."""
    from nbdiff.method.losses import ar_targets
    from nbdiff.method.masks import training_mask

    pos = torch.arange(L)[None]
    target = ar_targets(torch.ones(1, L, dtype=torch.bool), pos, b, context)[0]
    mask = training_mask(L, b, context)
    for j in range(1, L):
        if target[j]:
            assert not mask[L + j - 1, L + j], j
    # causal context keeps every position; block-causal keeps the block starts only
    expected = L - 1 if context == "causal" else len(range(b, L, b))
    assert int(target.sum()) == expected
