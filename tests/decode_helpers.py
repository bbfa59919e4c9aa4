"""Tiny model folders for the decoding tests: a plain one and one with nbdiff settings."""

from pathlib import Path

from nbdiff.testing import save_tiny_checkpoint, save_tiny_converted


def plain_folder(path: Path, arch: str = "llama", **overrides) -> Path:
    save_tiny_checkpoint(path, arch, **overrides)
    return path


def converted_folder(path: Path, arch: str = "llama", block_size: int = 4, adapted: int = 1, **overrides) -> Path:
    """A tiny folder whose config.json carries nbdiff settings (mask = the last vocabulary id)."""
    return save_tiny_converted(path, arch, block_size=block_size, adapted=adapted, mask="last", **overrides)
