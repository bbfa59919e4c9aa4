"""The Python API (nbdiff.load / stream / generate), `nbdiff generate`, and one-line errors for bad input."""

import importlib.util
import json

import pytest
from typer.testing import CliRunner

import nbdiff
from nbdiff.decode.options import DecodeOptions
from nbdiff.errors import NBDiffError
from nbdiff.decode.events import BlockEvent, FinalEvent, StepEvent, event_from_json, to_json
from nbdiff_cli.app import app

from decode_helpers import converted_folder, plain_folder

runner = CliRunner()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return converted_folder(tmp_path_factory.mktemp("api") / "tiny", "qwen2", block_size=4)


@pytest.fixture(scope="module")
def loaded(folder):
    return nbdiff.load(folder, device="cpu")


def test_generate_and_stream_agree(loaded):
    model, tok = loaded
    text, final = nbdiff.generate(model, tok, "Hello, how are you?", max_new_tokens=9, block_size=4)
    assert isinstance(final, FinalEvent) and final.block_size == 4 and isinstance(text, str)
    events = list(nbdiff.stream(model, tok, "Hello, how are you?", DecodeOptions(max_new_tokens=9, block_size=4)))
    assert isinstance(events[-1], FinalEvent) and events[-1].tokens == final.tokens
    assert any(isinstance(e, StepEvent) and e.ar for e in events)
    assert "".join(e.text for e in events if isinstance(e, BlockEvent)) == text == events[-1].texts[0]
    # the records survive a JSON round trip (visualize --record/--replay)
    assert all(event_from_json(to_json(e)) == e for e in events)
    # the block size above the adapted one is announced
    assert any("adapted" in n for n in final.notes)


def test_messages_and_batches(loaded):
    model, tok = loaded
    msgs = [{"role": "user", "content": "Hello"}]
    text, templated = nbdiff.generate(model, tok, msgs, block_size=1, max_new_tokens=6)
    same, _ = nbdiff.generate(model, tok, "Hello", block_size=1, max_new_tokens=6)
    assert text == same
    texts, final = nbdiff.generate(model, tok, ["Hello", "Once upon a time"], block_size=4, max_new_tokens=6)
    assert isinstance(texts, list) and len(texts) == 2 and len(final.finish_reasons) == 2
    # system prompt and raw continuation change the prompt
    _, with_system = nbdiff.generate(model, tok, "Hello", system="Be brief.", block_size=1, max_new_tokens=2)
    _, raw = nbdiff.generate(model, tok, "Hello", raw=True, block_size=1, max_new_tokens=2)
    assert with_system.prompt_tokens > templated.prompt_tokens > raw.prompt_tokens


def test_never_converted_folder_decodes_as_ar_with_a_note(tmp_path):
    model, tok = nbdiff.load(plain_folder(tmp_path / "plain"), device="cpu")
    _, final = nbdiff.generate(model, tok, "Hello", max_new_tokens=4)
    assert final.block_size == 1 and final.forwards == 4 and "nbdiff convert" in final.notes[0]
    with pytest.raises(NBDiffError, match="converted model"):
        nbdiff.generate(model, tok, "Hello", block_size=4)


@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(block_size=0), "power of two"),
        (dict(block_size=3), "power of two"),
        (dict(block_size=8, sub_blocks=3), "does not divide"),
        (dict(threshold=0.0), r"\(0, 1\]"),
        (dict(threshold=1.5), r"\(0, 1\]"),
        (dict(blocksize=4), "unknown decoding option"),
    ],
)
def test_bad_options(loaded, overrides, match):
    model, tok = loaded
    with pytest.raises(NBDiffError, match=match):
        nbdiff.generate(model, tok, "Hello", **overrides)


def test_bad_prompts(loaded):
    model, tok = loaded
    with pytest.raises(NBDiffError, match="empty"):
        nbdiff.generate(model, tok, "   ")
    with pytest.raises(NBDiffError, match="context is 512"):
        nbdiff.generate(model, tok, "the quick brown fox " * 200)
    # a prompt that fits, but not with all the new tokens: announced shortening
    ids_len = len(nbdiff.api.encode(tok, "the fox " * 100))
    _, final = nbdiff.generate(model, tok, "the fox " * 100, block_size=1, max_new_tokens=512)
    assert final.new_tokens <= 512 - ids_len and any("shortened" in n for n in final.notes)


def test_bad_folders(tmp_path):
    with pytest.raises(NBDiffError, match="does not exist"):
        nbdiff.load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(NBDiffError, match="no config.json"):
        nbdiff.load(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(NBDiffError, match="safetensors"):
        nbdiff.load(tmp_path / "empty")


def test_quantize_without_bitsandbytes_is_a_clear_error(folder, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(NBDiffError, match="needs bitsandbytes"):
        nbdiff.load(folder, quantize="nf4")
    result = runner.invoke(app, ["generate", str(folder), "--prompt", "hi", "--quantize", "nf4"])
    assert result.exit_code == 1 and "needs bitsandbytes" in result.output


def test_cli_generate_json(folder):
    result = runner.invoke(app, ["generate", str(folder), "--prompt", "Hello", "--json", "-n", "6", "-b", "2"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    for key in ("text", "new_tokens", "forwards", "tokens_per_forward", "seconds", "tokens_per_second", "finish_reason"):
        assert key in data
    assert data["block_size"] == 2 and data["new_tokens"] <= 6
    assert data["tokens_per_forward"] == pytest.approx(data["new_tokens"] / data["forwards"], abs=1e-3)


def test_cli_generate_streams_text_and_stats(folder):
    result = runner.invoke(app, ["generate", str(folder), "-p", "Hello", "-n", "4", "--raw", "--seed", "1", "-t", "0.8"])
    assert result.exit_code == 0, result.output
    assert "tokens/forward" in result.output


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["--prompt", ""], "prompt is empty"),
        (["--prompt", "hi", "--block-size", "0"], "power of two"),
        (["--prompt", "hi", "--block-size", "8", "--sub-blocks", "3"], "does not divide"),
        (["--prompt", "hi", "--threshold", "1.5"], "(0, 1]"),
    ],
)
def test_cli_generate_bad_input_is_one_line(folder, args, fragment):
    result = runner.invoke(app, ["generate", str(folder), *args])
    assert result.exit_code == 1 and fragment in result.output and "Traceback" not in result.output


def test_cli_generate_missing_folder_says_convert(tmp_path):
    result = runner.invoke(app, ["generate", str(tmp_path / "nope"), "--prompt", "hi"])
    assert result.exit_code == 1 and "nbdiff convert" in result.output


def test_a_session_keeps_the_cache_across_turns_with_the_same_replies(loaded):
    model, tok = loaded
    session = nbdiff.api.Session()
    kept, fresh = [], []
    for history, replies in ((kept, []), (fresh, None)):
        messages = []
        for turn in ("Hello", "Once upon a time", "How are you today?"):
            messages.append({"role": "user", "content": turn})
            text, final = nbdiff.generate(model, tok, messages, block_size=4, max_new_tokens=8,
                                          session=session if replies is not None else None)
            messages.append({"role": "assistant", "content": text})
            history.append((text, final.reused_tokens))
    assert [t for t, _ in kept] == [t for t, _ in fresh]
    assert kept[0][1] == 0 and all(r > 0 for _, r in kept[1:]) and all(r == 0 for _, r in fresh)


@pytest.mark.parametrize("opts", [dict(block_size=4), dict(block_size=4, exact=True),
                                  dict(block_size=4, exact=True, drafter="diffusion")])
def test_each_turn_of_a_session_counts_its_own_forwards(folder, opts):
    """A kept cache serves later turns; every turn's figures are those of a fresh generate of its history."""
    model, tok = nbdiff.load(folder, device="cpu", dtype="fp32")  # bf16 rounds a cached prefix unlike a prefill
    session, messages = nbdiff.api.Session(), []
    for turn in ("Hello", "Once upon a time", "Hello"):
        messages.append({"role": "user", "content": turn})
        text, kept = nbdiff.generate(model, tok, messages, max_new_tokens=10, session=session, **opts)
        _, fresh = nbdiff.generate(model, tok, messages, max_new_tokens=10, **opts)
        figures = ("new_tokens", "forwards", "tokens_per_forward", "steps", "drafted", "accepted", "verified_blocks")
        assert [getattr(kept, f) for f in figures] == [getattr(fresh, f) for f in figures], turn
        assert kept.tokens_per_second == pytest.approx(kept.new_tokens / kept.seconds)
        messages.append({"role": "assistant", "content": text})
    assert kept.reused_tokens > 0 and fresh.reused_tokens == 0


def test_exact_lookup_drafts_have_their_own_default_block_size(loaded):
    """Lookup drafts do not take the folder's (diffusion) block size unless it is asked for."""
    from nbdiff.api import resolve_options
    from nbdiff.cpu_kernel import KernelStatus
    from nbdiff.decode.options import LOOKUP_BLOCK_SIZE, LOOKUP_BLOCK_SIZE_KERNEL

    model, tok = loaded
    kept = getattr(model, "_nbdiff_cpu_kernel", None)
    try:
        model._nbdiff_cpu_kernel = KernelStatus(False, "off (for this test)")  # torch's products: block 2
        assert resolve_options(model, DecodeOptions(exact=True))[0].block_size == LOOKUP_BLOCK_SIZE
        assert resolve_options(model, DecodeOptions(exact=True, drafter="ngram"))[0].block_size == LOOKUP_BLOCK_SIZE
        assert resolve_options(model, DecodeOptions(exact=True, block_size=8))[0].block_size == 8
        for opts in (DecodeOptions(exact=True, drafter="diffusion"), DecodeOptions(exact=True, draft_steps=1), DecodeOptions()):
            assert resolve_options(model, opts)[0].block_size == 1  # the folder's: converted, not adapted
        _, final = nbdiff.generate(model, tok, "Hello", exact=True, max_new_tokens=8)
        assert final.block_size == LOOKUP_BLOCK_SIZE and final.steps == 0
        model._nbdiff_cpu_kernel = KernelStatus(True, "on (for this test)", 2)  # cheap verifies: wider drafts
        assert resolve_options(model, DecodeOptions(exact=True))[0].block_size == LOOKUP_BLOCK_SIZE_KERNEL
    finally:
        model._nbdiff_cpu_kernel = kept


def test_a_folder_decodes_at_the_block_size_it_was_adapted_to(tmp_path, loaded):
    """No block size given: a converted, unadapted folder decodes as its AR model (block 1, no note);
    an adapted one at its last curriculum step; a folder asking for less than it was adapted to gets it."""
    import torch

    from nbdiff.api import resolve_options
    from nbdiff.loading import default_block_size, model_settings

    model, tok = loaded  # converted for block size 4, adapted to 1
    text, final = nbdiff.generate(model, tok, "Hello, how are you?", max_new_tokens=12)
    assert final.block_size == 1 and not any("adapted" in n for n in final.notes)
    prompt = nbdiff.api.encode(tok, "Hello, how are you?")
    with torch.no_grad():
        ar = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=tok.eos_token_id,
                            pad_token_id=tok.pad_token_id)[0, len(prompt):].tolist()
    assert final.tokens[0] == ar[: len(final.tokens[0])] and len(final.tokens[0]) == len(ar)
    cases = [(32, 1, 1), (32, 8, 8), (8, 8, 8), (1, 8, 1), (4, 16, 4)]  # (converted for, adapted to, decodes at)
    for block_size, adapted, expected in cases:
        folder = converted_folder(tmp_path / f"b{block_size}a{adapted}", "llama", block_size=block_size, adapted=adapted)
        m, _ = nbdiff.load(folder, device="cpu")
        assert default_block_size(model_settings(m)) == expected
        opts, notes = resolve_options(m, DecodeOptions())
        assert opts.block_size == expected and not any("adapted" in n for n in notes)
        above, notes = resolve_options(m, DecodeOptions(block_size=adapted * 2))
        assert above.block_size == adapted * 2 and any("adapted to" in n for n in notes)  # by flag, with the warning
