"""The visualizer's widgets: the text panel, the token tiles, the status line, the options form.

The drawing is done by plain functions from a `RunView` to Rich `Text`, so it is deterministic
(no clock) and the same for live runs and replays.
"""

from __future__ import annotations

import math

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Grid, Horizontal, Vertical
from textual.reactive import reactive
from textual.screen import ModalScreen
from textual.widget import Widget
from textual.widgets import Button, Input, Label, Static

from nbdiff.decode.options import DecodeOptions
from nbdiff.errors import NBDiffError

from nbdiff_cli.console import printable
from nbdiff_cli.visualize.state import RunView, Tile

TILE_WIDTH = 8
"""Longest token text shown in a tile (longer ones end with an ellipsis)."""

# distinct backgrounds for "coloured by step": step 0 is the AR step that opens a block
STEP_PALETTE = ("#5f87af", "#00af87", "#afaf00", "#d78700", "#d75f5f", "#af5faf", "#8787d7", "#5fafaf")
BLOCK_BACKGROUNDS = ("#1c2b3a", "#2e2338")


def visible(text: str) -> str:
    """Token text made visible in a tile: newlines and tabs as arrows, spaces as middle dots."""
    text = text.replace("\n", "↵").replace("\t", "→").replace("\r", "")
    return printable(text.replace(" ", "·"))


def unit_confidence(value: float) -> float:
    """Map a confidence to [0, 1]: probabilities and margins already are; a negative entropy -H
    becomes exp(-H) (1 = certain)."""
    if value < 0:
        value = math.exp(value)
    return min(1.0, max(0.0, value))


def confidence_colour(value: float) -> str:
    """Red (unsure) -> amber -> green (sure)."""
    c = unit_confidence(value)
    low, mid, high = (0xd7, 0x3a, 0x3a), (0xd7, 0xaf, 0x00), (0x2e, 0xa0, 0x4f)
    a, b, f = (low, mid, c * 2) if c < 0.5 else (mid, high, (c - 0.5) * 2)
    r, g, bl = (round(x + (y - x) * f) for x, y in zip(a, b))
    return f"#{r:02x}{g:02x}{bl:02x}"


def step_colour(step_in_block: int) -> str:
    return STEP_PALETTE[step_in_block % len(STEP_PALETTE)]


def tile_label(tile: Tile) -> str:
    label = visible(tile.text) if tile.text else f"#{tile.token}"
    return label if len(label) <= TILE_WIDTH else label[: TILE_WIDTH - 1] + "…"


def render_tiles(view: RunView, colour_by: str = "confidence") -> Text:
    """The active block as a row of tiles; masked positions as mask tiles; sub-blocks separated by
    bars, the current sub-block's bars highlighted."""
    out = Text(no_wrap=False, overflow="fold")
    if not view.tiles:
        out.append("waiting for the first block…", style="dim italic")
        return out
    n = len(view.tiles)
    part = view.sub_block_size
    marked = view.sub_blocks > 1 and part < max(n, view.full_block_size)
    current = None if view.active_committed else view.sub_block

    def bar(*touching: int) -> None:
        # the bar between two sub-blocks is highlighted when either side is the current one
        here = current in touching
        out.append("┃" if here else "│", style="bold #ffd75f" if here else "#6c6c6c")

    for pos, tile in enumerate(view.tiles):
        if marked and pos % part == 0:
            bar(pos // part, pos // part - 1)
        if tile is None:
            out.append(" ░░ ", style="#808080 on #303030")
        elif view.rejected_from is not None and pos >= view.rejected_from:  # exact mode: a rejected draft
            out.append(f" {tile_label(tile)} ", style="strike #8a8a8a on #3a3a3a")
        else:
            colour = step_colour(tile.step_in_block) if colour_by == "step" else confidence_colour(tile.confidence)
            out.append(f" {tile_label(tile)} ", style=f"bold #000000 on {colour}")
        end_of_part = (pos + 1) % part == 0 or pos + 1 == n
        if marked and end_of_part:
            if pos + 1 == n:
                bar(pos // part)  # closing bar of the last sub-block
        else:
            out.append(" ")
    return out


def render_text(view: RunView) -> Text:
    """The prompt, then every committed block on its own background, then the active block's
    committed tokens so far (masked positions as dots)."""
    out = Text()
    out.append("prompt ", style="bold #5fafff")
    out.append(printable(view.prompt) or "(none)", style="#d0d0d0")
    out.append("\n\n")
    for i, block in enumerate(view.blocks):
        out.append(printable(block), style=f"#ffffff on {BLOCK_BACKGROUNDS[i % 2]}")  # model text: controls escaped
    if view.tiles and not view.active_committed:
        for tile in view.tiles:
            if tile is None:
                out.append("·", style="#6c6c6c")
            else:
                out.append(printable(tile.text), style="italic #ffd75f")
    if view.final is not None:
        out.append(f"  [{view.final.finish_reason}]", style="dim")
    return out


def render_status(view: RunView, *, speed: str, paused: bool, state: str) -> Text:
    """One or two lines of figures. tokens/s uses the recorded event times, never the clock."""
    out = Text()

    def item(label: str, value: str) -> None:
        # a no-break space inside an item, so a narrow terminal wraps between items only
        out.append(f"{label}\u00a0", style="dim")
        out.append(value.replace(" ", "\u00a0"), style="bold")
        out.append("  ")

    item("step", str(view.steps))
    item("block", str(max(view.block, 0)) if view.block >= 0 else "-")
    item("tokens", str(view.new_tokens))
    item("forwards", f"{view.forwards}" + ("" if view.final else "~"))
    item("tok/fwd", f"{view.tokens_per_forward:.2f}")
    if view.accepted_length is not None:  # exact mode: tokens kept per verified block
        item("accepted", f"{view.accepted_length:.2f}/block")
    item("tok/s", f"{view.tokens_per_second:.1f}")
    item("speed", speed)
    shown = "PAUSED" if paused else state
    out.append(shown.replace(" ", "\u00a0"), style="bold #ffd75f" if paused else "#5fd75f")
    return out


BARS = " ▁▂▃▄▅▆▇█"


def render_step_bars(per_step: list[int], width: int) -> Text:
    """Tokens committed at each of the last `width` steps, one column per step, on a zero
    baseline (unlike a min-max sparkline, a run of 1-token steps stays visible)."""
    shown = per_step[-width:] if width > 0 else []
    top = max(max(shown, default=0), 2)
    out = Text()
    for value in shown:
        level = 0 if value <= 0 else max(1, round(value / top * (len(BARS) - 1)))
        out.append(BARS[level], style="#5fafff" if value <= 1 else "#5fd75f")
    if shown:
        out.append(f" max {max(shown)}", style="dim")
    return out


class StepBars(Widget):
    """A bar per denoising step: how many tokens it committed (newest on the right)."""

    data: reactive[list[int]] = reactive(list, always_update=True)

    def render(self) -> Text:
        # leave room for the " max N" label
        return render_step_bars(self.data, max(0, self.size.width - 7))


def render_legend(colour_by: str) -> str:
    """Border subtitle of the tiles (Textual content markup): what the colours mean."""
    if colour_by == "step":
        swatches = "".join(f"[{c}]■[/]" for c in STEP_PALETTE[:6])
        return f"colour: step in block 0 {swatches} 5 (c)"
    swatches = "".join(f"[{confidence_colour(v)}]■[/]" for v in (0.0, 0.25, 0.5, 0.75, 1.0))
    return f"colour: confidence low {swatches} high (c)"


class OptionsScreen(ModalScreen[DecodeOptions | None]):
    """A small form: block size, sub-blocks, threshold. Returns validated options, or None."""

    BINDINGS = [("escape", "cancel", "Cancel")]
    AUTO_FOCUS = "#opt-block-size"

    def __init__(self, options: DecodeOptions, block_size_hint: int | None = None) -> None:
        super().__init__()
        self.options = options
        self.block_size_hint = block_size_hint

    def compose(self) -> ComposeResult:
        block = self.options.block_size or self.block_size_hint
        with Vertical(id="options-form"):
            yield Label("Decoding options (Enter runs again, Esc cancels)", id="options-title")
            with Grid(id="options-grid"):
                yield Label("block size")
                yield Input(str(block or ""), placeholder="model's", id="opt-block-size")
                yield Label("sub-blocks")
                yield Input(str(self.options.sub_blocks), id="opt-sub-blocks")
                yield Label("threshold")
                yield Input(str(self.options.threshold), id="opt-threshold")
            yield Static("", id="options-error")
            with Horizontal(id="options-buttons"):
                yield Button("Run", variant="primary", id="opt-run")
                yield Button("Cancel", id="opt-cancel")

    def _read(self) -> DecodeOptions:
        raw_block = self.query_one("#opt-block-size", Input).value.strip()
        raw_sub = self.query_one("#opt-sub-blocks", Input).value.strip()
        raw_thr = self.query_one("#opt-threshold", Input).value.strip()
        try:
            block = int(raw_block) if raw_block else None
            sub = int(raw_sub)
            thr = float(raw_thr)
        except ValueError:
            raise NBDiffError("block size and sub-blocks are integers, threshold a number") from None
        return self.options.with_(block_size=block, sub_blocks=sub, threshold=thr)

    def _submit(self) -> None:
        try:
            options = self._read()
        except NBDiffError as exc:
            self.query_one("#options-error", Static).update(Text(exc.message, style="bold red"))
            return
        self.dismiss(options)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self._submit()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "opt-run":
            self._submit()
        else:
            self.dismiss(None)

    def action_cancel(self) -> None:
        self.dismiss(None)
