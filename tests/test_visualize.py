"""`nbdiff visualize`: the Textual app over the decoder's event stream.

Pilot-driven (App.run_test): a typed prompt runs to the end and the figures shown equal the final
record; pause stops the step counter; a replayed trace ends with the recorded text; the real
decoder on a tiny converted model; snapshots of a replayed trace at 80x24 and 200x50.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest

from nbdiff.decode.options import DecodeOptions
from nbdiff.errors import NBDiffError
from nbdiff.decode.events import BlockEvent, FinalEvent, StepEvent
from nbdiff_cli.visualize.app import SPEEDS, make_app
from nbdiff_cli.visualize.backends import FakeBackend, LiveBackend, ReplayBackend
from nbdiff_cli.visualize.state import RunView
from nbdiff_cli.visualize.trace import TraceHeader, TraceWriter, read_trace
from nbdiff_cli.visualize.widgets import confidence_colour, render_status, render_step_bars, render_tiles
from textual.widgets import Input, Static

pytestmark = pytest.mark.anyio

OPTIONS = DecodeOptions(block_size=8, sub_blocks=2, threshold=0.7, max_new_tokens=40, seed=3)


async def wait_until(pilot, condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the app")
        await pilot.pause(0.02)


def finished(app) -> bool:
    return app.finished and app.view.done


def status_text(app) -> str:
    # the no-break spaces keep items whole when wrapping; compare with plain spaces
    return str(app.query_one("#status", Static).content).replace("\u00a0", " ")


async def type_prompt(pilot, text: str) -> None:
    pilot.app.query_one("#prompt", Input).focus()
    await pilot.press(*text)
    await pilot.press("enter")


def fake_trace(path, options: DecodeOptions = OPTIONS, prompt: str = "Tell me about block diffusion"):
    """Record the fake backend's events as a trace file (deterministic: seeded, synthetic times)."""
    writer = TraceWriter(path, TraceHeader(prompt, options.to_dict(), "demo"))
    for t, event in FakeBackend().run(prompt, options, threading.Event()):
        writer.write(event, t)
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny_folder(tiny_converted):
    """A tiny converted folder: random llama + tiny tokenizer with a mask token + nbdiff section."""
    return tiny_converted


# ---- pure parts ------------------------------------------------------------------------------


def test_cli_module_does_not_import_textual_or_torch():
    code = (
        "import sys, nbdiff_cli.visualize\n"
        "bad = [m for m in ('textual', 'torch') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_trace_round_trip_and_bad_trace(tmp_path):
    path = fake_trace(tmp_path / "run.jsonl")
    header, events = read_trace(path)
    assert header.prompt == "Tell me about block diffusion"
    assert DecodeOptions(**header.options) == OPTIONS
    first = json.loads(path.read_text().splitlines()[1])
    assert first["kind"] == "step" and "t" in first
    replayed = [e for _, e in events]
    original = [e for _, e in FakeBackend().run(header.prompt, OPTIONS, threading.Event())]
    assert replayed == original
    assert [t for t, _ in events] == sorted(t for t, _ in events)
    # a field from a newer nbdiff is ignored, an unknown kind is an error with its line number
    newer = tmp_path / "newer.jsonl"
    newer.write_text('{"t": 1.0, "kind": "block", "seq": 0, "block": 0, "tokens": [1], "text": "a", "future": 1}\n')
    assert read_trace(newer)[1] == [(1.0, BlockEvent(0, 0, [1], "a"))]
    (tmp_path / "bad.jsonl").write_text('{"kind": "header"}\n{"kind": "nope"}\n')
    with pytest.raises(NBDiffError, match="bad.jsonl:2"):
        read_trace(tmp_path / "bad.jsonl")
    with pytest.raises(NBDiffError, match="not found"):
        ReplayBackend(tmp_path / "missing.jsonl")


def test_run_view_folds_events():
    view = RunView(prompt="p", sub_blocks=2)
    view.apply(StepEvent(0, 0, 1, [0], [5], ["a"], [0.9], 3, 4, 0, ar=True), t=0.1)
    view.apply(StepEvent(0, 0, 2, [1, 3], [6, 7], ["b", "d"], [0.95, 0.2], 1, 4, 0), t=0.2)
    assert [t.text if t else None for t in view.tiles] == ["a", "b", None, "d"]
    assert view.tiles[3].step_in_block == 1 and view.active_text == "abd"
    assert view.tokens == 3 and view.steps == 2 and view.per_step == [1, 2]
    assert view.tokens_per_second == pytest.approx(3 / 0.2)
    view.apply(StepEvent(0, 0, 3, [2], [8], ["c"], [0.5], 0, 4, 1), t=0.3)
    view.apply(BlockEvent(0, 0, [5, 6, 8, 7], "abcd"), t=0.3)
    assert view.text == "abcd" and view.active_text == ""
    # 1 prefill + 2 denoising steps + 1 commit pass
    assert view.forwards == 4
    view.apply(FinalEvent(4, 3, 4 / 3, 0.3, 13.3, "length"), t=0.3)
    assert view.forwards == 3 and view.tokens_per_second == 13.3
    # events of other sequences in a batch are ignored
    view.apply(BlockEvent(1, 0, [1], "zzz"))
    assert view.text == "abcd"


def test_tiles_mark_masks_and_current_sub_block():
    view = RunView(sub_blocks=2)
    view.apply(StepEvent(0, 0, 1, [0], [5], ["hi"], [1.0], 3, 4, 0, ar=True))
    text = render_tiles(view).plain
    assert text.count("░░") == 3 and "hi" in text
    assert text == "┃ hi   ░░ ┃ ░░   ░░ │"  # the current sub-block's two bars are heavy
    assert render_step_bars([1, 4, 2, 0, 8], width=4).plain == "▄▂ █ max 8"  # last 4 steps, zero base
    assert confidence_colour(1.0) != confidence_colour(0.0)
    assert confidence_colour(-0.01) == confidence_colour(0.99004983)  # negative entropy -> exp(-H)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--replay", "nope.jsonl"], "not found"),
        (["--demo", "--speed", "-1"], "--speed"),
        (["--demo", "--threshold", "0"], "--threshold"),
        (["--demo", "-b", "8", "--sub-blocks", "3"], "does not divide"),
        (["missing-folder"], "does not exist"),
        (["--demo", "--record", "no/such/dir/t.jsonl"], "does not exist"),
        (["--replay", "a.jsonl", "--record", "b.jsonl"], "exclude each other"),
    ],
)
def test_command_refuses_bad_input_before_opening_the_screen(tmp_path, monkeypatch, args, message):
    import typer
    from typer.testing import CliRunner

    from nbdiff_cli.console import handle_errors
    from nbdiff_cli.visualize import visualize

    monkeypatch.chdir(tmp_path)
    cli = typer.Typer()
    cli.command()(handle_errors(visualize))
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1
    assert message in result.output


# ---- the app with the fake backend -------------------------------------------------------------


async def test_typed_prompt_runs_and_counts_equal_final_record():
    app = make_app(FakeBackend(), options=OPTIONS, speed=0)
    async with app.run_test(size=(100, 30)) as pilot:
        await type_prompt(pilot, "Hello there")
        await wait_until(pilot, lambda: finished(app))
        final = app.view.final
        assert app.view.prompt == "Hello there"
        assert final.new_tokens == OPTIONS.max_new_tokens
        shown = status_text(app)
        assert f"tokens {final.new_tokens} " in shown
        assert f"forwards {final.forwards} " in shown
        assert f"step {final.steps + app.view.committed_blocks} " in shown  # denoising + AR steps
        assert f"tok/fwd {final.tokens_per_forward:.2f}" in shown
        assert f"tok/s {final.tokens_per_second:.1f}" in shown
        assert "done (length)" in shown
        assert app.view.text == final.texts[0]
        prompt_box = app.query_one("#prompt", Input)
        assert not prompt_box.has_focus  # keys drive the app again
        await pilot.press("slash")
        assert prompt_box.has_focus
        await pilot.press("p")  # typed into the prompt, not a pause
        assert not app.paused and prompt_box.value.endswith("p")
        await pilot.press("escape")
        assert not prompt_box.has_focus


async def test_pause_stops_the_step_counter_and_n_single_steps():
    app = make_app(FakeBackend(), prompt="pause me", options=OPTIONS, speed=32)
    async with app.run_test() as pilot:
        await wait_until(pilot, lambda: app.view.steps >= 3)
        await pilot.press("p")
        assert app.paused
        frozen = app.view.steps
        await pilot.pause(0.4)  # about 12 ticks at 32 steps/s
        assert app.view.steps == frozen
        assert "PAUSED" in status_text(app)
        await pilot.press("n")
        assert app.view.steps == frozen + 1
        await pilot.press("p")
        await wait_until(pilot, lambda: app.view.steps > frozen + 2)
        await wait_until(pilot, lambda: finished(app))


async def test_speed_keys_and_colour_toggle_and_screenshot(tmp_path):
    app = make_app(FakeBackend(), prompt="x", options=OPTIONS, speed=8, screenshot_dir=tmp_path)
    async with app.run_test() as pilot:
        await pilot.press("plus")
        assert app.speed == 16
        await pilot.press("minus", "minus")
        assert app.speed == 4
        for _ in SPEEDS:
            await pilot.press("plus")
        assert app.speed == 0  # max: every queued event shown at once
        await wait_until(pilot, lambda: finished(app))
        await pilot.press("c")
        assert app.colour_by == "step"
        assert "step in block" in app.query_one("#tiles").border_subtitle
        await pilot.press("s")
        await pilot.pause(0.1)
        shots = list(tmp_path.glob("*.svg"))
        assert len(shots) == 1 and "<svg" in shots[0].read_text()


async def test_new_prompt_cancels_the_running_one():
    backend = FakeBackend(delay=0.02)
    app = make_app(backend, prompt="first prompt", options=OPTIONS.with_(max_new_tokens=64), speed=0)
    async with app.run_test() as pilot:
        await wait_until(pilot, lambda: app.view.steps >= 2)
        first_cancel = app._cancel
        await type_prompt(pilot, "second")
        assert first_cancel.is_set()  # the first run stops at its next step
        await wait_until(pilot, lambda: finished(app))
        assert app.view.prompt == "second"
        assert app.view.final.new_tokens == 64  # counts of the second run only
        assert app.view.tokens == 64


async def test_quit_cancels_the_run():
    app = make_app(FakeBackend(delay=0.05), prompt="slow", options=OPTIONS.with_(max_new_tokens=400), speed=0)
    async with app.run_test() as pilot:
        await wait_until(pilot, lambda: app.view.steps >= 1)
        cancel = app._cancel
        await pilot.press("q")
        assert cancel.is_set()
    assert app.view.final is None  # it stopped long before its 400 tokens


async def test_options_form_reruns_with_new_block_size():
    app = make_app(FakeBackend(), prompt="form", options=OPTIONS, speed=0)
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_until(pilot, lambda: finished(app))
        await pilot.press("o")
        await pilot.press("ctrl+a", "ctrl+k", "4", "tab", "ctrl+a", "ctrl+k", "4", "tab",
                          "ctrl+a", "ctrl+k", "0", ".", "5", "enter")
        await wait_until(pilot, lambda: app.runs_started == 2 and finished(app))
        assert (app.options.block_size, app.options.sub_blocks, app.options.threshold) == (4, 4, 0.5)
        assert app.view.block_size == 4
        # a bad value is refused in the form, with the option's message
        await pilot.press("o")
        await pilot.press("ctrl+a", "ctrl+k", "6", "enter")
        assert "power of two" in str(app.screen.query_one("#options-error", Static).content)
        await pilot.press("escape")
        assert app.runs_started == 2


# ---- record and replay, the real decoder on a tiny model ---------------------------------------


async def test_live_tiny_model_record_then_replay_ends_with_same_text(tiny_folder, tmp_path):
    trace = tmp_path / "live.jsonl"
    options = DecodeOptions(sub_blocks=2, threshold=0.02, max_new_tokens=24)  # block size: the folder's 8
    app = make_app(LiveBackend(str(tiny_folder), device="cpu"), options=options, speed=0, record=trace)
    async with app.run_test() as pilot:
        await type_prompt(pilot, "Hello there")
        await wait_until(pilot, lambda: finished(app), timeout=120)
        final = app.view.final
        live_text = app.view.text
        assert final.finish_reason in ("length", "eos")
        assert live_text == final.texts[0]
        assert app.view.tokens == final.new_tokens  # every committed token was shown
        assert app.view.block_size == 8
        shown = status_text(app)
        assert f"tokens {final.new_tokens} " in shown and f"forwards {final.forwards} " in shown
    header, events = read_trace(trace)
    assert header.prompt == "Hello there" and header.options["threshold"] == 0.02
    assert isinstance(events[-1][1], FinalEvent)

    replay = make_app(ReplayBackend(trace), speed=0)
    async with replay.run_test() as pilot:
        await wait_until(pilot, lambda: finished(replay))
        assert replay.view.text == live_text
        assert replay.view.final == final
        assert replay.view.prompt == "Hello there"


async def test_live_backend_reports_errors_in_the_ui(tiny_folder):
    # the API refuses an empty prompt; the worker turns that into a notification, the UI lives on
    app = make_app(LiveBackend(str(tiny_folder), device="cpu"), options=DecodeOptions(max_new_tokens=4), speed=0)
    async with app.run_test(notifications=True) as pilot:
        app.start_run("   ")
        await wait_until(pilot, lambda: app.finished and app.state == "error", timeout=120)
        assert any("empty" in n.message for n in app._notifications)
        await type_prompt(pilot, "Hi")
        await wait_until(pilot, lambda: finished(app), timeout=60)


# ---- snapshots of a replayed trace -------------------------------------------------------------


@pytest.mark.parametrize("size", [(80, 24), (200, 50)])
def test_snapshot_replay(snap_compare, tmp_path, size):
    trace = fake_trace(tmp_path / "demo.jsonl")
    app = make_app(ReplayBackend(trace), speed=0)

    async def run_before(pilot) -> None:
        await wait_until(pilot, lambda: finished(app))

    assert snap_compare(app, terminal_size=size, run_before=run_before)


def test_exact_mode_blocks_show_rejected_drafts_and_the_accepted_length():
    view = RunView()
    view.apply(StepEvent(0, 0, 1, [0], [5], ["a"], [1.0], 3, 4, 0, ar=True))
    view.apply(StepEvent(0, 0, 2, [1, 2, 3], [6, 7, 8], ["b", "c", "d"], [0.9, 0.8, 0.7], 0, 4, 0))
    view.apply(BlockEvent(0, 0, [5, 6], "ab", drafted=[6, 7, 8], accepted=1))
    assert view.rejected_from == 2 and view.accepted_length == 2.0
    tiles = render_tiles(view)
    struck = [span for span in tiles.spans if "strike" in str(span.style)]
    assert len(struck) == 2  # offsets 2 and 3 were rejected
    assert "accepted" in render_status(view, speed="8/s", paused=False, state="done").plain
    view.apply(StepEvent(0, 1, 3, [0], [9], ["e"], [1.0], 3, 4, 0, ar=True))
    assert view.rejected_from is None  # a new block starts clean
