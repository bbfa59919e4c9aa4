"""`nbdiff info DIR`: what a model folder is, and its block-diffusion settings."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from nbdiff_cli.console import console


def info(
    model_dir: Annotated[Path, typer.Argument(help="A model folder (converted by nbdiff or plain Hugging Face).")],
    json_out: Annotated[bool, typer.Option("--json", help="Print the settings as JSON.")] = False,
) -> None:
    """Show a model folder's architecture, size and nbdiff settings."""
    import json

    from rich.table import Table
    from rich.text import Text

    from nbdiff.cpu_kernel import describe
    from nbdiff.adapters import is_adapter_folder, read_adapter_folder
    from nbdiff.errors import NBDiffError
    from nbdiff.loading import choose_dtype, default_block_size, resolve_device
    from nbdiff.method.settings import read_settings

    if not model_dir.is_dir():
        raise NBDiffError(f"{model_dir} is not a folder", "pass the folder written by `nbdiff convert`")
    base = model_dir
    if is_adapter_folder(model_dir):  # an --export adapter folder (the default model is one): its base's config
        settings, base = read_adapter_folder(model_dir)
    else:
        settings = read_settings(model_dir)
    config = json.loads((base / "config.json").read_text(encoding="utf-8"))
    weights = sorted(model_dir.glob("*.safetensors"))
    size = sum(p.stat().st_size for p in weights)
    device = resolve_device("auto")
    auto = choose_dtype("auto", device)  # what decoding commands run in with the default --dtype auto
    if json_out:
        payload = {
            "architecture": (config.get("architectures") or ["?"])[0],
            "model_type": config.get("model_type"),
            "weight_files": len(weights),
            "weight_bytes": size,
            "nbdiff": settings.to_dict() if settings else None,
            "default_block_size": default_block_size(settings),
            "auto_dtype": {"device": device, "dtype": auto.name, "reason": auto.reason},
            "cpu_kernel": describe(),
            "drafter": _drafter(model_dir),
        }
        console.print_json(json.dumps(payload))
        return
    table = Table(title=str(model_dir), show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("architecture", str((config.get("architectures") or ["?"])[0]))
    table.add_row("model type", str(config.get("model_type")))
    table.add_row("vocabulary", str(config.get("vocab_size")))
    table.add_row("layers / hidden", f"{config.get('num_hidden_layers')} / {config.get('hidden_size')}")
    table.add_row("weights", f"{len(weights)} safetensors file(s), {size / 2**20:,.1f} MiB"
                  + (f" (an adapter over {base})" if base != model_dir else ""))
    table.add_row("--dtype auto here", Text(f"{auto.name} on {device} ({auto.reason})"))
    table.add_row("few-row CPU kernel", Text(describe()))
    if settings is None:
        table.add_row("nbdiff", Text.assemble(("not converted", "yellow"), " (run `nbdiff convert` on it)"))
    else:
        table.add_row("block size", f"{settings.block_size} (converted for)")
        table.add_row("adapted block size", f"{settings.adapted_block_size} (the largest its weights were trained for)")
        table.add_row("decodes at", f"block size {default_block_size(settings)} by default (the smaller of the two; "
                      f"--block-size N for another, with a warning above {settings.adapted_block_size})")
        table.add_row("mask token", f"{settings.mask_token!r} (id {settings.mask_token_id})")
        table.add_row("context mask", settings.context_mask)
        table.add_row("shift", str(settings.shift))
        table.add_row("source", settings.source or "?")
        for key, value in settings.extra.items():
            table.add_row(key, str(value))
    drafter = _drafter(model_dir)
    if drafter is not None:
        vocab = drafter["draft_vocab"]
        table.add_row("trained drafter", f"{drafter['folder']}: {drafter['layers']} layers, block {drafter['block_size']}, "
                      f"reads AR layers {drafter['reads']}, draft vocabulary {vocab if vocab else 'whole'}")
    console.print(table)


def _drafter(model_dir: Path) -> dict | None:
    """The trained drafter this folder is (or brings along in drafter/), in brief; None without one."""
    from nbdiff.drafter.folder import find_drafter, is_drafter_folder

    folder = model_dir if is_drafter_folder(model_dir) else find_drafter(model_dir)
    if folder is None:
        return None
    import json

    data = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    ours = data.get("nbdiff_drafter") or {}
    vocab = ours.get("draft_vocab")
    return {"folder": str(folder), "layers": data.get("num_hidden_layers"), "block_size": data.get("block_size"),
            "reads": (data.get("dflash_config") or {}).get("target_layer_ids"), "draft_vocab": len(vocab) if vocab else None,
            "trained_for": ours.get("target_name") or None}
