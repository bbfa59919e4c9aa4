"""The parallel [x_t ; x_0] forward: clean half = AR forward, noised block = decoding view."""

import pytest
import torch

from nbdiff.layout import parallel_forward
from nbdiff.masks import decoding_mask, to_model_mask
from nbdiff.noising import noise_blocks
from nbdiff.testing import ARCHITECTURES, tiny_model

MASK_ID = 5


def _batch(L=12, b=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randint(6, 300, (2, L), generator=g)
    pos = torch.arange(L).repeat(2, 1)
    doc = torch.zeros_like(pos)
    noised = noise_blocks(x0, pos, doc, b, MASK_ID, generator=g)
    return x0, pos, doc, noised


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_clean_half_is_exact_ar_forward(arch, impl):
    model = tiny_model(arch, attn_implementation=impl)
    x0, pos, doc, noised = _batch()
    with torch.no_grad():
        _, clean = parallel_forward(model, noised.x_t, x0, pos, doc, 4)
        ar = model(input_ids=x0).logits
    torch.testing.assert_close(clean, ar, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_noised_block_equals_decoding_view(arch):
    """Block k of the noised copy sees exactly what the decoder shows it: clean blocks < k, then itself."""
    model = tiny_model(arch)
    L, b = 12, 4
    x0, pos, doc, noised = _batch(L, b, seed=3)
    with torch.no_grad():
        noised_logits, _ = parallel_forward(model, noised.x_t, x0, pos, doc, b)
        for k in range(L // b):
            ctx = x0[:, : k * b]
            blk = noised.x_t[:, k * b : (k + 1) * b]
            ids = torch.cat([ctx, blk], dim=1)
            mask = decoding_mask(k * b, b)
            ref = model(input_ids=ids, attention_mask=to_model_mask(mask, model)).logits[:, k * b :]
            torch.testing.assert_close(noised_logits[:, k * b : (k + 1) * b], ref, rtol=1e-4, atol=1e-5)


def test_block_size_one_noised_equals_clean():
    """At b = 1 the full 2L pass gives equal halves, so the one-pass shortcut is exact."""
    from nbdiff.masks import packed_training_mask

    model = tiny_model("llama")
    x0, pos, doc, noised = _batch(L=9, b=1)
    doc[1, 5:] = 1  # second row packs two documents
    pos[1, 5:] = torch.arange(4)
    assert not noised.masked.any()
    L = x0.shape[1]
    with torch.no_grad():
        full_mask = to_model_mask(packed_training_mask(pos, doc, 1), model)
        full = model(input_ids=torch.cat([x0, x0], 1), position_ids=torch.cat([pos, pos], 1),
                     attention_mask=full_mask).logits  # the general 2L pass, by hand
        n, c = parallel_forward(model, noised.x_t, x0, pos, doc, 1)
    torch.testing.assert_close(full[:, :L], full[:, L:], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(n, full[:, :L], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(c, full[:, L:], rtol=1e-4, atol=1e-5)
