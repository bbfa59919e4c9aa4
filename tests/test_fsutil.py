"""nbdiff.fsutil: atomic writes leave either the old or the new content, and clean only their own."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from nbdiff.fsutil import (
    atomic_dir,
    atomic_file,
    atomic_write_bytes,
    atomic_write_text,
    clean_stale_temps,
    quiet_transformers,
    temp_sibling,
)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _siblings(path):
    return sorted(p.name for p in path.parent.iterdir() if p.name != path.name)


def test_atomic_dir_renames_on_success_and_removes_on_error(tmp_path):
    out = tmp_path / "new" / "out"
    with atomic_dir(out) as tmp:
        assert tmp.parent == out.parent and ".nbdiff-tmp-" in tmp.name and str(os.getpid()) in tmp.name
        (tmp / "a.txt").write_text("a")
    assert (out / "a.txt").read_text() == "a" and _siblings(out) == []

    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "made" / "x") as tmp:
            (tmp / "b").write_text("b")
            raise RuntimeError("boom")
    assert not (tmp_path / "made").exists()  # parents it created are gone too


def test_atomic_dir_replaces_only_when_asked_and_only_at_the_end(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(FileExistsError):
        with atomic_dir(out) as tmp:
            (tmp / "new.txt").write_text("new")
    assert (out / "old.txt").read_text() == "old" and _siblings(out) == []
    with atomic_dir(out, replace=True) as tmp:
        assert (out / "old.txt").exists()  # the old folder lives until the new one is complete
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"] and _siblings(out) == []


def test_atomic_file_keeps_old_content_on_error_and_the_extension(tmp_path):
    path = tmp_path / "plot.png"
    atomic_write_bytes(path, b"one")
    with pytest.raises(OSError):
        with atomic_file(path) as tmp:
            assert tmp.suffix == ".png"
            tmp.write_bytes(b"half")
            raise OSError(28, "No space left on device")
    assert path.read_bytes() == b"one" and _siblings(path) == []
    atomic_write_text(tmp_path / "t.txt", "héllo\n")
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "héllo\n"
    stale = tmp_path / f".plot.png.nbdiff-tmp-{_dead_pid()}-0123abcd.png"  # a killed writer's
    stale.write_bytes(b"half")
    atomic_write_bytes(path, b"two")
    assert path.read_bytes() == b"two" and not stale.exists()


def test_clean_stale_temps_removes_only_dead_owners_of_this_name(tmp_path):
    final = tmp_path / "out"
    dead, alive = _dead_pid(), os.getpid()
    stale_dir = tmp_path / f".out.nbdiff-tmp-{dead}-0123abcd"
    stale_dir.mkdir()
    (stale_dir / "w.safetensors").write_bytes(b"x" * 10)
    stale_old = tmp_path / f".out.nbdiff-old-{dead}-89abcdef"
    stale_old.mkdir()
    live = tmp_path / f".out.nbdiff-tmp-{alive}-0123abcd"
    live.mkdir()
    other_name = tmp_path / f".other.nbdiff-tmp-{dead}-0123abcd"
    other_name.mkdir()
    lookalike = tmp_path / ".out.nbdiff-tmp-notmine"
    lookalike.mkdir()
    removed = clean_stale_temps(final)
    assert sorted(p.name for p in removed) == sorted([stale_dir.name, stale_old.name])
    assert not stale_dir.exists() and not stale_old.exists()
    assert live.exists() and other_name.exists() and lookalike.exists()


def test_temp_sibling_names_are_unique_and_recognised(tmp_path):
    a, b = temp_sibling(tmp_path / "x.json"), temp_sibling(tmp_path / "x.json")
    assert a != b and a.name.startswith(".x.json.nbdiff-tmp-") and a.suffix == ".json"


def test_quiet_transformers_restores_the_verbosity():
    from transformers.utils import logging as hf_logging

    before = hf_logging.get_verbosity()
    with quiet_transformers():
        assert hf_logging.get_verbosity() == hf_logging.ERROR
        assert not hf_logging.is_progress_bar_enabled()
    assert hf_logging.get_verbosity() == before
