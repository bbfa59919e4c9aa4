"""`nbdiff chat` driven through a pipe (CliRunner input): commands, multi-line input, errors, Ctrl-C, EOF."""

import queue

import pytest
from typer.testing import CliRunner

from nbdiff.decode.options import DecodeOptions
from nbdiff.errors import NBDiffError
from nbdiff_cli import chat as chat_mod
from nbdiff_cli.app import app

from decode_helpers import converted_folder, plain_folder

runner = CliRunner()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return converted_folder(tmp_path_factory.mktemp("chat") / "tiny", "qwen3", block_size=4, adapted=4)


def chat(folder, text, *args):
    return runner.invoke(app, ["chat", str(folder), "-n", "6", *args], input=text)


def test_two_turns_with_commands_and_eof(folder):
    script = "Hello there\n/set threshold 0.5\n/set threshold 7\n/set nope 1\n/set\nAnd again\n/help\n/clear\n"
    result = chat(folder, script)
    assert result.exit_code == 0, result.output
    out = result.output
    assert out.count("tokens/forward") == 2  # one dim stats line per reply
    assert "set threshold" in out and "threshold = 0.5" in out
    assert "--threshold must be in (0, 1]" in out  # error shown, session kept
    assert "unknown option 'nope'" in out
    assert "/clear" in out and "conversation cleared" in out
    assert out.rstrip().endswith("bye")  # EOF exits cleanly


def test_multiline_input_is_one_message(folder, monkeypatch):
    seen = []
    real = chat_mod._reply

    def spy(model, tok, messages, options, system, **kwargs):
        seen.append([dict(m) for m in messages])
        return real(model, tok, messages, options, system, **kwargs)

    monkeypatch.setattr(chat_mod, "_reply", spy)
    result = chat(folder, '"""\nline one\nline two\n"""\n"""single"""\n/exit\nnever read\n')
    assert result.exit_code == 0, result.output
    assert seen[0][0] == {"role": "user", "content": "line one\nline two"}
    assert seen[1][2] == {"role": "user", "content": "single"}  # history: user, assistant, user
    assert len(seen) == 2  # /exit stopped before "never read"


def test_block_size_above_adapted_is_said_once(folder):
    result = chat(folder, "Hi\nHi again\n", "--block-size", "8")
    assert result.exit_code == 0, result.output
    assert result.output.count("above the block size this model was adapted to") == 1
    assert result.output.count("tokens/forward") == 2


def test_ctrl_c_stops_the_reply_and_keeps_the_session(folder, monkeypatch):
    class InterruptOnce(queue.Queue):
        fired = False

        def get(self, *args, **kwargs):
            if not InterruptOnce.fired:
                InterruptOnce.fired = True
                raise KeyboardInterrupt
            return super().get(*args, **kwargs)

    monkeypatch.setattr(chat_mod.queue, "Queue", InterruptOnce)
    result = chat(folder, "Hello\nSecond turn\n", "-n", "64", "--block-size", "1")
    assert result.exit_code == 0, result.output
    assert "stopped" in result.output  # first reply cancelled
    assert result.output.count("tokens/forward") == 2  # the session went on to the second turn


def test_no_markup_injection_from_model_text(folder, monkeypatch):
    from nbdiff.decode.events import BlockEvent, FinalEvent

    def fake_stream(*args, **kwargs):
        yield BlockEvent(seq=0, block=0, tokens=[1], text="[bold red]x[/] [link=file:///]y")
        yield FinalEvent(new_tokens=1, forwards=1, tokens_per_forward=1.0, seconds=0.1, tokens_per_second=10.0,
                         finish_reason="length", texts=["..."])

    monkeypatch.setattr("nbdiff.api.stream", fake_stream)
    result = chat(folder, "Hello\n")
    assert "[bold red]x[/] [link=file:///]y" in result.output


def test_plain_folder_chats_as_ar_with_a_note(tmp_path):
    result = chat(plain_folder(tmp_path / "plain"), "Hi\n")
    assert result.exit_code == 0, result.output
    assert "never converted" in result.output and "tokens/forward" in result.output


def test_parse_set():
    opts = DecodeOptions()
    assert chat_mod.parse_set(opts, "threshold 0.8").threshold == 0.8
    assert chat_mod.parse_set(opts, "block-size 8").block_size == 8
    assert chat_mod.parse_set(opts, "seed none").seed is None
    assert chat_mod.parse_set(opts, "confidence margin").confidence == "margin"
    assert chat_mod.parse_set(opts, "exact on").exact is True and chat_mod.parse_set(opts, "exact off").exact is False
    assert chat_mod.parse_set(opts, "draft-steps 1").draft_steps == 1
    with pytest.raises(NBDiffError, match="on or off"):
        chat_mod.parse_set(opts, "exact maybe")
    for bad, match in [("block_size 3", "power of two"), ("top_k x", "needs a number"), ("threshold", "usage"),
                       ("confidence loud", "confidence")]:
        with pytest.raises(NBDiffError, match=match):
            chat_mod.parse_set(opts, bad)


def test_prompt_longer_than_the_context_is_an_error_and_the_session_goes_on(folder):
    result = chat(folder, "the quick brown fox " * 200 + "\nHello\n")
    assert result.exit_code == 0, result.output
    assert "context is 512" in result.output and result.output.count("tokens/forward") == 1


def test_chat_keeps_one_cache_across_turns_and_clear_drops_it(folder, monkeypatch):
    import nbdiff.api

    sessions, reused = [], []
    real = nbdiff.api.stream

    def spy(*args, session=None, **kwargs):
        sessions.append(session)
        for event in real(*args, session=session, **kwargs):
            if hasattr(event, "reused_tokens"):
                reused.append(event.reused_tokens)
            yield event

    monkeypatch.setattr(nbdiff.api, "stream", spy)
    result = chat(folder, "Hello\nAgain\n/clear\nThird\n/set exact on\nFourth\n")
    assert result.exit_code == 0, result.output
    assert len(sessions) == 4 and all(s is sessions[0] for s in sessions)
    assert reused[0] == 0 and reused[1] > 0  # the second turn computed only its new tokens
    assert reused[2] == 0  # /clear forgot the cache with the conversation
    assert "tokens/block accepted" in result.output  # exact mode's stats line


def test_each_turn_shows_its_own_figures_and_says_slow_below_one_token_per_forward(folder, monkeypatch):
    """The line under every reply is the turn's own (a fresh generate of its history gives the same
    figures), and a reply decoded at fewer than one token per forward is marked "slow"."""
    import nbdiff.api
    from nbdiff.decode.events import FinalEvent

    turns = []
    real = nbdiff.api.stream

    def spy(model, tok, messages, options, **kwargs):
        history = [dict(m) for m in messages]
        for event in real(model, tok, messages, options, **kwargs):
            if isinstance(event, FinalEvent):
                turns.append((model, tok, history, options))
            yield event

    monkeypatch.setattr(nbdiff.api, "stream", spy)
    # exact mode's default drafter (n-gram lookup) twice, then diffusion drafts denoised until filled
    result = chat(folder, "Hello\nHello again\n/set drafter diffusion\nThird\n", "--exact", "--block-size", "4")
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if "tokens/forward" in line]
    assert len(lines) == len(turns) == 3
    for line, (model, tok, history, options) in zip(lines, turns):
        _, fresh = nbdiff.api.generate(model, tok, history, options)
        assert line.startswith(f"{fresh.new_tokens} tokens, {fresh.tokens_per_forward:.2f} tokens/forward"), line
        assert ("(slow)" in line) == (fresh.tokens_per_forward < 1), line
    assert "(slow)" not in lines[0] + lines[1] and "(slow)" in lines[2]


def test_chat_loads_fp32_under_dtype_auto_on_a_cpu_and_a_16_bit_session_gets_a_note(folder, monkeypatch):
    """In bf16 the keys/values a conversation keeps (computed a token at a time) round unlike a fresh prefill's,
    so a later turn could differ from a fresh call: chat loads fp32 under --dtype auto on a CPU even where
    the CPU does bf16 natively, keeps an explicit --dtype, and the API says so to a 16-bit session."""
    import torch

    import nbdiff
    from nbdiff import hardware
    from nbdiff.api import Session
    from nbdiff.loading import CHAT_DTYPE_REASON, loaded_dtype

    monkeypatch.setattr(hardware, "cpu_bf16", lambda: hardware.CpuBf16(True, "mocked CPU with bf16"))
    loaded = []
    real = chat_mod.load_for_decoding

    def spy(*args, **kwargs):
        model, tok = real(*args, **kwargs)
        loaded.append(model)
        return model, tok

    monkeypatch.setattr(chat_mod, "load_for_decoding", spy)
    assert chat(folder, "Hi\n").exit_code == 0
    assert loaded[-1].dtype == torch.float32 and loaded_dtype(loaded[-1]).reason == CHAT_DTYPE_REASON
    assert chat(folder, "Hi\n", "--dtype", "bf16").exit_code == 0
    assert loaded[-1].dtype == torch.bfloat16
    model, tok = nbdiff.load(folder, device="cpu", dtype="bf16")
    _, final = nbdiff.generate(model, tok, "Hi", max_new_tokens=3, session=Session())
    assert any("kept conversation in 16-bit" in note for note in final.notes)
    _, final = nbdiff.generate(model, tok, "Hi", max_new_tokens=3)
    assert not any("kept conversation" in note for note in final.notes)


def test_each_turn_resolves_its_drafting_plan_once(folder, monkeypatch):
    """chat resolves the plan before the reply (for its notes) and hands it to the reply's stream: one
    resolution per turn, not two (nbdiff.decode.plan)."""
    import nbdiff.api as api
    import nbdiff.decode.decoder as decoder_mod

    calls = []
    real = api.plan_drafting

    def counted(model, options, **kwargs):
        calls.append(options.exact)
        return real(model, options, **kwargs)

    monkeypatch.setattr(api, "plan_drafting", counted)
    monkeypatch.setattr(decoder_mod, "plan_drafting", counted)
    result = chat(folder, "Hello there\nAnd again\n", "--exact")
    assert result.exit_code == 0, result.output
    assert result.output.count("tokens/forward") == 2
    assert calls == [True, True]  # one per turn
