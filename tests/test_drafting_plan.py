"""The drafting plan (nbdiff.decode.plan): one resolver per decoding call, a plan for every --drafter value,
shipped drafters found by the model's fingerprint, and near-ties counted when exact mode verifies in bf16."""

import json
import random

import pytest
import torch

import nbdiff
from nbdiff.decode.decoder import decode
from nbdiff.decode.options import LOOKUP_BLOCK_SIZE, LOOKUP_BLOCK_SIZE_KERNEL, DecodeOptions
from nbdiff.decode.plan import DraftingPlan, plan_drafting
from nbdiff.drafter import save_drafter
from nbdiff.drafter.folder import REGISTRY_ENV, shipped_drafter
from nbdiff.errors import NBDiffError
from nbdiff.testing import random_drafter, save_tiny_checkpoint, save_tiny_converted, tiny_model

pytestmark = pytest.mark.usefixtures("ungated_drafters")  # gates set per test (conftest)


@pytest.fixture
def registry(tmp_path, monkeypatch):
    """An empty folder of shipped drafters in place of assets/drafters/."""
    folder = tmp_path / "registry"
    folder.mkdir()
    monkeypatch.setenv(REGISTRY_ENV, str(folder))
    return folder


@pytest.fixture
def converted(tmp_path, registry):
    """A converted tiny folder (block size 4, adapted to 1) loaded in fp32, with torch's products."""
    from nbdiff.cpu_kernel import KernelStatus

    model, tok = nbdiff.load(save_tiny_converted(tmp_path / "m", block_size=4), device="cpu", dtype="fp32")
    model._nbdiff_cpu_kernel = KernelStatus(False, "off (for this test)")  # lookup's block size: LOOKUP_BLOCK_SIZE
    return model, tok


def _reference(model, prompt, n):
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


# a plan for each --drafter value ------------------------------------------------------------------


def test_a_plan_for_each_drafter_value(converted, tmp_path):
    model, tok = converted
    from nbdiff.loading import model_settings

    mask = model_settings(model).mask_token_id
    off = plan_drafting(model, DecodeOptions())
    assert (off.kind, off.block_size, off.exact, off.drafter) == ("off", 1, False, None)  # adapted to 1
    assert "exact mode off" in off.why
    auto = plan_drafting(model, DecodeOptions(exact=True))
    assert (auto.kind, auto.block_size, auto.lookup_first) == ("ngram", LOOKUP_BLOCK_SIZE, False)
    assert "no shipped drafter" in auto.why and "block size 2" in auto.why
    from nbdiff.cpu_kernel import KernelStatus

    model._nbdiff_cpu_kernel = KernelStatus(True, "on (for this test)", 2)
    assert plan_drafting(model, DecodeOptions(exact=True)).block_size == LOOKUP_BLOCK_SIZE_KERNEL
    model._nbdiff_cpu_kernel = KernelStatus(True, "on (AVX2, for this test)", 1)  # the same width, drafts that follow
    avx2 = plan_drafting(model, DecodeOptions(exact=True))
    assert avx2.block_size == LOOKUP_BLOCK_SIZE_KERNEL and avx2.lookup_follows
    model._nbdiff_cpu_kernel = KernelStatus(False, "off (for this test)")
    steps = plan_drafting(model, DecodeOptions(exact=True, draft_steps=1))
    assert (steps.kind, steps.block_size) == ("diffusion", 1)  # the folder's block size: diffusion drafts
    for name in ("diffusion", "ngram"):
        plan = plan_drafting(model, DecodeOptions(exact=True, drafter=name, block_size=4))
        assert (plan.kind, plan.block_size, plan.drafter, plan.name) == (name, 4, None, name)
        assert f"--drafter {name}" in plan.why and "as asked" in plan.why
    with pytest.raises(NBDiffError, match="no trained drafter"):
        plan_drafting(model, DecodeOptions(drafter="trained"))  # no drafter/ in the folder

    save_drafter(random_drafter(model, mask, block_size=8), tmp_path / "d")
    folder = plan_drafting(model, DecodeOptions(drafter=str(tmp_path / "d")))  # a folder turns exact mode on
    assert (folder.kind, folder.block_size, folder.lookup_first, folder.source) == ("trained", 8, False, str(tmp_path / "d"))
    assert folder.draft_threshold == DecodeOptions.draft_threshold and folder.name == str(tmp_path / "d")
    both = plan_drafting(model, DecodeOptions(drafter=f"lookup+{tmp_path / 'd'}", block_size=4, draft_threshold=0.3))
    assert (both.kind, both.block_size, both.lookup_first, both.draft_threshold) == ("trained", 4, True, 0.3)
    assert both.drafter is folder.drafter  # loaded once per model
    from nbdiff.decode import plan as plan_module

    assert folder.draft_gate == plan_module.DRAFT_GATE and steps.draft_gate == auto.draft_gate == 0.0  # trained only
    gated = plan_drafting(model, DecodeOptions(drafter=str(tmp_path / "d"), draft_gate=0.25))
    assert gated.draft_gate == 0.25 and gated.to_dict()["draft_gate"] == 0.25
    loaded = random_drafter(model, mask, block_size=16, seed=1)
    given = plan_drafting(model, DecodeOptions(drafter=loaded))
    assert given.drafter is loaded and given.source is None and given.block_size == 16 and given.name.startswith("<Drafter")

    save_drafter(random_drafter(model, mask, block_size=8), tmp_path / "m" / "drafter")  # the folder brings one along now
    bundled = plan_drafting(model, DecodeOptions(exact=True))
    assert (bundled.kind, bundled.lookup_first, bundled.name, bundled.block_size) == ("trained", True, "lookup+trained", 8)
    assert "drafter/" in bundled.why
    assert plan_drafting(model, DecodeOptions(drafter="trained")).source == str(tmp_path / "m" / "drafter")
    assert plan_drafting(model, DecodeOptions(exact=True, drafter="ngram")).kind == "ngram"  # asked for beats found
    assert json.loads(json.dumps(bundled.to_dict()))["drafter"] == "lookup+trained"
    with pytest.raises(Exception):  # frozen: nothing downstream changes the decision
        bundled.kind = "ngram"  # type: ignore[misc]


def test_one_decoding_call_resolves_its_plan_once(converted, tmp_path, monkeypatch):
    """stream/generate resolve the plan once and pass it down: one look in the model folder, one registry
    search, one drafter load per model (then cached); a bare decode() resolves its own, also once."""
    import nbdiff.api as api
    import nbdiff.decode.decoder as decoder_mod
    import nbdiff.drafter.decoding as glue
    import nbdiff.drafter.folder as folder_mod
    from nbdiff.loading import model_settings

    model, tok = converted
    calls = {"plan": 0, "bundled": 0, "shipped": 0, "load": 0}

    def counted(name, real):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)
        return wrapper

    plan = counted("plan", plan_drafting)
    monkeypatch.setattr(api, "plan_drafting", plan)
    monkeypatch.setattr(decoder_mod, "plan_drafting", plan)
    bundled = counted("bundled", folder_mod.bundled_drafter)
    monkeypatch.setattr(folder_mod, "bundled_drafter", bundled)
    monkeypatch.setattr(glue, "bundled_drafter", bundled)  # 'trained' names the folder's drafter/ too
    monkeypatch.setattr(folder_mod, "shipped_drafter", counted("shipped", folder_mod.shipped_drafter))
    monkeypatch.setattr(glue, "load_drafter", counted("load", glue.load_drafter))

    _, final = nbdiff.generate(model, tok, "Hello, how are you?", exact=True, max_new_tokens=8)
    assert calls == {"plan": 1, "bundled": 1, "shipped": 1, "load": 0} and final.plan["kind"] == "ngram"
    save_drafter(random_drafter(model, model_settings(model).mask_token_id, block_size=4), tmp_path / "m" / "drafter")
    for turn in range(2):
        calls.update(plan=0, bundled=0, shipped=0)
        _, final = nbdiff.generate(model, tok, "Hello, how are you?", exact=True, max_new_tokens=8)
        assert calls == {"plan": 1, "bundled": 1, "shipped": 0, "load": 1}, turn  # loaded at the first call only
        assert final.plan["drafter"] == "lookup+trained" and final.block_size == 4 and final.drafter_forwards > 0
    calls.update(plan=0, bundled=0)
    final = list(decode(model, [[5, 17, 33]], DecodeOptions(exact=True, block_size=4, max_new_tokens=6),
                        mask_token_id=model_settings(model).mask_token_id))[-1]
    assert calls["plan"] == 1 and calls["bundled"] == 1 and final.plan["kind"] == "trained"


# shipped drafters, found by the model's fingerprint -----------------------------------------------


def test_a_shipped_drafter_is_found_by_the_models_fingerprint(tmp_path, registry):
    folder = save_tiny_checkpoint(tmp_path / "plain", "llama")  # never converted: the drafter brings the mask
    model, tok = nbdiff.load(folder, device="cpu", dtype="fp32")
    assert plan_drafting(model, DecodeOptions(exact=True)).kind == "ngram"  # empty registry: lookup, as before
    other = tiny_model("llama", seed=3)
    save_drafter(random_drafter(other, tok.pad_token_id, block_size=8), registry / "a-other")  # same shape, other weights
    save_drafter(random_drafter(model, tok.pad_token_id, block_size=4), registry / "b-mine")
    (registry / "c-not-a-drafter").mkdir()
    assert shipped_drafter(model) == registry / "b-mine" and shipped_drafter(other) == registry / "a-other"
    assert shipped_drafter(tiny_model("qwen2")) is None  # another architecture
    assert shipped_drafter(model, registry=tmp_path / "nowhere") is None

    plan = plan_drafting(model, DecodeOptions(exact=True))
    assert (plan.kind, plan.lookup_first, plan.block_size, plan.source) == ("trained", True, 4, str(registry / "b-mine"))
    assert "shipped drafter b-mine" in plan.why and "fingerprint" in plan.why
    prompt = tok("hello there")["input_ids"]
    _, final = nbdiff.generate(model, tok, "hello there", raw=True, exact=True, max_new_tokens=12)
    assert final.tokens[0] == _reference(model, prompt, 12)[: len(final.tokens[0])] and final.drafter_forwards > 0
    assert final.plan["drafter"] == "lookup+" + str(registry / "b-mine") and final.plan["source"] == str(registry / "b-mine")

    bf16, _ = nbdiff.load(folder, device="cpu", dtype="bf16")  # the fingerprint survives the dtype
    assert shipped_drafter(bf16) == registry / "b-mine"
    assert plan_drafting(model, DecodeOptions(exact=True, drafter="ngram")).kind == "ngram"  # asked for beats shipped
    assert plan_drafting(model, DecodeOptions()).kind == "off"  # exact mode off: nothing searched for
    save_drafter(random_drafter(model, tok.pad_token_id, block_size=8, seed=2), folder / "drafter")
    assert plan_drafting(model, DecodeOptions(exact=True)).source.endswith("drafter")  # the folder's own comes first


def test_the_default_registry_is_the_shipped_assets(monkeypatch):
    from nbdiff.drafter.folder import shipped_drafters_dir
    from nbdiff.resources import assets_dir

    monkeypatch.delenv(REGISTRY_ENV, raising=False)
    assert shipped_drafters_dir() == assets_dir() / "drafters"
    plan = plan_drafting(tiny_model("llama"), DecodeOptions(exact=True, block_size=4))  # whatever ships: not this model's
    assert plan.kind == "ngram"


# exact mode in bf16: identical to block size 1 in bf16 except after a counted near-tie ----------------


def test_near_ties_count_kept_tokens_whose_top_two_logits_are_within_the_dtypes_rounding():
    from nbdiff.decode.exact import NEAR_TIE_ULPS, near_ties

    # one ulp of bf16 at 10.0 is 2**3 * 2**-7 = 0.0625
    logits = torch.zeros(2, 3, 5)
    logits[:, :, 0] = 10.0
    logits[0, 0, 1] = 10.0 - 0.0625 * NEAR_TIE_ULPS  # a near-tie at position 0
    logits[0, 1, 1] = 10.0 - 0.0625 * (NEAR_TIE_ULPS + 1)  # clear
    logits[0, 2, 1] = 10.0  # an exact tie, but past the accepted prefix
    logits[1, 2, 1] = 9.99
    accepted = torch.tensor([1, 2])
    assert near_ties(logits.bfloat16(), accepted, torch.bfloat16).tolist() == [1, 1]
    assert near_ties(logits, accepted, torch.float32).tolist() == [0, 0]  # fp32: far finer rounding
    assert near_ties(logits, torch.tensor([2, 2]), torch.bfloat16).tolist() == [2, 1]


def test_exact_in_bf16_equals_block_size_1_in_bf16_unless_a_near_tie_was_counted():
    """Several tiny random models and prompts in bf16: exact mode (lookup and diffusion drafts) gives
    block size 1's bf16 tokens in every reply with no near-tie; the rounding does change some replies
    (so the check has something to catch), and each of those counted a near-tie. The LM head is scaled
    up 4x: a random tiny model's logits lie so close together that nearly every token is a near-tie
    (20 of 72 replies without one after the scaling, 10 replies changed, all with a near-tie counted)."""
    pairs = differ = clean = 0
    for arch in ("llama", "mistral", "qwen3"):
        for seed in range(3):
            model = tiny_model(arch, seed=seed)
            with torch.no_grad():
                model.get_output_embeddings().weight.mul_(4.0)
            model = model.to(torch.bfloat16)
            rnd = random.Random(seed)
            for k in range(4):
                prompt = [rnd.randrange(1, 380) for _ in range(rnd.randrange(3, 10))] * (1 + k % 2)
                ar = list(decode(model, [prompt], DecodeOptions(block_size=1, max_new_tokens=32), mask_token_id=383))[-1]
                for drafter in ("ngram", "diffusion"):
                    opts = DecodeOptions(exact=True, drafter=drafter, block_size=4, max_new_tokens=32)
                    final = list(decode(model, [prompt], opts, mask_token_id=383))[-1]
                    pairs += 1
                    if final.near_ties == 0:
                        clean += 1
                        assert final.tokens == ar.tokens, (arch, seed, k, drafter)
                    differ += final.tokens != ar.tokens
    assert clean >= 10 and differ > 0, (pairs, clean, differ)  # both sides of the claim were exercised


def test_fp32_on_the_cpu_skips_the_near_tie_count_and_stays_bit_identical(monkeypatch):
    """fp32 on the CPU: a verify pass rounds like one-token steps, so the plan skips the near-tie count (its
    top-2 over the vocabulary is never computed) and reports 0; the reply is block size 1's. bf16 counts."""
    import nbdiff.decode.decoder as decoder_mod
    from nbdiff.decode.plan import verify_rounds_like_steps

    model = tiny_model("llama")
    prompt = [5, 17, 33, 80] * 3
    ar = list(decode(model, [prompt], DecodeOptions(block_size=1, max_new_tokens=24), mask_token_id=383))[-1]
    real, seen = decoder_mod.near_ties, []

    def spy(*args, **kwargs):
        seen.append(args[2])
        return real(*args, **kwargs)

    monkeypatch.setattr(decoder_mod, "near_ties", spy)
    final = list(decode(model, [prompt], DecodeOptions(exact=True, block_size=4, max_new_tokens=24), mask_token_id=383))[-1]
    assert final.tokens == ar.tokens and final.near_ties == 0 and final.plan["kind"] == "ngram"
    assert final.forwards < 24  # drafts were verified: passes of several tokens ran without the count
    assert verify_rounds_like_steps(model) and final.plan["counts_near_ties"] is False and seen == []
    half = model.to(torch.bfloat16)
    assert not verify_rounds_like_steps(half) and plan_drafting(half, DecodeOptions(exact=True, block_size=4)).counts_near_ties
    list(decode(half, [prompt], DecodeOptions(exact=True, block_size=4, max_new_tokens=24), mask_token_id=383))
    assert seen and set(seen) == {torch.bfloat16}
    sampled = plan_drafting(half, DecodeOptions(exact=True, block_size=4, temperature=0.7))
    assert not sampled.counts_near_ties  # sampled tokens have no argmax to tie
    assert isinstance(DraftingPlan("ngram", 4).to_dict()["why"], str)


def test_generate_json_reports_the_plan_and_near_ties(tmp_path, registry):
    from typer.testing import CliRunner

    from nbdiff_cli.app import app

    folder = save_tiny_converted(tmp_path / "m", block_size=4)
    base = ["generate", str(folder), "--prompt", "Hello, how are you", "-n", "10", "--device", "cpu", "--json"]
    for extra, kind, dtype in ((["--exact"], "ngram", "fp32"), (["--exact", "--dtype", "bf16"], "ngram", "bf16"),
                               ([], "off", "fp32")):
        out = CliRunner().invoke(app, base + extra)
        assert out.exit_code == 0, out.output
        data = json.loads(out.stdout)
        assert data["plan"]["kind"] == kind and data["plan"]["block_size"] == data["block_size"] and data["dtype"] == dtype
        assert data["plan"]["why"]
        if kind != "off":
            assert isinstance(data["near_ties"], int) and data["drafter"] == "ngram"
        if dtype == "bf16":
            assert any(f"{data['near_ties']} here" in note for note in data["notes"])


def test_lookup_drafts_follow_their_accepted_runs_where_the_kernel_runs_on_avx2(converted):
    """On AVX2 (wide verifies cost there) the plan makes a row's next lookup draft at most one token longer
    than its last draft's accepted run; AVX-512 keeps full-width drafts. Replies stay block size 1's."""
    from nbdiff.cpu_kernel import KernelStatus
    from nbdiff.decode.events import BlockEvent, FinalEvent

    model, _ = converted
    model._nbdiff_cpu_kernel = KernelStatus(True, "on (AVX-512, for this test)", 2)
    assert not plan_drafting(model, DecodeOptions(exact=True, block_size=8)).lookup_follows
    model._nbdiff_cpu_kernel = KernelStatus(True, "on (AVX2, for this test)", 1)
    assert not plan_drafting(model, DecodeOptions(exact=True, block_size=2)).lookup_follows  # one-token drafts anyway
    plan = plan_drafting(model, DecodeOptions(exact=True, block_size=8))
    assert plan.kind == "ngram" and plan.lookup_follows and "last accepted run" in plan.why
    prompt = [5, 17]  # this tiny model's reply repeats itself: lookup drafts are kept, then rejected
    events = list(decode(model, [prompt], DecodeOptions(exact=True, block_size=8, max_new_tokens=60), mask_token_id=383,
                         plan=plan))
    blocks = [e for e in events if isinstance(e, BlockEvent)]
    for before, after in zip(blocks, blocks[1:]):
        if before.drafted:
            assert len(after.drafted) <= before.accepted + 1
    assert any(b.accepted < len(b.drafted) for b in blocks) and any(b.accepted > 0 for b in blocks)
    ar = list(decode(model, [prompt], DecodeOptions(block_size=1, max_new_tokens=60), mask_token_id=383))[-1]
    final = events[-1]
    assert isinstance(final, FinalEvent) and final.tokens == ar.tokens
    # the same call without following: full-width drafts after a rejection (the check above can fail)
    wide = list(decode(model, [prompt], DecodeOptions(exact=True, block_size=8, max_new_tokens=60), mask_token_id=383,
                       plan=plan_drafting(model, DecodeOptions(exact=True, block_size=8)).__class__(
                           **{**vars(plan), "lookup_follows": False})))
    wide_blocks = [e for e in wide if isinstance(e, BlockEvent)]
    assert any(len(b.drafted) > a.accepted + 1 for a, b in zip(wide_blocks, wide_blocks[1:]) if a.drafted)
