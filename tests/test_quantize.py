"""bitsandbytes quantization: nf4/fp4/int8 configs, nf4 decoding on a tiny model, closeness to fp32."""

import pytest
import torch

import nbdiff
from nbdiff.errors import NBDiffError
from nbdiff.quantize import bnb_config, normalize, weight_bytes

from decode_helpers import converted_folder

pytest.importorskip("bitsandbytes")

# bitsandbytes packs 4-bit weights in blocks of 64, so widths are multiples of 64
WIDTHS = dict(hidden_size=128, intermediate_size=256)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return converted_folder(tmp_path_factory.mktemp("quant") / "tiny", "llama", block_size=4, **WIDTHS)


def test_configs():
    assert normalize("none") is None and normalize(None) is None and normalize("NF4") == "nf4"
    nf4 = bnb_config("nf4")
    assert nf4.load_in_4bit and nf4.bnb_4bit_quant_type == "nf4"
    assert bnb_config("fp4").bnb_4bit_quant_type == "fp4"
    assert bnb_config("int8").load_in_8bit
    with pytest.raises(NBDiffError, match="--quantize"):
        normalize("q3")


def test_nf4_generation_runs_and_stays_close_to_fp32(folder):
    fp32, tok = nbdiff.load(folder, device="cpu")
    nf4, _ = nbdiff.load(folder, device="cpu", quantize="nf4")
    assert type(nf4.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    assert weight_bytes(nf4) < 0.6 * weight_bytes(fp32)
    ids = torch.tensor([[5, 17, 33, 80, 12, 7, 99, 40]])
    with torch.no_grad():
        ref = fp32(ids).logits
        got = nf4(ids).logits
    # Tolerance: random small-width weights quantize worse than trained ones; measured here
    # cosine 0.95, relative L2 error 0.33, KL(fp32 || nf4) mean 0.04 / max 0.06 nats. Bounds:
    # cosine > 0.9, relative error < 0.45, mean KL < 0.1 (an unrelated model has cosine near 0).
    cos = torch.nn.functional.cosine_similarity(got.flatten(), ref.flatten(), 0).item()
    rel = ((got - ref).norm() / ref.norm()).item()
    kl = torch.nn.functional.kl_div(got.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    assert cos > 0.9 and rel < 0.45 and kl.mean().item() < 0.1, (cos, rel, kl.mean().item())
    text, final = nbdiff.generate(nf4, tok, "Hello", block_size=4, max_new_tokens=8)
    assert final.new_tokens >= 1 and final.forwards >= 2 and isinstance(text, str)
