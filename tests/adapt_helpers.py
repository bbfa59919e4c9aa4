"""Shared helpers of the adapt tests: a tiny *converted* model folder and tiny data files."""

from __future__ import annotations

import json
from pathlib import Path

from nbdiff.settings import BlockDiffusionSettings, attach_settings
from nbdiff.testing import tiny_model, tiny_tokenizer

TEXT = "The quick brown fox jumps over the lazy dog. Hello, how are you today? I am fine, thank you. "


def converted_tiny(path: Path, arch: str = "llama", block_size: int = 8, seed: int = 0, **overrides) -> Path:
    """A tiny model folder as `nbdiff convert` writes it: <|mask|> added, `nbdiff` section in config.json."""
    tok = tiny_tokenizer(mask_token=True)
    model = tiny_model(arch, seed=seed, vocab_size=len(tok), **overrides)
    model.config.eos_token_id = tok.eos_token_id
    model.config.pad_token_id = tok.pad_token_id
    attach_settings(model.config, BlockDiffusionSettings(block_size=block_size, mask_token_id=tok.mask_token_id,
                                                         mask_token="<|mask|>", source="tiny"))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return Path(path)


def text_file(path: Path, repeats: int = 40) -> Path:
    path.write_text(TEXT * repeats, encoding="utf-8")
    return path


def jsonl_file(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path
