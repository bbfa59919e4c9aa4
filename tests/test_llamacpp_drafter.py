"""benchmarks/llamacpp_drafter.py without llama.cpp: parsing its printed counters, the commands it
builds, and the export of a drafter folder into the layout llama.cpp's converter reads."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("llamacpp_drafter", ROOT / "benchmarks" / "llamacpp_drafter.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)

# The tail of a llama-speculative-simple run with a DFlash drafter (its log lines, as printed; a
# captured sample, shortened to the lines the benchmark reads).
SAMPLE_LOG = """\
common_speculative_impl_draft_dflash: adding speculative implementation 'draft-dflash'
common_speculative_impl_draft_dflash: - n_max=7, n_min=0, p_min=0.00
common_speculative_impl_draft_dflash: - block_size=8, mask_token_id=49152, n_extract=5, sample_from_anchor=true
main: encoded   41 tokens in    0.112 seconds, speed:  366.071 t/s
main: decoded   97 tokens in    3.507 seconds, speed:   27.659 t/s
main:
main: n_draft   = 7
main: n_predict = 97
main: n_drafted = 511
main: n_accept  = 24
main: accept    = 4.697%
main:
main: draft:
statistics     draft-dflash: #calls(b,g,a) =    1     73     73, #gen drafts =     73, #acc drafts =    17, \
#gen tokens =    511, #acc tokens =    24, #mean acc len = 1.33, #acc rate/pos = (0.233, 0.082, 0.014, 0.000, 0.000, 0.000, 0.000)
"""


def test_parse_speculative_reads_the_counters_and_derives_tokens_per_verify():
    got = bench.parse_speculative(SAMPLE_LOG)
    assert (got["n_draft"], got["n_predict"], got["n_drafted"], got["n_accept"]) == (7, 97, 511, 24)
    assert got["verifies"] == 97 - 24  # each verify pass gives its accepted drafts plus one token
    assert got["tokens_per_verify"] == pytest.approx(97 / 73, abs=1e-3)
    assert (got["prompt_tokens"], got["decoded"], got["tokens_per_s"]) == (41, 97, 27.659)
    assert got["accept_rate_per_pos"][:3] == [0.233, 0.082, 0.014] and len(got["accept_rate_per_pos"]) == 7
    assert (got["block_size"], got["mask_token_id"], got["n_extract"]) == (8, 49152, 5)


def test_parse_speculative_refuses_a_run_that_did_not_finish():
    with pytest.raises(ValueError, match="n_accept"):
        bench.parse_speculative(SAMPLE_LOG.split("main: n_accept")[0])


def test_parse_completion_reads_llama_perf_counters():
    log = ("llama_perf_context_print: prompt eval time =      80.00 ms /    41 tokens (    1.95 ms per token)\n"
           "llama_perf_context_print:        eval time =    2000.00 ms /    49 runs   (   40.82 ms per token)\n")
    got = bench.parse_completion(log)
    assert (got["prompt_tokens"], got["decode_runs"], got["tokens_per_s"]) == (41, 49, 24.5)
    with pytest.raises(ValueError):
        bench.parse_completion("no counters here")


def test_reply_text_drops_the_echoed_prompt():
    prompt = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert bench.reply_text(prompt + "Hello there.\n\n", prompt) == "Hello there."
    assert bench.same_greedy_text("def f():\n    return 1", "def f():\n    return 1\n\nprint")
    assert not bench.same_greedy_text("def f(): pass", "def g(): pass")


def test_commands_carry_the_drafting_and_greedy_flags(tmp_path):
    argv = bench.command_speculative(tmp_path, Path("t.gguf"), Path("d.gguf"), "a\\nb", n_max=7, tokens=96, threads=2)
    assert argv[0] == str(tmp_path / "bin" / "llama-speculative-simple")

    def flag(name):
        return argv[argv.index(name) + 1]

    assert flag("-m") == "t.gguf" and flag("-md") == "d.gguf" and flag("--spec-type") == "draft-dflash"
    assert flag("--spec-draft-n-max") == "7" and flag("--temp") == "0" and flag("-n") == "96"
    assert argv[argv.index("-p") + 1] == "a\\nb" and "--no-escape" in argv  # the text goes in unchanged
    plain = bench.command_completion(tmp_path, Path("t.gguf"), "x", tokens=10, threads=2)
    assert "--ignore-eos" in plain and plain[plain.index("-n") + 1] == "10"
    conv = bench.command_convert(tmp_path, Path("drafter"), Path("d.gguf"), Path("model"))
    assert conv[-2:] == ["--target-model-dir", "model"] and conv[conv.index("--outtype") + 1] == "f32"


def _drafter_folder(tmp_path, draft_vocab):
    """A drafter folder and a target folder (tied embeddings) of a few tensors, as the export reads them."""
    from safetensors.torch import save_file

    target = tmp_path / "target"
    target.mkdir()
    head = torch.randn(50, 8)
    save_file({"model.embed_tokens.weight": head}, str(target / "model.safetensors"))
    (target / "config.json").write_text(json.dumps({"tie_word_embeddings": True}))
    drafter = tmp_path / "drafter"
    drafter.mkdir()
    save_file({"fc.weight": torch.randn(8, 16), "norm.weight": torch.ones(8)}, str(drafter / "model.safetensors"))
    config = {"architectures": ["DFlashDraftModel"], "vocab_size": 50, "block_size": 8,
              "dflash_config": {"target_layer_ids": [1, 2], "mask_token_id": 49},
              "nbdiff_drafter": {"draft_vocab": draft_vocab}}
    (drafter / "config.json").write_text(json.dumps(config))
    return drafter, target, head


def test_export_gives_llamacpp_the_draft_vocabulary(tmp_path):
    from safetensors.torch import load_file

    ids = [0, 3, 7, 42]
    drafter, target, head = _drafter_folder(tmp_path, ids)
    out = bench.export_for_llamacpp(drafter, target, tmp_path / "out")
    tensors = load_file(str(out / "model.safetensors"))
    config = json.loads((out / "config.json").read_text())
    assert torch.equal(tensors["lm_head.weight"], head[ids])  # the target head's rows, in draft order
    # llama.cpp's converter turns offsets into target ids as i + d2t[i]
    assert (torch.arange(len(ids)) + tensors["d2t"]).tolist() == ids
    assert config["draft_vocab_size"] == len(ids) and config["dflash_config"]["mask_token_id"] == 49
    assert torch.equal(tensors["fc.weight"], load_file(str(drafter / "model.safetensors"))["fc.weight"])


def test_export_full_vocab_keeps_the_folder_as_it_is(tmp_path):
    from safetensors.torch import load_file

    drafter, target, _ = _drafter_folder(tmp_path, [0, 3])
    out = bench.export_for_llamacpp(drafter, target, tmp_path / "out", vocab="full")
    assert set(load_file(str(out / "model.safetensors"))) == {"fc.weight", "norm.weight"}
    assert json.loads((out / "config.json").read_text())["architectures"] == ["DFlashDraftModel"]
    with pytest.raises(SystemExit):
        bench.export_for_llamacpp(drafter, target, tmp_path / "bad", vocab="some")
