"""Training a drafter (`nbdiff adapt --target drafter`): the mask, train/decode consistency, learning, resume."""

from __future__ import annotations

import json
import re
import warnings

import pytest
import torch

from adapt_helpers import converted_tiny
from nbdiff.adapt.recipe import AdaptConfig
from nbdiff.adapt.trainer import adapt
from nbdiff.drafter.data import build_blocks, dense_mask, sample_anchors, valid_anchors, walk_tokens_per_verify
from nbdiff.drafter.train import DrafterTraining, ar_hidden_states, build_drafter
from nbdiff.errors import NBDiffError

pytestmark = pytest.mark.usefixtures("ungated_drafters")  # gates set per test (conftest)

WORDS = "the quick brown fox jumps over a lazy dog hello how are you today once upon a time fortune".split()


def reference_mask(anchors: torch.Tensor, doc_ids: torch.Tensor, b: int) -> torch.Tensor:
    """The rule written out with loops: block j sees features c < a_j of a_j's document, and itself."""
    R, L = doc_ids.shape
    N = anchors.shape[1]
    ref = torch.zeros(R, N * b, L + N * b, dtype=torch.bool)
    for r in range(R):
        for j in range(N):
            a = int(anchors[r, j])
            for q in range(j * b, (j + 1) * b):
                for c in range(L):
                    ref[r, q, c] = a >= 0 and c < a and bool(doc_ids[r, c] == doc_ids[r, a])
                for k in range(N * b):
                    ref[r, q, L + k] = k // b == j
    return ref


def test_training_mask_equals_the_rule_written_out():
    g = torch.Generator().manual_seed(0)
    doc_ids = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 2, 2], [5, 5, 5, 5, 5, 5, 5, 5, -1, -1, -1, -1]])
    trainable = torch.tensor([[0, 0, 1, 1, 0, 0, 1, 1, 1, 1, 0, 1], [0, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0]]).bool()
    valid = valid_anchors(doc_ids, trainable)
    # an anchor's next token is a reply token of its document: never the last of a document
    assert valid[0].nonzero().flatten().tolist() == [1, 2, 5, 6, 7, 8, 10]
    anchors = torch.stack([sample_anchors(valid[r], 4, g) for r in range(2)])
    assert (anchors[1] >= 0).all() and anchors[0].tolist() == sorted(anchors[0].tolist())
    anchors[1, 3] = -1  # an unused block sees only itself
    for b in (1, 3, 4):
        assert torch.equal(dense_mask(anchors, doc_ids, b), reference_mask(anchors, doc_ids, b))


def test_blocks_hold_the_anchor_then_masks_and_targets_inside_the_document():
    ids = torch.arange(100, 112)[None]
    pos = torch.tensor([[0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5]])
    doc = torch.tensor([[0] * 6 + [1] * 6])
    trainable = torch.tensor([[0, 0, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1]]).bool()
    batch = build_blocks(ids, pos, doc, trainable, torch.tensor([[3, 7]]), 4, mask_token_id=9, gamma=4.0)
    assert batch.block_ids.tolist() == [[103, 9, 9, 9, 107, 9, 9, 9]]
    assert batch.block_pos.tolist() == [[3, 4, 5, 6, 1, 2, 3, 4]]
    # block 0 runs past its document's end (index 5): those offsets have no target
    assert batch.targets.tolist() == [[-100, 104, 105, -100, -100, 108, 109, 110]]
    w = torch.exp(-torch.arange(3) / 4.0).tolist()
    assert batch.weights[0].tolist() == pytest.approx([0, w[0], w[1], 0, 0, *w])
    assert batch.real_tokens == 5


def test_walk_counts_verifies_as_decoding_does():
    # drafts accepted: 3 at the first anchor, then nothing, then 10 (capped by the reply's end)
    accept = [3, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0]
    assert walk_tokens_per_verify(accept, start=0, end=11) == (10, 3)  # 4 + 1 + 5 tokens in 3 verifies


@pytest.fixture(scope="module")
def tiny_target(tmp_path_factory):
    """A tiny converted llama and its own greedy replies to 48 prompts (chat records)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("drafter-train")
    folder = converted_tiny(root / "model", block_size=8)
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    # Training data are chat text, tokenised again: a random model's byte soup would not come back as
    # the same ids. Its LM head keeps only whole words (" the", " fox"; zero rows are never the argmax),
    # whose texts tokenise back to the ids the model produced.
    words = [t for t in range(len(tok)) if re.fullmatch(r" [a-z]+", tok.decode([t]))
             and tok(tok.decode([t]), add_special_tokens=False)["input_ids"] == [t]]
    keep = torch.zeros(len(tok), dtype=torch.bool)
    keep[words + [tok.eos_token_id]] = True
    with torch.no_grad():
        model.lm_head.weight[~keep] = 0.0
    model.save_pretrained(folder)
    g = torch.Generator().manual_seed(0)
    records = []
    for _ in range(48):
        prompt = " ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (6,), generator=g))
        enc = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)
        out = model.generate(**enc, max_new_tokens=40, do_sample=False, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)
        reply = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        records.append({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]})
    data = root / "replies.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return folder, data, model, tok, records


def cache_kwarg(model) -> str:
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def drafter_config(folder, data, out, **kw) -> AdaptConfig:
    base = dict(model=str(folder), data=[str(data)], out=str(out), target="drafter", steps=6, seq_len=128,
                block_size=8, batch_size=2, lr=3e-3, eval_fraction=0, dtype="fp32", drafter_layers=1,
                drafter_anchors=8)
    base.update(kw)
    return AdaptConfig(**base)


def test_a_trained_block_has_the_logits_of_drafting_at_that_point(tiny_target):
    """Training positions and features equal decoding's: the multi-block training forward gives the
    logits the drafter computes from its decoding cache (features absorbed in two pieces)."""
    from nbdiff.drafter.model import FeatureCache

    folder, _, model, tok, records = tiny_target
    text = tok.apply_chat_template(records[0]["messages"], tokenize=False)
    ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"])[None]
    L = ids.shape[1]
    pos, doc = torch.arange(L)[None], torch.zeros(1, L, dtype=torch.int64)
    cfg = drafter_config(folder, "x", "y", drafter_layers=2)
    drafter = build_drafter(model, cfg, mask_token_id=len(tok) - 1, draft_vocab=None)
    module = DrafterTraining(drafter, model)
    anchors = torch.tensor([[3, L // 2, L - 5]])
    batch = build_blocks(ids, pos, doc, torch.ones_like(ids, dtype=torch.bool), anchors, 8, drafter.config.mask_token_id,
                         4.0)
    with torch.no_grad():
        trained = module(batch).view(1, 3, 8, -1)
        for j, a in enumerate(anchors[0].tolist()):
            # decoding: AR prefill of part of the prefix, then a cached pass over the rest, features absorbed per pass
            cache, split = FeatureCache(), max(1, a // 2)
            first = model(input_ids=ids[:, :split], use_cache=True, output_hidden_states=True)
            rest = model(input_ids=ids[:, split:a], use_cache=True, output_hidden_states=True,
                         **{cache_kwarg(model): first.past_key_values})
            for out, cols in ((first, range(0, split)), (rest, range(split, a))):
                cols = torch.tensor(list(cols))[None]
                drafter.extend(cache, drafter.fuse(drafter.select(out.hidden_states)), cols)
            block = torch.full((1, 8), drafter.config.mask_token_id)
            block[0, 0] = ids[0, a]
            decoded = drafter(block, torch.arange(a, a + 8)[None], cache=cache)
            torch.testing.assert_close(trained[:, j], decoded, atol=2e-5, rtol=1e-4)
    # the features the training pass fuses are the AR model's own hidden states
    direct = model(input_ids=ids, output_hidden_states=True).hidden_states
    stacked = ar_hidden_states(model, ids, pos, doc, drafter.config.target_layer_ids)
    for n, i in enumerate(drafter.config.target_layer_ids):
        torch.testing.assert_close(stacked[:, :, n], direct[i + 1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cache", [False, True])
def test_resume_gives_the_same_drafter_as_an_uninterrupted_run(tiny_target, tmp_path, cache):
    from safetensors.torch import load_file

    folder, data, *_ = tiny_target
    kw = dict(steps=6, drafter_cache_features=cache, drafter_vocab=64 if cache else 0, grad_accum=2)
    full = adapt(drafter_config(folder, data, tmp_path / "a", **kw))

    def ctrl_c(rec):
        if rec["event"] == "train" and rec["step"] == 3:
            raise KeyboardInterrupt

    part = adapt(drafter_config(folder, data, tmp_path / "b", **kw), callback=ctrl_c)
    assert part.status == "interrupted" and part.steps == 3
    rest = adapt(drafter_config(folder, data, tmp_path / "b", resume=True, **kw))
    assert rest.status == "completed" and rest.tokens == full.tokens
    wa, wb = (load_file(str(tmp_path / d / "model.safetensors")) for d in "ab")
    assert set(wa) == set(wb) and all(k.startswith(("fc.", "hidden_norm.", "layers.", "norm.")) for k in wa)
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-6
    if cache:
        assert any((tmp_path / "a" / "feature-cache").rglob("row-*.safetensors"))


def test_a_forced_run_keeps_caching_features_after_its_folder_takes_the_old_runs_place(tiny_target, tmp_path):
    """--force writes into a staging folder that becomes --out at the first checkpoint; rows whose features are
    first computed after that are cached in --out (the store follows the folder)."""
    folder, data, *_ = tiny_target
    kw = dict(steps=6, save_every=2, drafter_cache_features=True, drafter_vocab=64, batch_size=1)
    first = adapt(drafter_config(folder, data, tmp_path / "r", steps=2, **{k: v for k, v in kw.items() if k != "steps"}))
    assert first.status == "completed"
    again = adapt(drafter_config(folder, data, tmp_path / "r", force=True, **kw))
    assert again.status == "completed" and again.steps == 6
    cached = list((tmp_path / "r" / "feature-cache").rglob("row-*.safetensors"))
    assert len(cached) >= 4  # rows met at steps 3-6, after the commit at step 2, too
    assert not list(tmp_path.glob(".r.nbdiff-tmp-*"))
    # the forced run trained what a fresh run in an empty folder trains
    from safetensors.torch import load_file

    fresh = adapt(drafter_config(folder, data, tmp_path / "fresh", **kw))
    assert fresh.tokens == again.tokens
    wa, wb = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("r", "fresh"))
    assert set(wa) == set(wb) and max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-6


def test_drafter_recipe_refuses_lora_and_block_one(tiny_target, tmp_path):
    folder, data, *_ = tiny_target
    with pytest.raises(NBDiffError, match="drop --lora-rank"):
        drafter_config(folder, data, tmp_path / "x", lora_rank=4)
    with pytest.raises(NBDiffError, match="block-size 2 or more"):
        drafter_config(folder, data, tmp_path / "x", block_size=1, seq_len=128)
    with pytest.raises(NBDiffError, match="drafter-target-layers"):
        adapt(drafter_config(folder, data, tmp_path / "y", drafter_target_layers="7"))


def test_a_drafter_trained_on_the_targets_own_replies_raises_tokens_per_verify(tiny_target, tmp_path):
    """A few hundred steps on a tiny target's greedy replies: real exact-mode decoding keeps well over
    one token per verify, and the output stays the AR output."""
    import nbdiff

    folder, data, model, tok, records = tiny_target
    run = tmp_path / "run"
    result = adapt(drafter_config(folder, data, run, steps=300, batch_size=4, drafter_layers=2, drafter_anchors=16,
                                  lr=3e-3, eval_fraction=0.1, eval_every=0))
    assert result.status == "completed" and (run / "model.safetensors").is_file()
    assert result.evals[-1]["tokens_per_verify"]["8"] > result.evals[0]["tokens_per_verify"]["8"]
    prompts = [r["messages"][:1] for r in records[:8]]
    plain, _ = nbdiff.generate(model, tok, prompts, block_size=1, max_new_tokens=40)
    untrained = tmp_path / "untrained"
    adapt(drafter_config(folder, data, untrained, steps=1, lr=1e-9))
    per_verify = {}
    for name, drafter in (("untrained", untrained), ("trained", run)):
        text, final = nbdiff.generate(model, tok, prompts, block_size=8, exact=True, drafter=str(drafter),
                                      max_new_tokens=40)
        assert text == plain
        per_verify[name] = final.accepted_length
    assert per_verify["untrained"] < 1.2
    assert per_verify["trained"] > 1.8, per_verify


def test_flex_block_mask_gives_the_dense_masks_logits(tiny_target):
    """The GPU path's BlockMask is built from the same rule: equal logits (flex runs forward-only on CPU)."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    folder, _, model, *_ = tiny_target
    drafter = build_drafter(model, drafter_config(folder, "x", "y", drafter_layers=2), 384, None)
    module = DrafterTraining(drafter, model)
    L, g = 128, torch.Generator().manual_seed(0)
    ids = torch.randint(0, 380, (2, L), generator=g)
    pos, doc = torch.arange(L).repeat(2, 1), torch.zeros(2, L, dtype=torch.int64)
    doc[:, 70:] = 1
    trainable = torch.ones(2, L, dtype=torch.bool)
    valid = valid_anchors(doc, trainable)
    anchors = torch.stack([sample_anchors(valid[r], 16, g) for r in range(2)])
    batch = build_blocks(ids, pos, doc, trainable, anchors, 8, 384, 4.0)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flex attention warns that it runs unfused outside torch.compile
        dense = module(batch)
        module.use_flex = True
        flex = module(batch)
    torch.testing.assert_close(flex, dense, atol=1e-5, rtol=1e-5)


def test_time_limit_ends_training_as_at_steps(tiny_target, tmp_path):
    """--time-limit (the GPU script's window): training stops early and the run still evaluates, saves and exports."""
    folder, data, *_ = tiny_target
    result = adapt(drafter_config(folder, data, tmp_path / "t", steps=50, time_limit=1e-9))
    assert result.status == "completed" and result.steps == 1
    assert (tmp_path / "t" / "model.safetensors").is_file() and result.checkpoint.name == "step-00000001"


def test_a_narrower_drafter_is_smaller_and_loads(tiny_target, tmp_path):
    """--drafter-intermediate narrows every draft layer's MLP (a smaller drafter to ship); the folder loads."""
    from safetensors.torch import load_file

    from nbdiff.drafter.folder import load_drafter

    folder, data, model, *_ = tiny_target
    wide = adapt(drafter_config(folder, data, tmp_path / "wide", steps=1))
    narrow = adapt(drafter_config(folder, data, tmp_path / "narrow", steps=1, drafter_intermediate=24))
    assert wide.status == narrow.status == "completed"
    w = load_file(str(tmp_path / "narrow" / "model.safetensors"))
    assert w["layers.0.mlp.up_proj.weight"].shape == (24, model.config.hidden_size)
    assert load_file(str(tmp_path / "wide" / "model.safetensors"))["layers.0.mlp.up_proj.weight"].shape[0] == \
        model.config.intermediate_size
    drafter = load_drafter(tmp_path / "narrow", model)
    assert drafter.config.intermediate_size == 24
    assert all(torch.equal(p.detach().cpu(), w[k]) for k, p in drafter.state_dict().items())
    with pytest.raises(NBDiffError, match="drafter-intermediate"):
        drafter_config(folder, data, tmp_path / "x", drafter_intermediate=-1)


def test_lookup_walk_counts_what_prompt_lookup_drafts():
    """Prompt lookup's accepted drafts along a known row, and lookup first / drafter otherwise."""
    from nbdiff.adapt.data import PackedRows
    from nbdiff.drafter.train import lookup_accepts, lookup_first

    #        prompt: 5 6 7 8 | reply: 5 6 7 9 5 6 7 8
    ids = torch.tensor([[5, 6, 7, 8, 5, 6, 7, 9, 5, 6, 7, 8]])
    L = ids.shape[1]
    trainable = torch.zeros(1, L, dtype=torch.bool)
    trainable[0, 4:] = True
    rows = PackedRows(ids, torch.arange(L)[None], torch.zeros(1, L, dtype=torch.int64), trainable)
    acc, matched = lookup_accepts(rows, block_size=4)
    # anchor 4 (token 5): tail [8, 5]? no; [5] matches at 0 -> drafts 6 7 8; reply goes on 6 7 9: 2 right
    assert int(matched[0, 4]) == 1 and int(acc[0, 4]) == 2
    # anchor 8 (token 5, second time): tail [7, 9, 5]? no; [9, 5] no; [5] latest at 4 -> 6 7 9; reply 6 7 8: 2 right
    assert int(acc[0, 8]) == 2
    # anchor 9 (token 6 after 5): [9, 5, 6] no, [5, 6] at 4 -> 7 9 5; reply 7 8: 1 right
    assert int(matched[0, 9]) == 2 and int(acc[0, 9]) == 1
    assert int(acc[0, 2]) == -1  # prompt positions are not anchors
    drafts = torch.full_like(acc, 3)
    both = lookup_first(drafts, acc, matched)
    assert int(both[0, 9]) == 1 and int(both[0, 4]) == 3  # lookup where its match has 2+ tokens


def test_a_resumed_run_reads_its_held_out_features_from_disk(tiny_target, tmp_path, monkeypatch):
    """With --drafter-cache-features the held-out features are written once; a later process (a resumed
    chunk) evaluates without an AR pass over them; every evaluation reports blocks 8 and 16, prompt
    lookup alone and lookup first."""
    import nbdiff.drafter.train as train

    folder, data, *_ = tiny_target
    kw = dict(steps=2, block_size=16, drafter_cache_features=True, drafter_vocab=64, drafter_eval_data=str(data))
    first = adapt(drafter_config(folder, data, tmp_path / "r", **kw))
    ev = first.evals[-1]
    assert set(ev["tokens_per_verify"]) == set(ev["lookup_first_tokens_per_verify"]) == {"8", "16"}
    assert ev["lookup_tokens_per_verify"]["8"] >= 1.0
    in_eval, calls = [], []
    real_eval, real_ar = train.evaluate_drafter, train.ar_hidden_states

    def evaluate(*a, **k):
        in_eval.append(True)
        try:
            return real_eval(*a, **k)
        finally:
            in_eval.pop()

    monkeypatch.setattr(train, "evaluate_drafter", evaluate)
    monkeypatch.setattr(train, "ar_hidden_states", lambda *a, **k: calls.append(bool(in_eval)) or real_ar(*a, **k))
    train._EVAL_ROWS.clear()
    again = adapt(drafter_config(folder, data, tmp_path / "r", resume=True, **{**kw, "steps": 3}))
    assert again.status == "completed" and again.steps == 3 and again.evals[-1]["step"] == 3
    assert True not in calls  # no AR pass while evaluating: the features came from disk


def test_a_run_from_a_drafter_folder_starts_where_that_drafter_ended(tiny_target, tmp_path):
    """--drafter-from: more training for a drafter one has. The new run's first evaluation is the old run's
    last (same weights, layout and draft vocabulary), and training goes on from there."""
    from safetensors.torch import load_file

    folder, data, *_ = tiny_target
    kw = dict(eval_fraction=0.1, eval_every=0)
    first = adapt(drafter_config(folder, data, tmp_path / "a", steps=40, drafter_vocab=64, drafter_intermediate=24,
                                 **kw))
    fro = dict(drafter_from=str(tmp_path / "a"), drafter_layers=2)  # 2 is the default: the folder's 1 layer stays
    more = adapt(drafter_config(folder, data, tmp_path / "b", steps=40, **fro, **kw))
    assert first.status == more.status == "completed"
    assert more.evals[0]["step"] == 0 and first.evals[-1]["step"] == 40
    assert more.evals[0]["tokens_per_verify"] == first.evals[-1]["tokens_per_verify"]
    assert first.evals[-1]["tokens_per_verify"]["8"] > first.evals[0]["tokens_per_verify"]["8"]  # not a fresh drafter's
    assert more.evals[0]["mdm"]["8"] == pytest.approx(first.evals[-1]["mdm"]["8"], rel=1e-5)
    wa, wb = (load_file(str(tmp_path / d / "model.safetensors")) for d in "ab")
    assert {k: v.shape for k, v in wa.items()} == {k: v.shape for k, v in wb.items()}
    assert any(not torch.equal(wa[k], wb[k]) for k in wa)  # trained on
    ca, cb = (json.loads((tmp_path / d / "config.json").read_text())["nbdiff_drafter"] for d in "ab")
    assert cb["draft_vocab"] == ca["draft_vocab"] and cb["intermediate_size"] == 24 and cb["num_hidden_layers"] == 1

    with pytest.raises(NBDiffError, match="drop --drafter-layers"):
        drafter_config(folder, data, tmp_path / "x", drafter_from=str(tmp_path / "a"), drafter_layers=3)
    with pytest.raises(NBDiffError, match="use --block-size 8"):
        adapt(drafter_config(folder, data, tmp_path / "y", **fro, block_size=4, seq_len=128))
    with pytest.raises(NBDiffError, match="no such folder"):
        adapt(drafter_config(folder, data, tmp_path / "z", drafter_from=str(tmp_path / "nowhere"), drafter_layers=2))
    with pytest.raises(NBDiffError, match="ships no drafter"):
        adapt(drafter_config(folder, data, tmp_path / "w", drafter_from="auto", drafter_layers=2))
