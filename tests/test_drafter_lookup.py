"""Which AR model a drafter belongs to: the exact fingerprint, or its embedding probe for quantized copies.

A drafter trained on one copy of a model (a Q4 GGUF dequantized, say) is found for the model's other
copies (the same weights, a bf16 copy, a 4-bit-rounded one whose sign hash differs) and for nothing
else (another model of the same shape, another shape, a vocabulary more than one row apart)."""

import copy
import json

import pytest
import torch

from nbdiff.drafter import DrafterConfig, fingerprint, load_drafter, save_drafter
from nbdiff.drafter.config import PROBE_MATCH, PROBE_ROWS, probe_similarity, weight_probe
from nbdiff.drafter.folder import SECTION, check_pair, shipped_drafter
from nbdiff.errors import NBDiffError
from nbdiff.testing import random_drafter, tiny_model

MASK = 383


def rounded_4bit(weight: torch.Tensor) -> torch.Tensor:
    """Q4-style copy: blocks of 32 along each row, scaled by their largest |w|, rounded to -7..7.
    Small weights round to 0, so some positive ones lose their sign."""
    blocks = weight.reshape(weight.shape[0], -1, 32)  # [V, H/32, 32]
    scale = blocks.abs().amax(-1, keepdim=True) / 7
    return (torch.round(blocks / scale).clamp(-7, 7) * scale).reshape(weight.shape)


def q4_copy(model):
    """The model with its embedding and LM head rounded to 4 bits (the rest as it is)."""
    quantized = copy.deepcopy(model)
    with torch.no_grad():
        for module in (quantized.get_input_embeddings(), quantized.get_output_embeddings()):
            module.weight.copy_(rounded_4bit(module.weight))
    return quantized


def with_rows(model, rows: int):
    """The model with its vocabulary grown to `rows` (new rows at the end, as a converted mask token's)."""
    grown = copy.deepcopy(model)
    grown.resize_token_embeddings(rows)
    return grown


@pytest.fixture(scope="module")
def ar():
    return tiny_model("llama")


@pytest.fixture
def registry(tmp_path, ar):
    """A registry holding one drafter, trained (here: made) for `ar`."""
    folder = tmp_path / "registry"
    save_drafter(random_drafter(ar, MASK, block_size=4), folder / "mine")
    return folder


def test_the_probe_is_a_few_rows_kept_small_and_read_back(ar):
    c = DrafterConfig.for_target(ar, block_size=4, mask_token_id=MASK)
    probe = c.target_probe
    assert len(probe["rows"]) == PROBE_ROWS and probe["rows"][0] == 0 and max(probe["rows"]) < 384
    assert probe["column_step"] == 1  # 64 wide: every column
    assert DrafterConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    assert probe_similarity(probe, ar) == pytest.approx(1.0, abs=1e-4)  # bf16 storage costs ~nothing
    wide = tiny_model("llama", hidden_size=896, intermediate_size=32, num_hidden_layers=1)
    stored = weight_probe(wide)  # Qwen2.5-0.5B's width: every 4th column, under 10 KB in config.json
    assert stored["column_step"] == 4 and len(json.dumps(stored)) < 10_000
    damaged = dict(probe, bf16=probe["bf16"][:-8])
    with pytest.raises(NBDiffError, match="target_probe"):
        DrafterConfig.from_dict(dict(c.to_dict(), target_probe=damaged))


def test_a_drafter_is_found_for_copies_of_its_model_and_for_nothing_else(ar, registry):
    q4, bf16 = q4_copy(ar), copy.deepcopy(ar).to(torch.bfloat16)
    assert fingerprint(q4) != fingerprint(ar)  # the sign hash alone misses the quantized copy
    assert fingerprint(bf16) == fingerprint(ar)
    mine = registry / "mine"
    assert shipped_drafter(ar, registry) == mine  # (a) the same model
    assert shipped_drafter(q4, registry) == mine  # (b) a 4-bit copy, by its embedding rows
    assert shipped_drafter(bf16, registry) == mine  # (c) a bf16 copy
    assert shipped_drafter(with_rows(ar, 385), registry) == mine  # a mask token's row added
    other = tiny_model("llama", seed=1)
    assert shipped_drafter(other, registry) is None  # (d) same shape, other weights
    assert shipped_drafter(q4_copy(other), registry) is None
    for shape in (dict(hidden_size=96), dict(num_hidden_layers=3)):  # (e) other shapes
        assert shipped_drafter(tiny_model("llama", **shape), registry) is None
    assert shipped_drafter(tiny_model("mistral"), registry) is None  # another architecture
    assert shipped_drafter(with_rows(ar, 386), registry) is None  # another vocabulary, though the rows agree

    config = DrafterConfig.from_dict(json.loads((mine / "config.json").read_text())[SECTION])
    assert check_pair(config, ar) == "fingerprint" and check_pair(config, bf16) == "fingerprint"
    assert check_pair(config, q4) == "probe"
    assert PROBE_MATCH <= probe_similarity(config.target_probe, q4) < 0.999  # measured: 0.995
    assert abs(probe_similarity(config.target_probe, other)) < 0.3  # measured: about 0.0


def test_an_exact_fingerprint_match_beats_an_earlier_probe_match(ar, registry):
    q4 = q4_copy(ar)
    save_drafter(random_drafter(q4, MASK, block_size=8), registry / "a-q4")  # first in name order
    assert shipped_drafter(ar, registry) == registry / "mine"
    assert shipped_drafter(q4, registry) == registry / "a-q4"
    assert shipped_drafter(copy.deepcopy(ar).to(torch.bfloat16), registry) == registry / "mine"


def test_a_folder_written_before_the_probe_matches_by_fingerprint_only(ar, registry):
    path = registry / "mine" / "config.json"
    data = json.loads(path.read_text())
    del data[SECTION]["target_probe"]
    path.write_text(json.dumps(data))
    assert shipped_drafter(ar, registry) == registry / "mine"
    assert shipped_drafter(copy.deepcopy(ar).to(torch.bfloat16), registry) == registry / "mine"
    assert shipped_drafter(q4_copy(ar), registry) is None
    with pytest.raises(NBDiffError, match=r"different weights \(fingerprint\)"):
        load_drafter(registry / "mine", q4_copy(ar))


def test_load_drafter_takes_a_quantized_copy_and_refuses_another_model(ar, registry):
    q4 = q4_copy(ar)
    drafter = load_drafter(registry / "mine", q4)
    assert drafter.embed_tokens is q4.get_input_embeddings()  # drafts through the copy's own rows
    with pytest.raises(NBDiffError) as refused:
        load_drafter(registry / "mine", tiny_model("llama", seed=1))
    message = str(refused.value)
    assert "\n" not in message and "does not belong to this model" in message and "cosine" in message


def test_the_registry_is_read_again_when_a_config_changes(ar, registry):
    """Configs are kept between calls (every exact-mode call looks through the registry), never past an edit."""
    path = registry / "mine" / "config.json"
    assert shipped_drafter(ar, registry) == registry / "mine"
    original = path.read_text()
    data = json.loads(original)
    data[SECTION]["target_fingerprint"], data[SECTION]["target_probe"] = None, None  # names no model now
    path.write_text(json.dumps(data))
    assert shipped_drafter(ar, registry) is None
    path.write_text(original)
    assert shipped_drafter(ar, registry) == registry / "mine"
