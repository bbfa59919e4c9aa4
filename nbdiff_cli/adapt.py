"""`nbdiff adapt`: the NBDiff adaptation recipe, with a Rich live panel.

The flags are made from `nbdiff.adapt.recipe.AdaptConfig`: one per field, help from its attribute
docstring, panel from its `# --- Section` comment, default from the dataclass (shown in --help).
Every flag defaults to None here, so `AdaptConfig.build` can tell "not given" from "given" and the
precedence stays command line > --config file > default. A bool field is a switch (`--resume`);
a hidden `--no-...` twin turns off a switch that a --config file turned on.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import time
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.text import Text

from nbdiff_cli.console import console, err_console, stdout_is_tty

SHORT = {"data": "-d", "out": "-o", "block_size": "-b", "quantize": "-q"}
PATHS = {"data", "out", "cache_dir"}
HELP = {  # where the command line says more than the field docstring
    "data": ("Training data; repeat for several: --data a.txt --data chats.jsonl. Text (.txt/.md), .jsonl with "
             "`text` or chat `messages`, .parquet, a `datasets.save_to_disk` folder, or a folder of such files."),
}


def _run(model: Path, config: Optional[Path] = None, **values: Any) -> None:
    """Adapt a converted model with the NBDiff recipe (2L layout, AR loss, block-size curriculum).

    Runs unchanged on one CPU, one GPU, or under `accelerate launch` / `torchrun` (DDP, FSDP).
    Ctrl-C saves a checkpoint; `--resume` continues it exactly.
    `--resume --steps N` extends a finished run.
    """
    from nbdiff.errors import NBDiffError
    from nbdiff.adapt.recipe import AdaptConfig
    from nbdiff.adapt.trainer import adapt as run_adapt

    for name in [k for k in values if k.startswith("no_")]:
        if values.pop(name):
            values[name[3:]] = False
    values = {k: ([str(p) for p in v] if isinstance(v, list) else str(v) if isinstance(v, Path) else v)
              for k, v in values.items()}
    values["model"] = str(model)
    cfg = AdaptConfig.build(file=config, **values)
    if not cfg.data:
        raise NBDiffError("no training data", "pass --data FILE (repeat it for several files) or set `data:` in --config")
    if not cfg.out:
        raise NBDiffError("no output folder", "pass --out DIR")

    _quiet_libraries()
    panel = _Panel(cfg)
    # under torchrun / accelerate launch only rank 0 talks (the trainer creates the process group)
    main = int(os.environ.get("RANK", "0")) == 0
    from nbdiff.fsutil import quiet_transformers

    with quiet_transformers(), panel.live(enabled=main):
        result = run_adapt(cfg, callback=panel.update)
    if main:
        _report(result)


def _report(result) -> None:
    if result.status == "interrupted":
        err_console.print(f"interrupted at step {result.steps}; checkpoint: {result.checkpoint}", style="yellow")
        err_console.print("continue with the same command plus --resume", style="dim")
        raise typer.Exit(130)
    console.print(Text.assemble(("done", "green"), f": {result.steps} steps, {result.tokens:,} tokens, block size "
                                f"{result.block_size}, {result.seconds:.1f}s -> {result.out_dir}"), soft_wrap=True)
    if result.checkpoint is not None:
        console.print(f"kept the final checkpoint {result.checkpoint} ({_fmt_bytes(result.checkpoint_bytes)}) so "
                      "--resume --steps N can extend the run; --prune-checkpoints deletes it", style="dim", soft_wrap=True)
    if result.evals:
        console.print(_eval_table(result.evals[0], result.evals[-1]))


# ----------------------------------------------------------------------------- flags from AdaptConfig


def _parameters() -> list[inspect.Parameter]:
    """The command's parameters: MODEL, --config, then one option per AdaptConfig field (and --no-X twins)."""
    from dataclasses import MISSING, fields

    from nbdiff.adapt.recipe import CHOICES, AdaptConfig, field_docs

    kw = inspect.Parameter.KEYWORD_ONLY
    params = [
        inspect.Parameter("model", kw, annotation=Annotated[Path, typer.Argument(
            help="Converted model folder (from `nbdiff convert`).", show_default=False)]),
        inspect.Parameter("config", kw, default=None, annotation=Annotated[Optional[Path], typer.Option(
            "--config", "-c", help="YAML recipe; flags given here override it.", show_default=False)]),
    ]
    docs = field_docs(AdaptConfig)
    twins = []
    for f in fields(AdaptConfig):
        if f.name == "model":
            continue
        section, doc = docs[f.name]
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        help_text = HELP.get(f.name, doc)
        if f.name in CHOICES and not any(c in doc for c in CHOICES[f.name][1:]):
            help_text += f" One of: {', '.join(CHOICES[f.name])}."
        if not (default is None or default is False or default == "" or default == []) and "default:" not in doc:
            help_text += f" [default: {default}]"
        help_text = help_text.replace("[", "\\[")  # typer reads help as Rich markup
        flag = "--" + f.name.replace("_", "-")
        names = [flag, SHORT[f.name]] if f.name in SHORT else [flag]
        params.append(inspect.Parameter(f.name, kw, default=None, annotation=Annotated[
            _cli_type(f.name, str(f.type)), typer.Option(*names, help=help_text, rich_help_panel=section,
                                                         show_default=False)]))
        if str(f.type) == "bool":
            twins.append(inspect.Parameter("no_" + f.name, kw, default=None, annotation=Annotated[
                Optional[bool], typer.Option("--no-" + f.name.replace("_", "-"), hidden=True)]))
    return params + twins


def _cli_type(name: str, annotation: str):
    base = annotation.replace("| None", "").strip()
    if name in PATHS:
        return Optional[list[Path]] if base.startswith("list") else Optional[Path]
    return Optional[{"int": int, "float": float, "bool": bool, "str": str}[base]]


def _command():
    def adapt(**values: Any) -> None:
        _run(**values)

    params = _parameters()
    adapt.__doc__ = _run.__doc__
    adapt.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    adapt.__annotations__ = {p.name: p.annotation for p in params}
    return adapt


adapt = _command()


# ----------------------------------------------------------------------------- output


def _quiet_libraries() -> None:
    import warnings

    warnings.filterwarnings("ignore", message=".*requires_grad=True to a scalar.*")
    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecation notes of peft/transformers internals


def _fmt_bytes(n: int | None) -> str:
    if not n:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"


def _fmt_time(s: float | None) -> str:
    if s is None:
        return "-"
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _eval_table(first: dict, last: dict):
    from rich.table import Table

    if "tokens_per_verify" in last:
        return _drafter_table(first, last)
    table = Table(title="held-out evaluation", show_edge=False)
    table.add_column("block size", justify="right")
    table.add_column(f"MDM loss @ step {first['step']}", justify="right")
    table.add_column(f"MDM loss @ step {last['step']}", justify="right")
    table.add_column("masked accuracy", justify="right")
    table.add_row("1 (AR loss)", f"{first['ar']:.4f}", f"{last['ar']:.4f}", "-")
    for b, v in last["mdm"].items():
        table.add_row(b, f"{first['mdm'].get(b, float('nan')):.4f}", f"{v:.4f}", f"{last['acc'][b]:.3f}")
    return table


def _drafter_table(first: dict, last: dict):
    """A drafter run's evaluation: the weighted draft loss and tokens per verify of simulated greedy decoding."""
    from rich.table import Table

    table = Table(title="held-out evaluation (drafter)", show_edge=False)
    table.add_column("block size", justify="right")
    for what in ("draft loss", "tokens per verify"):
        table.add_column(f"{what} @ step {first['step']}", justify="right")
        table.add_column(f"@ step {last['step']}", justify="right")
    for b in last["mdm"]:
        table.add_row(b, f"{first['mdm'].get(b, float('nan')):.4f}", f"{last['mdm'][b]:.4f}",
                      f"{first['tokens_per_verify'].get(b, float('nan')):.3f}", f"{last['tokens_per_verify'][b]:.3f}")
    return table


@contextlib.contextmanager
def no_ctrl_echo(stream=None):
    """Keep the terminal from echoing `^C` while the live panel is drawn.

    The echoed characters land after the panel's last line and shift what Rich thinks is on the
    screen, so the next redraw leaves a second border behind.
    """
    import sys

    try:
        import termios
    except ImportError:  # not a POSIX terminal
        yield
        return
    try:
        fd = (stream or sys.stdin).fileno()
        old = termios.tcgetattr(fd)
    except (termios.error, OSError, ValueError, AttributeError):  # stdin is a pipe or a file
        yield
        return
    new = list(old)
    new[3] &= ~termios.ECHOCTL
    termios.tcsetattr(fd, termios.TCSANOW, new)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSANOW, old)


class _Panel:
    """The live view: fed by the trainer's callback records."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.train: dict = {}
        self.eval: dict = {}
        self.info: dict = {}
        self.note = ""
        self._live = None
        self._tty = stdout_is_tty()

    @contextlib.contextmanager
    def live(self, enabled: bool = True):
        from rich.live import Live

        if not enabled or not self._tty:
            yield
            return
        self._live = Live(self.render(), console=console, refresh_per_second=4, transient=False)
        with no_ctrl_echo(), self._live:
            yield

    def update(self, rec: dict) -> None:
        ev = rec.get("event")
        if ev == "start":
            self._start(rec)
        elif ev == "train":
            self.train = rec
            if not self._tty:
                console.print(f"step {rec['step']}/{rec['steps']} b={rec['block_size']} loss={rec['loss']:.4f} "
                              f"mdm={rec['mdm']:.4f} ar={rec['ar']:.4f} lr={rec['lr']:.2e} tok/s={rec['tokens_per_s']:.0f}")
        elif ev == "eval":
            self.eval = rec
            if not self._tty:
                mdm = " ".join(f"b{b}={v:.3f}" for b, v in rec["mdm"].items())
                tpv = " ".join(f"b{b}={v:.3f}" for b, v in rec.get("tokens_per_verify", {}).items())
                console.print(f"eval step {rec['step']}: ar={rec['ar']:.4f} mdm {mdm}"
                              + (f" tokens/verify {tpv}" if tpv else ""))
        elif ev == "checkpoint":
            self.note = f"checkpoint {rec['path']}"
            if not self._tty:
                console.print(f"saved checkpoint {rec['path']}")
        if self._live is not None:
            self._live.update(self.render())

    def _start(self, rec: dict) -> None:
        self.info = rec
        d = rec["data"]
        skipped = d["skipped_empty"] + d["skipped_non_utf8"] + d["skipped_no_field"] + d["skipped_no_assistant"]
        self.note = (f"{d['documents']} documents, {d['tokens']:,} tokens, {rec['train_rows']} train rows, "
                     f"{rec['eval_rows']} held-out rows" + (f", {skipped} skipped" if skipped else ""))
        for warning in rec.get("warnings", []):
            err_console.print(f"warning: {warning}", style="yellow", soft_wrap=True)
        for note in rec.get("notes", []):  # dtype, memory plan, attention kernel
            err_console.print(note, style="dim", soft_wrap=True, markup=False)
        if not self._tty:
            console.print(f"adapt {self.cfg.model} -> {rec['out']} on {rec['device']} x{rec['world_size']}: {self.note}")

    def render(self):
        from rich.console import Group
        from rich.panel import Panel
        from rich.table import Table

        t = self.train
        grid = Table.grid(padding=(0, 2))
        for _ in range(4):
            grid.add_column()
        steps = t.get("steps", self.cfg.steps)
        val = lambda k, f="{:.4f}": f.format(t[k]) if t.get(k) is not None else "-"  # noqa: E731
        grid.add_row("step", f"{t.get('step', 0)}/{steps}", "block size", f"{t.get('block_size', '-')} -> {self.cfg.block_size}")
        grid.add_row("loss", val("loss"), "lr", val("lr", "{:.2e}"))
        grid.add_row("MDM", val("mdm"), "AR", val("ar") + (f" (x{t['ar_weight']:.2f})" if t else ""))
        grid.add_row("tokens/s", val("tokens_per_s", "{:,.0f}"), "tokens", val("tokens", "{:,}"))
        grid.add_row("ETA", _fmt_time(t.get("eta_s")), "peak memory", _fmt_bytes(t.get("peak_memory_bytes")))
        if self.eval:
            mdm = "  ".join(f"b{b} {v:.3f}" for b, v in self.eval["mdm"].items())
            grid.add_row("eval", f"step {self.eval['step']}", "AR / MDM", f"{self.eval['ar']:.3f} / {mdm}")
        body = Group(grid, Text(""), Text(self.note, style="dim")) if self.note else grid
        title = Text.assemble("nbdiff adapt  ", (time.strftime("%H:%M:%S"), "dim"))
        return Panel(body, title=title, border_style="cyan")
