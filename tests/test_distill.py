"""`nbdiff distill`: the model's own replies as chat data, resumable, greedy = nbdiff.generate."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from adapt_helpers import converted_tiny
from nbdiff.errors import NBDiffError

PROMPTS = ["Name a fruit.", "Count to three.", "Say hello.", "What is two plus two?", "Write one word."]


pytestmark = pytest.mark.usefixtures("quiet_hf")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return converted_tiny(tmp_path_factory.mktemp("model") / "m")


@pytest.fixture(scope="module")
def loaded(model_dir):
    import nbdiff

    return nbdiff.load(model_dir, device="cpu")


@pytest.fixture()
def prompt_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS), encoding="utf-8")
    return path


def run(loaded, prompts, out, **kw):
    from nbdiff.adapt.distill import distill

    model, tok = loaded
    return list(distill(model, tok, prompts, out, **{"max_new_tokens": 6, "batch_size": 2, **kw}))


def records(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_output_is_chat_data_that_adapt_reads(loaded, prompt_file, tmp_path):
    from nbdiff.adapt.data import load_corpus
    from nbdiff.adapt.distill import read_prompts

    out = tmp_path / "d.jsonl"
    progress = run(loaded, read_prompts(prompt_file), out)
    assert progress[-1].done == len(PROMPTS) and progress[-1].skipped == 0
    recs = records(out)
    assert sorted(r["messages"][0]["content"] for r in recs) == sorted(PROMPTS)
    assert all([m["role"] for m in r["messages"]] == ["user", "assistant"] for r in recs)
    assert sum(r["tokens"] for r in recs) == progress[-1].new_tokens > 0
    corpus = load_corpus([out], loaded[1], cache_dir=tmp_path / "cache")
    assert corpus.num_documents == len(PROMPTS)
    assert 0 < corpus.stats.trainable_tokens < corpus.stats.tokens  # the replies train, the prompts do not


def test_resume_skips_answered_prompts_and_cuts_a_torn_line(loaded, prompt_file, tmp_path):
    from nbdiff.adapt.distill import read_prompts

    prompts = read_prompts(prompt_file)
    out = tmp_path / "d.jsonl"
    run(loaded, prompts[:3], out)
    first = out.read_text(encoding="utf-8")
    with open(out, "a", encoding="utf-8") as f:
        f.write('{"messages": [{"role": "user", "content": "half a')  # an interrupted write
    progress = run(loaded, prompts, out)
    assert progress[-1].skipped == 3 and progress[-1].done == 2
    text = out.read_text(encoding="utf-8")
    assert text.startswith(first)  # answered lines are kept as they were
    recs = records(out)  # every line parses: the torn one is gone
    assert len(recs) == 5 and len({r["id"] for r in recs}) == 5
    assert run(loaded, prompts, out)[-1].done == 0  # nothing left to answer


@pytest.mark.parametrize("backend", ["engine", "nbdiff", "hf"])
def test_greedy_replies_equal_nbdiff_generate(loaded, prompt_file, tmp_path, backend):
    import nbdiff
    from nbdiff.adapt.distill import read_prompts

    model, tok = loaded
    out = tmp_path / "d.jsonl"
    run(loaded, read_prompts(prompt_file), out, batch_size=3, backend=backend)
    for rec in records(out):
        prompt = rec["messages"][0]["content"]
        text, final = nbdiff.generate(model, tok, prompt, block_size=1, max_new_tokens=6)
        assert rec["messages"][-1]["content"] == text, prompt
        assert rec["finish"] == final.finish_reason
        eos = set(nbdiff.api.eos_ids(model, tok))
        assert rec["tokens"] == len([t for t in final.tokens[0] if t not in eos]), prompt


def test_engine_keeps_rows_full_with_fewer_rows_than_prompts(loaded, prompt_file, tmp_path):
    """Two engine rows for five prompts: every prompt answered once, as it would be alone."""
    import nbdiff
    from nbdiff.adapt.distill import read_prompts

    model, tok = loaded
    out = tmp_path / "d.jsonl"
    progress = run(loaded, read_prompts(prompt_file), out, batch_size=2, max_new_tokens=9, backend="engine")
    recs = records(out)
    assert sorted(r["messages"][0]["content"] for r in recs) == sorted(PROMPTS)
    assert progress[-1].done == 5 and progress[-1].new_tokens == sum(r["tokens"] for r in recs)
    for rec in recs:
        text, _ = nbdiff.generate(model, tok, rec["messages"][0]["content"], block_size=1, max_new_tokens=9)
        assert rec["messages"][-1]["content"] == text


def test_sampling_is_seeded(loaded, prompt_file, tmp_path):
    from nbdiff.adapt.distill import read_prompts

    prompts = read_prompts(prompt_file)
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    run(loaded, prompts, a, temperature=1.0, seed=3)
    run(loaded, prompts, b, temperature=1.0, seed=3)
    assert a.read_text() == b.read_text()


def test_prompt_files(tmp_path):
    from nbdiff.adapt.distill import read_prompts

    txt = tmp_path / "p.txt"
    txt.write_text("one\n\ntwo\none\n", encoding="utf-8")
    assert [p.messages[0]["content"] for p in read_prompts(txt)] == ["one", "two"]  # blank and duplicate dropped
    chat = tmp_path / "c.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
                    + "\n", encoding="utf-8")
    assert read_prompts(chat)[0].messages == [{"role": "user", "content": "hi"}]  # the old answer is dropped
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no prompt"}\n', encoding="utf-8")
    with pytest.raises(NBDiffError, match="not a prompt"):
        read_prompts(bad)
    with pytest.raises(NBDiffError, match="does not exist"):
        read_prompts(tmp_path / "missing.jsonl")


def test_shipped_prompts_are_many_and_unique():
    from nbdiff.resources import assets_dir
    from nbdiff.adapt.distill import read_prompts

    path = assets_dir() / "prompts" / "distill.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(read_prompts(path)) == len(lines) >= 2000


def test_cli_distill(model_dir, prompt_file, tmp_path):
    from nbdiff_cli.app import app

    out = tmp_path / "d.jsonl"
    args = ["distill", str(model_dir), "--prompts", str(prompt_file), "--out", str(out), "--max-new-tokens", "4",
            "--batch-size", "4", "--device", "cpu"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "5 prompts answered" in result.output
    assert len(records(out)) == 5
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0 and "0 prompts answered" in again.output
    bad = CliRunner().invoke(app, ["distill", str(model_dir), "--prompts", str(tmp_path / "nope.jsonl")])
    assert bad.exit_code == 1 and "does not exist" in bad.output


# ----------------------------------------------------------------------------- certainty forcing


def test_certainty_loss_is_the_entropy_of_right_predictions_only():
    import torch

    from nbdiff.method.losses import certainty_loss

    ids = torch.tensor([[0, 1, 2, 3]])
    masked = torch.tensor([[False, True, True, True]])
    logits = torch.zeros(1, 4, 5)
    logits[0, 0, 1] = 2.0  # predicts token 1 at position 1: right
    logits[0, 1, 4] = 2.0  # predicts 4 at position 2 (gold 2): wrong, no certainty term
    logits[0, 2, 3] = 1.0  # right, less sure
    p = torch.softmax(logits[0, [0, 2]], -1)
    entropy = -(p * p.log()).sum(-1)
    assert torch.allclose(certainty_loss(logits, ids, masked), entropy.sum() / 3)
    sharp = torch.softmax(logits[0, [0, 2]] / 0.5, -1)
    assert torch.allclose(certainty_loss(logits, ids, masked, 0.5), -(sharp * sharp.log()).sum() / 3)
    assert certainty_loss(logits, ids, torch.zeros_like(masked)).item() == 0.0


def test_adapt_logs_the_certainty_term(model_dir, tmp_path):
    from adapt_helpers import text_file
    from nbdiff.adapt.recipe import AdaptConfig
    from nbdiff.adapt.trainer import adapt

    data = text_file(tmp_path / "a.txt", repeats=20)
    base = dict(model=str(model_dir), data=[str(data)], steps=2, seq_len=32, block_size=4, batch_size=2, lr=1e-3,
                eval_fraction=0, curriculum="none")
    adapt(AdaptConfig(out=str(tmp_path / "cf"), certainty_weight=1.0, certainty_temperature=0.5, **base))
    rows = [json.loads(line) for line in (tmp_path / "cf" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["event"] == "train"]
    assert train and all(r["certainty"] >= 0 for r in train)  # a random tiny model is rarely right: often 0
    for r in train:  # the logged loss includes the term
        assert r["loss"] == pytest.approx(r["mdm"] + r["ar_weight"] * r["ar"] + r["certainty"], rel=1e-4)
    with pytest.raises(NBDiffError, match="certainty-temperature"):
        AdaptConfig(out=str(tmp_path / "x"), certainty_temperature=0.0, **base)


def test_time_limit_finishes_started_rows_and_a_rerun_goes_on(loaded, prompt_file, tmp_path):
    """A run past its time limit starts no new prompt, writes the rows it had started, and the same
    command again answers the rest: the file then holds every prompt once, as an unlimited run does."""
    from nbdiff.adapt.distill import read_prompts

    prompts = read_prompts(prompt_file)
    out = tmp_path / "d.jsonl"
    first = run(loaded, prompts, out, batch_size=2, time_limit=1e-9)[-1]
    assert first.done == 2  # the first batch always starts; nothing after the limit
    assert len(records(out)) == first.done
    run(loaded, prompts, out, batch_size=2)
    whole = tmp_path / "w.jsonl"
    run(loaded, prompts, whole, batch_size=2)
    by_id = lambda path: {r["id"]: r for r in records(path)}  # noqa: E731
    assert by_id(out) == by_id(whole)
