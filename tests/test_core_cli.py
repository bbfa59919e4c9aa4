"""Package hygiene, settings and the CLI shell."""

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from nbdiff.errors import NBDiffError
from nbdiff.settings import BlockDiffusionSettings, attach_settings, read_settings
from nbdiff.testing import save_tiny_checkpoint
from nbdiff_cli.app import COMMANDS, app

runner = CliRunner()


def test_library_never_imports_cli_libraries():
    code = (
        "import importlib, pkgutil, sys, nbdiff\n"
        "for m in pkgutil.walk_packages(nbdiff.__path__, 'nbdiff.'):\n"
        "    importlib.import_module(m.name)\n"
        "bad = [m for m in ('typer', 'rich', 'textual') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_help_is_light_and_lists_every_registered_command():
    code = (
        "import sys\n"
        "from nbdiff_cli.app import app\n"
        "heavy = [m for m in ('torch', 'transformers', 'textual') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for name in COMMANDS:
        assert name in result.output
    for name in COMMANDS:
        sub = runner.invoke(app, [name, "--help"])
        assert sub.exit_code == 0, (name, sub.output)


def test_settings_validation_names_the_field():
    with pytest.raises(NBDiffError, match="block_size"):
        BlockDiffusionSettings(block_size=3, mask_token_id=1)
    with pytest.raises(NBDiffError, match="context_mask"):
        BlockDiffusionSettings(mask_token_id=1, context_mask="full")
    with pytest.raises(NBDiffError, match="mask_token_id"):
        BlockDiffusionSettings()


def test_settings_round_trip_through_config_json(tmp_path):
    from transformers import AutoConfig

    save_tiny_checkpoint(tmp_path)
    assert read_settings(tmp_path) is None
    config = AutoConfig.from_pretrained(tmp_path)
    s = BlockDiffusionSettings(block_size=8, mask_token_id=7, source="here", extra={"steps": 3})
    attach_settings(config, s)
    config.save_pretrained(tmp_path)
    back = read_settings(tmp_path)
    assert back == s
    assert json.loads((tmp_path / "config.json").read_text())["nbdiff"]["block_size"] == 8


def test_info_plain_and_converted(tmp_path):
    from transformers import AutoConfig

    save_tiny_checkpoint(tmp_path)
    result = runner.invoke(app, ["info", str(tmp_path)])
    assert result.exit_code == 0 and "not converted" in result.output
    config = AutoConfig.from_pretrained(tmp_path)
    attach_settings(config, BlockDiffusionSettings(block_size=16, mask_token_id=9))
    config.save_pretrained(tmp_path)
    result = runner.invoke(app, ["info", str(tmp_path), "--json"])
    assert result.exit_code == 0
    assert json.loads(result.output)["nbdiff"]["block_size"] == 16


def test_info_missing_folder_is_one_line_error(tmp_path):
    result = runner.invoke(app, ["info", str(tmp_path / "nope")])
    assert result.exit_code == 1
    assert "error:" in result.output and "Traceback" not in result.output
