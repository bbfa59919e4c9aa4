"""The files that ship inside nbdiff: one lookup for every command.

They live in `nbdiff/assets/` (in the repository a link to `assets/`, in a wheel real files), so an
installed package finds them wherever the current folder is:

- `bench/*.jsonl`: the prompt suites of `nbdiff bench`;
- `prompts/distill.jsonl`: the self-distillation prompts, the default of `nbdiff distill --prompts`;
- `default-model/adapter.safetensors`: the default model's adapter;
- `drafters/<name>/`: drafters nbdiff ships, found for a model by its weights (nbdiff.drafter.folder).
"""

from __future__ import annotations

from pathlib import Path

from nbdiff.errors import NBDiffError

_HERE = Path(__file__).resolve().parent


def assets_dir() -> Path:
    """The folder of shipped assets (`nbdiff/assets`, or the repository's `assets/` beside the package)."""
    inside = _HERE / "assets"
    return inside if inside.is_dir() else _HERE.parent / "assets"


def asset_path(*parts: str, must_exist: bool = True) -> Path:
    """A shipped file or folder, e.g. `asset_path("bench")`; NBDiffError when the install lacks it."""
    path = assets_dir().joinpath(*parts)
    if must_exist and not path.exists():
        raise NBDiffError(f"the shipped file {'/'.join(parts)} is missing from this install ({path})",
                          "reinstall nbdiff (`pip install --force-reinstall nbdiff`)")
    return path


def bench_suites_dir() -> Path:
    return asset_path("bench", must_exist=False)


def distill_prompts() -> Path:
    return asset_path("prompts", "distill.jsonl", must_exist=False)
