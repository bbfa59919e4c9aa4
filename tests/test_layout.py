"""The parallel [x_t ; x_0] forward: clean half = AR forward, noised block = decoding view."""

import pytest
import torch

from nbdiff.method.layout import parallel_forward
from nbdiff.method.masks import decoding_mask, to_model_mask
from nbdiff.method.noising import noise_blocks
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
    from nbdiff.method.masks import packed_training_mask

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


# ----------------------------------------------------------------------------- losses without full logits


def _packed_batch(L=16, b=4, seed=0):
    """Two rows; the second packs two documents and ends in padding (doc id -1, not trainable)."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randint(6, 300, (2, L), generator=g)
    pos = torch.arange(L).repeat(2, 1)
    doc = torch.zeros_like(pos)
    doc[1, 7:] = 1
    pos[1, 7:] = torch.arange(L - 7)
    doc[1, -3:] = -1
    trainable = doc >= 0
    noised = noise_blocks(x0, pos, doc, b, MASK_ID, maskable=trainable, generator=g)
    return x0, pos, doc, trainable, noised


def _lora(model):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                            trainable_token_indices=[MASK_ID], task_type="CAUSAL_LM"))


def _losses_and_grads(model, fn):
    model.zero_grad(set_to_none=True)
    parts = fn()
    parts.total.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return parts, grads


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("b,weighting", [(4, "none"), (4, "inverse-t"), (1, "none")])
def test_hidden_path_equals_dense_losses_and_gradients(arch, lora, b, weighting):
    """parallel_losses (hidden states, chunked head + CE) = mdm_loss/ar_loss on full logits, values and grads."""
    from nbdiff.method.layout import _dense_losses, parallel_losses
    from nbdiff.method.losses import ar_targets
    from nbdiff.method.noising import block_starts

    model = tiny_model(arch).train()
    if lora:
        model = _lora(model)
    x0, pos, doc, trainable, noised = _packed_batch(b=b, seed=1)
    if b == 4:
        assert noised.masked.any()
    eligible = trainable & ~block_starts(pos, b)
    target = ar_targets(trainable, pos, b, "causal")
    args = (model, noised.x_t, x0, pos, doc, noised.masked, noised.t, target, b, "causal", weighting, eligible, 0.5)
    dense, g_dense = _losses_and_grads(model, lambda: _dense_losses(*args))
    # chunk_rows=5 forces several chunks (and a ragged last one)
    new, g_new = _losses_and_grads(model, lambda: parallel_losses(*args, chunk_rows=5))
    for field in ("mdm_tokens", "ar_tokens", "mdm_correct"):
        assert getattr(new, field) == getattr(dense, field), field
    assert new.ar_tokens > 0
    for field in ("total", "mdm", "ar"):
        torch.testing.assert_close(getattr(new, field), getattr(dense, field), rtol=1e-5, atol=1e-6)
    assert g_new.keys() == g_dense.keys() and len(g_new) > 0
    for name in g_dense:
        torch.testing.assert_close(g_new[name], g_dense[name], rtol=1e-4, atol=1e-6, msg=name)


def test_hidden_path_skips_ar_rows_and_handles_no_masked_token():
    """ar_target None: no AR rows (loss 0, count 0); no masked token: L_MDM = 0 and still in the graph."""
    from nbdiff.method.layout import parallel_losses

    model = tiny_model("llama").train()
    x0, pos, doc, trainable, noised = _packed_batch(b=4, seed=2)
    parts = parallel_losses(model, noised.x_t, x0, pos, doc, noised.masked, noised.t, None, 4)
    assert parts.ar_tokens == 0 and float(parts.ar.detach()) == 0.0 and parts.mdm_tokens == int(noised.masked[:, 1:].sum())
    none = torch.zeros_like(noised.masked)
    parts = parallel_losses(model, x0, x0, pos, doc, none, noised.t, pos > 0, 4)
    assert parts.mdm_tokens == 0 and float(parts.mdm.detach()) == 0.0 and parts.ar_tokens > 0
    parts.total.backward()


def test_chunked_cross_entropy_never_builds_full_logits():
    """The head sees at most chunk_rows rows at a time, in forward and in the backward recomputation."""
    from nbdiff.method.losses import chunked_cross_entropy

    head = torch.nn.Linear(8, 50, bias=False)
    seen = []
    head.register_forward_hook(lambda m, i, o: seen.append(o.shape[0]))
    h = torch.randn(23, 8, requires_grad=True)
    gold = torch.randint(0, 50, (23,))
    ce, hit = chunked_cross_entropy(head, h, gold, 50, chunk_rows=6)  # a trained head: checkpointed chunks
    ce.sum().backward()
    assert max(seen) == 6 and sum(seen) == 2 * 23  # forward + recompute
    ref = torch.nn.functional.cross_entropy(head(h.detach()), gold, reduction="none")
    torch.testing.assert_close(ce, ref)
    assert torch.equal(hit, head(h.detach()).argmax(-1) == gold)


def test_evaluation_reads_the_same_losses_as_full_logits():
    """evaluate() (hidden path) = mean MDM / AR CE and masked accuracy computed from full logits."""
    from nbdiff.adapt.data import PackedRows
    from nbdiff.adapt.evaluation import evaluate, noise_row
    from nbdiff.method.losses import ar_loss, ar_targets, mdm_loss

    model = tiny_model("qwen2")
    x0, pos, doc, trainable, _ = _packed_batch(L=16, b=4, seed=4)
    rows = PackedRows(x0, pos, doc, trainable)
    res = evaluate(model, rows, [1, 4], MASK_ID, batch_size=2)
    with torch.no_grad():
        for b in (1, 4):
            noised = [noise_row(rows, i, b, MASK_ID, 20251206) for i in range(2)]
            x_t, masked = torch.cat([n.x_t for n in noised]), torch.cat([n.masked for n in noised])
            n_logits, c_logits = parallel_forward(model, x_t, x0, pos, doc, b)
            mdm, n, correct = mdm_loss(n_logits, x0, masked, torch.cat([n.t for n in noised]))
            if b == 4:
                assert res["mdm"][4] == pytest.approx(float(mdm), rel=1e-5)
                assert res["acc"][4] == correct / n and res["mdm_tokens"][4] == n
            else:
                ar, n_ar = ar_loss(c_logits, x0, ar_targets(trainable, pos, 1, "causal"))
                assert res["ar"] == pytest.approx(float(ar), rel=1e-5) and res["ar_tokens"] == n_ar


def test_fused_head_ce_matches_dense_and_trains_only_token_rows():
    """A frozen head with trainable rows (peft trainable tokens on a tied head): values, hidden and
    row gradients equal F.cross_entropy on full logits; fp32, and bf16 autocast to bf16 tolerance."""
    from nbdiff.method.losses import _frozen_head, chunked_cross_entropy

    model = _lora(tiny_model("qwen2"))  # tied embeddings: the head carries the mask-token row
    head = model.get_output_embeddings()
    weight, rows, _ = _frozen_head(head)
    assert rows.tolist() == [MASK_ID] and weight.requires_grad
    g = torch.Generator().manual_seed(0)
    h = torch.randn(29, 64, generator=g)
    gold = torch.randint(0, 384, (29,), generator=g)
    gold[3] = MASK_ID  # a target on the trainable row
    w = torch.rand(29, generator=g)
    for autocast, tol in ((False, dict(rtol=1e-5, atol=1e-6)), (True, dict(rtol=2e-2, atol=2e-2))):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            results = []
            for fused in (True, False):
                model.zero_grad(set_to_none=True)
                x = h.clone().requires_grad_()
                if fused:
                    ce, hit = chunked_cross_entropy(head, x, gold, 384, chunk_rows=8)
                else:
                    logits = head(x).float()
                    ce, hit = torch.nn.functional.cross_entropy(logits, gold, reduction="none"), logits.argmax(-1) == gold
                (ce * w).sum().backward()
                delta = [p for n, p in model.named_parameters() if "trainable_tokens_delta" in n][0]
                results.append((ce.detach(), hit, x.grad, delta.grad.clone()))
        (ce_f, hit_f, gh_f, gd_f), (ce_d, hit_d, gh_d, gd_d) = results
        torch.testing.assert_close(ce_f, ce_d, **tol)
        torch.testing.assert_close(gh_f, gh_d, **tol)
        torch.testing.assert_close(gd_f, gd_d, **tol)
        assert gd_f.abs().sum() > 0
        if not autocast:
            assert torch.equal(hit_f, hit_d)
