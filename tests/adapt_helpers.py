"""Shared helpers of the adapt tests: a tiny *converted* model folder, tiny data files, a tiny recipe.

Test modules use the fixtures by importing them: `from adapt_helpers import data_file, model_dir`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nbdiff.adapt.recipe import AdaptConfig
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


def tiny_config(model_dir, data_file, out, **kw) -> AdaptConfig:
    """A recipe small enough for a test: 6 steps of 2 rows x 32 tokens, block size 4, no held-out rows."""
    base = dict(model=str(model_dir), data=[str(data_file)], out=str(out), steps=6, seq_len=32, block_size=4,
                batch_size=2, lr=3e-3, eval_fraction=0, dtype="fp32")  # exactness tests compare fp32 runs
    base.update(kw)
    return AdaptConfig(**base)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return converted_tiny(tmp_path_factory.mktemp("model") / "m")


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return text_file(tmp_path_factory.mktemp("data") / "a.txt", repeats=30)
