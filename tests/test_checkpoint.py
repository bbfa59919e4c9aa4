"""Checkpoints: atomic layout, pruning, safe loading, RNG round trip."""

from __future__ import annotations

import json

import pytest
import torch

from nbdiff.adapt.checkpoint import (finish_checkpoint, latest_checkpoint, list_checkpoints, load_checkpoint, staging_dir,
                               write_optimizer)
from nbdiff.errors import NBDiffError


def _save(run, step, keep=2):
    w = {"a.weight": torch.full((2, 3), float(step)), "b": torch.arange(4.0)}
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    write_optimizer(staging_dir(run, step), opt.state_dict())
    return finish_checkpoint(run, step, w, {"tokens": step * 10, "recipe": {"lr": 0.1}}, keep=keep), opt


def test_checkpoint_round_trip(tmp_path):
    path, opt = _save(tmp_path, 5)
    assert path.name == "step-00000005"
    assert sorted(p.name for p in path.iterdir()) == ["optimizer.pt", "rng.safetensors", "state.json", "weights.safetensors"]
    assert not any(p.name.startswith(".tmp") for p in (tmp_path / "checkpoints").iterdir())
    ck = latest_checkpoint(tmp_path)
    assert ck.step == 5 and ck.state["tokens"] == 50 and ck.state["recipe"] == {"lr": 0.1}
    assert torch.equal(ck.weights()["a.weight"], torch.full((2, 3), 5.0))
    state = ck.optimizer_state()
    assert torch.equal(state["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_rng_state_is_restored(tmp_path):
    torch.manual_seed(123)
    _save(tmp_path, 1)
    expected = torch.rand(3)
    torch.manual_seed(999)
    latest_checkpoint(tmp_path).restore_rng()
    assert torch.equal(torch.rand(3), expected)


def test_pruning_and_incomplete_folders(tmp_path):
    for step in (1, 2, 3, 4):
        _save(tmp_path, step, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000003", "step-00000004"]
    # a half-written checkpoint (no state.json) is never picked up
    half = tmp_path / "checkpoints" / "step-00000009"
    half.mkdir()
    (half / "weights.safetensors").write_bytes(b"junk")
    assert latest_checkpoint(tmp_path).step == 4
    broken = tmp_path / "checkpoints" / "step-00000005"
    broken.mkdir()
    (broken / "state.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(NBDiffError, match="unreadable"):
        latest_checkpoint(tmp_path)


def test_optimizer_file_is_loaded_without_unpickling_code(tmp_path):
    import pickle

    path, _ = _save(tmp_path, 1)

    class Evil:
        def __reduce__(self):
            return (exec, ("raise SystemExit('code ran')",))

    with (path / "optimizer.pt").open("wb") as fh:
        pickle.dump({"state": Evil()}, fh)
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(path).optimizer_state()


def test_state_json_is_plain_json(tmp_path):
    path, _ = _save(tmp_path, 2)
    state = json.loads((path / "state.json").read_text())
    assert state["step"] == 2 and "python" in state
