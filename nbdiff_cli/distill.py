"""`nbdiff distill MODEL --prompts FILE --out data.jsonl`: the model's own replies as `nbdiff adapt` data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from nbdiff_cli.console import console, err_console
from nbdiff_cli.options import DeviceChoice, DtypeChoice


def distill(
    model: Annotated[Optional[str], typer.Argument(help="Model folder that answers (omitted: the default model).")] = None,
    prompts: Annotated[Optional[Path], typer.Option("--prompts", help="Prompts: .jsonl ({\"prompt\": ...} or {\"messages\": [...]}) or .txt (one per line). Omitted: the 4,000 prompts shipped with nbdiff.")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output .jsonl of chat records; prompts already in it are skipped (resume).")] = Path("distill.jsonl"),
    temperature: Annotated[float, typer.Option("--temperature", help="0 = greedy; above 0 samples (more varied data).")] = 0.0,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Longest reply in tokens.")] = 256,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Prompts decoded together (rows of the engine, or one left-padded batch).")] = 16,
    limit: Annotated[Optional[int], typer.Option("--limit", help="Use only the first N prompts of the file.")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the sampling generator (with --temperature).")] = 0,
    backend: Annotated[str, typer.Option("--backend", help="engine (the serving engine: continuous batching, a finished row is refilled at once), nbdiff (left-padded batches of the block decoder at block size 1) or hf (transformers generate).")] = "engine",
    time_limit: Annotated[float, typer.Option("--time-limit", help="Minutes: start no new prompt after this (the rows decoding then finish); run again to go on. 0 = no limit. Engine backend.")] = 0.0,
    device: Annotated[DeviceChoice, typer.Option("--device", help="Where to run.")] = DeviceChoice.auto,
    dtype: Annotated[DtypeChoice, typer.Option("--dtype", help="Weight dtype.")] = DtypeChoice.auto,
) -> None:
    """Answer every prompt with MODEL (greedy by default) and write chat records for `nbdiff adapt`.

    Batched, with a progress bar; interrupted runs resume: run the same command again.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from nbdiff.adapt.distill import distill as run_distill
    from nbdiff.adapt.distill import read_prompts
    from nbdiff.errors import NBDiffError

    from nbdiff_cli.models import load_for_decoding

    if temperature < 0:
        raise NBDiffError(f"--temperature must be >= 0, got {temperature}")
    if time_limit < 0:
        raise NBDiffError(f"--time-limit must be >= 0 minutes, got {time_limit}")
    if time_limit and backend != "engine":
        raise NBDiffError("--time-limit needs the engine backend", "drop --backend or --time-limit")
    if limit is not None and limit < 1:
        raise NBDiffError(f"--limit must be >= 1, got {limit}")
    from nbdiff.resources import distill_prompts

    items = read_prompts(prompts or distill_prompts(), limit=limit)
    mdl, tok = load_for_decoding(model, device, dtype, "none")
    progress = Progress(
        TextColumn("[bold]distilling"), BarColumn(), MofNCompleteColumn(), TextColumn("prompts"),
        TextColumn("{task.fields[speed]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
        console=err_console,
    )
    last = None
    with progress:
        task = progress.add_task("distill", total=None, speed="")
        for last in run_distill(mdl, tok, items, out, temperature=temperature, max_new_tokens=max_new_tokens,
                                batch_size=batch_size, seed=seed, backend=backend, time_limit=time_limit):
            progress.update(task, total=last.todo, completed=last.done,
                            speed=f"{last.tokens_per_second:.1f} tokens/s")
    assert last is not None
    if last.skipped:
        err_console.print(f"{last.skipped} prompts were already answered in {out} (skipped)", style="dim")
    console.print(f"{last.done} prompts answered, {last.new_tokens:,} reply tokens in {last.seconds:.0f} s "
                  f"({last.tokens_per_second:.1f} tokens/s, {last.truncated} cut at --max-new-tokens) -> {out}")
    console.print(f"next: nbdiff adapt {model or 'MODEL'} --data {out} --out RUN --lora-rank 16 --block-size 8")
