"""Shared helpers of the adapt tests: a tiny *converted* model folder and tiny data files."""

from __future__ import annotations

import json
from pathlib import Path

from nbdiff.testing import save_tiny_converted

TEXT = "The quick brown fox jumps over the lazy dog. Hello, how are you today? I am fine, thank you. "


def converted_tiny(path: Path, arch: str = "llama", block_size: int = 8, seed: int = 0, **overrides) -> Path:
    """A tiny model folder as `nbdiff convert` writes it: <|mask|> added, `nbdiff` section in config.json."""
    return save_tiny_converted(path, arch, block_size=block_size, seed=seed, mask="added", **overrides)


def text_file(path: Path, repeats: int = 40) -> Path:
    path.write_text(TEXT * repeats, encoding="utf-8")
    return path


def jsonl_file(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path
