"""The trained drafter's network and folder: shapes, what is saved, the mask, a mismatched pair refused."""

import contextlib
import json

import pytest
import torch

from nbdiff import cpu_kernel
from nbdiff.drafter import Drafter, DrafterConfig, FeatureCache, fingerprint, load_drafter, new_drafter, save_drafter
from nbdiff.drafter.config import target_hidden_layers
from nbdiff.errors import NBDiffError
from nbdiff.testing import tiny_model

MASK = 383


def randomised(drafter: Drafter, seed: int = 0) -> Drafter:
    """Draft weights far from their init (RMSNorm weights at 1 would hide a wrong norm)."""
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for p in drafter.parameters():
            p.normal_(1.0 if p.dim() == 1 else 0.0, 0.1)
    return drafter


@contextlib.contextmanager
def same_products(loaded, reference):
    """A loaded drafter (fp32, CPU) takes nbdiff's few-row kernel where it is ready: run the reference
    through the same products while comparing bits, then give it back torch's."""
    assert any(type(m) is cpu_kernel.SmallRowsLinear for m in loaded.modules()) == cpu_kernel.status().ready
    cpu_kernel.install(reference)
    try:
        yield
    finally:
        cpu_kernel.uninstall(reference)


@pytest.fixture(scope="module")
def ar():
    return tiny_model("qwen3", num_hidden_layers=4)


@pytest.fixture(scope="module")
def drafter(ar):
    return randomised(new_drafter(DrafterConfig.for_target(ar, block_size=4, mask_token_id=MASK), ar))


def features(ar, drafter, ids):
    with torch.no_grad():  # the AR model runs without gradients; the fusion trains
        out = ar(torch.tensor(ids), output_hidden_states=True)
    return drafter.fuse(drafter.select(out.hidden_states))  # [B, T, H]


def test_dflash_layer_rule_and_config_from_the_target(ar):
    assert target_hidden_layers(36, 5) == [1, 9, 17, 25, 33]  # Qwen3-8B: the layers DFlash's drafter reads
    assert target_hidden_layers(30, 5) == [1, 8, 14, 20, 27]  # SmolLM2-135M
    assert target_hidden_layers(4, 5) == [0, 1, 2, 3] and target_hidden_layers(30, 1) == [15]
    c = DrafterConfig.for_target(ar, num_hidden_layers=1)
    assert (c.hidden_size, c.num_target_layers, c.head_dim, c.target_architecture) == (64, 4, 16, "Qwen3ForCausalLM")
    assert DrafterConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    with pytest.raises(NBDiffError, match="target_layer_ids"):
        DrafterConfig.for_target(ar, target_layer_ids=[7])


def test_shapes_and_only_the_draft_layers_are_trained_or_saved(ar, drafter):
    feats = features(ar, drafter, [[5, 6, 7, 8, 9], [10, 11, 12, 13, 14]])
    assert feats.shape == (2, 5, 64)
    block = torch.tensor([[9, MASK, MASK, MASK], [14, MASK, MASK, MASK]])
    pos = torch.arange(5, 9).expand(2, 4)
    logits = drafter(block, pos, feats, torch.arange(5).expand(2, 5))
    assert logits.shape == (2, 4, ar.config.vocab_size)
    names = set(drafter.state_dict())
    assert "fc.weight" in names and "layers.0.self_attn.k_norm.weight" in names
    assert not any("embed" in n or "lm_head" in n for n in names)
    ar_params = {id(p) for p in ar.parameters()}
    assert not any(id(p) in ar_params for p in drafter.parameters())
    logits.sum().backward()  # gradients reach the draft layers, never the AR's embedding or head
    assert drafter.fc.weight.grad is not None and ar.lm_head.weight.grad is None
    assert ar.get_input_embeddings().weight.grad is None
    drafter.zero_grad(set_to_none=True)


def test_reduced_draft_vocabulary_maps_back_to_ar_ids(ar, drafter):
    vocab = [3, 50, 7, 200, MASK]
    small = new_drafter(DrafterConfig.for_target(ar, block_size=4, mask_token_id=MASK, draft_vocab=vocab), ar)
    small.load_state_dict(drafter.state_dict())
    feats = features(ar, drafter, [[5, 6, 7, 8]])
    args = (torch.tensor([[8, MASK, MASK]]), torch.tensor([[4, 5, 6]]), feats, torch.arange(4)[None])
    full, reduced = drafter(*args), small(*args)
    assert reduced.shape == (1, 3, 5)
    torch.testing.assert_close(reduced, full[..., vocab])  # the same head rows
    assert small.to_full_vocab(torch.tensor([[0, 3, 4]])).tolist() == [[3, 200, MASK]]


def test_save_load_round_trip_in_dflash_layout(ar, drafter, tmp_path):
    save_drafter(drafter, tmp_path / "d")
    config = json.loads((tmp_path / "d" / "config.json").read_text())
    assert config["architectures"] == ["DFlashDraftModel"]
    assert config["dflash_config"] == {"target_layer_ids": [0, 1, 2, 3], "mask_token_id": MASK}
    assert config["nbdiff_drafter"]["target_fingerprint"] == fingerprint(ar)
    loaded = load_drafter(tmp_path / "d", ar)
    feats = features(ar, drafter, [[5, 6, 7]])
    args = (torch.tensor([[7, MASK]]), torch.tensor([[3, 4]]), feats, torch.arange(3)[None])
    with torch.no_grad(), same_products(loaded, drafter):
        torch.testing.assert_close(loaded(*args), drafter(*args), rtol=0, atol=0)
    assert fingerprint(ar.to(torch.bfloat16)) == fingerprint(ar.float())  # dtype does not change it


def test_saving_over_a_drafter_folder_keeps_its_other_files_and_refuses_other_folders(ar, drafter, tmp_path):
    out = save_drafter(drafter, tmp_path / "d")
    (out / "README.md").write_text("how it was made\n")
    other = new_drafter(DrafterConfig.for_target(ar, num_hidden_layers=1, block_size=4, mask_token_id=MASK), ar)  # saved over the first
    save_drafter(other, out)
    assert (out / "README.md").read_text() == "how it was made\n"
    loaded = load_drafter(out, ar)
    assert len(loaded.layers) == 1
    assert sorted(f.name for f in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]  # no temp left
    with pytest.raises(NBDiffError, match="already holds a drafter"):
        save_drafter(drafter, out, replace=False)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("not nbdiff's")
    with pytest.raises(NBDiffError, match="not a drafter folder"):
        save_drafter(drafter, mine)
    assert [f.name for f in mine.iterdir()] == ["notes.txt"]


def test_a_mismatched_pair_is_refused(ar, drafter, tmp_path):
    save_drafter(drafter, tmp_path / "d")
    with pytest.raises(NBDiffError, match="fingerprint"):
        load_drafter(tmp_path / "d", tiny_model("qwen3", seed=1, num_hidden_layers=4))
    with pytest.raises(NBDiffError, match="architecture LlamaForCausalLM"):
        load_drafter(tmp_path / "d", tiny_model("llama", num_hidden_layers=4))
    with pytest.raises(NBDiffError, match="not a drafter folder"):
        load_drafter(tmp_path, ar)
    with pytest.raises(NBDiffError, match="does not exist"):
        load_drafter(tmp_path / "nothing", ar)
    (tmp_path / "d" / "model.safetensors").write_bytes(b"\0" * 16)
    with pytest.raises(NBDiffError, match="corrupt"):
        load_drafter(tmp_path / "d", ar)


def test_many_blocks_under_a_mask_equal_each_block_alone(ar, drafter):
    """Training's shape: several blocks in one forward, each seeing the features strictly before its
    anchor and itself bidirectionally, equal each block drafted alone against only those features."""
    ids = [[5, 17, 33, 80, 12, 7, 99, 40, 41, 300, 12, 9]]
    feats, T, b = features(ar, drafter, ids), 12, 4
    feat_pos = torch.arange(T)[None]
    anchors = [3, 6, 7]
    blocks = torch.tensor([[ids[0][a]] + [MASK] * (b - 1) for a in anchors]).view(1, -1)  # [1, 3b]
    block_pos = torch.tensor([list(range(a, a + b)) for a in anchors]).view(1, -1)
    mask = torch.zeros(1, 1, len(anchors) * b, T + len(anchors) * b, dtype=torch.bool)
    for n, a in enumerate(anchors):
        rows = slice(n * b, (n + 1) * b)
        mask[0, 0, rows, :a] = True  # features of positions < anchor
        mask[0, 0, rows, T + n * b : T + (n + 1) * b] = True  # its own block
    with torch.no_grad():
        together = drafter(blocks, block_pos, feats, feat_pos, attn_mask=mask)
        additive = drafter(blocks, block_pos, feats, feat_pos, attn_mask=torch.zeros(mask.shape).masked_fill(~mask, float("-inf")))
        for n, a in enumerate(anchors):
            alone = drafter(blocks[:, n * b : (n + 1) * b], block_pos[:, n * b : (n + 1) * b], feats[:, :a], feat_pos[:, :a])
            torch.testing.assert_close(together[:, n * b : (n + 1) * b], alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(additive, together, rtol=1e-5, atol=1e-5)


def test_the_feature_cache_equals_features_passed_whole(ar, drafter):
    feats = features(ar, drafter, [[5, 17, 33, 80, 12, 7], [40, 41, 300, 12, 9, 9]])
    pos = torch.arange(6).expand(2, 6)
    block, block_pos = torch.tensor([[7, MASK, MASK], [9, MASK, MASK]]), torch.arange(6, 9).expand(2, 3)
    cache = FeatureCache()
    with torch.no_grad():
        drafter.extend(cache, feats[:, :4], pos[:, :4])  # the prompt
        drafter.extend(cache, feats[:, 4:], pos[:, 4:])  # an accepted block
        torch.testing.assert_close(drafter(block, block_pos, cache=cache), drafter(block, block_pos, feats, pos))
    cache.crop(4)
    assert cache.length == 4 and len(cache.keys) == drafter.config.num_hidden_layers


def test_a_dflash_checkpoint_loads_for_its_ar_model(ar, drafter, tmp_path):
    """DFlash's published layout: config.json without our section (Qwen3-style + dflash_config), same tensors."""
    save_drafter(drafter, tmp_path / "d")
    config = json.loads((tmp_path / "d" / "config.json").read_text())
    del config["nbdiff_drafter"]
    (tmp_path / "d" / "config.json").write_text(json.dumps(config))
    loaded = load_drafter(tmp_path / "d", ar)
    assert loaded.config.target_layer_ids == drafter.config.target_layer_ids and loaded.config.target_fingerprint == ""
    feats = features(ar, drafter, [[5, 6, 7]])
    args = (torch.tensor([[7, MASK]]), torch.tensor([[3, 4]]), feats, torch.arange(3)[None])
    with torch.no_grad(), same_products(loaded, drafter):
        torch.testing.assert_close(loaded(*args), drafter(*args), rtol=0, atol=0)
    with pytest.raises(NBDiffError, match="layers"):
        load_drafter(tmp_path / "d", tiny_model("qwen3", num_hidden_layers=3))
    config["layer_types"] = ["sliding_attention", "full_attention"]
    (tmp_path / "d" / "config.json").write_text(json.dumps(config))
    with pytest.raises(NBDiffError, match="cannot run"):
        load_drafter(tmp_path / "d", ar)


@pytest.mark.skipif(not cpu_kernel.status().ready, reason="needs nbdiff's CPU kernel (a C++ compiler)")
def test_the_draft_vocabulary_head_takes_the_kernel_where_the_ar_head_does(ar, monkeypatch):
    """The head's rows of the draft vocabulary are a weight of their own: with the AR head on the few-row
    kernel, a decoding forward's few rows take it too (about 2.5x faster than torch's product for a
    12k-row head on one core), with the values of torch's product up to rounding."""
    from nbdiff.drafter import model as drafter_model

    vocab = list(range(0, 380, 3))
    small = randomised(new_drafter(DrafterConfig.for_target(ar, block_size=4, mask_token_id=MASK, draft_vocab=vocab), ar))
    h = torch.randn(1, 3, ar.config.hidden_size)
    with torch.no_grad():
        plain = small.head(h)
    calls = []
    real = drafter_model.few_rows_linear
    monkeypatch.setattr(drafter_model, "few_rows_linear", lambda *a: calls.append(a[3]) or real(*a))
    cpu_kernel.install(ar)
    try:
        with torch.no_grad():
            fast = small.head(h)
        with torch.enable_grad():  # training (autograd through h): torch's product
            trained = small.head(h.clone().requires_grad_())
    finally:
        cpu_kernel.uninstall(ar)
    assert calls and calls[0] > 0  # the kernel's instruction set: its product, not torch's
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)
    assert torch.equal(fast.argmax(-1), plain.argmax(-1)) and trained.requires_grad
