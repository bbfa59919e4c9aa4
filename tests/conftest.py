"""Shared fixtures. Tiny folders come from `nbdiff.testing` (one builder for converted folders)."""

from __future__ import annotations

import pytest

from nbdiff.testing import save_tiny_converted


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture(scope="module")
def tiny_converted(tmp_path_factory):
    """A tiny converted llama folder: <|mask|> added, block size 8, adapted to 8."""
    return save_tiny_converted(tmp_path_factory.mktemp("tiny-nbdiff"), "llama", block_size=8, adapted=8)
