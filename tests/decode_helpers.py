"""Tiny model folders for the decoding tests: a plain one and one with nbdiff settings."""

import json
from pathlib import Path

from nbdiff.settings import BlockDiffusionSettings
from nbdiff.testing import save_tiny_checkpoint


def plain_folder(path: Path, arch: str = "llama", **overrides) -> Path:
    save_tiny_checkpoint(path, arch, **overrides)
    return path


def converted_folder(path: Path, arch: str = "llama", block_size: int = 4, adapted: int = 1, **overrides) -> Path:
    """A tiny folder whose config.json carries nbdiff settings (mask = the last vocabulary id)."""
    save_tiny_checkpoint(path, arch, **overrides)
    cfg_path = Path(path) / "config.json"
    cfg = json.loads(cfg_path.read_text())
    settings = BlockDiffusionSettings(
        block_size=block_size, mask_token_id=cfg["vocab_size"] - 1, adapted_block_size=adapted, source="tiny"
    )
    cfg["nbdiff"] = settings.to_dict()
    cfg_path.write_text(json.dumps(cfg))
    return path
