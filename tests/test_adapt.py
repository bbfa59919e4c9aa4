"""`nbdiff adapt`: the recipe, the loop, resume, bad input, LoRA/QLoRA, the CLI and `nbdiff plot`."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from adapt_helpers import TEXT, data_file, model_dir, text_file, tiny_config  # noqa: F401 (fixtures)
from nbdiff.errors import NBDiffError
from nbdiff.adapt.recipe import AdaptConfig
from nbdiff.adapt.trainer import adapt


@pytest.fixture(autouse=True)
def _quiet():
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


cfg = tiny_config


def train_losses(out) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["event"] == "train"]


# ----------------------------------------------------------------------------- the recipe


def test_block_size_1_is_plain_ar(model_dir, data_file, tmp_path):
    """b = 1: nothing is masked, L_MDM = 0, and the trained loss is lambda x the model's own causal LM loss."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nbdiff.adapt.data import build_dataset
    from nbdiff.method.layout import parallel_forward
    from nbdiff.method.losses import ar_loss, mdm_loss
    from nbdiff.adapt.trainer import make_micro_batch

    c = cfg(model_dir, data_file, tmp_path / "o", block_size=1, curriculum="none")
    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = build_dataset(c.data, tok, 32, 0, eval_fraction=0).train
    mb = make_micro_batch(rows, [0, 1], c, 1, mask_token_id=tok.mask_token_id)
    assert not bool(mb.masked.any()) and bool((mb.x_t == mb.x_0).all())
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa")
    noised, clean = parallel_forward(model, mb.x_t, mb.x_0, mb.position_ids, mb.doc_ids, 1)
    mdm, n, _ = mdm_loss(noised, mb.x_0, mb.masked, mb.t)
    assert n == 0 and float(mdm.detach()) == 0.0
    ar, _ = ar_loss(clean, mb.x_0, mb.ar_target)
    labels = mb.x_0.masked_fill(~(mb.ar_target), -100)  # HF shifts labels itself
    ref = model(input_ids=mb.x_0, position_ids=mb.position_ids, labels=labels).loss
    assert float(ar.detach()) == pytest.approx(float(ref.detach()), abs=1e-5)

    res = adapt(cfg(model_dir, data_file, tmp_path / "run", block_size=1, curriculum="none", steps=2,
                    seq_len=32, ar_loss_weight=0.5))
    for rec in res.last, *map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()):
        if rec.get("event") == "train":
            assert rec["mdm"] == 0.0 and rec["masked_tokens"] == 0
            assert rec["loss"] == pytest.approx(0.5 * rec["ar"], rel=1e-6)


def test_loss_decreases_and_output_folder_loads(model_dir, data_file, tmp_path):
    from transformers import AutoModelForCausalLM

    from nbdiff.method.settings import read_settings

    out = tmp_path / "run"
    records = []
    res = adapt(cfg(model_dir, data_file, out, steps=30, curriculum="1,2,4", growth_steps=10, eval_fraction=0.1),
                callback=records.append)
    losses = train_losses(out)
    assert len(losses) == 30
    mdm = [r["mdm"] for r in records if r["event"] == "train" and r["block_size"] == 4]
    assert sum(mdm[-5:]) / 5 < 0.85 * sum(mdm[:5]) / 5  # MDM at the final block size goes down
    ev = [r for r in records if r["event"] == "eval"]
    assert ev[0]["step"] == 0 and ev[-1]["step"] == 30
    assert ev[-1]["mdm"]["4"] < ev[0]["mdm"]["4"] and ev[-1]["ar"] < ev[0]["ar"]
    assert {r["event"] for r in records} >= {"start", "train", "eval", "done"}
    assert res.status == "completed" and res.block_size == 4 and res.steps == 30
    s = read_settings(out)
    assert s.adapted_block_size == 4 and s.extra["adapt"]["steps"] == 30 and s.extra["adapt"]["tokens"] == res.tokens
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.vocab_size == AutoModelForCausalLM.from_pretrained(model_dir).config.vocab_size
    assert (out / "tokenizer.json").is_file() and (out / "recipe.yaml").is_file()
    assert not (out / ".final-tmp").exists()
    import nbdiff  # the decoder loads the folder and decodes at the adapted block size

    m, tok = nbdiff.load(out, device="cpu")
    text, final = nbdiff.generate(m, tok, "Hello", block_size=4, max_new_tokens=8)
    assert final.new_tokens == 8 and isinstance(text, str)


def test_complementary_masks_cover_every_eligible_token(model_dir, data_file, tmp_path):
    from transformers import AutoTokenizer

    from nbdiff.adapt.data import build_dataset
    from nbdiff.adapt.trainer import make_micro_batch

    c = cfg(model_dir, data_file, tmp_path / "o", complementary_masks=True, block_size=8, seq_len=64)
    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = build_dataset(c.data, tok, 64, 0, eval_fraction=0).train
    mb = make_micro_batch(rows, [0, 1, 2], c, 8, tok.mask_token_id)
    assert mb.x_t.shape[0] == 6
    m1, m2, elig = mb.masked[:3], mb.masked[3:], mb.eligible[:3]
    assert bool(((m1 | m2) == elig).all()) and not bool((m1 & m2).any())
    assert bool(elig.any())
    res = adapt(cfg(model_dir, data_file, tmp_path / "run", complementary_masks=True, steps=2))
    assert res.status == "completed"


def test_inverse_t_and_block_causal_and_annealing_run(model_dir, data_file, tmp_path):
    c = cfg(model_dir, data_file, tmp_path / "run", loss_weighting="inverse-t", context_mask="block-causal",
            ar_loss_weight=1.0, ar_loss_weight_final=0.0, curriculum="none", steps=2, grad_accum=2)
    assert c.ar_weight_at(1) == 1.0 and c.ar_weight_at(2) == 0.5 and c.ar_weight_at(4) == 0.0
    records = []
    adapt(c, callback=records.append)
    train = [r for r in records if r["event"] == "train"]
    assert all(r["ar_weight"] == 0.0 and r["loss"] == pytest.approx(r["mdm"]) for r in train)


# ----------------------------------------------------------------------------- checkpoints and resume


def test_resume_gives_the_same_losses_as_an_uninterrupted_run(model_dir, data_file, tmp_path):
    kw = dict(steps=6, grad_accum=2, curriculum="1,2,4", growth_steps=3)
    full = adapt(cfg(model_dir, data_file, tmp_path / "a", **kw))

    def ctrl_c(rec):
        if rec["event"] == "train" and rec["step"] == 3:
            raise KeyboardInterrupt

    part = adapt(cfg(model_dir, data_file, tmp_path / "b", **kw), callback=ctrl_c)
    assert part.status == "interrupted" and part.steps == 3
    assert part.checkpoint.name == "step-00000003" and (part.checkpoint / "state.json").is_file()
    assert not (tmp_path / "b" / "model.safetensors").exists()  # no final model for an interrupted run
    rest = adapt(cfg(model_dir, data_file, tmp_path / "b", resume=True, **kw))
    assert rest.status == "completed" and rest.steps == 6 and rest.tokens == full.tokens
    a, b = train_losses(tmp_path / "a"), train_losses(tmp_path / "b")
    assert len(a) == len(b) == 6
    assert a == pytest.approx(b, abs=1e-6)
    from safetensors.torch import load_file

    wa, wb = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-6


def test_resume_refuses_changed_settings_and_missing_checkpoint(model_dir, data_file, tmp_path):
    def stop(rec):
        if rec["event"] == "train" and rec["step"] == 2:
            raise KeyboardInterrupt

    adapt(cfg(model_dir, data_file, tmp_path / "r"), callback=stop)
    with pytest.raises(NBDiffError, match=r"changed settings: block-size: 4 -> 8; lr: 0.003 -> 0.001"):
        adapt(cfg(model_dir, data_file, tmp_path / "r", resume=True, lr=1e-3, block_size=8))
    own = text_file(tmp_path / "own.txt", repeats=30)
    adapt(cfg(model_dir, own, tmp_path / "d"), callback=stop)
    text_file(own, repeats=31)  # same path, new content
    with pytest.raises(NBDiffError, match="training data changed"):
        adapt(cfg(model_dir, own, tmp_path / "d", resume=True))
    with pytest.raises(NBDiffError, match="not empty") as err:
        adapt(cfg(model_dir, data_file, tmp_path / "r"))
    assert "--resume" in err.value.hint
    with pytest.raises(NBDiffError, match="no checkpoint"):
        adapt(cfg(model_dir, data_file, tmp_path / "fresh", resume=True))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(model_dir, data_file, tmp_path, monkeypatch):
    import nbdiff.adapt.trainer as trainer

    real = trainer.parallel_losses
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        parts = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] > 3:  # steps 1-3 are fine, step 4 produces a NaN loss
            parts.mdm, parts.total = parts.mdm * float("nan"), parts.total * float("nan")
        return parts

    monkeypatch.setattr(trainer, "parallel_losses", poisoned)
    with pytest.raises(NBDiffError, match=r"loss became nan at step 4.*step-00000002"):
        adapt(cfg(model_dir, data_file, tmp_path / "n", save_every=2, block_size=2, curriculum="none"))
    ckpts = sorted(p.name for p in (tmp_path / "n" / "checkpoints").iterdir())
    assert ckpts == ["step-00000002"]
    assert not (tmp_path / "n" / "model.safetensors").exists()


# ----------------------------------------------------------------------------- bad input


def test_bad_input(model_dir, data_file, tmp_path):
    from nbdiff.testing import save_tiny_checkpoint

    plain = save_tiny_checkpoint(tmp_path / "plain")
    with pytest.raises(NBDiffError, match="never converted") as err:
        adapt(cfg(plain, data_file, tmp_path / "o"))
    assert "nbdiff convert" in err.value.hint
    with pytest.raises(NBDiffError, match="--seq-len 100 is not a multiple of the final block size 32") as err:
        cfg(model_dir, data_file, tmp_path / "o", seq_len=100, block_size=32)
    assert "--seq-len 96 or 128" in err.value.hint
    with pytest.raises(NBDiffError, match="exceeds the model's context"):
        adapt(cfg(model_dir, data_file, tmp_path / "o", seq_len=1024))
    with pytest.raises(NBDiffError, match="--block-size must be a power of two"):
        cfg(model_dir, data_file, tmp_path / "o", block_size=6)
    with pytest.raises(NBDiffError, match="--curriculum ends at 8"):
        cfg(model_dir, data_file, tmp_path / "o", curriculum="1,2,8", block_size=4)
    with pytest.raises(NBDiffError, match="--lora-rank"):
        cfg(model_dir, data_file, tmp_path / "o", quantize="nf4")
    with pytest.raises(NBDiffError, match="--context-mask"):
        cfg(model_dir, data_file, tmp_path / "o", context_mask="full")
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(NBDiffError, match="no usable training text"):
        adapt(cfg(model_dir, empty, tmp_path / "o2"))


# ----------------------------------------------------------------------------- LoRA / QLoRA


def test_lora_trains_the_mask_row_and_exports(model_dir, data_file, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    mask_id = AutoTokenizer.from_pretrained(model_dir).mask_token_id
    res = adapt(cfg(model_dir, data_file, tmp_path / "merged", lora_rank=4, steps=4, curriculum="none"))
    assert res.status == "completed"
    src, new = load_file(str(model_dir / "model.safetensors")), load_file(str(tmp_path / "merged" / "model.safetensors"))
    emb = "model.embed_tokens.weight"
    changed = (src[emb] - new[emb]).abs().amax(dim=1) > 0
    assert changed.nonzero().flatten().tolist() == [mask_id]  # only the mask token's row moved
    assert float((src["model.layers.0.self_attn.q_proj.weight"] - new["model.layers.0.self_attn.q_proj.weight"]).abs().max()) > 0
    adapt(cfg(model_dir, data_file, tmp_path / "adapter", lora_rank=4, steps=1, export="adapter"))
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    record = json.loads((tmp_path / "adapter" / "nbdiff.json").read_text())
    assert record["adapted_block_size"] == 4
    assert record["base_model"] == {"path": str(model_dir.resolve()), "source": "tiny"}  # where a loader finds the base
    assert (tmp_path / "adapter" / "tokenizer.json").is_file()


def test_qlora_nf4_on_cpu(model_dir, data_file, tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    records = []
    res = adapt(cfg(model_dir, data_file, tmp_path / "q", lora_rank=4, quantize="nf4", steps=3, curriculum="none"),
                callback=records.append)
    assert res.status == "completed"
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records if r["event"] == "train")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "q")  # merged full-precision weights
    assert model.get_input_embeddings().weight.dtype == torch.float32


# ----------------------------------------------------------------------------- recipe file and CLI


def test_command_line_beats_file_beats_default(tmp_path, model_dir, data_file):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("steps: 7\nlr: 0.01\nblock-size: 8\nseq_len: 64\n", encoding="utf-8")
    c = AdaptConfig.build(file=recipe, model=str(model_dir), data=[str(data_file)], out="o", lr=0.02, seed=None)
    assert (c.steps, c.lr, c.block_size, c.seq_len, c.ar_loss_weight) == (7, 0.02, 8, 64, 0.5)
    c.save_yaml(tmp_path / "saved.yaml")
    assert AdaptConfig.build(file=tmp_path / "saved.yaml") == c
    recipe.write_text("stepz: 3\n", encoding="utf-8")
    with pytest.raises(NBDiffError, match="unknown settings: stepz"):
        AdaptConfig.build(file=recipe)


def test_cli_adapt_and_plot(model_dir, data_file, tmp_path):
    from nbdiff_cli.app import app

    runner = CliRunner()
    out = tmp_path / "run"
    result = runner.invoke(app, ["adapt", str(model_dir), "--data", str(data_file), "--data", str(data_file),
                                 "--out", str(out), "--steps", "3", "--seq-len", "32", "--block-size", "2",
                                 "--lr", "3e-3", "--batch-size", "2", "--eval-fraction", "0.1"])
    assert result.exit_code == 0, result.output
    assert "step 3/3" in result.output and "done" in result.output
    assert (out / "metrics.jsonl").is_file() and (out / "config.json").is_file()
    png = tmp_path / "loss.png"
    result = runner.invoke(app, ["plot", str(out / "metrics.jsonl"), "-o", str(png)])
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    both = tmp_path / "both.png"
    result = runner.invoke(app, ["plot", str(out), str(out / "metrics.jsonl"), "-o", str(both)])
    assert result.exit_code == 0 and "2 runs" in result.output and both.stat().st_size > 10_000

    result = runner.invoke(app, ["adapt", str(model_dir), "--out", str(tmp_path / "x")])
    assert result.exit_code == 1 and "no training data" in result.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n", encoding="utf-8")
    result = runner.invoke(app, ["plot", str(bad)])
    assert result.exit_code == 1 and "no training records" in result.output
    result = runner.invoke(app, ["adapt", "--help"])
    assert result.exit_code == 0 and "--ar-loss-weight" in result.output and "repeat" in result.output


@pytest.mark.parametrize("name", ["tiny-cpu.yaml", "gpu-7b.yaml"])
def test_example_recipes_are_valid(name):
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "examples" / "recipes" / name
    c = AdaptConfig.build(file=path, model="m", data=["d"], out="o")
    assert c.curriculum_schedule().final_block_size == c.block_size


def test_every_recipe_field_is_a_flag():
    import inspect
    from dataclasses import fields

    from nbdiff_cli.adapt import adapt as command

    params = set(inspect.signature(command).parameters)
    assert {f.name for f in fields(AdaptConfig)} <= params


def test_live_panel_renders_every_record():
    from rich.console import Console

    from nbdiff_cli.adapt import _Panel

    panel = _Panel(AdaptConfig(model="m", data=["d"], out="o", steps=10, seq_len=32, block_size=4))
    panel._tty = True  # render as in a terminal, without starting a Live display
    panel.update({"event": "start", "data": {"documents": 3, "tokens": 900, "skipped_empty": 1, "skipped_non_utf8": 0,
                                             "skipped_no_field": 0, "skipped_no_assistant": 0},
                  "train_rows": 20, "eval_rows": 2, "out": "o", "device": "cpu", "world_size": 1})
    panel.update({"event": "train", "step": 4, "steps": 10, "block_size": 2, "loss": 3.5, "mdm": 2.5, "ar": 2.0,
                  "ar_weight": 0.5, "lr": 1e-3, "tokens": 4096, "tokens_per_s": 1234.0, "eta_s": 75.0,
                  "peak_memory_bytes": 3 * 2**30})
    panel.update({"event": "eval", "step": 4, "ar": 2.1, "mdm": {"2": 2.4, "4": 3.3}, "acc": {"2": 0.5, "4": 0.3}})
    console = Console(width=120, record=True)
    console.print(panel.render())
    text = console.export_text()
    for expected in ("4/10", "2 -> 4", "3.5000", "2.5000", "1,234", "0:01:15", "3.0 GiB", "1.00e-03", "b4 3.300",
                     "1 skipped"):
        assert expected in text, expected


def test_training_modules_import_no_ui_libraries():
    import subprocess
    import sys

    code = ("import sys, nbdiff.adapt.trainer, nbdiff.adapt.data, nbdiff.adapt.evaluation, nbdiff.adapt.checkpoint, nbdiff.adapt.recipe; "
            "print([m for m in ('rich', 'typer', 'textual') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_chat_rows_train_only_assistant_tokens(model_dir, tmp_path):
    from transformers import AutoTokenizer

    from adapt_helpers import jsonl_file
    from nbdiff.adapt.data import build_dataset, row_index
    from nbdiff.adapt.trainer import make_micro_batch

    chat = [{"role": "user", "content": "Hello, how are you today?"},
            {"role": "assistant", "content": "I am fine, thank you. The quick brown fox jumps over the lazy dog."}]
    path = jsonl_file(tmp_path / "chat.jsonl", [{"messages": chat}] * 6)
    tok = AutoTokenizer.from_pretrained(model_dir)
    c = cfg(model_dir, path, tmp_path / "o", block_size=4, seq_len=32)
    rows = build_dataset([path], tok, 32, 0, eval_fraction=0).train
    mb = make_micro_batch(rows, list(range(len(rows))), c, 4, tok.mask_token_id)
    trainable = rows.trainable[[row_index(s, len(rows), 0) for s in range(len(rows))]]  # rows in batch order
    assert bool(mb.masked.any()) and not bool((mb.masked & ~trainable).any())  # prompt never masked
    assert not bool((mb.ar_target & ~trainable).any())  # prompt never an AR target
    assert bool((~trainable & (rows.doc_ids[:1] >= 0)).any())  # there are prompt tokens to leave alone
    res = adapt(cfg(model_dir, path, tmp_path / "run", steps=2))
    assert res.status == "completed"


def test_cli_reports_an_interrupted_run(model_dir, data_file, tmp_path, monkeypatch):
    import nbdiff.adapt.trainer as trainer
    from nbdiff.adapt.trainer import AdaptResult
    from nbdiff_cli.app import app

    def fake(config, callback=None):
        return AdaptResult(out_dir=tmp_path, status="interrupted", steps=3, tokens=10, block_size=2, seconds=1.0,
                           checkpoint=tmp_path / "checkpoints" / "step-00000003")

    monkeypatch.setattr(trainer, "adapt", fake)
    result = CliRunner().invoke(app, ["adapt", str(model_dir), "--data", str(data_file), "--out", str(tmp_path / "o"),
                                      "--seq-len", "32", "--block-size", "4"])
    assert result.exit_code == 130
    assert "interrupted at step 3" in result.output and "--resume" in result.output
