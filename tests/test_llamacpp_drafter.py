"""benchmarks/llamacpp_drafter.py without llama.cpp: parsing its printed counters, the commands it
builds, and the export of a drafter folder into the layout llama.cpp's converter reads."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("llamacpp_drafter", ROOT / "benchmarks" / "llamacpp_drafter.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)

# The lines the benchmark reads from a real llama-speculative-simple run (the S1 drafter for SmolLM2 on
# the first prompt of the bench suite `code`, docs/benchmarks/llamacpp-drafter.md), as it printed them.
SAMPLE_LOG = """\
0.00.576.698 I common_speculative_impl_draft_dflash: - n_max=7, n_min=0, p_min=0.00
0.00.576.699 I common_speculative_impl_draft_dflash: - block_size=8, mask_token_id=49152, n_extract=5, sample_from_anchor=true
0.04.250.342 I encoded   50 tokens in    0.119 seconds, speed:  419.826 t/s
0.04.250.344 I decoded   97 tokens in    3.555 seconds, speed:   27.289 t/s
0.04.250.344 I n_draft   = 7
0.04.250.344 I n_predict = 97
0.04.250.345 I n_drafted = 473
0.04.250.345 I n_accept  = 27
0.04.250.346 I accept    = 5.708%
"""
# The per-offset statistics line llama.cpp prints at trace verbosity (common_speculative_print_stats's format).
STATS_LINE = ("statistics     draft-dflash: #calls(b,g,a) =    1     70     70, #gen drafts =     70, #acc drafts =    20, "
              "#gen tokens =    473, #acc tokens =    27, #mean acc len = 1.39, #acc rate/pos = (0.286, 0.071, 0.029)\n")


def test_parse_speculative_reads_the_counters_and_derives_tokens_per_verify():
    got = bench.parse_speculative(SAMPLE_LOG)
    assert (got["n_draft"], got["n_predict"], got["n_drafted"], got["n_accept"]) == (7, 97, 473, 27)
    assert got["verifies"] == 97 - 27  # each verify pass gives its accepted drafts plus one token
    assert got["tokens_per_verify"] == pytest.approx(97 / 70, abs=1e-3)
    assert (got["prompt_tokens"], got["decoded"], got["tokens_per_s"]) == (50, 97, 27.289)
    assert (got["block_size"], got["mask_token_id"], got["n_extract"]) == (8, 49152, 5)
    assert "accept_rate_per_pos" not in got  # printed at trace verbosity only
    assert bench.parse_speculative(SAMPLE_LOG + STATS_LINE)["accept_rate_per_pos"] == [0.286, 0.071, 0.029]


def test_parse_speculative_refuses_a_run_that_did_not_finish():
    with pytest.raises(ValueError, match="n_accept"):
        bench.parse_speculative(SAMPLE_LOG.split("I n_accept")[0])


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


def test_export_errors_end_the_script_with_one_line(tmp_path):
    # the export itself is nbdiff.drafter.export (tests/test_export_drafter.py); the script turns its errors into an exit
    with pytest.raises(SystemExit, match="unknown vocabulary"):
        bench.export_for_llamacpp(tmp_path, tmp_path, tmp_path / "out", vocab="some")


def test_parse_drafts_reads_each_verify_of_a_debug_log():
    # The format of a `-lv 5` run: the first five lines from a real one (an untrained SmolLM2 drafter),
    # the second draft edited so that the target keeps one of its tokens.
    log = """\
0.01.980.018 D  - seq_id 0, draft candidate   0, pos   0:   3427 (   0.605) ' strugg'
0.01.984.626 D  - seq_id 0, draft candidate   1, pos   0:      6 (   0.167) '<filename>'
0.01.984.657 D  - seq_id 0, draft candidate   0, pos   1:   3427 (   0.541) ' strugg'
0.01.984.824 D spec common_specu: called impl draft-dflash, hist size = 48, call_count = 1, gen = 7
0.02.248.619 D accepted 0/7 draft tokens, the last target token is: (198)
0.02.259.566 D  - seq_id 0, draft candidate   0, pos   0:   3427 (   0.585) ' strugg'
0.02.259.606 D  - seq_id 0, draft candidate   1, pos   0:   3322 (   0.111) ' thous'
0.02.259.624 D  - seq_id 0, draft candidate   0, pos   1:    198 (   0.589) ' strugg'
0.02.300.000 D accepted 1/7 draft tokens, the last target token is: (5)
"""
    assert bench.parse_drafts(log) == [{"draft": [3427, 3427], "accepted": 0}, {"draft": [3427, 198], "accepted": 1}]
