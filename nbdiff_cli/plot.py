"""`nbdiff plot METRICS.jsonl -o loss.png`: loss curves and block-size steps of an adapt run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from nbdiff_cli.console import console


def read_metrics(path: Path) -> tuple[list[dict], list[dict]]:
    """Train and eval records of a metrics.jsonl (bad lines are skipped)."""
    from nbdiff.errors import NBDiffError

    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise NBDiffError(f"{path} not found", "pass the metrics.jsonl of an `nbdiff adapt` run (or its --out folder)")
    train, evals = [], []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(rec, dict):
            continue
        if rec.get("event") == "train":
            train.append(rec)
        elif rec.get("event") == "eval":
            evals.append(rec)
    if not train and not evals:
        raise NBDiffError(f"{path} holds no training records", "is it the metrics.jsonl of `nbdiff adapt`?")
    return train, evals


def plot(
    metrics: Annotated[list[Path], typer.Argument(help="metrics.jsonl of an adapt run (or its --out folder); several runs are overlaid.",
                                                  show_default=False)],
    output: Annotated[Optional[Path], typer.Option("--out", "-o", help="PNG to write. \\[default: loss.png next to the metrics]",
                                                   show_default=False)] = None,
    title: Annotated[Optional[str], typer.Option("--title", help="Figure title.")] = None,
) -> None:
    """Draw the loss curves (total, MDM, AR, held-out) and the block-size steps to a PNG.

    With several runs, each run gets one colour: train loss (solid), held-out MDM loss at the largest
    block size (dashed) and held-out AR loss (dotted).
    """
    runs = [(m, *read_metrics(m)) for m in metrics]
    if output is None:
        first = metrics[0]
        output = (first if first.is_dir() else first.parent) / "loss.png"
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if len(runs) > 1:
        _plot_runs(plt, runs, output, title)
        console.print(f"wrote {output} ({len(runs)} runs)")
        return
    metrics, train, evals = runs[0]

    fig, (ax, axb) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    if train:
        steps = [r["step"] for r in train]
        ax.plot(steps, [r["loss"] for r in train], label="loss (train)", color="black", lw=1.2)
        ax.plot(steps, [r["mdm"] for r in train], label="MDM (train)", color="tab:blue", lw=1, alpha=0.8)
        ax.plot(steps, [r["ar"] for r in train], label="AR (train)", color="tab:orange", lw=1, alpha=0.8)
        axb.step(steps, [r["block_size"] for r in train], where="post", color="tab:green")
        # vertical guides where the block size grows
        for prev, cur in zip(train, train[1:]):
            if cur["block_size"] != prev["block_size"]:
                ax.axvline(cur["step"], color="tab:green", lw=0.6, ls=":")
    if evals:
        es = [r["step"] for r in evals]
        ax.plot(es, [r["ar"] for r in evals], "o--", color="tab:orange", ms=3, label="AR (held-out)")
        sizes = sorted({b for r in evals for b in r.get("mdm", {})}, key=int)
        cmap = plt.get_cmap("viridis")
        for i, b in enumerate(sizes):
            pts = [(r["step"], r["mdm"][b]) for r in evals if b in r.get("mdm", {})]
            ax.plot(*zip(*pts), "s--", ms=3, lw=0.8, color=cmap(i / max(1, len(sizes) - 1)), label=f"MDM b={b} (held-out)")
    ax.set_ylabel("cross-entropy (nats)")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    ax.set_title(title or f"nbdiff adapt: {metrics}")
    _finish(plt, fig, axb, output)
    console.print(f"wrote {output} ({len(train)} train records, {len(evals)} evaluations)")


def _finish(plt, fig, axb, output: Path) -> None:
    """Label the block-size axis and write the PNG atomically (temporary file, then rename)."""
    axb.set_yscale("log", base=2)
    axb.set_ylabel("block size")
    axb.set_xlabel("optimizer step")
    axb.grid(alpha=0.3)
    fig.tight_layout()
    from nbdiff.fsutil import atomic_file

    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        suffix = output.suffix.lstrip(".").lower()
        fmt = suffix if suffix in fig.canvas.get_supported_filetypes() else "png"
        with atomic_file(output) as tmp:
            fig.savefig(tmp, dpi=120, format=fmt)
    finally:
        plt.close(fig)


def _run_name(path: Path) -> str:
    return (path if path.is_dir() else path.parent).name or str(path)


def _plot_runs(plt, runs, output: Path, title: str | None) -> None:
    fig, (ax, axb) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    colors = plt.get_cmap("tab10")
    for i, (path, train, evals) in enumerate(runs):
        c, name = colors(i % 10), _run_name(path)
        if train:
            steps = [r["step"] for r in train]
            ax.plot(steps, [r["loss"] for r in train], color=c, lw=1, alpha=0.7, label=f"{name}: loss (train)")
            axb.step(steps, [r["block_size"] for r in train], where="post", color=c, lw=1)
        if evals:
            top = max((b for r in evals for b in r.get("mdm", {})), key=int, default=None)
            if top is not None:
                pts = [(r["step"], r["mdm"][top]) for r in evals if top in r.get("mdm", {})]
                ax.plot(*zip(*pts), "s--", ms=3, color=c, label=f"{name}: MDM b={top} (held-out)")
            ax.plot([r["step"] for r in evals], [r["ar"] for r in evals], "o:", ms=3, color=c,
                    label=f"{name}: AR (held-out)")
    ax.set_ylabel("cross-entropy (nats)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    ax.set_title(title or "nbdiff adapt: " + ", ".join(_run_name(p) for p, _, _ in runs))
    _finish(plt, fig, axb, output)
