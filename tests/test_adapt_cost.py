"""Adaptation cost (issue 14): the flex BlockMask equals the dense mask, attention and memory choices."""

import pytest
import torch

from adapt_helpers import data_file, model_dir  # noqa: F401 (fixtures)
from adapt_helpers import tiny_config as recipe
from nbdiff import hardware
from nbdiff.errors import NBDiffError
from nbdiff.method.masks import packed_training_mask, training_mask_mod
from nbdiff.testing import tiny_config, tiny_model


def _packed(L=12):
    pos = torch.tensor([[0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 0, 1], list(range(L))])
    doc = torch.tensor([[0] * 6 + [1] * 4 + [-1] * 2, [0] * L])
    return pos, doc


@pytest.mark.parametrize("context", ["causal", "block-causal"])
@pytest.mark.parametrize("b", [1, 2, 4, 5])
def test_block_mask_rule_equals_dense_mask(context, b):
    """The flex mask_mod, evaluated everywhere, is packed_training_mask (and its clean quadrant)."""
    from torch.nn.attention.flex_attention import create_mask

    pos, doc = _packed()
    L = pos.shape[1]
    dense = packed_training_mask(pos, doc, b, context)
    full = create_mask(training_mask_mod(pos, doc, b, context), 2, 1, 2 * L, 2 * L, device="cpu")[:, 0]
    clean = create_mask(training_mask_mod(pos, doc, b, context, clean_only=True), 2, 1, L, L, device="cpu")[:, 0]
    assert torch.equal(full, dense)
    assert torch.equal(clean, dense[:, L:, L:])


def test_block_mask_skips_forbidden_tiles():
    """With one document of 4 tiles, the noised half never reads later clean tiles: the BlockMask knows."""
    from nbdiff.method.masks import training_block_mask

    L, tile = 512, 128
    pos = torch.arange(L)[None]
    bm = training_block_mask(pos, torch.zeros_like(pos), 8, tile=tile)
    dense = packed_training_mask(pos, torch.zeros_like(pos), 8)[0]
    tiles = dense.reshape(2 * L // tile, tile, 2 * L // tile, tile).any(3).any(1)  # [8, 8] tiles with any True
    assert int(bm.kv_num_blocks.sum() + bm.full_kv_num_blocks.sum()) == int(tiles.sum()) < tiles.numel() // 2


def test_flex_attention_is_chosen_on_cuda_only(monkeypatch):
    import nbdiff.method.attention as attention

    model = tiny_model("llama")
    impl, note = attention.choose_training_attention(model, "cpu")
    assert impl == "sdpa" and "dense" in note
    monkeypatch.setattr(attention, "flex_available", lambda device: True)
    impl, note = attention.choose_training_attention(model, "cuda")
    assert impl == "flex_attention" and model.config._attn_implementation == "flex_attention"
    impl, _ = attention.choose_training_attention(tiny_model("llama"), "cuda", asked="eager")
    assert impl == "sdpa"  # an explicit choice is kept


def test_training_attention_mask_follows_the_model():
    from nbdiff.method.layout import training_attention_mask

    pos, doc = _packed()
    assert training_attention_mask(tiny_model("llama"), pos, doc, 4).shape == (2, 1, 24, 24)
    flex = tiny_model("llama", attn_implementation="flex_attention")
    assert type(training_attention_mask(flex, pos, doc, 4)).__name__ == "BlockMask"


def test_memory_plan_chooses_checkpointing_and_refuses_what_cannot_fit():
    from nbdiff.adapt.memory import GiB, estimate_step_bytes, parse_memory, plan_memory

    cfg = tiny_config("llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30, vocab_size=49152)
    args = (cfg, 135_000_000, 5_000_000, 8, 256)
    full = estimate_step_bytes(*args, checkpointing=False)
    saved = estimate_step_bytes(*args, checkpointing=True)
    assert saved < full and estimate_step_bytes(*args, two_l=False) < full
    assert estimate_step_bytes(*args, compute_dtype=torch.bfloat16) < full
    roomy = plan_memory(*args, "cpu", max_memory=full + GiB)
    assert not roomy.gradient_checkpointing and "checkpointing off" in roomy.note
    tight = plan_memory(*args, "cpu", max_memory=(full + saved) // 2)
    assert tight.gradient_checkpointing and tight.estimate_bytes == saved and "checkpointing on" in tight.note
    with pytest.raises(NBDiffError, match="needs about") as err:
        plan_memory(*args, "cpu", max_memory=saved - 1)
    assert "--batch-size" in err.value.hint
    with pytest.raises(NBDiffError, match="needs about") as err:
        plan_memory(*args, "cpu", checkpointing=False, max_memory=(full + saved) // 2)
    assert "--gradient-checkpointing" in err.value.hint
    assert parse_memory("4G") == 4 * GiB and parse_memory("512MiB") == 512 * 2**20 and parse_memory("auto") is None
    with pytest.raises(NBDiffError, match="--max-memory"):
        parse_memory("lots")


@pytest.mark.parametrize("native", [True, False])
def test_adapt_autocasts_on_cpus_with_native_bf16_only(native, model_dir, data_file, tmp_path, monkeypatch):
    """--dtype auto: bf16 autocast where the CPU has bf16 (detection mocked), plain fp32 elsewhere;
    the start record says which and why, and how memory and attention were chosen."""
    from nbdiff.adapt.trainer import adapt

    monkeypatch.setattr(hardware, "cpu_bf16", lambda: hardware.CpuBf16(native, "mocked CPU"))
    seen = []
    res = adapt(recipe(model_dir, data_file, tmp_path / "o", steps=1, dtype="auto", lora_rank=4),
                callback=seen.append)
    notes = next(r for r in seen if r["event"] == "start")["notes"]
    assert any(("bf16 autocast" in n) == native and "mocked CPU" in n for n in notes if n.startswith("dtype"))
    assert any(n.startswith("memory: about") and "checkpointing off" in n for n in notes)
    assert any(n.startswith("attention: sdpa") for n in notes)
    assert res.status == "completed" and res.last["loss"] == res.last["loss"]  # finite, not NaN


def test_adapt_refuses_a_step_over_max_memory(model_dir, data_file, tmp_path):
    from nbdiff.adapt.trainer import adapt

    with pytest.raises(NBDiffError, match="needs about .* more than --max-memory"):
        adapt(recipe(model_dir, data_file, tmp_path / "o", steps=1, max_memory="100M"))
