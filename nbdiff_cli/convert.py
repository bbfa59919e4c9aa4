"""`nbdiff convert SOURCE`: an AR checkpoint -> a block-diffusion folder (Rich progress + summary)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from nbdiff_cli.console import console, err_console
from nbdiff_cli.options import DtypeChoice, Force, OutDir

ConvertBlockSize = Annotated[
    int, typer.Option("--block-size", "-b", help="Target block size recorded in the folder (power of two; 1 = plain AR).")
]
MaskToken = Annotated[
    Optional[str],
    typer.Option("--mask-token", help="Mask token text (a special token of the vocabulary, or new). "
                 "Default: reuse a mask-like or reserved special token, else add <|mask|>."),
]
ConvertDtype = Annotated[
    DtypeChoice, typer.Option("--dtype", help="Weight dtype written (auto: keep the source's; GGUF: fp32).")
]


def convert(
    source: Annotated[str, typer.Argument(help="Model folder, .gguf file, hub id (owner/name) or alias (e.g. smollm2-135m, qwen3-8b).")],
    out: OutDir = None,
    block_size: ConvertBlockSize = 32,
    mask_token: MaskToken = None,
    dtype: ConvertDtype = DtypeChoice.auto,
    force: Force = False,
) -> None:
    """Convert an autoregressive checkpoint into a block-diffusion initialisation (weights unchanged).

    Writes ./<name>-nbdiff unless --out is given: safetensors, tokenizer, generation config and a
    model card, with the block-diffusion settings in config.json. Nothing is written on error.
    """
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn, TransferSpeedColumn
    from rich.table import Table
    from rich.text import Text

    from nbdiff.method.settings import check_block_size
    from nbdiff.convert.sources import resolve_source

    # Fail fast (bad block size, unknown alias, offline hub) before torch is even imported.
    check_block_size(block_size)
    resolved = resolve_source(source)

    from nbdiff.convert import ConvertProgress
    from nbdiff.convert import convert as run_convert
    labels = {"load": "reading source", "weights": "writing weights", "files": "writing config + tokenizer", "done": "done"}
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeElapsedColumn(),
        console=err_console,
        transient=True,  # the summary table replaces it; an error stays a single line
    )
    task = progress.add_task(labels["load"], total=None)

    def on_progress(p: ConvertProgress) -> None:
        if p.stage == "weights" and p.done == 0:
            progress.reset(task)  # speed and time count from the first byte written
        progress.update(task, description=labels.get(p.stage, p.stage), completed=p.done, total=p.total or None)

    with progress:
        result = run_convert(
            resolved, out, block_size=block_size, mask_token=mask_token, dtype=dtype.value, force=force, on_progress=on_progress
        )

    table = Table(title=f"converted {result.source}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("architecture", result.architecture)
    table.add_row("parameters", f"{result.parameters:,}")
    table.add_row("dtype", result.dtype)
    table.add_row("mask token", f"{result.mask.token!r} id {result.mask.token_id} ({result.mask.how})")
    table.add_row("vocabulary", f"{result.vocab_size:,} rows")
    table.add_row("block size", str(result.block_size))
    table.add_row("output size", f"{result.output_bytes / 2**20:,.1f} MiB in {result.shards} safetensors file(s)")
    table.add_row("output folder", str(result.out_dir))
    table.add_row("time", f"{result.seconds:.1f} s")
    console.print(table)
    console.print(Text.assemble("next: ", (f"nbdiff info {result.out_dir}", "bold")), soft_wrap=True)
