"""`nbdiff adapt`: the NBDiff adaptation recipe, with a Rich live panel."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from .console import console, err_console, stdout_is_tty

RECIPE = "Recipe"
CURRICULUM = "Curriculum"
OPTIM = "Optimisation"
MEMORY = "Hardware and memory"
RUN = "Data and bookkeeping"


def _opt(*names: str, help: str, panel: str):
    return typer.Option(*names, help=help, rich_help_panel=panel, show_default=False)


def adapt(
    model: Annotated[Path, typer.Argument(help="Converted model folder (from `nbdiff convert`).", show_default=False)],
    data: Annotated[Optional[list[Path]], _opt("--data", "-d", panel=RUN, help=(
        "Training data; repeat for several: --data a.txt --data chats.jsonl. Text (.txt/.md), .jsonl with "
        "`text` or chat `messages`, .parquet, a `datasets.save_to_disk` folder, or a folder of such files."))] = None,
    out: Annotated[Optional[Path], _opt("--out", "-o", panel=RUN, help="Output folder (final model, metrics.jsonl, checkpoints/).")] = None,
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML recipe; flags given here override it.",
                                                   show_default=False)] = None,
    # recipe
    context_mask: Annotated[Optional[str], _opt("--context-mask", panel=RECIPE, help="causal (NBDiff) | block-causal (BD3-LM baseline). \\[default: causal]")] = None,
    ar_loss_weight: Annotated[Optional[float], _opt("--ar-loss-weight", panel=RECIPE, help="lambda of the AR loss; 0 = off. \\[default: 0.5]")] = None,
    ar_loss_weight_final: Annotated[Optional[float], _opt("--ar-loss-weight-final", panel=RECIPE, help="Anneal lambda towards this as blocks grow (linear in log2 b).")] = None,
    loss_weighting: Annotated[Optional[str], _opt("--loss-weighting", panel=RECIPE, help="none | inverse-t (1/t on L_MDM). \\[default: none]")] = None,
    complementary_masks: Annotated[Optional[bool], _opt("--complementary-masks/--no-complementary-masks", panel=RECIPE,
                                                        help="Also train each row's complementary mask (Fast-dLLM v2).")] = None,
    noise_eps: Annotated[Optional[float], _opt("--noise-eps", panel=RECIPE, help="Smallest noise level t. \\[default: 0.001]")] = None,
    # curriculum
    block_size: Annotated[Optional[int], _opt("--block-size", "-b", panel=CURRICULUM, help="Target block size. \\[default: 32]")] = None,
    curriculum: Annotated[Optional[str], _opt("--curriculum", panel=CURRICULUM, help=(
        "auto (1,2,..,b over --growth-steps) | none (b from the start) | 1,2,4,8 | 0:1,100:2 | formula. \\[default: auto]"))] = None,
    growth_steps: Annotated[Optional[int], _opt("--growth-steps", panel=CURRICULUM, help="Steps to reach the target size. \\[default: 5/8 of --steps]")] = None,
    growth_start: Annotated[Optional[int], _opt("--growth-start", panel=CURRICULUM, help="formula: step s0 where growth starts. \\[default: 0]")] = None,
    growth_interval: Annotated[Optional[int], _opt("--growth-interval", panel=CURRICULUM, help="formula: steps between doublings. \\[default: 100]")] = None,
    # optimisation
    steps: Annotated[Optional[int], _opt("--steps", panel=OPTIM, help="Optimizer steps. \\[default: 100]")] = None,
    seq_len: Annotated[Optional[int], _opt("--seq-len", panel=OPTIM, help="Tokens per packed row. \\[default: 512]")] = None,
    batch_size: Annotated[Optional[int], _opt("--batch-size", panel=OPTIM, help="Rows per micro-batch per process. \\[default: 1]")] = None,
    grad_accum: Annotated[Optional[int], _opt("--grad-accum", panel=OPTIM, help="Micro-batches per step. \\[default: 1]")] = None,
    lr: Annotated[Optional[float], _opt("--lr", panel=OPTIM, help="Peak learning rate (AdamW). \\[default: 1e-5]")] = None,
    min_lr_ratio: Annotated[Optional[float], _opt("--min-lr-ratio", panel=OPTIM, help="Cosine floor as a fraction of --lr. \\[default: 0.1]")] = None,
    warmup_steps: Annotated[Optional[int], _opt("--warmup-steps", panel=OPTIM, help="Linear warmup steps. \\[default: 3% of --steps]")] = None,
    weight_decay: Annotated[Optional[float], _opt("--weight-decay", panel=OPTIM, help="AdamW weight decay. \\[default: 0]")] = None,
    adam_beta1: Annotated[Optional[float], _opt("--adam-beta1", panel=OPTIM, help="AdamW beta1. \\[default: 0.9]")] = None,
    adam_beta2: Annotated[Optional[float], _opt("--adam-beta2", panel=OPTIM, help="AdamW beta2. \\[default: 0.95]")] = None,
    max_grad_norm: Annotated[Optional[float], _opt("--max-grad-norm", panel=OPTIM, help="Gradient clipping; 0 = off. \\[default: 1.0]")] = None,
    seed: Annotated[Optional[int], _opt("--seed", panel=OPTIM, help="Seed of data order, noise and LoRA init. \\[default: 0]")] = None,
    # memory / hardware
    device: Annotated[Optional[str], _opt("--device", panel=MEMORY, help="auto | cpu | cuda. \\[default: auto]")] = None,
    dtype: Annotated[Optional[str], _opt("--dtype", panel=MEMORY, help="auto | fp32 | bf16 weights. \\[default: auto]")] = None,
    gradient_checkpointing: Annotated[Optional[bool], _opt("--gradient-checkpointing/--no-gradient-checkpointing", panel=MEMORY,
                                                           help="Recompute activations to save memory.")] = None,
    attn_implementation: Annotated[Optional[str], _opt("--attn-implementation", panel=MEMORY, help="sdpa | eager. \\[default: sdpa]")] = None,
    lora_rank: Annotated[Optional[int], _opt("--lora-rank", panel=MEMORY, help="LoRA rank; 0 = full fine-tuning. The mask token's embedding row stays trainable.")] = None,
    lora_alpha: Annotated[Optional[float], _opt("--lora-alpha", panel=MEMORY, help="LoRA alpha. \\[default: 2 * rank]")] = None,
    lora_dropout: Annotated[Optional[float], _opt("--lora-dropout", panel=MEMORY, help="LoRA dropout. \\[default: 0]")] = None,
    lora_targets: Annotated[Optional[str], _opt("--lora-targets", panel=MEMORY, help="all-linear | q_proj,v_proj,... \\[default: all-linear]")] = None,
    quantize: Annotated[Optional[str], _opt("--quantize", "-q", panel=MEMORY, help="none | nf4 (QLoRA; needs --lora-rank).")] = None,
    export: Annotated[Optional[str], _opt("--export", panel=MEMORY, help="LoRA output: merged | adapter. \\[default: merged]")] = None,
    # bookkeeping
    eval_every: Annotated[Optional[int], _opt("--eval-every", panel=RUN, help="Evaluate every N steps (0 = before and after). \\[default: 0]")] = None,
    eval_fraction: Annotated[Optional[float], _opt("--eval-fraction", panel=RUN, help="Packed rows held out. \\[default: 0.05]")] = None,
    eval_max_rows: Annotated[Optional[int], _opt("--eval-max-rows", panel=RUN, help="At most this many held-out rows. \\[default: 16]")] = None,
    log_every: Annotated[Optional[int], _opt("--log-every", panel=RUN, help="Metrics line every N steps. \\[default: 1]")] = None,
    keep_checkpoints: Annotated[Optional[int], _opt("--keep-checkpoints", panel=RUN, help="Checkpoints kept. \\[default: 2]")] = None,
    save_every: Annotated[Optional[int], _opt("--save-every", panel=RUN, help="Checkpoint every N steps (always on Ctrl-C). \\[default: 0]")] = None,
    cache_dir: Annotated[Optional[Path], _opt("--cache-dir", panel=RUN, help="Tokenised-data cache. \\[default: OUT/data-cache]")] = None,
    resume: Annotated[Optional[bool], _opt("--resume", panel=RUN, help="Continue from the last checkpoint in --out.")] = None,
    force: Annotated[Optional[bool], _opt("--force", panel=RUN, help="Replace an --out that already holds a run.")] = None,
) -> None:
    """Adapt a converted model with the NBDiff recipe (2L layout, AR loss, block-size curriculum).

    Runs unchanged on one CPU, one GPU, or under `accelerate launch` / `torchrun` (DDP, FSDP).
    Ctrl-C saves a checkpoint; `--resume` continues it exactly.
    """
    values = {k: v for k, v in locals().items() if k not in ("config", "model", "data", "out")}
    from nbdiff.errors import NBDiffError
    from nbdiff.recipe import AdaptConfig
    from nbdiff.trainer import adapt as run_adapt

    values["model"] = str(model)
    if data:
        values["data"] = [str(p) for p in data]
    if out is not None:
        values["out"] = str(out)
    if cache_dir is not None:
        values["cache_dir"] = str(cache_dir)
    cfg = AdaptConfig.build(file=config, **values)
    if not cfg.data:
        raise NBDiffError("no training data", "pass --data FILE (repeat it for several files) or set `data:` in --config")
    if not cfg.out:
        raise NBDiffError("no output folder", "pass --out DIR")

    _quiet_libraries()
    panel = _Panel(cfg)
    import os

    # under torchrun / accelerate launch only rank 0 talks (the trainer creates the process group)
    main = int(os.environ.get("RANK", "0")) == 0
    with panel.live(enabled=main):
        result = run_adapt(cfg, callback=panel.update)
    if not main:
        return
    if result.status == "interrupted":
        err_console.print(f"[yellow]interrupted at step {result.steps}[/]; checkpoint: {result.checkpoint}")
        err_console.print(f"[dim]continue with the same command plus --resume[/]")
        raise typer.Exit(130)
    console.print(f"[green]done[/]: {result.steps} steps, {result.tokens:,} tokens, block size {result.block_size}, "
                  f"{result.seconds:.1f}s -> {result.out_dir}")
    if result.evals:
        console.print(_eval_table(result.evals[0], result.evals[-1]))


def _quiet_libraries() -> None:
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message=".*requires_grad=True to a scalar.*")
    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecation notes of peft/transformers internals


def _fmt_bytes(n: int | None) -> str:
    if not n:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"


def _fmt_time(s: float | None) -> str:
    if s is None:
        return "-"
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _eval_table(first: dict, last: dict):
    from rich.table import Table

    table = Table(title="held-out evaluation", show_edge=False)
    table.add_column("block size", justify="right")
    table.add_column(f"MDM loss @ step {first['step']}", justify="right")
    table.add_column(f"MDM loss @ step {last['step']}", justify="right")
    table.add_column("masked accuracy", justify="right")
    table.add_row("1 (AR loss)", f"{first['ar']:.4f}", f"{last['ar']:.4f}", "-")
    for b, v in last["mdm"].items():
        table.add_row(b, f"{first['mdm'].get(b, float('nan')):.4f}", f"{v:.4f}", f"{last['acc'][b]:.3f}")
    return table


class _Panel:
    """The live view: fed by the trainer's callback records."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.train: dict = {}
        self.eval: dict = {}
        self.info: dict = {}
        self.note = ""
        self._live = None
        self._tty = stdout_is_tty()

    def live(self, enabled: bool = True):
        from contextlib import nullcontext

        from rich.live import Live

        if not enabled or not self._tty:
            return nullcontext()
        self._live = Live(self.render(), console=console, refresh_per_second=4, transient=False)
        return self._live

    def update(self, rec: dict) -> None:
        ev = rec.get("event")
        if ev == "start":
            self.info = rec
            d = rec["data"]
            skipped = d["skipped_empty"] + d["skipped_non_utf8"] + d["skipped_no_field"] + d["skipped_no_assistant"]
            self.note = (f"{d['documents']} documents, {d['tokens']:,} tokens, {rec['train_rows']} train rows, "
                         f"{rec['eval_rows']} held-out rows" + (f", {skipped} skipped" if skipped else ""))
            if not self._tty:
                console.print(f"adapt {self.cfg.model} -> {rec['out']} on {rec['device']} x{rec['world_size']}: {self.note}")
        elif ev == "train":
            self.train = rec
            if not self._tty:
                console.print(f"step {rec['step']}/{rec['steps']} b={rec['block_size']} loss={rec['loss']:.4f} "
                              f"mdm={rec['mdm']:.4f} ar={rec['ar']:.4f} lr={rec['lr']:.2e} tok/s={rec['tokens_per_s']:.0f}")
        elif ev == "eval":
            self.eval = rec
            if not self._tty:
                mdm = " ".join(f"b{b}={v:.3f}" for b, v in rec["mdm"].items())
                console.print(f"eval step {rec['step']}: ar={rec['ar']:.4f} mdm {mdm}")
        elif ev == "checkpoint":
            self.note = f"checkpoint {rec['path']}"
            if not self._tty:
                console.print(f"saved checkpoint {rec['path']}")
        if self._live is not None:
            self._live.update(self.render())

    def render(self):
        from rich.panel import Panel
        from rich.table import Table

        t = self.train
        grid = Table.grid(padding=(0, 2))
        for _ in range(4):
            grid.add_column()
        steps = t.get("steps", self.cfg.steps)
        val = lambda k, f="{:.4f}": f.format(t[k]) if t.get(k) is not None else "-"  # noqa: E731
        grid.add_row("step", f"{t.get('step', 0)}/{steps}", "block size", f"{t.get('block_size', '-')} -> {self.cfg.block_size}")
        grid.add_row("loss", val("loss"), "lr", val("lr", "{:.2e}"))
        grid.add_row("MDM", val("mdm"), "AR", val("ar") + (f" (x{t['ar_weight']:.2f})" if t else ""))
        grid.add_row("tokens/s", val("tokens_per_s", "{:,.0f}"), "tokens", val("tokens", "{:,}"))
        grid.add_row("ETA", _fmt_time(t.get("eta_s")), "peak memory", _fmt_bytes(t.get("peak_memory_bytes")))
        if self.eval:
            mdm = "  ".join(f"b{b} {v:.3f}" for b, v in self.eval["mdm"].items())
            grid.add_row("eval", f"step {self.eval['step']}", "AR / MDM", f"{self.eval['ar']:.3f} / {mdm}")
        body = grid
        if self.note:
            from rich.console import Group
            from rich.text import Text

            body = Group(grid, Text(""), Text(self.note, style="dim"))
        return Panel(body, title=f"nbdiff adapt  [dim]{time.strftime('%H:%M:%S')}[/]", border_style="cyan")
