"""The NBDiff adaptation loop: `adapt(config, callback) -> AdaptResult`.

Notable features:
- One forward per micro-batch over `[x_t ; x_0]` (nbdiff.layout.parallel_forward) with the mask of
  nbdiff.masks; L = L_MDM + lambda * L_AR (nbdiff.losses), block size from nbdiff.curriculum.
- Losses are token-weighted over the whole optimizer step (all micro-batches, all processes): the
  token counts are known before the forward and summed across processes, so 2 processes x batch 1
  give the same gradient as 1 process x batch 2 or batch 1 x 2 accumulation steps.
- Noise and data order are functions of (seed, row slot), never of a running generator, so a
  resumed run sees exactly the rows and masks an uninterrupted run would.
- accelerate's Accelerator runs the same code on one CPU, one GPU (bf16 autocast), or many
  processes launched by `accelerate launch` / `torchrun` (DDP or FSDP).
- Checkpoints (nbdiff.checkpoint) every --save-every steps and on Ctrl-C; a NaN loss stops the run
  before the bad update and keeps the last good checkpoint.
- LoRA through peft with the mask token's embedding row trainable (`trainable_token_indices`), and
  QLoRA on nf4 weights through bitsandbytes.
- It never prints: every record (start, train, eval, checkpoint, done) goes to `callback(dict)` on
  the main process, and train/eval records are also appended to OUT/metrics.jsonl.

From Python:

    from nbdiff.recipe import AdaptConfig
    from nbdiff.trainer import adapt

    config = AdaptConfig(model="smollm2-bd", data=["austen.txt"], out="runs/b8", block_size=8,
                         steps=200, seq_len=128, batch_size=4, lr=1e-4, eval_every=50)
    result = adapt(config, callback=lambda rec: print(rec) if rec["event"] == "eval" else None)
    result.evals[0]["mdm"]["8"], result.evals[-1]["mdm"]["8"]   # held-out MDM loss before / after
"""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .checkpoint import (CHECKPOINTS, finish_checkpoint, latest_checkpoint, staging_dir, write_optimizer)
from .data import Dataset, PackedRows, build_dataset, row_index
from .errors import NBDiffError
from .evaluation import eval_block_sizes, evaluate
from .layout import parallel_forward
from .losses import ar_loss, ar_targets, mdm_loss
from .noising import block_starts, complementary, noise_blocks
from .recipe import AdaptConfig, differences
from .settings import BlockDiffusionSettings, attach_settings, read_settings

Callback = Callable[[dict], None]
METRICS = "metrics.jsonl"
RECIPE = "recipe.yaml"


@dataclass
class AdaptResult:
    """What a call to `adapt` did."""

    out_dir: Path
    status: str
    """'completed' or 'interrupted' (Ctrl-C; a checkpoint was saved)."""
    steps: int
    """Optimizer steps done in total (resumed runs included)."""
    tokens: int
    """Training tokens seen (real tokens of the clean rows, all processes)."""
    block_size: int
    """Block size of the last step (recorded as adapted_block_size)."""
    seconds: float
    checkpoint: Path | None = None
    last: dict = field(default_factory=dict)
    """The last train record."""
    evals: list[dict] = field(default_factory=list)


# ----------------------------------------------------------------------------- small helpers


def lr_at(config: AdaptConfig, step: int) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then cosine to lr * min_lr_ratio."""
    warm = config.effective_warmup_steps
    if step < warm:
        return config.lr * (step + 1) / warm
    progress = (step - warm) / max(1, config.steps - warm)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return config.lr * (config.min_lr_ratio + (1.0 - config.min_lr_ratio) * cosine)


def slot_generator(seed: int, slot: int) -> torch.Generator:
    """The noise generator of one row slot of the training stream (independent of process layout)."""
    return torch.Generator().manual_seed((seed * 6364136223846793005 + slot * 1442695040888963407 + 1) % 2**63)


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


@dataclass
class MicroBatch:
    """One micro-batch on one process; every tensor [R, L] where R = rows (x2 with complementary masks)."""

    x_t: torch.Tensor
    x_0: torch.Tensor
    position_ids: torch.Tensor
    doc_ids: torch.Tensor
    masked: torch.Tensor
    t: torch.Tensor
    eligible: torch.Tensor
    """May be masked: trainable and not a block start."""
    ar_target: torch.Tensor
    """AR targets: trainable and not a document start."""
    real_tokens: int

    def mdm_denominator(self, weighting: str) -> int:
        # mdm_loss averages over masked tokens ('none') or divides by eligible tokens ('inverse-t'),
        # both over target positions 1..L-1 (position 0 has no logit before it)
        src = self.masked if weighting == "none" else self.eligible
        return int(src[:, 1:].sum())

    def to(self, device) -> "MicroBatch":
        return MicroBatch(*(getattr(self, f).to(device) for f in
                            ("x_t", "x_0", "position_ids", "doc_ids", "masked", "t", "eligible", "ar_target")),
                          real_tokens=self.real_tokens)


def make_micro_batch(rows: PackedRows, slots: list[int], config: AdaptConfig, block_size: int,
                     mask_token_id: int) -> MicroBatch:
    """Rows of the given stream slots, each noised with its slot's own generator."""
    n = len(rows)
    idx = [row_index(s, n, config.seed) for s in slots]
    ids, pos, docs, trainable = rows.input_ids[idx], rows.position_ids[idx], rows.doc_ids[idx], rows.trainable[idx]
    views = []
    for j, slot in enumerate(slots):
        sl = slice(j, j + 1)
        nb = noise_blocks(ids[sl], pos[sl], docs[sl], block_size, mask_token_id, eps=config.noise_eps,
                          maskable=trainable[sl], generator=slot_generator(config.seed, slot))
        views.append(nb)
    x_t = torch.cat([v.x_t for v in views])
    masked = torch.cat([v.masked for v in views])
    t = torch.cat([v.t for v in views])
    if config.complementary_masks:
        comp = complementary(views_as_batch(x_t, masked, t), ids, pos, block_size, mask_token_id, maskable=trainable)
        x_t, masked, t = torch.cat([x_t, comp.x_t]), torch.cat([masked, comp.masked]), torch.cat([t, comp.t])
        ids, pos, docs, trainable = (torch.cat([a, a]) for a in (ids, pos, docs, trainable))
    eligible = trainable & ~block_starts(pos, block_size)
    ar_target = ar_targets(trainable, pos, block_size, config.context_mask)
    real = int((rows.doc_ids[idx] >= 0).sum())
    return MicroBatch(x_t, ids, pos, docs, masked, t, eligible, ar_target, real)


def views_as_batch(x_t, masked, t):
    from .noising import NoisedBatch

    return NoisedBatch(x_t=x_t, masked=masked, t=t)


# ----------------------------------------------------------------------------- setup


def _make_accelerator(config: AdaptConfig):
    from accelerate import Accelerator

    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    cuda = torch.cuda.is_available()
    if config.device == "cuda" and not cuda:
        raise NBDiffError("--device cuda was asked for but no CUDA GPU is visible", "use --device cpu or auto")
    cpu = config.device == "cpu" or not cuda
    kwargs: dict[str, Any] = {"cpu": cpu}
    if "ACCELERATE_MIXED_PRECISION" not in os.environ:  # a launcher's config wins
        kwargs["mixed_precision"] = "no" if cpu or config.dtype == "fp32" else "bf16"
    if launched and cpu:
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")
    return Accelerator(**kwargs)


def _check_model_dir(config: AdaptConfig) -> BlockDiffusionSettings:
    model_dir = Path(config.model)
    if not model_dir.is_dir():
        raise NBDiffError(f"model folder {model_dir} does not exist", "pass a folder written by `nbdiff convert`")
    settings = read_settings(model_dir)
    if settings is None:
        raise NBDiffError(
            f"{model_dir} was never converted to a block-diffusion model (no `nbdiff` section in config.json)",
            f"run `nbdiff convert {model_dir} --out CONVERTED` first, then adapt CONVERTED",
        )
    if Path(config.out).resolve() == model_dir.resolve():
        raise NBDiffError("--out must differ from the model folder", "pass a new folder to --out")
    return settings


def _prepare_out(config: AdaptConfig, is_main: bool):
    """Check the output folder; returns the checkpoint to resume from (or None)."""
    out = Path(config.out)
    has_run = out.is_dir() and any(out.iterdir())
    if config.resume:
        ckpt = latest_checkpoint(out)
        if ckpt is None:
            raise NBDiffError(f"--resume: {out} holds no checkpoint", "run without --resume to start a new run")
        diff = differences(ckpt.state.get("recipe", {}), config)
        if diff:
            raise NBDiffError("--resume with changed settings: " + "; ".join(diff),
                              "use the settings of the interrupted run, or start a new run in another --out")
        if ckpt.step >= config.steps:
            raise NBDiffError(f"the checkpoint in {out} is already at step {ckpt.step} of {config.steps}")
        return ckpt
    if has_run:
        if not config.force:
            hint = "pass --resume to continue it" if (out / CHECKPOINTS).is_dir() else "pass --force to replace it"
            raise NBDiffError(f"output folder {out} is not empty", hint + ", or choose another --out")
        if is_main:
            shutil.rmtree(out)
    return None


def _source_dtype(model_dir: Path) -> torch.dtype:
    cfg = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    name = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    return getattr(torch, str(name), torch.float32)


def _load_model(config: AdaptConfig, settings: BlockDiffusionSettings, device: torch.device):
    from transformers import AutoModelForCausalLM

    from .compat import probe_mask_support

    gpu = device.type == "cuda"
    if config.dtype == "bf16" or (config.dtype == "auto" and gpu and config.lora_rank > 0):
        dtype = torch.bfloat16
    else:
        dtype = torch.float32  # fp32 master weights (bf16 autocast on GPU)
    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": config.attn_implementation}
    if config.quantize == "nf4":
        try:
            import bitsandbytes  # noqa: F401
            from transformers import BitsAndBytesConfig
        except ImportError:
            raise NBDiffError("--quantize nf4 needs bitsandbytes", "pip install bitsandbytes") from None
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if gpu else torch.float32,
        )
        kwargs["device_map"] = {"": (device.index or 0) if gpu else "cpu"}  # this process's GPU under DDP
    model = AutoModelForCausalLM.from_pretrained(config.model, **kwargs)
    probe_mask_support(model.config, config.attn_implementation)
    vocab = model.get_input_embeddings().weight.shape[0]
    if not 0 <= settings.mask_token_id < vocab:
        raise NBDiffError(f"mask token id {settings.mask_token_id} is outside the embedding table ({vocab} rows)",
                          "re-run `nbdiff convert` on the source model")
    model.config.use_cache = False
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if config.lora_rank > 0:
        model = _wrap_lora(model, config, settings)
    return model


def _wrap_lora(model, config: AdaptConfig, settings: BlockDiffusionSettings):
    """LoRA on every linear layer (or --lora-targets); the mask token's input embedding row trains too.

    The mask row is the one embedding the AR model never learnt, so LoRA alone cannot fix it; peft's
    `trainable_token_indices` trains just that row (a [1, hidden] delta) instead of the whole table
    (`modules_to_save` would copy and train all of embed_tokens).
    """
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if config.quantize != "none":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=config.gradient_checkpointing)
    targets: Any = config.lora_targets
    if targets != "all-linear":
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    lora = LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha if config.lora_alpha is not None else 2 * config.lora_rank,
        lora_dropout=config.lora_dropout,
        target_modules=targets,
        trainable_token_indices=[settings.mask_token_id],
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def _trainable_names(model) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


# ----------------------------------------------------------------------------- the run


class _Run:
    """State of one adapt() call (kept on an object so the loop functions stay small)."""

    def __init__(self, config: AdaptConfig, callback: Callback | None):
        self.config = config
        self.callback = callback
        self.out = Path(config.out)
        self.started = time.perf_counter()

    def emit(self, record: dict, log: bool = False) -> None:
        if not self.acc.is_main_process:
            return
        if log:
            with (self.out / METRICS).open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")
        if self.callback is not None:
            self.callback(record)


def adapt(config: AdaptConfig, callback: Callback | None = None) -> AdaptResult:
    """Adapt a converted model with the NBDiff recipe; see the module docstring.

    `callback(record)` receives dicts with an "event" key: "start", "train", "eval", "checkpoint",
    "done". Raising KeyboardInterrupt (from the callback or Ctrl-C) saves a checkpoint and returns a
    result with status 'interrupted'. Raises NBDiffError for bad input and for a NaN loss.
    """
    run = _Run(config, callback)
    settings = _check_model_dir(config)
    acc = run.acc = _make_accelerator(config)
    ckpt = _prepare_out(config, acc.is_main_process)
    acc.wait_for_everyone()
    out = run.out
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        config.save_yaml(out / RECIPE)

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(config.model)
    cache_dir = config.cache_dir or str(out / "data-cache")
    _check_positions(config)
    with acc.main_process_first():  # rank 0 tokenises and fills the cache, the others read it
        data = build_dataset(config.data, tokenizer, config.seq_len, config.seed, config.eval_fraction,
                             config.eval_max_rows, cache_dir)

    fingerprint = _data_fingerprint(data)
    if ckpt is not None and ckpt.state.get("data_fingerprint", fingerprint) != fingerprint:
        raise NBDiffError("--resume: the training data changed since the checkpoint was written",
                          "resume with the same data files, or start a new run in another --out")
    torch.manual_seed(config.seed)  # LoRA initialisation
    model = _load_model(config, settings, acc.device)
    names = _trainable_names(model)
    if not names:
        raise NBDiffError("the model has no trainable parameters")
    if ckpt is not None:
        _load_weights(model, ckpt, names)
    model = acc.prepare(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, betas=(config.adam_beta1, config.adam_beta2),
                                  weight_decay=config.weight_decay)
    optimizer = acc.prepare(optimizer)
    start_step, tokens = 0, 0
    if ckpt is not None:
        if ckpt.state.get("world_size") != acc.num_processes and _is_fsdp(acc):
            raise NBDiffError(f"--resume: the checkpoint was written by {ckpt.state.get('world_size')} processes, "
                              f"this run has {acc.num_processes}", "FSDP optimizer shards need the same world size")
        opt_state = ckpt.optimizer_state(acc.process_index if _is_fsdp(acc) else 0)
        if opt_state is not None:
            optimizer.load_state_dict(opt_state)
        ckpt.restore_rng()
        start_step, tokens = ckpt.step, int(ckpt.state.get("tokens", 0))
    if acc.is_main_process:
        _trim_metrics(out / METRICS, start_step)

    curriculum = config.curriculum_schedule()
    mask_id = settings.mask_token_id
    world, rank = acc.num_processes, acc.process_index
    per_step_rows = config.batch_size * config.grad_accum * world
    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in params)
    run.emit({"event": "start", "step": start_step, "steps": config.steps, "resumed": ckpt is not None,
              "train_rows": len(data.train), "eval_rows": len(data.eval) if data.eval is not None else 0,
              "seq_len": config.seq_len, "world_size": world, "rows_per_step": per_step_rows,
              "parameters": n_params, "trainable_parameters": n_train, "device": str(acc.device),
              "data": dict(data.stats.__dict__), "out": str(out)})

    evals: list[dict] = []
    last: dict = {}
    saved_at = ckpt.step if ckpt is not None else -1
    last_ckpt_path = ckpt.path if ckpt is not None else None
    step = start_step
    block = curriculum.block_size_at(max(step - 1, 0))
    session_start = time.perf_counter()
    window_start, window_tokens = time.perf_counter(), 0

    def do_eval(at_step: int) -> None:
        if data.eval is None:
            return
        sizes = eval_block_sizes(config.block_size)
        res = evaluate(model, data.eval, sizes, mask_id, config.context_mask, batch_size=config.batch_size,
                       autocast=acc.autocast)
        rec = {"event": "eval", "step": at_step, "block_size": curriculum.block_size_at(max(at_step - 1, 0)),
               "ar": res["ar"], "mdm": {str(k): v for k, v in res["mdm"].items()},
               "acc": {str(k): v for k, v in res["acc"].items()}, "mdm_tokens": {str(k): v for k, v in res["mdm_tokens"].items()},
               "ar_tokens": res["ar_tokens"]}
        evals.append(rec)
        run.emit(rec, log=True)

    def save(at_step: int) -> Path | None:
        nonlocal saved_at, last_ckpt_path
        if at_step == saved_at or at_step == 0:
            return last_ckpt_path
        state_dict = acc.get_state_dict(model)  # collective under FSDP: every rank calls it
        staging = staging_dir(out, at_step)
        if _is_fsdp(acc):
            write_optimizer(staging, optimizer.state_dict(), rank)
        acc.wait_for_everyone()
        if acc.is_main_process:
            if not _is_fsdp(acc):
                write_optimizer(staging, optimizer.state_dict())
            wanted = set(names)
            weights = {k: v for k, v in state_dict.items() if k in wanted}
            state = {"tokens": tokens, "block_size": curriculum.block_size_at(at_step - 1),
                     "data_slot": at_step * per_step_rows, "curriculum_step": at_step, "world_size": world,
                     "data_fingerprint": fingerprint,
                     "recipe": config.to_dict(), "elapsed": time.perf_counter() - run.started}
            last_ckpt_path = finish_checkpoint(out, at_step, weights, state, keep=config.keep_checkpoints)
        acc.wait_for_everyone()
        saved_at = at_step
        run.emit({"event": "checkpoint", "step": at_step, "path": str(last_ckpt_path)})
        return last_ckpt_path

    status = "completed"
    try:
        if start_step == 0 and (config.eval_every > 0 or data.eval is not None):
            do_eval(0)
        model.train()
        while step < config.steps:
            block = curriculum.block_size_at(step)
            lam = config.ar_weight_at(block)
            lr = lr_at(config, step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            t0 = time.perf_counter()
            # all micro-batches of the step first: their token counts set each one's share of the loss
            micro = []
            for m in range(config.grad_accum):
                base = step * per_step_rows + m * world * config.batch_size + rank * config.batch_size
                micro.append(make_micro_batch(data.train, list(range(base, base + config.batch_size)), config,
                                              block, mask_id))
            local = torch.tensor([[mb.mdm_denominator(config.loss_weighting), int(mb.ar_target[:, 1:].sum()),
                                   mb.real_tokens] for mb in micro], dtype=torch.float64)
            glob = acc.reduce(local.sum(0).to(acc.device), reduction="sum").cpu()
            mdm_total, ar_total = float(glob[0]), float(glob[1])
            parts = torch.zeros(4, dtype=torch.float64)  # mdm, ar, masked tokens, masked correct
            for m, mb in enumerate(micro):
                mb_dev = mb.to(acc.device)
                sync = acc.no_sync(model) if m < len(micro) - 1 else nullcontext()
                with sync, acc.autocast():
                    noised_logits, clean_logits = parallel_forward(
                        model, mb_dev.x_t, mb_dev.x_0, mb_dev.position_ids, mb_dev.doc_ids, block, config.context_mask)
                    mdm, n_masked, correct = mdm_loss(noised_logits, mb_dev.x_0, mb_dev.masked, mb_dev.t,
                                                      config.loss_weighting, mb_dev.eligible)
                    ar, n_ar = ar_loss(clean_logits, mb_dev.x_0, mb_dev.ar_target)
                    w_mdm = float(local[m, 0]) / mdm_total if mdm_total else 0.0
                    w_ar = float(local[m, 1]) / ar_total if ar_total else 0.0
                    mdm_part, ar_part = mdm * w_mdm, ar * w_ar
                    # DDP/FSDP average gradients over processes; * world turns that into the global sum
                    loss = (mdm_part + lam * ar_part) * world
                acc.backward(loss)
                parts += torch.tensor([float(mdm_part.detach()), float(ar_part.detach()), n_masked, correct], dtype=torch.float64)
            parts = acc.reduce(parts.to(acc.device), reduction="sum").cpu()
            mdm_v, ar_v = float(parts[0]), float(parts[1])
            loss_v = mdm_v + lam * ar_v
            grad_norm = None
            if config.max_grad_norm > 0:
                grad_norm = float(acc.clip_grad_norm_(params, config.max_grad_norm))
            if not math.isfinite(loss_v) or (grad_norm is not None and not math.isfinite(grad_norm)):
                optimizer.zero_grad(set_to_none=True)
                where = f"; the last good checkpoint is {last_ckpt_path}" if last_ckpt_path else ""
                raise NBDiffError(
                    f"the loss became {loss_v} at step {step + 1} (block size {block}); training stopped{where}",
                    "lower --lr, or check the data; --resume continues from the last checkpoint",
                )
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            step_tokens = int(glob[2])
            tokens += step_tokens
            window_tokens += step_tokens
            if step % config.log_every == 0 or step == config.steps:
                now = time.perf_counter()
                per_step = (now - session_start) / (step - start_step)
                last = {"event": "train", "step": step, "steps": config.steps, "block_size": block, "loss": loss_v,
                        "mdm": mdm_v, "ar": ar_v, "ar_weight": lam, "lr": lr, "grad_norm": grad_norm,
                        "masked_tokens": int(parts[2]), "masked_accuracy": float(parts[3] / parts[2]) if parts[2] else None,
                        "tokens": tokens, "tokens_per_s": window_tokens / max(now - window_start, 1e-9),
                        "step_seconds": now - t0, "elapsed": now - run.started,
                        "eta_s": per_step * (config.steps - step),
                        "peak_memory_bytes": peak_memory_bytes(acc.device)}
                window_start, window_tokens = now, 0
                run.emit(last, log=True)
            if config.eval_every and step % config.eval_every == 0 and step < config.steps:
                do_eval(step)
            if config.save_every and step % config.save_every == 0 and step < config.steps:
                save(step)
    except KeyboardInterrupt:
        optimizer.zero_grad(set_to_none=True)
        status = "interrupted"
        save(step)
    result = AdaptResult(out_dir=out, status=status, steps=step, tokens=tokens, block_size=block,
                         seconds=time.perf_counter() - run.started, checkpoint=last_ckpt_path, last=last, evals=evals)
    if status == "completed":
        do_eval(step)
        result.evals = evals
        _export(acc, model, tokenizer, config, settings, result)
    run.emit({"event": "done", "status": status, "step": step, "tokens": tokens, "block_size": block,
              "seconds": result.seconds, "out": str(out), "checkpoint": str(last_ckpt_path) if last_ckpt_path else None})
    acc.wait_for_everyone()
    return result


def _is_fsdp(acc) -> bool:
    from accelerate.utils import DistributedType

    return acc.distributed_type == DistributedType.FSDP


def _data_fingerprint(data: Dataset) -> str:
    """Cheap identity of the packed data (shape and token sums), so --resume can refuse changed data."""
    t = data.train.input_ids
    e = data.eval.input_ids if data.eval is not None else torch.zeros(0, dtype=torch.int64)
    return f"{tuple(t.shape)}:{int(t.sum())}:{int(t[:, ::7].sum())}:{tuple(e.shape)}:{int(e.sum())}"


def _check_positions(config: AdaptConfig) -> None:
    cfg = json.loads((Path(config.model) / "config.json").read_text(encoding="utf-8"))
    max_pos = cfg.get("max_position_embeddings")
    if isinstance(max_pos, int) and config.seq_len > max_pos:
        raise NBDiffError(f"--seq-len {config.seq_len} exceeds the model's context ({max_pos} positions)",
                          f"use --seq-len {max_pos - max_pos % config.block_size} or less")


def _load_weights(model, ckpt, names: list[str]) -> None:
    weights = ckpt.weights()
    missing = [n for n in names if n not in weights]
    if missing:
        raise NBDiffError(f"checkpoint {ckpt.path} lacks {len(missing)} trainable weights (e.g. {missing[0]})",
                          "it was written by a different model or LoRA setup")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n in names:
            params[n].copy_(weights[n].to(params[n].dtype))


def _trim_metrics(path: Path, step: int) -> None:
    """On resume, drop records after the checkpoint's step (they will be written again)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("step", 0) <= step:
            keep.append(line)
    path.write_text("".join(line + "\n" for line in keep), encoding="utf-8")


# ----------------------------------------------------------------------------- export


def _export(acc, model, tokenizer, config: AdaptConfig, settings: BlockDiffusionSettings, result: AdaptResult) -> None:
    """Write the final model into OUT (through OUT/.final-tmp, config.json moved in last)."""
    state_dict = acc.get_state_dict(model)  # collective under FSDP
    if not acc.is_main_process:
        acc.wait_for_everyone()
        return
    out = Path(config.out)
    tmp = out / ".final-tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    new_settings = BlockDiffusionSettings.from_dict(settings.to_dict())
    new_settings.block_size = config.block_size
    new_settings.adapted_block_size = result.block_size
    new_settings.context_mask = config.context_mask
    new_settings.extra = dict(new_settings.extra, adapt={
        "steps": result.steps, "tokens": result.tokens, "context_mask": config.context_mask,
        "ar_loss_weight": config.ar_loss_weight, "curriculum": config.curriculum, "lora_rank": config.lora_rank,
        "from": str(config.model)})
    unwrapped = acc.unwrap_model(model)
    src_dtype = _source_dtype(Path(config.model))
    if config.lora_rank > 0 and config.export == "adapter":
        unwrapped.save_pretrained(tmp)
        (tmp / "nbdiff.json").write_text(json.dumps(new_settings.to_dict(), indent=1), encoding="utf-8")
    else:
        if config.lora_rank > 0:
            final = _merge_lora(unwrapped, config)
            state = final.state_dict()
        else:
            final = unwrapped
            state = state_dict
        state = {k: (v.to(src_dtype) if v.is_floating_point() else v) for k, v in state.items()}
        attach_settings(final.config, new_settings)
        final.config.use_cache = True
        final.save_pretrained(tmp, state_dict=state, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    files = sorted(tmp.iterdir(), key=lambda p: p.name == "config.json")  # config.json last: loadable = complete
    for f in files:
        target = out / f.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(f, target)
    shutil.rmtree(tmp, ignore_errors=True)
    acc.wait_for_everyone()


def _merge_lora(peft_model, config: AdaptConfig):
    """Merged weights: in place for LoRA; for QLoRA the adapter goes onto a full-precision reload of the base."""
    if config.quantize == "none":
        return peft_model.merge_and_unload()
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    adapter = {k: v.detach().float().cpu() for k, v in get_peft_model_state_dict(peft_model).items()}
    base = AutoModelForCausalLM.from_pretrained(config.model, dtype=torch.float32,
                                                attn_implementation=config.attn_implementation)
    fresh = get_peft_model(base, peft_model.peft_config["default"])
    set_peft_model_state_dict(fresh, adapter)
    return fresh.merge_and_unload()
