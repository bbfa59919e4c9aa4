"""Shared fixtures. Tiny folders come from `nbdiff.testing` (one builder for converted folders)."""

from __future__ import annotations

import pytest

from nbdiff.testing import save_tiny_converted


@pytest.fixture
def quiet_hf():
    """transformers' warnings and progress bars off for one test (nbdiff.fsutil's one way to quiet it)."""
    from nbdiff.fsutil import quiet_transformers

    with quiet_transformers():
        yield


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture(scope="module")
def tiny_converted(tmp_path_factory):
    """A tiny converted llama folder: <|mask|> added, block size 8, adapted to 8."""
    return save_tiny_converted(tmp_path_factory.mktemp("tiny-nbdiff"), "llama", block_size=8, adapted=8)
