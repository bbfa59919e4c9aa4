"""Block-diffusion settings stored in a model folder's config.json, under the key `nbdiff`.

A converted or adapted folder is an ordinary Hugging Face folder; these settings ride inside its
config.json so that loading needs no flag and no file-name convention.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from nbdiff.errors import NBDiffError

CONFIG_KEY = "nbdiff"
CONTEXT_MASKS = ("causal", "block-causal")
FORMAT_VERSION = 1


def check_block_size(value: int, flag: str = "--block-size") -> int:
    """A block size is a power of two >= 1 (1 is plain AR)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1 or value & (value - 1):
        raise NBDiffError(
            f"{flag} must be a power of two >= 1, got {value!r}", "try 1, 2, 4, 8, 16 or 32"
        )
    return value


@dataclass
class BlockDiffusionSettings:
    """What a model folder says about itself as a block-diffusion model."""

    block_size: int = 32
    """Target block size (the size decoding uses by default)."""
    mask_token_id: int = -1
    """Vocabulary id of the mask token."""
    mask_token: str = "<|mask|>"
    """Text of the mask token."""
    shift: bool = True
    """Logits at position i predict token i+1, also inside a block (AR-style shift)."""
    context_mask: str = "causal"
    """Attention of the clean context: 'causal' (NBDiff, M_CC) or 'block-causal' (BD3-LM)."""
    adapted_block_size: int = 1
    """Largest block size the weights were trained for (1 right after conversion)."""
    source: str = ""
    """Where the weights came from (folder, GGUF file, alias or hub id)."""
    format_version: int = FORMAT_VERSION
    """Version of this section's layout."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form provenance (training steps, tokens seen, ...)."""

    def __post_init__(self) -> None:
        check_block_size(self.block_size, "block_size")
        check_block_size(self.adapted_block_size, "adapted_block_size")
        if self.context_mask not in CONTEXT_MASKS:
            raise NBDiffError(
                f"context_mask must be one of {', '.join(CONTEXT_MASKS)}, got {self.context_mask!r}"
            )
        if not isinstance(self.mask_token_id, int) or self.mask_token_id < 0:
            raise NBDiffError(f"mask_token_id must be a vocabulary id >= 0, got {self.mask_token_id!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "BlockDiffusionSettings":
        known = {f.name for f in fields(cls)}
        unknown = {k: v for k, v in data.items() if k not in known}
        kwargs = {k: v for k, v in data.items() if k in known}
        if unknown:
            kwargs.setdefault("extra", {}).update(unknown)
        return cls(**kwargs)


def settings_from_config(config: Any) -> BlockDiffusionSettings | None:
    """The settings carried by a transformers config object (or dict), or None if never converted."""
    raw = config.get(CONFIG_KEY) if isinstance(config, dict) else getattr(config, CONFIG_KEY, None)
    if raw is None:
        return None
    if isinstance(raw, BlockDiffusionSettings):
        return raw
    return BlockDiffusionSettings.from_dict(dict(raw))


def read_settings(model_dir: str | Path) -> BlockDiffusionSettings | None:
    """Read the `nbdiff` section of `model_dir/config.json`; None if the folder was never converted."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise NBDiffError(
            f"{model_dir} has no config.json", "pass a Hugging Face model folder or run `nbdiff convert` first"
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise NBDiffError(f"{path} is not valid JSON: {exc}") from None
    return settings_from_config(config)


def attach_settings(config: Any, settings: BlockDiffusionSettings) -> None:
    """Store settings on a transformers config so `save_pretrained` writes them to config.json."""
    setattr(config, CONFIG_KEY, settings.to_dict())
