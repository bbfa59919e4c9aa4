"""The Textual app: watch a block-diffusion decoder unmask tokens, block by block.

Threads: the backend (model load + decoding) runs in one exclusive thread worker; it posts each
event as a `Decoded` message (thread-safe) and nothing else crosses into the UI. Events wait in a
queue and a timer releases them at the chosen speed (steps per second), so a fast model can still
be watched; pause stops the timer, single step releases one step. A new run or quitting sets the
run's cancel event, and the decoder stops at its next step. Built by `make_app(backend, ...)`, so
tests drive it with a fake or replay backend and `App.run_test()`.
"""

from __future__ import annotations

import threading
from collections import deque
from pathlib import Path

from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.message import Message
from textual.timer import Timer
from textual.widgets import Footer, Header, Input, Label, Static

from nbdiff.decode.options import DecodeOptions
from nbdiff.errors import NBDiffError
from nbdiff.decode.events import Event, StepEvent

from nbdiff_cli.visualize.backends import Backend
from nbdiff_cli.visualize.state import RunView
from nbdiff_cli.visualize.trace import TraceHeader, TraceWriter
from nbdiff_cli.visualize.widgets import OptionsScreen, StepBars, render_legend, render_status, render_text, render_tiles

SPEEDS = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 0.0)
"""Steps shown per second; 0 = as fast as the model produces them."""


def speed_label(speed: float) -> str:
    return "max" if speed == 0 else f"{speed:g}/s"


class Decoded(Message):
    """One decoder event, posted by the worker thread."""

    def __init__(self, run_id: int, t: float, event: Event) -> None:
        super().__init__()
        self.run_id, self.t, self.event = run_id, t, event


class RunEnded(Message):
    """The worker finished (normally, cancelled, or with an error)."""

    def __init__(self, run_id: int, error: str | None = None, hint: str | None = None) -> None:
        super().__init__()
        self.run_id, self.error, self.hint = run_id, error, hint


class Loading(Message):
    def __init__(self, run_id: int) -> None:
        super().__init__()
        self.run_id = run_id


class VisualizeApp(App):
    CSS_PATH = "visualize.tcss"
    TITLE = "nbdiff visualize"
    AUTO_FOCUS = None
    BINDINGS = [
        Binding("p", "pause", "Pause"),
        Binding("n", "step", "Step"),
        Binding("plus,equals_sign", "faster", "Faster", key_display="+"),
        Binding("minus", "slower", "Slower", key_display="-"),
        Binding("c", "colour", "Colour"),
        Binding("o", "options", "Options"),
        Binding("r", "rerun", "Run"),
        Binding("slash", "edit_prompt", "Prompt", key_display="/"),
        Binding("s", "screenshot", "SVG"),
        Binding("q", "quit", "Quit"),
        Binding("escape", "leave_prompt", "Leave prompt", show=False),
    ]

    def __init__(self, backend: Backend, *, prompt: str = "", options: DecodeOptions | None = None,
                 speed: float = 8.0, record: str | Path | None = None, autorun: bool = True,
                 screenshot_dir: str | Path = ".") -> None:
        super().__init__()
        self.backend = backend
        self.options = options or DecodeOptions()
        self.prompt = prompt
        if backend.replay:
            self.prompt = getattr(backend, "prompt", prompt)
            self.options = getattr(backend, "options", self.options)
        self.speed = speed
        self.record = Path(record) if record else None
        self.autorun = autorun and bool(self.prompt)
        self.screenshot_dir = Path(screenshot_dir)
        self.view = RunView(prompt=self.prompt, sub_blocks=self.options.sub_blocks)
        self.paused = False
        self.colour_by = "confidence"
        self.state = "ready"
        self.runs_started = 0
        self.producer_done = True
        self._run_id = 0
        self._cancel = threading.Event()
        self._queue: deque[tuple[float, Event]] = deque()
        self._timer: Timer | None = None

    # ---- layout ------------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield Header()
        with VerticalScroll(id="text-box"):
            yield Static(id="text")
        yield Static(id="tiles")
        yield Static(id="status")
        with Horizontal(id="spark-row"):
            yield Label("tokens/step ", id="spark-label")
            yield StepBars(id="spark")
        yield Input(self.prompt, placeholder="type a prompt, Enter runs it", id="prompt")
        yield Footer(compact=True, show_command_palette=False)

    def on_mount(self) -> None:
        self.sub_title = self.backend.name
        self.query_one("#text-box").border_title = "prompt and generated text (one shade per block)"
        self._restart_timer()
        self.refresh_view()
        if self.autorun:
            self.start_run(self.prompt)
        else:
            self.query_one("#prompt", Input).focus()

    # ---- runs --------------------------------------------------------------------------------

    def start_run(self, prompt: str, options: DecodeOptions | None = None) -> None:
        """Cancel the current run (it stops at its next step) and start a new one."""
        if options is not None:
            self.options = options
        self._cancel.set()
        self._cancel = threading.Event()
        self._run_id += 1
        self.runs_started += 1
        self._queue.clear()
        self.paused = False
        self.prompt = prompt
        self.view = RunView(prompt=prompt, sub_blocks=self.options.sub_blocks)
        self.producer_done = False
        self.state = "starting"
        self._decode(self._run_id, prompt, self.options, self._cancel)
        self.refresh_view()

    def cancel_run(self) -> None:
        self._cancel.set()

    @property
    def finished(self) -> bool:
        """The worker is done and every event it made has been shown."""
        return self.producer_done and not self._queue

    @work(thread=True, exclusive=True, group="decode")
    def _decode(self, run_id: int, prompt: str, options: DecodeOptions, cancel: threading.Event) -> None:
        writer = None
        error: tuple[str, str | None] | None = None
        try:
            if not getattr(self.backend, "loaded", True):
                self.post_message(Loading(run_id))
            self.backend.prepare()
            if self.record is not None and not self.backend.replay:
                header = TraceHeader(prompt, options.to_dict(), self.backend.name)
                writer = TraceWriter(self.record, header)
            # after a cancel the decoder still ends with its block and final records (no extra
            # forward pass): they go to the trace, not to the UI, which has moved on
            for t, event in self.backend.run(prompt, options, cancel):
                if writer is not None:
                    writer.write(event, t)
                if not cancel.is_set():
                    self.post_message(Decoded(run_id, t, event))
        except NBDiffError as exc:
            error = (exc.message, exc.hint)
        except Exception as exc:  # noqa: BLE001 - shown in the UI instead of killing it
            error = (f"{type(exc).__name__}: {exc}", None)
        finally:
            if writer is not None:
                writer.close()
        self.post_message(RunEnded(run_id, *(error or (None, None))))

    def on_loading(self, message: Loading) -> None:
        if message.run_id == self._run_id:
            self.state = "loading model…"
            self.refresh_view()

    def on_decoded(self, message: Decoded) -> None:
        if message.run_id != self._run_id:
            return  # a cancelled run's late events
        self._queue.append((message.t, message.event))
        if self.state != "decoding":
            self.state = "decoding"

    def on_run_ended(self, message: RunEnded) -> None:
        if message.run_id != self._run_id:
            return
        self.producer_done = True
        if message.error:
            self.state = "error"
            text = message.error + (f"\nhint: {message.hint}" if message.hint else "")
            self.notify(text, title="decoding failed", severity="error", timeout=10)
        self._update_state()
        self.refresh_view()

    # ---- animation ---------------------------------------------------------------------------

    def _restart_timer(self) -> None:
        if self._timer is not None:
            self._timer.stop()
        # at max speed, show whatever has arrived 30 times a second (a fast model on a GPU makes
        # hundreds of events a second; redrawing for each would only cost the UI thread)
        self._timer = self.set_interval(1.0 / self.speed if self.speed > 0 else 1 / 30, self._tick)

    def _tick(self) -> None:
        if not self.paused and self._queue:
            self.release(1 if self.speed > 0 else None)

    def release(self, steps: int | None) -> int:
        """Show queued events up to `steps` step events (None = all), plus the block/final events
        that follow the last one. Returns the step events shown."""
        shown = 0
        while self._queue:
            t, event = self._queue[0]
            if isinstance(event, StepEvent):
                if steps is not None and shown >= steps:
                    break
                shown += 1
            self._queue.popleft()
            self.view.apply(event, t)
            for note in getattr(event, "notes", None) or []:
                self.notify(note, title="note", severity="warning")
        self._update_state()
        self.refresh_view()
        return shown

    def _update_state(self) -> None:
        if self.view.final is not None:
            self.state = f"done ({self.view.final.finish_reason})"
        elif self.producer_done and not self._queue and self.state not in ("error", "ready"):
            self.state = "stopped"

    def refresh_view(self) -> None:
        if not self.is_mounted:
            return
        view = self.view
        self.query_one("#text", Static).update(render_text(view))
        tiles = self.query_one("#tiles", Static)
        tiles.update(render_tiles(view, self.colour_by))
        if view.block >= 0:
            sub = f" · sub-block {view.sub_block + 1}/{view.sub_blocks}" if view.sub_blocks > 1 else ""
            tiles.border_title = f"block {view.block} · {view.block_size} tokens{sub}"
        else:
            tiles.border_title = "active block"
        tiles.border_subtitle = render_legend(self.colour_by)
        self.query_one("#status", Static).update(
            render_status(view, speed=speed_label(self.speed), paused=self.paused, state=self.state)
        )
        self.query_one("#spark", StepBars).data = list(view.per_step)
        self.query_one("#text-box", VerticalScroll).scroll_end(animate=False)

    # ---- actions -----------------------------------------------------------------------------

    def on_input_submitted(self, event: Input.Submitted) -> None:
        prompt = event.value.strip()
        if not prompt:
            self.notify("type a prompt first", severity="warning")
            return
        if self.backend.replay:
            self.notify("replaying a trace: its prompt is fixed", severity="information")
            prompt = self.prompt
        self.set_focus(None)
        self.start_run(prompt)

    def action_edit_prompt(self) -> None:
        self.query_one("#prompt", Input).focus()

    def action_leave_prompt(self) -> None:
        self.set_focus(None)

    def action_pause(self) -> None:
        self.paused = not self.paused
        self.refresh_view()

    def action_step(self) -> None:
        if not self.paused:
            self.paused = True
        self.release(1)

    def action_faster(self) -> None:
        self._set_speed(+1)

    def action_slower(self) -> None:
        self._set_speed(-1)

    def _set_speed(self, direction: int) -> None:
        # nearest preset to the current speed (a --speed value need not be one); max is the last
        if self.speed == 0:
            index = len(SPEEDS) - 1
        else:
            index = min(range(len(SPEEDS) - 1), key=lambda i: abs(SPEEDS[i] - self.speed))
        self.speed = SPEEDS[min(len(SPEEDS) - 1, max(0, index + direction))]
        self._restart_timer()
        self.refresh_view()

    def action_colour(self) -> None:
        self.colour_by = "step" if self.colour_by == "confidence" else "confidence"
        self.refresh_view()

    def action_rerun(self) -> None:
        if self.prompt:
            self.start_run(self.prompt)

    def action_options(self) -> None:
        if self.backend.replay:
            self.notify("replaying a trace: its options are fixed", severity="warning")
            return

        def done(options: DecodeOptions | None) -> None:
            if options is not None:
                self.options = options
                if self.prompt:
                    self.start_run(self.prompt, options)

        self.push_screen(OptionsScreen(self.options, self.view.block_size or None), done)

    def action_screenshot(self) -> None:
        self.screenshot_dir.mkdir(parents=True, exist_ok=True)
        path = self.save_screenshot(path=str(self.screenshot_dir))
        self.notify(f"saved {Path(path).resolve()}", title="screenshot")  # the full path: say where it went

    async def action_quit(self) -> None:
        self.cancel_run()
        self.exit()

    def on_unmount(self) -> None:
        self.cancel_run()


def make_app(backend: Backend, **kwargs) -> VisualizeApp:
    """The app factory: any backend (live model, replayed trace, fake) and the same UI."""
    return VisualizeApp(backend, **kwargs)
