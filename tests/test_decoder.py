"""The NBDiff decoder against its definition (METHOD.md), on tiny random models of several families."""

import threading

import pytest
import torch

from nbdiff.decode.context import Prefix
from nbdiff.decode.decoder import CachedContext, decode
from nbdiff.errors import NBDiffError
from nbdiff.decode.options import DecodeOptions
from nbdiff.decode.events import BlockEvent, FinalEvent, StepEvent
from nbdiff.method.layout import parallel_forward
from nbdiff.method.masks import decoding_mask, to_model_mask
from nbdiff.decode.sampling import choose, confidence, filtered_probs, select_commits
from nbdiff.testing import ARCHITECTURES, tiny_model

MASK = 383  # any id works as the mask token of a random model
PROMPTS = [[5, 17, 33, 80, 12, 7, 99], [40, 41], [300, 12, 9, 9, 61]]
MODELS = [(arch, "sdpa") for arch in ARCHITECTURES] + [("llama", "eager"), ("qwen3", "eager")]


@pytest.fixture(scope="module", params=MODELS, ids=[f"{a}-{i}" for a, i in MODELS])
def model(request):
    arch, impl = request.param
    return tiny_model(arch, attn_implementation=impl)


def run(model, prompts, eos=None, cancel=None, **opts):
    events = list(decode(model, prompts, DecodeOptions(**opts), mask_token_id=MASK, eos_token_ids=eos, cancel=cancel))
    assert isinstance(events[-1], FinalEvent)
    return events


# a. block size 1 is exactly greedy AR --------------------------------------------------------------


def test_block_size_one_equals_transformers_greedy_generate(model):
    prompt = PROMPTS[0]
    final = run(model, [prompt], block_size=1, max_new_tokens=12)[-1]
    with torch.no_grad():
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert final.tokens[0] == ref[0, len(prompt) :].tolist()
    assert final.forwards == 12 and final.tokens_per_forward == 1.0 and final.steps == 0


# b. cached block logits = one uncached forward with the context-causal mask ------------------------


def test_cached_block_logits_equal_uncached_forward(model):
    prompt, committed = PROMPTS[0], [9, 8, 7, 6]
    block = torch.tensor([[21, MASK, 77, MASK, MASK, 13, MASK, MASK]])
    ctx = CachedContext(model, [prompt])
    ctx.prefill()
    ctx.commit(torch.tensor([committed]))
    cached = ctx.block_logits(block)  # [1, 8, V]
    assert ctx.cache.get_seq_length() == ctx.length == len(prompt) + 4  # not extended
    again = ctx.block_logits(block)
    context = prompt + committed
    C, n = len(context), block.shape[1]
    ids = torch.tensor([context + block[0].tolist()])
    with torch.no_grad():
        full = model(
            input_ids=ids,
            position_ids=torch.arange(C + n)[None],
            attention_mask=to_model_mask(decoding_mask(C, n), model),
        ).logits
    torch.testing.assert_close(cached, full[:, C:], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(again, cached)
    # keep: only the requested offsets, same values
    kept = ctx.block_logits(block, torch.tensor([2, 5]))
    torch.testing.assert_close(kept, cached[:, [2, 5]], atol=1e-6, rtol=1e-5)
    assert ctx.forwards == 5


def test_cached_block_logits_with_left_padding_match_unpadded(model):
    block = torch.tensor([[21, MASK, 77, MASK], [4, MASK, MASK, MASK], [50, 51, MASK, MASK]])
    ctx = CachedContext(model, PROMPTS)
    first = ctx.prefill()
    batched = ctx.block_logits(block)
    assert torch.isfinite(batched).all() and torch.isfinite(first).all()
    for i, prompt in enumerate(PROMPTS):
        alone = CachedContext(model, [prompt])
        torch.testing.assert_close(alone.prefill(), first[i : i + 1], atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(alone.block_logits(block[i : i + 1]), batched[i : i + 1], atol=2e-5, rtol=1e-4)


def test_a_cached_prefix_seeds_every_row_and_the_rest_matches_a_full_prefill(model):
    # rows share the prefix [5, 17, 33, 80]; their rests differ in length (padding sits after the prefix)
    prompts = [[5, 17, 33, 80, 12, 7, 99], [5, 17, 33, 80, 41], [5, 17, 33, 80, 9, 9, 61, 3]]
    block = torch.tensor([[21, MASK, 77, MASK], [4, MASK, MASK, MASK], [50, 51, MASK, MASK]])
    donor = CachedContext(model, [prompts[0]])
    donor.prefill()
    layers = [(layer.keys[:, :, :4], layer.values[:, :, :4]) for layer in donor.cache.layers]
    ctx = CachedContext(model, prompts, prefix=Prefix((5, 17, 33, 80), layers))
    assert ctx.length == 4 and ctx.gap == 4 and ctx.pad.tolist() == [1, 3, 0]
    first = ctx.prefill()
    assert ctx.forwards == 1 and ctx.length == 4 + 4 and ctx.next_pos.tolist() == [7, 5, 8]
    assert ctx.hidden.tolist()[1] == [False] * 4 + [True] * 3 + [False]  # its padding: after the prefix
    batched = ctx.block_logits(block)
    committed = ctx.commit(block.clamp(max=300))
    for i, prompt in enumerate(prompts):
        alone = CachedContext(model, [prompt])
        torch.testing.assert_close(alone.prefill(), first[i : i + 1], atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(alone.block_logits(block[i : i + 1]), batched[i : i + 1], atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(alone.commit(block[i : i + 1].clamp(max=300)), committed[i : i + 1], atol=2e-5, rtol=1e-4)
    with pytest.raises(NBDiffError, match="prefix must begin every prompt"):
        CachedContext(model, [[5, 17, 33, 80], [5, 17]], prefix=Prefix((5, 17, 33, 80), layers))


# c. train/inference consistency -------------------------------------------------------------------


@pytest.mark.parametrize("b,k", [(4, 2), (8, 1)])
def test_training_noised_logits_equal_decoder_logits(model, b, k):
    g = torch.Generator().manual_seed(1)
    L = (k + 1) * b
    x0 = torch.randint(3, 300, (1, L), generator=g)
    xt = x0.clone()
    masked = torch.rand(b, generator=g) < 0.6
    masked[0] = False  # the first token of a noised block stays clean
    masked[1] = True
    xt[0, k * b :][masked] = MASK
    pos = torch.arange(L)[None]
    with torch.no_grad():
        noised, _ = parallel_forward(model, xt, x0, pos, torch.zeros_like(pos), b)
    ctx = CachedContext(model, [x0[0, : k * b].tolist()])  # prompt = the first k clean blocks
    ctx.prefill()
    dec = ctx.block_logits(xt[:, k * b :])
    torch.testing.assert_close(dec, noised[:, k * b :], atol=2e-5, rtol=1e-4)


# d. batching with left padding --------------------------------------------------------------------


@pytest.mark.parametrize("b,threshold,subs", [(4, 0.9, 1), (8, 0.02, 1), (8, 0.012, 4)])
def test_batch_gives_the_same_tokens_as_each_prompt_alone(model, b, threshold, subs):
    # with sub-blocks, rows sit in different sub-blocks at the same step (per-row logits_to_keep)
    opts = dict(block_size=b, threshold=threshold, sub_blocks=subs, max_new_tokens=9)
    together = run(model, PROMPTS, **opts)[-1]
    for i, prompt in enumerate(PROMPTS):
        alone = run(model, [prompt], **opts)[-1]
        assert together.tokens[i] == alone.tokens[0], i


# e. threshold rule --------------------------------------------------------------------------------


def test_threshold_one_commits_one_token_per_step(model):
    events = run(model, [PROMPTS[0]], block_size=8, threshold=1.0, max_new_tokens=16)
    steps = [e for e in events if isinstance(e, StepEvent) and not e.ar]
    assert steps and all(len(e.positions) == 1 for e in steps)
    final = events[-1]
    assert final.steps == 2 * 7  # two blocks, 7 masked positions each
    assert final.forwards == 1 + final.steps + 1  # prefill + steps + one commit between the blocks


def test_tiny_threshold_commits_a_whole_sub_block_per_step(model):
    events = run(model, [PROMPTS[0]], block_size=8, sub_blocks=2, threshold=1e-6, max_new_tokens=16)
    steps = [e for e in events if isinstance(e, StepEvent) and not e.ar]
    # per block: sub-block 0 has 3 masked positions (offset 0 is the AR token), sub-block 1 has 4
    assert [(e.sub_block, sorted(e.positions)) for e in steps] == [(0, [1, 2, 3]), (1, [4, 5, 6, 7])] * 2
    assert events[-1].steps == 4


def test_sub_blocks_are_decoded_left_to_right(model):
    events = run(model, [PROMPTS[1]], block_size=8, sub_blocks=4, threshold=1.0, max_new_tokens=8)
    steps = [e for e in events if isinstance(e, StepEvent) and not e.ar]
    subs = [e.sub_block for e in steps]
    assert subs == sorted(subs) and set(subs) == {0, 1, 2, 3}
    for e in steps:
        assert all(p // 2 == e.sub_block for p in e.positions)


# events, counting, lengths, EOS, cancel, sampling -------------------------------------------------


def test_events_are_consistent_with_the_final_record():
    model = tiny_model("qwen2")
    events = run(model, PROMPTS[:2], block_size=4, threshold=0.5, max_new_tokens=10)
    final = events[-1]
    blocks = [e for e in events if isinstance(e, BlockEvent)]
    for i in range(2):
        assert sum((e.tokens for e in blocks if e.seq == i), []) == final.tokens[i]
        block_sizes = [len(e.tokens) for e in blocks if e.seq == i]
        assert block_sizes == [4, 4, 2]  # max_new_tokens 10 is not a multiple of 4
        committed = {}
        for e in events:
            if isinstance(e, StepEvent) and e.seq == i:
                for p, t in zip(e.positions, e.tokens):
                    committed[(e.block, p)] = t
        assert [committed[(k // 4, k % 4)] for k in range(10)] == final.tokens[i]
    assert final.new_tokens == 20 and final.finish_reasons == ["length", "length"]
    # prefill + one forward per denoising step + a commit between blocks (none after the last)
    assert final.forwards == 1 + final.steps + 2
    assert final.tokens_per_forward == pytest.approx(20 / final.forwards)


@pytest.mark.parametrize("b", [1, 4])
def test_eos_ends_the_sequence(b):
    model = tiny_model("llama")
    free = run(model, [PROMPTS[0]], block_size=b, max_new_tokens=12)[-1].tokens[0]
    eos = free[5]
    cut = free.index(eos)
    events = run(model, [PROMPTS[0]], eos=[eos], block_size=b, max_new_tokens=12)
    final = events[-1]
    assert final.tokens[0] == free[: cut + 1] and final.finish_reason == "eos"
    assert all(eos not in e.tokens[:-1] for e in events if isinstance(e, BlockEvent))


def test_eos_in_a_batch_stops_only_that_row():
    model = tiny_model("llama")
    free = run(model, PROMPTS[:2], block_size=1, max_new_tokens=8)[-1].tokens
    eos = free[0][2]
    assert eos not in free[1]
    final = run(model, PROMPTS[:2], eos=[eos], block_size=1, max_new_tokens=8)[-1]
    assert final.tokens[0] == free[0][: free[0].index(eos) + 1] and final.tokens[1] == free[1]
    assert final.finish_reasons == ["eos", "length"]


def test_cancel_stops_at_the_next_step():
    model = tiny_model("mistral")
    cancel = threading.Event()
    events = []
    for event in decode(model, [PROMPTS[0]], DecodeOptions(block_size=8, threshold=1.0, max_new_tokens=64),
                        mask_token_id=MASK, cancel=cancel):
        events.append(event)
        if isinstance(event, StepEvent) and event.step == 3:
            cancel.set()
    final = events[-1]
    assert final.finish_reason == "cancelled"
    assert final.forwards == 3  # prefill + the two denoising steps before the cancel
    # kept: the contiguous committed prefix of the interrupted block
    committed = {p: t for e in events if isinstance(e, StepEvent) for p, t in zip(e.positions, e.tokens)}
    prefix = []
    while len(prefix) in committed:
        prefix.append(committed[len(prefix)])
    assert len(committed) == 3 and final.tokens[0] == prefix and final.new_tokens == len(prefix)
    assert [e.tokens for e in events if isinstance(e, BlockEvent)] == [prefix]


def test_sampling_is_deterministic_under_a_seed():
    model = tiny_model("qwen3")
    opts = dict(block_size=4, temperature=1.0, top_p=0.95, max_new_tokens=12)
    a = run(model, [PROMPTS[0]], seed=7, **opts)[-1].tokens
    b = run(model, [PROMPTS[0]], seed=7, **opts)[-1].tokens
    c = run(model, [PROMPTS[0]], seed=8, **opts)[-1].tokens
    assert a == b and a != c
    # top-k 1 is greedy in its tokens (at b > 1 the commit order differs: its confidences are all 1)
    greedy = run(model, [PROMPTS[0]], block_size=1, max_new_tokens=12)[-1].tokens
    top1 = run(model, [PROMPTS[0]], block_size=1, temperature=0.7, top_k=1, seed=3, max_new_tokens=12)[-1].tokens
    assert top1 == greedy


def test_block_size_above_one_needs_a_mask_token():
    from nbdiff.errors import NBDiffError

    with pytest.raises(NBDiffError, match="mask token"):
        list(decode(tiny_model("llama"), [[1, 2]], DecodeOptions(block_size=4), mask_token_id=-1))
    with pytest.raises(NBDiffError, match="at least one token"):
        list(decode(tiny_model("llama"), [[]], DecodeOptions(block_size=1), mask_token_id=-1))


def test_sampling_helpers():
    logits = torch.tensor([[3.0, 2.0, 1.0, -5.0]])
    probs = filtered_probs(logits, 1.0, top_k=2)
    assert probs[0, 2] == 0 and probs[0, 3] == 0 and probs.sum().item() == pytest.approx(1.0)
    probs = filtered_probs(logits, 1.0, top_p=0.5)
    assert probs[0, 0] == 1.0  # the top token alone holds > 50 %
    p = logits.softmax(-1)
    tok = torch.tensor([0])
    assert confidence(p, tok, "prob").item() == pytest.approx(p[0, 0].item())
    assert confidence(p, tok, "margin").item() == pytest.approx((p[0, 0] - p[0, 1]).item())
    assert 0 < confidence(p, tok, "entropy").item() < 1
    assert confidence(torch.tensor([[1.0, 0.0]]), torch.tensor([0]), "entropy").item() == 1.0
    tokens, conf = choose(logits)
    assert tokens.tolist() == [0] and conf.item() == pytest.approx(p[0, 0].item())
    conf = torch.tensor([[0.3, 0.95, 0.5, 0.99]])
    cand = torch.tensor([[True, True, True, False]])
    assert select_commits(conf, cand, 0.9).tolist() == [[False, True, False, False]]
    assert select_commits(conf, cand, 0.4).tolist() == [[False, True, True, False]]
    assert select_commits(conf, torch.zeros_like(cand), 0.1).tolist() == [[False] * 4]


def test_rows_in_different_sub_blocks_use_per_row_logits(monkeypatch):
    """The batch case above with threshold 0.012 really takes the 2-D logits_to_keep path."""
    seen = []
    real = CachedContext.block_logits

    def spy(self, block, keep=0, rows=None):
        seen.append(keep.dim() if torch.is_tensor(keep) else 0)
        return real(self, block, keep, rows)

    monkeypatch.setattr(CachedContext, "block_logits", spy)
    run(tiny_model("llama"), PROMPTS, block_size=8, threshold=0.012, sub_blocks=4, max_new_tokens=9)
    assert 2 in seen and 1 in seen


# long context: the model's own causal attention where exact, O(n * L) mask rows otherwise ----------


def test_causal_passes_hand_no_mask_without_padding_and_rows_with_it(monkeypatch):
    model = tiny_model("llama")
    seen = []
    real = model.forward

    def spy(*args, **kwargs):
        mask = kwargs.get("attention_mask")
        seen.append(None if mask is None else tuple(mask.shape))
        return real(*args, **kwargs)

    monkeypatch.setattr(model, "forward", spy)
    run(model, [PROMPTS[0]], block_size=1, max_new_tokens=3)
    assert seen == [None] * 3  # prefill and commits: plain causal attention
    seen.clear()
    run(model, PROMPTS[:2], block_size=1, max_new_tokens=3)
    assert seen[0] == (2, 1, 7, 7) and seen[1] == (2, 1, 1, 8)  # left padding: only the new rows


def test_long_left_padded_batch_equals_generate_per_prompt():
    """Several blocks past the prompt, rows of very different lengths: the hidden-column mask path."""
    model = tiny_model("qwen2")
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 380, (n,), generator=g).tolist() for n in (61, 5, 33)]
    final = run(model, prompts, block_size=1, max_new_tokens=24)[-1]
    for i, prompt in enumerate(prompts):
        with torch.no_grad():
            ref = model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=None,
                                 pad_token_id=0)
        assert final.tokens[i] == ref[0, len(prompt) :].tolist(), i
    together = run(model, prompts, block_size=8, threshold=0.3, max_new_tokens=24)[-1]
    for i, prompt in enumerate(prompts):
        assert together.tokens[i] == run(model, [prompt], block_size=8, threshold=0.3, max_new_tokens=24)[-1].tokens[0]


def test_a_kept_context_serves_the_next_prompt():
    model = tiny_model("llama")
    ctx = CachedContext(model, [PROMPTS[0]])
    first = decode(model, [PROMPTS[0]], DecodeOptions(block_size=4, max_new_tokens=8), mask_token_id=MASK, context=ctx)
    reply = list(first)[-1].tokens[0]
    follow = PROMPTS[0] + reply + [3, 4, 5]
    kept = list(decode(model, [follow], DecodeOptions(block_size=4, max_new_tokens=8), mask_token_id=MASK, context=ctx))[-1]
    fresh = run(model, [follow], block_size=4, max_new_tokens=8)[-1]
    assert kept.tokens == fresh.tokens
    assert kept.reused_tokens == len(PROMPTS[0]) + 4  # the prompt and the committed first block (not the last)
