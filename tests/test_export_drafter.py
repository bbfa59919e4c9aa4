"""`nbdiff export-drafter`: a drafter folder in the layout llama.cpp's converter reads (nbdiff.drafter.export)."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from nbdiff_cli.app import app

runner = CliRunner()


def _folders(tmp_path, draft_vocab, tied=False):
    """A target folder (an untied head beside an embedding unless `tied`) and a drafter folder of a few tensors."""
    target = tmp_path / "target"
    target.mkdir()
    embed, head = torch.randn(50, 8), torch.randn(50, 8)
    tensors = {"model.embed_tokens.weight": embed} if tied else {"model.embed_tokens.weight": embed, "lm_head.weight": head}
    save_file(tensors, str(target / "model.safetensors"))
    (target / "config.json").write_text(json.dumps({"tie_word_embeddings": tied}))
    drafter = tmp_path / "drafter"
    drafter.mkdir()
    save_file({"fc.weight": torch.randn(8, 16), "norm.weight": torch.ones(8)}, str(drafter / "model.safetensors"))
    config = {"architectures": ["DFlashDraftModel"], "vocab_size": 50, "block_size": 8,
              "dflash_config": {"target_layer_ids": [1, 2], "mask_token_id": 49},
              "nbdiff_drafter": {"draft_vocab": draft_vocab}}
    (drafter / "config.json").write_text(json.dumps(config))
    return drafter, target, (embed if tied else head)


def test_export_drafter_writes_the_draft_vocabulary_from_the_untied_head(tmp_path):
    ids = [0, 5, 9, 31]
    drafter, target, head = _folders(tmp_path, ids)
    out = tmp_path / "out"
    result = runner.invoke(app, ["export-drafter", str(drafter), "--target", str(target), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "--spec-draft-n-max 7" in result.output  # block 8: seven drafted tokens per verify
    tensors = load_file(str(out / "model.safetensors"))
    config = json.loads((out / "config.json").read_text())
    assert torch.equal(tensors["lm_head.weight"], head[ids])  # lm_head's rows, not the embedding's
    assert (torch.arange(len(ids)) + tensors["d2t"]).tolist() == ids
    assert config["draft_vocab_size"] == 4 and config["architectures"] == ["DSparkDraftModel"]
    assert torch.equal(tensors["fc.weight"], load_file(str(drafter / "model.safetensors"))["fc.weight"])


def test_export_drafter_reads_a_tied_head_from_the_embedding(tmp_path):
    drafter, target, embed = _folders(tmp_path, [3, 4], tied=True)
    result = runner.invoke(app, ["export-drafter", str(drafter), "-t", str(target), "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert torch.equal(load_file(str(tmp_path / "out" / "model.safetensors"))["lm_head.weight"], embed[[3, 4]])


def test_export_drafter_full_vocab_keeps_the_folder_as_it_is(tmp_path):
    drafter, target, _ = _folders(tmp_path, [0, 3])
    result = runner.invoke(app, ["export-drafter", str(drafter), "-t", str(target), "-o", str(tmp_path / "out"), "--vocab", "full"])
    assert result.exit_code == 0, result.output
    assert set(load_file(str(tmp_path / "out" / "model.safetensors"))) == {"fc.weight", "norm.weight"}
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == json.loads((drafter / "config.json").read_text())


def test_export_drafter_leaves_a_non_empty_folder_alone_and_writes_nothing_on_bad_input(tmp_path):
    drafter, target, _ = _folders(tmp_path, [0, 1])
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    result = runner.invoke(app, ["export-drafter", str(drafter), "--target", str(target), "--out", str(out)])
    assert result.exit_code != 0 and "not empty" in result.output
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    result = runner.invoke(app, ["export-drafter", str(target), "--target", str(target), "--out", str(tmp_path / "o2")])
    assert result.exit_code != 0 and "not a drafter folder" in result.output
    result = runner.invoke(app, ["export-drafter", str(drafter), "--target", str(target), "--out", str(tmp_path / "o3"),
                                 "--vocab", "some"])
    assert result.exit_code != 0 and "unknown vocabulary" in result.output
    (tmp_path / "b").mkdir()
    bad, _, _ = _folders(tmp_path / "b", [0, 77])  # an id beyond the target's 50 rows
    result = runner.invoke(app, ["export-drafter", str(bad), "--target", str(target), "--out", str(tmp_path / "o4")])
    assert result.exit_code != 0 and "outside the target" in result.output
    assert not any((tmp_path / n).exists() for n in ("o2", "o3", "o4"))
