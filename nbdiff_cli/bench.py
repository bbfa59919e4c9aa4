"""`nbdiff bench [MODEL]`: transformers generate() and nbdiff side by side, per suite, speed and quality.

The measuring lives in `nbdiff.eval.bench` (no printing there); this module parses the flags, shows a
progress bar, and renders the rows as a Rich table, JSON lines, a Markdown table or a plot.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from nbdiff_cli.console import console, err_console
from nbdiff_cli.options import (
    Device, DraftSteps, DeviceChoice, Dtype, DtypeChoice, MaxNewTokens, ModelArg, Quantize,
    QuantizeChoice, SubBlocks
)

if TYPE_CHECKING:
    from nbdiff.eval.bench import BenchResult, BenchRow

BENCH = "Bench"


def _split(text: str, kind, flag: str) -> tuple:
    from nbdiff.errors import NBDiffError

    try:
        return tuple(kind(part) for part in text.replace(" ", "").split(",") if part)
    except ValueError:
        raise NBDiffError(f"{flag} takes a comma-separated list, got {text!r}", f"e.g. {flag} 1,4,8") from None


def _modes(modes: str, exact: Optional[bool], drafter: Optional[str]) -> list[str]:
    """--modes, with --exact/--no-exact adding or dropping the exact rows (--exact: `exact` per block size and
    `exact-auto`, exact mode as `nbdiff generate --exact` plans it) and --drafter adding exact-drafter."""
    mode_list = list(_split(modes, str, "--modes"))
    if exact is True:
        mode_list += [m for m in ("exact", "exact-auto") if m not in mode_list]
    elif exact is False:
        mode_list = [m for m in mode_list if not m.startswith("exact")]
    if drafter is not None and "exact-drafter" not in mode_list:
        mode_list.append("exact-drafter")
    return mode_list


def _model_path(model: Optional[str]) -> str:
    """MODEL, or the default model's folder when it is omitted (built on first use)."""
    from nbdiff_cli.models import resolve_model

    return resolve_model(model)


def bench(
    model: ModelArg = None,
    suite: Annotated[Optional[list[str]], typer.Option("--suite", "-s", help="Suite(s) to run: chat, lists, arithmetic, code, rewrite (repeat or comma-separate). \\[default: all]",
                                                       show_default=False, rich_help_panel=BENCH)] = None,
    prompts: Annotated[Optional[Path], typer.Option("--prompts", help="Your own prompts: one a line, or JSON lines with `prompt` and optional `suite`.",
                                                    rich_help_panel=BENCH)] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", help="Only the first N prompts of each suite.", rich_help_panel=BENCH)] = None,
    block_sizes: Annotated[str, typer.Option("--block-sizes", help="Block sizes of the nbdiff rows.", rich_help_panel=BENCH)] = "1,4,8",
    thresholds: Annotated[str, typer.Option("--thresholds", help="Confidence thresholds of the nbdiff rows.", rich_help_panel=BENCH)] = "0.9,0.7,0.5",
    exact_thresholds: Annotated[Optional[str], typer.Option("--exact-thresholds", help="Draft thresholds of the exact rows. \\[default: --thresholds]",
                                                            show_default=False, rich_help_panel=BENCH)] = None,
    modes: Annotated[str, typer.Option("--modes", help="Decoder modes: nbdiff, exact (diffusion drafts verified by AR), exact-ngram (n-gram drafts), exact-auto (generate --exact: the drafting plan picks drafter and block size), exact-drafter (a trained drafter), lookup (transformers' prompt lookup).",
                                       rich_help_panel=BENCH)] = "nbdiff,exact",
    exact: Annotated[Optional[bool], typer.Option("--exact/--no-exact", help="Add / drop the exact-mode rows (adds exact and exact-auto to --modes).",
                                                  show_default=False, rich_help_panel=BENCH)] = None,
    draft_steps: DraftSteps = None,
    drafter: Annotated[Optional[str], typer.Option("--drafter", help="Trained drafter folder of the exact-drafter rows (adds them); default: the model folder's drafter/.",
                                                   rich_help_panel=BENCH)] = None,
    draft_thresholds: Annotated[Optional[str], typer.Option("--draft-thresholds", help="Verify-width thresholds of the exact-drafter rows (0 = the whole block). \\[default: --draft-threshold's]",
                                                            show_default=False, rich_help_panel=BENCH)] = None,
    lookup_tokens: Annotated[int, typer.Option("--lookup-tokens", help="Draft tokens of the lookup row (transformers' prompt_lookup_num_tokens).",
                                               rich_help_panel=BENCH)] = 10,
    max_new_tokens: MaxNewTokens = 64,
    repeats: Annotated[int, typer.Option("--repeats", "-r", help="Timed decodes per prompt and row; the median counts.", rich_help_panel=BENCH)] = 1,
    sub_blocks: SubBlocks = 1,
    warmup: Annotated[bool, typer.Option("--warmup/--no-warmup", help="One untimed decode per row shape first (start-up costs stay out of the timings).",
                                         rich_help_panel=BENCH)] = True,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON lines: one machine object, then one object per row.", rich_help_panel=BENCH)] = False,
    markdown: Annotated[Optional[Path], typer.Option("--markdown", help="Also write the table as Markdown to this file.", rich_help_panel=BENCH)] = None,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Write a PNG: speedup against generative perplexity, one panel per suite.",
                                                 rich_help_panel=BENCH)] = None,
    dtypes: Annotated[Optional[str], typer.Option("--dtypes", help="Compare weight dtypes side by side, e.g. fp32,bf16 (replaces --dtype).",
                                                  rich_help_panel=BENCH)] = None,
    device: Device = DeviceChoice.auto,
    dtype: Dtype = DtypeChoice.auto,
    quantize: Quantize = QuantizeChoice.none,
) -> None:
    """Benchmark decoding against transformers generate() on the same weights: speed and quality per suite.

    Rows: `ar` (transformers generate(), greedy, KV cache, EOS honoured), `source` (the AR model an
    adapted folder came from, when it is here), and the nbdiff decoder for each block size x
    threshold and mode. Columns: tokens, forwards, tokens/forward, tokens/s (decoding only, after a
    warm-up, median of --repeats), speedup over `ar`, generative perplexity (scored in fp32 by the
    source AR model), distinct-2 and agreement with the AR reply. `!` marks rows below AR quality.
    """
    from nbdiff.eval.bench import BenchConfig, limit_per_suite, load_suites, read_prompts, run_bench
    from nbdiff.errors import NBDiffError

    mode_list = _modes(modes, exact, drafter)
    if limit is not None and limit < 1:
        raise NBDiffError(f"--limit must be >= 1, got {limit}")
    config = BenchConfig(
        block_sizes=_split(block_sizes, int, "--block-sizes"),
        thresholds=_split(thresholds, float, "--thresholds"),
        exact_thresholds=_split(exact_thresholds, float, "--exact-thresholds") if exact_thresholds else None,
        modes=tuple(mode_list),
        max_new_tokens=max_new_tokens,
        repeats=repeats,
        dtypes=_split(dtypes, str, "--dtypes") if dtypes else (dtype.value,),
        device=device.value,
        quantize=None if quantize.value == "none" else quantize.value,
        sub_blocks=sub_blocks,
        draft_steps=draft_steps,
        drafter=drafter,
        lookup_tokens=lookup_tokens,
        warmup=warmup,
        **({"draft_thresholds": _split(draft_thresholds, float, "--draft-thresholds")} if draft_thresholds else {}),
    )
    if prompts is not None and suite:
        raise NBDiffError("--suite and --prompts do not mix", "pick shipped suites with --suite, or your own with --prompts")
    names = [n for s in suite or [] for n in _split(s, str, "--suite")]
    items = read_prompts(prompts) if prompts is not None else load_suites(names)
    items = limit_per_suite(items, limit)
    path = _model_path(model)

    result = _run_with_progress(path, items, config, run_bench)
    _report(result, json_out, markdown, plot)


def _report(result: "BenchResult", json_out: bool, markdown: Optional[Path], plot: Optional[Path]) -> None:
    """Print the result (table or JSON lines) and write the Markdown table and the plot when asked."""
    import json

    from nbdiff.eval.bench import BELOW_AR_RULE

    if json_out:
        typer.echo(json.dumps(result.machine, ensure_ascii=False))
        for row in result.rows:
            typer.echo(json.dumps(row.to_dict(), ensure_ascii=False))
    else:
        table = render_table(result)
        if not console.is_terminal:  # a file or a pipe: print the table whole rather than squeezed to 80 columns
            from rich.measure import Measurement

            width = Measurement.get(console, console.options.update(max_width=1000), table).maximum
            console.print(table, width=max(console.width, width))
        else:
            console.print(table)
        console.print(machine_line(result.machine), style="dim")  # the consoles print text literally
        console.print(f"! = below AR quality: {BELOW_AR_RULE}", style="dim")
    for note in result.notes:
        err_console.print(f"note: {note}", style="yellow", markup=False)
    if markdown is not None:
        from nbdiff.fsutil import atomic_write_text

        atomic_write_text(markdown, markdown_table(result))
        err_console.print(f"table written to {markdown}", style="dim", markup=False)
    if plot is not None:
        plot_result(result, plot)
        err_console.print(f"plot written to {plot}", style="dim", markup=False)


def _run_with_progress(path, items, config, run_bench) -> "BenchResult":
    """Run with a Rich progress bar (with ETA) on a terminal; elsewhere one plain line per prompt and row."""
    import time

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    if not err_console.is_terminal:
        first: list[float] = []  # (time, done) of the first report: loading and warm-up are not in the rate

        def log(done: int, total: int, label: str) -> None:
            now = time.perf_counter()
            if not first:
                first.extend((now, done))
            rate = (done - first[1]) / (now - first[0]) if now > first[0] else 0.0
            eta = f"eta {(total - done) / rate:.0f} s" if rate > 0 else "eta -"
            err_console.print(f"[{done}/{total}] {label} ({eta})", style="dim", highlight=False)

        return run_bench(path, items, config, progress=log)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("eta"), TimeRemainingColumn())
    with Progress(*columns, console=err_console, transient=True) as bar:
        task = bar.add_task("loading", total=None)

        def progress(done: int, total: int, label: str) -> None:
            bar.update(task, completed=done, total=total, description=label)

        return run_bench(path, items, config, progress=progress)


# --------------------------------------------------------------------------------------------
# rendering


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)


def _method(row: "BenchRow") -> str:
    if row.mode == "ar":
        return "generate()"
    if row.mode == "source":
        return "source generate()"
    if row.mode == "lookup":
        return "prompt lookup"
    if row.mode.startswith("exact") and row.plan:  # the drafter the plan ran (exact-auto: what it chose)
        return f"{row.mode} ({row.plan.get('kind')})" if row.mode == "exact-auto" else row.mode
    return row.mode


def _cells(row: "BenchRow", several_dtypes: bool) -> list[str]:
    cells = [row.dtype] if several_dtypes else []
    return cells + [
        _method(row),
        str(row.block_size),
        _num(row.threshold, "g"),
        str(row.new_tokens),
        str(row.forwards),
        _num(row.tokens_per_forward, ".2f"),
        _num(row.tokens_per_second, ".1f"),
        _num(row.speedup, ".2f") + "x",
        _num(row.gen_ppl, ".1f"),
        _num(row.distinct2, ".2f"),
        _num(row.ar_agreement, ".2f"),
        _num(row.extra.get("identical"), ".2f"),
        _num(row.extra.get("accepted_length"), ".2f"),
        _num(row.extra.get("near_ties"), ".0f"),
        _num(row.extra.get("drafter_forwards"), ".0f"),
        _num(row.extra.get("speedup_vs_lookup"), ".2f") + ("x" if "speedup_vs_lookup" in row.extra else ""),
        "!" if row.below_ar else "",
    ]


HEADERS = ["method", "block", "threshold", "tokens", "forwards", "tokens/forward", "tokens/s", "speedup",
           "gen ppl", "distinct-2", "AR agreement", "identical", "tokens/verify", "near-ties", "drafter forwards", "vs lookup",
           "below AR"]
SHORT_HEADERS = ["method", "b", "thr", "tokens", "fwd", "tok/fwd", "tok/s", "speedup", "ppl", "dist-2", "AR agr",
                 "same", "tok/ver", "ties", "dr fwd", "vs lkp", "<AR"]


def render_table(result: "BenchResult"):
    """A Rich table: one section per suite, then "all"."""
    from rich.table import Table

    several = len(result.machine.get("dtypes", [])) > 1
    headers = (["dtype"] if several else []) + SHORT_HEADERS
    table = Table(title="nbdiff bench", show_lines=False)
    table.add_column("suite", style="bold")
    for h in headers:
        table.add_column(h, justify="left" if h in ("method", "dtype") else "right")
    groups = list(dict.fromkeys(r.suite for r in result.rows))
    for g, suite in enumerate(groups):
        if g:
            table.add_section()
        for i, row in enumerate(result.rows_of(suite)):
            style = "red" if row.below_ar else ("cyan" if row.mode == "ar" else None)
            table.add_row(suite if i == 0 else "", *_cells(row, several), style=style)
    return table


def machine_line(machine: dict) -> str:
    gpu = f", GPU {machine['gpu']}" if machine.get("gpu") else ""
    load = machine.get("load_average_start")
    load_text = f", load average {load[0]:.2f} at start" if load else ""
    return (f"{machine['cpu']} ({machine['cpu_count']} CPUs{gpu}), {machine['threads']} threads, torch {machine['torch']}, "
            f"transformers {machine['transformers']}, {machine['dtype']}, device {machine['device']}{load_text}")


def markdown_table(result: "BenchResult") -> str:
    """The table as Markdown: one section per suite (a bold suite name in the first column)."""
    several = len(result.machine.get("dtypes", [])) > 1
    headers = ["suite"] + (["dtype"] if several else []) + HEADERS
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for suite in dict.fromkeys(r.suite for r in result.rows):
        for i, row in enumerate(result.rows_of(suite)):
            name = f"**{suite}**" if i == 0 else ""
            lines.append("| " + " | ".join([name] + _cells(row, several)) + " |")
    return "\n".join(lines) + f"\n\nMachine: {machine_line(result.machine)}.\n"


def plot_result(result: "BenchResult", output: Path) -> None:
    """Speedup against generative perplexity, one panel per suite, one curve per mode and block size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from nbdiff.fsutil import atomic_file

    suites = list(dict.fromkeys(r.suite for r in result.rows))
    cols = min(3, len(suites))
    rows_n = math.ceil(len(suites) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.6 * cols, 3.8 * rows_n), squeeze=False)
    markers = {"nbdiff": "o", "exact": "s", "exact-ngram": "^", "exact-auto": "D", "exact-drafter": "v", "lookup": "P"}
    colours = {}
    several = len(result.machine.get("dtypes", [])) > 1
    try:
        for ax, suite in zip(axes.flat, suites):
            rows = result.rows_of(suite)
            curves: dict[tuple, list] = {}
            for row in rows:
                if row.mode in ("ar", "source"):
                    continue
                curves.setdefault((row.dtype, row.mode, row.block_size), []).append(row)
            for (dt, mode, b), members in curves.items():
                members = [m for m in members if not math.isnan(m.gen_ppl) and not math.isnan(m.speedup)]
                if not members:
                    continue
                members.sort(key=lambda r: -(r.threshold or 1.0))
                colour = colours.setdefault(b, f"C{len(colours)}")
                label = f"{mode} b={b}" + (f" {dt}" if several else "")
                ax.plot([m.gen_ppl for m in members], [m.speedup for m in members], marker=markers.get(mode, "o"),
                        color=colour, linestyle="-" if mode == "nbdiff" else "--", label=label,
                        alpha=1.0 if dt == result.machine["dtypes"][0] else 0.55)
                for m in members:
                    if m.threshold is not None:
                        ax.annotate(f"{m.threshold:g}", (m.gen_ppl, m.speedup), fontsize=6, xytext=(3, 3),
                                    textcoords="offset points")
            for row in rows:
                if row.mode in ("ar", "source") and not math.isnan(row.gen_ppl):
                    ax.plot([row.gen_ppl], [row.speedup], marker="*" if row.mode == "ar" else "D", markersize=12,
                            color="black", linestyle="none", label=f"{_method(row)}" + (f" {row.dtype}" if several else ""))
            ax.axhline(1.0, color="grey", linewidth=0.6, linestyle=":")
            ppl = [r.gen_ppl for r in rows if not math.isnan(r.gen_ppl)]
            if ppl and max(ppl) / min(ppl) > 4:  # a wide range reads better on a log axis
                from matplotlib.ticker import NullFormatter, ScalarFormatter

                ax.set_xscale("log")
                ax.xaxis.set_major_formatter(ScalarFormatter())
                ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_title(suite)
            ax.set_xlabel("generative perplexity (lower is better)")
            ax.set_ylabel("speedup over generate()")
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(suites):]:
            ax.axis("off")
        handles, labels = axes.flat[0].get_legend_handles_labels()
        seen = dict(zip(labels, handles))
        for ax in axes.flat:
            for h, l in zip(*ax.get_legend_handles_labels()):
                seen.setdefault(l, h)
        fig.legend(list(seen.values()), list(seen.keys()), loc="lower center", ncol=min(6, len(seen)), fontsize=7)
        fig.suptitle(f"nbdiff bench: {Path(result.machine['model']).name} ({result.machine['dtype']}, "
                     f"{result.machine['max_new_tokens']} new tokens max)")
        fig.tight_layout(rect=(0, 0.06, 1, 0.96))
        output.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(output) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        plt.close(fig)
