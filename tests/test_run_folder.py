"""`nbdiff adapt`'s output folder: nothing lost, one run at a time, runs that can be extended, clear errors."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from adapt_helpers import converted_tiny, data_file, model_dir, text_file, tiny_config  # noqa: F401 (fixtures)
from nbdiff.errors import NBDiffError
from nbdiff.adapt.recipe import AdaptConfig
from nbdiff.adapt.trainer import adapt


def cfg(model_dir, data_file, out, **kw) -> AdaptConfig:
    return tiny_config(model_dir, data_file, out, **dict(dict(steps=2), **kw))


def hidden_siblings(folder):
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}."))


# ----------------------------------------------------------------------------- --force deletes only nbdiff runs


def test_force_refuses_an_out_that_holds_the_model_or_the_data(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    model = converted_tiny(project / "model")
    data = text_file(project / "data.txt", repeats=30)
    with pytest.raises(NBDiffError, match="overlaps the model folder"):
        adapt(cfg(model, data, project, force=True))  # the old code deleted `project` here
    assert (model / "config.json").is_file() and data.is_file()
    with pytest.raises(NBDiffError, match="overlaps the model folder"):
        adapt(cfg(model, data, model / "run", force=True))
    (tmp_path / "corpus").mkdir()
    folder = text_file(tmp_path / "corpus" / "a.txt", repeats=30).parent
    with pytest.raises(NBDiffError, match="overlaps the data path"):
        adapt(cfg(model, folder, folder / "run"))
    assert sorted(p.name for p in folder.iterdir()) == ["a.txt"]


def test_force_refuses_a_folder_that_is_not_an_adapt_run(model_dir, data_file, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(NBDiffError, match="does not look like an adapt run") as err:
        adapt(cfg(model_dir, data_file, out, force=True))
    assert "notes.txt" in err.value.message
    assert (out / "notes.txt").read_text(encoding="utf-8") == "mine"
    adapt(cfg(model_dir, data_file, tmp_path / "run"))  # a run, plus a file the user put there
    (tmp_path / "run" / "notes.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(NBDiffError, match="notes.txt"):
        adapt(cfg(model_dir, data_file, tmp_path / "run", force=True))
    assert (tmp_path / "run" / "notes.txt").is_file() and (tmp_path / "run" / "model.safetensors").is_file()


def test_force_keeps_the_old_run_until_the_new_one_has_a_checkpoint(model_dir, data_file, tmp_path):
    out = tmp_path / "run"
    adapt(cfg(model_dir, data_file, out, lr=1e-3))
    old_model = (out / "model.safetensors").read_bytes()
    seen = []

    def fail_at_step_1(rec):
        if rec["event"] == "train":
            seen.append((out / "model.safetensors").read_bytes() == old_model)
            raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        adapt(cfg(model_dir, data_file, out, lr=2e-3, force=True), callback=fail_at_step_1)
    assert seen == [True]  # while the new run trained, the old one was still there
    assert (out / "model.safetensors").read_bytes() == old_model  # and it still is
    assert "0.001" in (out / "recipe.yaml").read_text(encoding="utf-8")
    assert hidden_siblings(out) == []  # no staging folder, no lock left behind

    res = adapt(cfg(model_dir, data_file, out, lr=2e-3, force=True))
    assert res.status == "completed" and res.out_dir == out
    assert "0.002" in (out / "recipe.yaml").read_text(encoding="utf-8")
    assert (out / "model.safetensors").read_bytes() != old_model
    assert len([r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
                if r["event"] == "train"]) == 2  # the new run's metrics only
    assert hidden_siblings(out) == []


# ----------------------------------------------------------------------------- one run per folder


def test_a_second_run_on_the_same_out_is_refused_and_a_killed_holder_leaves_no_lock(model_dir, data_file, tmp_path):
    out = tmp_path / "run"
    code = ("import sys, time; from nbdiff.adapt.run_folder import RunLock; RunLock(sys.argv[1]).acquire(); "
            "print('locked', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(NBDiffError, match=f"another adapt run \\(pid {holder.pid}\\) is writing to"):
            adapt(cfg(model_dir, data_file, out))
        with pytest.raises(NBDiffError, match="another adapt run"):
            adapt(cfg(model_dir, data_file, out, resume=True))
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    assert (tmp_path / ".run.nbdiff-lock").is_file()  # a crash cannot remove it ...
    res = adapt(cfg(model_dir, data_file, out))  # ... but it is stale: the next run goes ahead
    assert res.status == "completed"
    assert hidden_siblings(out) == []


def test_the_lock_is_held_while_the_run_lives(model_dir, data_file, tmp_path):
    from nbdiff.adapt.run_folder import RunLock

    out = tmp_path / "run"
    refused = []

    def try_second(rec):
        if rec["event"] == "train" and rec["step"] == 1:
            with pytest.raises(NBDiffError, match="another adapt run") as err:
                RunLock(out).acquire()
            refused.append(str(os.getpid()) in err.value.message)

    adapt(cfg(model_dir, data_file, out), callback=try_second)
    assert refused == [True]
    with RunLock(out):  # released at the end
        pass


# ----------------------------------------------------------------------------- a damaged model folder


def test_truncated_model_weights_are_one_error_and_leave_nothing_behind(model_dir, data_file, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    out = tmp_path / "run"
    with pytest.raises(NBDiffError, match="model.safetensors is truncated or corrupt") as err:
        adapt(cfg(broken, data_file, out))
    assert "convert" in err.value.hint
    assert not out.exists()  # no data-cache/, no recipe.yaml: the next run needs no --force
    out.mkdir()
    with pytest.raises(NBDiffError, match="truncated or corrupt"):
        adapt(cfg(broken, data_file, out))
    assert list(out.iterdir()) == []
    result = CliRunner().invoke(_app(), ["adapt", str(broken), "--data", str(data_file), "--out", str(out),
                                         "--seq-len", "32", "--block-size", "4"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "truncated or corrupt" in result.output
    shutil.copy(model_dir / "model.safetensors", weights)
    tokenizer = broken / "tokenizer.json"
    tokenizer.write_bytes(tokenizer.read_bytes()[:100])
    with pytest.raises(NBDiffError, match="cannot load the tokenizer"):
        adapt(cfg(broken, data_file, out))
    assert list(out.iterdir()) == []


def test_failed_setup_removes_what_it_created(model_dir, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(NBDiffError, match="no usable training text"):
        adapt(cfg(model_dir, empty, tmp_path / "run"))
    assert not (tmp_path / "run").exists() and hidden_siblings(tmp_path / "run") == []


# ----------------------------------------------------------------------------- finished runs can be extended


def test_a_finished_run_keeps_a_checkpoint_and_resume_extends_it(model_dir, data_file, tmp_path):
    out = tmp_path / "run"
    kw = dict(steps=4, eval_fraction=0.1, curriculum="1,2,4", growth_steps=2)
    first = adapt(cfg(model_dir, data_file, out, **kw))
    assert first.checkpoint == out / "checkpoints" / "step-00000004" and first.checkpoint_bytes > 0
    with pytest.raises(NBDiffError, match="already at step 4 of 4") as err:
        adapt(cfg(model_dir, data_file, out, resume=True, **kw))
    assert "--steps" in err.value.hint
    records = []
    more = adapt(cfg(model_dir, data_file, out, resume=True, **dict(kw, steps=6)), callback=records.append)
    assert more.status == "completed" and more.steps == 6 and more.tokens > first.tokens
    train = [r for r in records if r["event"] == "train"]
    c = cfg(model_dir, data_file, out, **kw)
    assert [r["step"] for r in train] == [5, 6]
    # the schedules keep the first run's length: final block size, final learning rate
    assert all(r["block_size"] == 4 and r["lr"] == pytest.approx(c.lr * c.min_lr_ratio) for r in train)
    assert more.evals[0]["step"] == 0 and more.evals[-1]["step"] == 6  # compared with the first evaluation
    saved = json.loads((out / "checkpoints" / "step-00000006" / "state.json").read_text())["recipe"]
    assert saved["steps"] == 6 and saved["schedule_steps"] == 4


def test_prune_checkpoints_deletes_them_after_the_final_model(model_dir, data_file, tmp_path):
    res = adapt(cfg(model_dir, data_file, tmp_path / "run", prune_checkpoints=True))
    assert res.checkpoint is None and not (tmp_path / "run" / "checkpoints").exists()
    assert (tmp_path / "run" / "model.safetensors").is_file()


def test_cli_says_the_checkpoint_is_kept_and_compares_with_the_first_eval_after_resume(model_dir, data_file, tmp_path):
    out = tmp_path / "run"
    args = ["adapt", str(model_dir), "--data", str(data_file), "--out", str(out), "--seq-len", "32", "--block-size",
            "4", "--batch-size", "2", "--eval-fraction", "0.1"]
    result = CliRunner().invoke(_app(), args + ["--steps", "2"])
    assert result.exit_code == 0, result.output
    assert re.search(r"kept the final checkpoint .*step-00000002 \(\d+\.\d (KiB|MiB)\)", result.output)
    result = CliRunner().invoke(_app(), args + ["--steps", "3", "--resume"])
    assert result.exit_code == 0, result.output
    assert "MDM loss @ step 0" in result.output and "MDM loss @ step 3" in result.output


# ----------------------------------------------------------------------------- smaller rough edges


def test_data_shorter_than_one_row_warns(model_dir, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Hello there.", encoding="utf-8")
    result = CliRunner().invoke(_app(), ["adapt", str(model_dir), "--data", str(short), "--out", str(tmp_path / "cli"),
                                         "--seq-len", "32", "--block-size", "4", "--steps", "1"])
    assert result.exit_code == 0, result.output
    assert re.search(r"warning: the training data holds \d+ tokens, less than one row of --seq-len 32", result.output)


def test_seq_len_hint_when_the_block_is_longer_than_the_row():
    with pytest.raises(NBDiffError) as err:
        AdaptConfig(model="m", data=["d"], out="o", seq_len=64, block_size=128)
    assert err.value.hint == "use --seq-len 128"


@pytest.mark.parametrize("text, flag", [("lr: .nan\n", "--lr"), ("adam_beta1: .inf\n", "--adam-beta1"),
                                        ("lora_alpha: -.inf\n", "--lora-alpha"), ("noise_eps: .nan\n", "--noise-eps")])
def test_recipes_refuse_non_finite_numbers(tmp_path, text, flag):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text, encoding="utf-8")
    with pytest.raises(NBDiffError, match=f"{flag} must be a finite number"):
        AdaptConfig.build(file=recipe, model="m", data=["d"], out="o")


def test_recipe_values_of_the_wrong_type_are_one_error(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("lr: 1e-4\nsteps: many\n", encoding="utf-8")  # YAML reads 1e-4 as text: accepted
    with pytest.raises(NBDiffError, match="--steps must be an integer, got 'many'"):
        AdaptConfig.build(file=recipe, model="m", data=["d"], out="o")
    recipe.write_text("lr: 1e-4\n", encoding="utf-8")
    assert AdaptConfig.build(file=recipe, model="m", data=["d"], out="o").lr == 1e-4


def test_cli_refuses_non_finite_flags(model_dir, data_file, tmp_path):
    for flag in ("--noise-eps", "--adam-beta2", "--lr"):
        result = CliRunner().invoke(_app(), ["adapt", str(model_dir), "--data", str(data_file), "--out",
                                             str(tmp_path / "o"), flag, "nan"])
        assert result.exit_code == 1 and "must be a finite number" in result.output, result.output
    assert not (tmp_path / "o").exists()


def test_help_shows_every_flag_whole_at_80_columns_with_defaults():
    from dataclasses import fields

    result = CliRunner().invoke(_app(), ["adapt", "--help"], env={"COLUMNS": "80"}, terminal_width=80)
    assert result.exit_code == 0
    text = result.output
    assert "…" not in text
    for f in fields(AdaptConfig):
        if f.name != "model":
            assert "--" + f.name.replace("_", "-") in text, f.name
    flat = re.sub(r"[\s│]+", " ", text)  # help lines wrap inside the panels
    assert "[default: 0.5]" in flat and "[default: 32]" in flat and "U[eps, 1]" in flat


def test_a_bool_set_by_the_recipe_can_be_turned_off_on_the_command_line(model_dir, data_file, tmp_path, monkeypatch):
    import nbdiff.adapt.trainer as trainer
    from nbdiff.adapt.trainer import AdaptResult

    seen = {}

    def fake(config, callback=None):
        seen["cfg"] = config
        return AdaptResult(out_dir=tmp_path, status="completed", steps=0, tokens=0, block_size=4, seconds=0.0)

    monkeypatch.setattr(trainer, "adapt", fake)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("complementary_masks: true\n", encoding="utf-8")
    base = ["adapt", str(model_dir), "--data", str(data_file), "--out", str(tmp_path / "o"), "--seq-len", "32",
            "--block-size", "4", "--config", str(recipe)]
    assert CliRunner().invoke(_app(), base).exit_code == 0 and seen["cfg"].complementary_masks is True
    assert CliRunner().invoke(_app(), base + ["--no-complementary-masks"]).exit_code == 0
    assert seen["cfg"].complementary_masks is False


def test_live_panel_hides_the_ctrl_c_echo_and_restores_the_terminal():
    """An echoed ^C after the panel's last line made Rich redraw a second border; the panel turns the echo off."""
    import pty
    import termios

    from nbdiff_cli.adapt import no_ctrl_echo

    leader, follower = pty.openpty()
    try:
        with open(follower, closefd=False) as stream:
            before = termios.tcgetattr(follower)[3]
            assert before & termios.ECHOCTL
            with no_ctrl_echo(stream):
                assert not termios.tcgetattr(follower)[3] & termios.ECHOCTL
            assert termios.tcgetattr(follower)[3] == before
    finally:
        os.close(leader)
        os.close(follower)
    with open(os.devnull) as not_a_terminal, no_ctrl_echo(not_a_terminal):  # stdin redirected: nothing to do
        pass


def _app():
    from nbdiff_cli.app import app

    return app


def test_out_can_be_the_current_folder(model_dir, data_file, tmp_path, monkeypatch):
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    assert adapt(cfg(model_dir, data_file, ".", steps=1)).status == "completed"  # the lock is not put inside it
    assert (here / "model.safetensors").is_file() and not any(p.name.startswith(".") for p in here.iterdir())
