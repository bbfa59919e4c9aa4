"""`nbdiff export-drafter DRAFTER --target MODEL --out DIR`: a trained drafter for llama.cpp's speculative decoding."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from nbdiff_cli.console import console


def export_drafter(
    drafter: Annotated[Path, typer.Argument(help="A drafter folder (`nbdiff adapt MODEL --target drafter` wrote it).")],
    target: Annotated[Path, typer.Option("--target", "-t", help="The model folder the drafter was trained for (its LM head gives the draft vocabulary's rows).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="New folder to write (must not exist or be empty).")],
    vocab: Annotated[str, typer.Option("--vocab", help="draft: give llama.cpp the drafter's reduced vocabulary (keeps more drafts); full: the folder as it is.")] = "draft",
) -> None:
    """Write a drafter in the layout llama.cpp's convert_hf_to_gguf.py reads (a dflash GGUF for --spec-type draft-dflash)."""
    from nbdiff.drafter.export import export_for_llamacpp

    import json

    folder = export_for_llamacpp(drafter, target, out, vocab)
    block = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("block_size", 16)
    console.print(f"wrote {folder}")
    console.print("next, with llama.cpp's sources and tools (docs/benchmarks/llamacpp-drafter.md):", highlight=False)
    console.print(f"  python convert_hf_to_gguf.py {target} --outtype f32 --outfile target.gguf", highlight=False, soft_wrap=True)
    console.print(f"  python convert_hf_to_gguf.py {folder} --target-model-dir {target} --outtype f32 --outfile drafter.gguf",
                  highlight=False, soft_wrap=True)
    console.print(f"  llama-speculative-simple -m target.gguf -md drafter.gguf --spec-type draft-dflash "
                  f"--spec-draft-n-max {int(block) - 1} --temp 0 -p PROMPT", highlight=False, soft_wrap=True)
