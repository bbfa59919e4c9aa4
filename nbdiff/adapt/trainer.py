"""The NBDiff adaptation loop: `adapt(config, callback) -> AdaptResult`.

Notable features:
- The run is an object (`AdaptRun`) with one method per phase: `setup`, `train_step`, `evaluate`,
  `save`, `export`; `adapt` is the short loop that calls them.
- The loss of one micro-batch is one function, `compute_loss(model, batch, config, block_size) ->
  LossParts`: one forward over `[x_t ; x_0]` (nbdiff.method.layout) with the mask of nbdiff.method.masks, and
  L = L_MDM + lambda * L_AR (nbdiff.method.losses). A new loss term plugs in there (see its docstring);
  the loop, checkpoints and logging do not change.
- Losses are token-weighted over the whole optimizer step (all micro-batches, all processes): the
  token counts are known before the forward and summed across processes, so 2 processes x batch 1
  give the same gradient as 1 process x batch 2 or batch 1 x 2 accumulation steps.
- Noise and data order are functions of (seed, row slot), never of a running generator, so a
  resumed run sees exactly the rows and masks an uninterrupted run would.
- accelerate's Accelerator runs the same code on one CPU, one GPU (bf16 autocast), or many
  processes launched by `accelerate launch` / `torchrun` (DDP or FSDP).
- Checkpoints (nbdiff.adapt.checkpoint) every --save-every steps, on Ctrl-C and at the end (so `--resume
  --steps N` extends a finished run); a NaN loss stops the run before the bad update and keeps the
  last good checkpoint. The output folder is guarded by nbdiff.adapt.run_folder (lock, safe --force).
- It never prints: every record (start, train, eval, checkpoint, done) goes to `callback(dict)` on
  the main process, and train/eval records are also appended to OUT/metrics.jsonl.

From Python:

    from nbdiff.adapt.recipe import AdaptConfig
    from nbdiff.adapt.trainer import adapt

    config = AdaptConfig(model="smollm2-bd", data=["austen.txt"], out="runs/b8", block_size=8,
                         steps=200, seq_len=128, batch_size=4, lr=1e-4, eval_every=50)
    result = adapt(config, callback=lambda rec: print(rec) if rec["event"] == "eval" else None)
    result.evals[0]["mdm"]["8"], result.evals[-1]["mdm"]["8"]   # held-out MDM loss before / after
"""

from __future__ import annotations

import dataclasses
import json
import math
import resource
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from nbdiff.adapt.checkpoint import (Checkpoint, finish_checkpoint, folder_bytes, latest_checkpoint, remove_checkpoints,
                         staging_dir, write_optimizer)
from nbdiff.adapt.data import Dataset, PackedRows, build_dataset, row_index, slot_generator
from nbdiff.errors import NBDiffError
from nbdiff.adapt.evaluation import eval_block_sizes, evaluate
from nbdiff.method.layout import parallel_forward, parallel_losses
from nbdiff.method.losses import LossParts, ar_loss, ar_targets, certainty_loss, combine, mdm_loss
from nbdiff.method.noising import NoisedBatch, block_starts, complementary, noise_blocks
from nbdiff.adapt.recipe import AdaptConfig, differences
from nbdiff.adapt.run_folder import CHECKPOINTS, DATA_CACHE, METRICS, RECIPE, RunFolder
from nbdiff.adapt.train_model import (ModelFolder, adapted_settings, autocast_context, load_model, load_tokenizer,
                          load_trained_weights, make_accelerator, read_model_folder, trainable_names, write_final_model)

Callback = Callable[[dict], None]
__all__ = ["AdaptConfig", "AdaptResult", "AdaptRun", "CHECKPOINTS", "LossParts", "MicroBatch", "adapt",
           "compute_loss", "lr_at", "make_micro_batch"]


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
    """The newest checkpoint (None when there is none, e.g. after --prune-checkpoints)."""
    checkpoint_bytes: int = 0
    """Its size on disk."""
    last: dict = field(default_factory=dict)
    """The last train record."""
    evals: list[dict] = field(default_factory=list)
    """Every evaluation of the run, those of earlier sessions of a resumed run included."""
    warnings: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- schedules and batches


def lr_at(config: AdaptConfig, step: int) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then cosine to lr * min_lr_ratio."""
    warm = config.effective_warmup_steps
    if step < warm:
        return config.lr * (step + 1) / warm
    progress = (step - warm) / max(1, config.effective_schedule_steps - warm)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return config.lr * (config.min_lr_ratio + (1.0 - config.min_lr_ratio) * cosine)


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
    shares: dict[str, float] = field(default_factory=dict)
    """Per loss term: this micro-batch's tokens / the step's tokens (all micro-batches, all processes)."""

    def mdm_denominator(self, weighting: str) -> int:
        # mdm_loss averages over masked tokens ('none') or divides by eligible tokens ('inverse-t'),
        # both over target positions 1..L-1 (position 0 has no logit before it)
        src = self.masked if weighting == "none" else self.eligible
        return int(src[:, 1:].sum())

    def token_counts(self, config: AdaptConfig) -> dict[str, int]:
        """The denominator of each loss term's mean in this micro-batch (the step turns them into `shares`)."""
        return {"mdm": self.mdm_denominator(config.loss_weighting), "ar": int(self.ar_target[:, 1:].sum())}

    def to(self, device) -> "MicroBatch":
        tensors = {f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)
                   if isinstance(getattr(self, f.name), torch.Tensor)}
        return dataclasses.replace(self, **tensors)


def make_micro_batch(rows: PackedRows, slots: list[int], config: AdaptConfig, block_size: int,
                     mask_token_id: int) -> MicroBatch:
    """Rows of the given stream slots, each noised with its slot's own generator."""
    n = len(rows)
    idx = [row_index(s, n, config.seed) for s in slots]
    ids, pos, docs, trainable = rows.input_ids[idx], rows.position_ids[idx], rows.doc_ids[idx], rows.trainable[idx]
    views = []
    for j, slot in enumerate(slots):
        sl = slice(j, j + 1)
        views.append(noise_blocks(ids[sl], pos[sl], docs[sl], block_size, mask_token_id, eps=config.noise_eps,
                                  maskable=trainable[sl], generator=slot_generator(config.seed, slot)))
    x_t = torch.cat([v.x_t for v in views])
    masked = torch.cat([v.masked for v in views])
    t = torch.cat([v.t for v in views])
    if config.complementary_masks:
        comp = complementary(NoisedBatch(x_t=x_t, masked=masked, t=t), ids, pos, block_size, mask_token_id,
                             maskable=trainable)
        x_t, masked, t = torch.cat([x_t, comp.x_t]), torch.cat([masked, comp.masked]), torch.cat([t, comp.t])
        ids, pos, docs, trainable = (torch.cat([a, a]) for a in (ids, pos, docs, trainable))
    eligible = trainable & ~block_starts(pos, block_size)
    ar_target = ar_targets(trainable, pos, block_size, config.context_mask)
    real = int((rows.doc_ids[idx] >= 0).sum())
    return MicroBatch(x_t, ids, pos, docs, masked, t, eligible, ar_target, real)


# ----------------------------------------------------------------------------- the loss boundary


def compute_loss(model, batch: MicroBatch, config: AdaptConfig, block_size: int) -> LossParts:
    """The loss of one micro-batch, already weighted by its share of the optimizer step.

    This is the one place the training objective lives: L = L_MDM + lambda(b) * L_AR over one
    forward of the 2L layout. `LossParts.total` is what backward() sees; `mdm` and `ar` are logged
    (summed over micro-batches and processes they give the step's token-weighted means).

    To add a loss term: compute it here from the same forward, scale it by its token share
    (add its denominator to `MicroBatch.token_counts`, read `batch.shares[name]`), add it to
    `total` with its weight, and put the weighted value in `LossParts.extra[name]`: the train
    record then shows it under that name. The loop, checkpoints and logging stay as they are.
    Called inside the step's autocast context.
    """
    if config.certainty_weight > 0:  # certainty forcing reads full noised logits
        noised, clean = parallel_forward(model, batch.x_t, batch.x_0, batch.position_ids, batch.doc_ids, block_size,
                                         config.context_mask)
        mdm, n_masked, correct = mdm_loss(noised, batch.x_0, batch.masked, batch.t, config.loss_weighting,
                                          batch.eligible)
        ar, n_ar = ar_loss(clean, batch.x_0, batch.ar_target)
    else:  # hidden states, and the LM head only at the rows the two losses read (no [B, 2L, V] logits)
        parts = parallel_losses(model, batch.x_t, batch.x_0, batch.position_ids, batch.doc_ids, batch.masked,
                                batch.t, batch.ar_target, block_size, config.context_mask, config.loss_weighting,
                                batch.eligible)
        mdm, n_masked, correct, ar, n_ar = parts.mdm, parts.mdm_tokens, parts.mdm_correct, parts.ar, parts.ar_tokens
    mdm, ar = mdm * batch.shares.get("mdm", 1.0), ar * batch.shares.get("ar", 1.0)
    total, extra = combine(mdm, ar, config.ar_weight_at(block_size)), {}
    if config.certainty_weight > 0:  # per masked token, like L_MDM, so it shares L_MDM's token share
        extra["certainty"] = config.certainty_weight * batch.shares.get("mdm", 1.0) * certainty_loss(
            noised, batch.x_0, batch.masked, config.certainty_temperature)
        total = total + extra["certainty"]
    return LossParts(total=total, mdm=mdm, ar=ar, mdm_tokens=n_masked, ar_tokens=n_ar, mdm_correct=correct,
                     extra=extra)


# ----------------------------------------------------------------------------- the run


class AdaptRun:
    """One adaptation run: `setup()` once, `train_step()` per optimizer step, `evaluate()`, `save()`, `export()`.

    The state (step, tokens, the newest checkpoint, evaluations) lives on the object, so each
    phase is a small method. `adapt()` is the loop that calls them in order.
    """

    def __init__(self, config: AdaptConfig, callback: Callback | None = None):
        self.config = config
        self.callback = callback
        self.started = time.perf_counter()
        self.step = 0
        self.tokens = 0
        self.block = 1
        self.start_step = 0
        self.evals: list[dict] = []
        self.last: dict = {}
        self.warnings: list[str] = []
        self.checkpoint: Path | None = None
        self.saved_at = -1
        self.folder: RunFolder | None = None
        self.acc = None
        self._loop_start = time.perf_counter()
        self._window = (self._loop_start, 0)  # (start of the logging window, tokens in it)

    # --- records
    @property
    def is_main(self) -> bool:
        return self.acc is None or self.acc.is_main_process

    def emit(self, record: dict, log: bool = False) -> None:
        if not self.is_main:
            return
        if log:
            with (self.folder.dir / METRICS).open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")
        if self.callback is not None:
            self.callback(record)

    # --- setup
    def setup(self) -> None:
        """Check the model folder, take the output folder, read the data, load model and optimizer (resuming if asked)."""
        cfg = self.config
        self.model_folder: ModelFolder = read_model_folder(cfg.model, cfg.seq_len, cfg.block_size)
        self.acc = make_accelerator(cfg)
        self.autocast = autocast_context(cfg, self.acc)
        self.world, self.rank = self.acc.num_processes, self.acc.process_index
        self.folder = RunFolder(Path(cfg.out), self.acc.is_main_process)
        self.folder.open(cfg.resume, cfg.force, Path(cfg.model), [Path(d) for d in cfg.data], self._broadcast)
        try:
            ckpt = self._checkpoint_to_resume() if cfg.resume else None
            if self.is_main:
                from nbdiff.fsutil import atomic_write_text

                atomic_write_text(self.folder.dir / RECIPE, _yaml(self.config))
            self._read_data(ckpt)
            self._load_model(ckpt)
        except BaseException:
            self.folder.abandon(setup_failed=True)
            raise
        self.curriculum = self.config.curriculum_schedule()
        self.rows_per_step = cfg.batch_size * cfg.grad_accum * self.world
        self.block = self.curriculum.block_size_at(max(self.step - 1, 0))
        self._emit_start(ckpt)

    def _broadcast(self, obj):
        if self.acc.num_processes == 1:
            return obj
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([obj], from_process=0)[0]

    def _checkpoint_to_resume(self) -> Checkpoint:
        """The checkpoint --resume continues from; pins the schedule length of the first run."""
        out = self.folder.out
        ckpt = latest_checkpoint(out)
        if ckpt is None:
            raise NBDiffError(f"--resume: {out} holds no checkpoint", "run without --resume to start a new run")
        old = ckpt.state.get("recipe", {})
        if self.config.schedule_steps is None:  # added steps train at the final block size and learning rate
            pinned = old.get("schedule_steps") or old.get("steps") or self.config.steps
            self.config = dataclasses.replace(self.config, schedule_steps=pinned)
        diff = differences(old, self.config)
        if diff:
            raise NBDiffError("--resume with changed settings: " + "; ".join(diff),
                              "use the settings of the interrupted run, or start a new run in another --out")
        if ckpt.step >= self.config.steps:
            raise NBDiffError(f"the checkpoint in {out} is already at step {ckpt.step} of {self.config.steps}",
                              f"pass --steps larger than {ckpt.step} to train on")
        return ckpt

    def _read_data(self, ckpt: Checkpoint | None) -> None:
        cfg = self.config
        self.tokenizer = load_tokenizer(self.model_folder)
        cache_dir = cfg.cache_dir or str(self.folder.dir / DATA_CACHE)
        with self.acc.main_process_first():  # rank 0 tokenises and fills the cache, the others read it
            self.data: Dataset = build_dataset(cfg.data, self.tokenizer, cfg.seq_len, cfg.seed, cfg.eval_fraction,
                                               cfg.eval_max_rows, cache_dir)
        self.fingerprint = _data_fingerprint(self.data)
        if ckpt is not None and ckpt.state.get("data_fingerprint", self.fingerprint) != self.fingerprint:
            raise NBDiffError("--resume: the training data changed since the checkpoint was written",
                              "resume with the same data files, or start a new run in another --out")
        if self.data.train.real_tokens < cfg.seq_len:
            self.warnings.append(
                f"the training data holds {self.data.train.real_tokens} tokens, less than one row of --seq-len "
                f"{cfg.seq_len}: every step trains on the same mostly padded row")

    def _load_model(self, ckpt: Checkpoint | None) -> None:
        cfg, acc = self.config, self.acc
        torch.manual_seed(cfg.seed)  # LoRA initialisation
        if cfg.target == "drafter":  # a new drafter beside the frozen model (nbdiff.drafter.train)
            from nbdiff.drafter.train import training_module

            # the folder as a function: a --force run's staging folder becomes --out at its first checkpoint
            model = training_module(cfg, self.model_folder, acc.device, self.data, lambda: self.folder.dir, self.tokenizer)
        else:
            model = load_model(cfg, self.model_folder, acc.device)
        self.notes: list[str] = list(getattr(model, "nbdiff_notes", []))  # dtype, memory, attention
        self.names = trainable_names(model)
        if not self.names:
            raise NBDiffError("the model has no trainable parameters")
        if ckpt is not None:
            load_trained_weights(model, ckpt.weights(), self.names, ckpt.path)
        self.model = acc.prepare(model)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = acc.prepare(torch.optim.AdamW(self.params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                                       weight_decay=cfg.weight_decay))
        if ckpt is not None:
            self._restore(ckpt)

    def _restore(self, ckpt: Checkpoint) -> None:
        acc = self.acc
        if ckpt.state.get("world_size") != acc.num_processes and _is_fsdp(acc):
            raise NBDiffError(f"--resume: the checkpoint was written by {ckpt.state.get('world_size')} processes, "
                              f"this run has {acc.num_processes}", "FSDP optimizer shards need the same world size")
        opt_state = ckpt.optimizer_state(acc.process_index if _is_fsdp(acc) else 0)
        if opt_state is not None:
            self.optimizer.load_state_dict(opt_state)
        ckpt.restore_rng()
        self.step = self.start_step = ckpt.step
        self.tokens = int(ckpt.state.get("tokens", 0))
        self.saved_at, self.checkpoint = ckpt.step, ckpt.path
        if self.is_main:
            self.evals = _trim_metrics(self.folder.dir / METRICS, ckpt.step)

    def _emit_start(self, ckpt: Checkpoint | None) -> None:
        data = self.data
        self.emit({"event": "start", "step": self.step, "steps": self.config.steps, "resumed": ckpt is not None,
                   "train_rows": len(data.train), "eval_rows": len(data.eval) if data.eval is not None else 0,
                   "seq_len": self.config.seq_len, "world_size": self.world, "rows_per_step": self.rows_per_step,
                   "parameters": sum(p.numel() for p in self.model.parameters()),
                   "trainable_parameters": sum(p.numel() for p in self.params), "device": str(self.acc.device),
                   "data": dict(data.stats.__dict__), "out": str(self.folder.out), "warnings": list(self.warnings),
                   "notes": list(self.notes)})

    # --- one optimizer step
    def train_step(self) -> None:
        """One optimizer step: micro-batches weighted by their tokens, backward through `compute_loss`, update."""
        cfg, acc = self.config, self.acc
        self.block = block = self.curriculum.block_size_at(self.step)
        lr = lr_at(cfg, self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        t0 = time.perf_counter()
        make, loss_of = _objective(cfg)
        micro = [make(self.data.train, self._slots(m), cfg, block, self.model_folder.settings.mask_token_id)
                 for m in range(cfg.grad_accum)]
        step_tokens = self._set_shares(micro)
        logged: dict[str, float] = {}
        weights: dict[str, float] = {}
        masked = torch.zeros(2, dtype=torch.float64)  # masked tokens, masked correct
        for m, mb in enumerate(micro):
            sync = acc.no_sync(self.model) if m < len(micro) - 1 else nullcontext()
            with sync, self.autocast():
                parts = loss_of(self.model, mb.to(acc.device), cfg, block)
                # DDP/FSDP average gradients over processes; * world turns that into the global sum
                loss = parts.total * self.world
            acc.backward(loss)
            for name, value, weight in _terms(parts, cfg.ar_weight_at(block)):
                logged[name] = logged.get(name, 0.0) + float(value.detach())
                weights[name] = weight
            masked += torch.tensor([parts.mdm_tokens, parts.mdm_correct], dtype=torch.float64)
        totals = acc.reduce(torch.tensor([*logged.values(), *masked.tolist()], dtype=torch.float64).to(acc.device),
                            reduction="sum").cpu().tolist()
        logged = dict(zip(logged, totals))
        loss_v = sum(weights[k] * v for k, v in logged.items())
        grad_norm = float(acc.clip_grad_norm_(self.params, cfg.max_grad_norm)) if cfg.max_grad_norm > 0 else None
        if not math.isfinite(loss_v) or (grad_norm is not None and not math.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            where = f"; the last good checkpoint is {self.checkpoint}" if self.checkpoint else ""
            raise NBDiffError(f"the loss became {loss_v} at step {self.step + 1} (block size {block}); training stopped{where}",
                              "lower --lr, or check the data; --resume continues from the last checkpoint")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens += step_tokens
        self._log_step(logged, weights, loss_v, lr, grad_norm, totals[-2:], step_tokens, t0)

    def _slots(self, m: int) -> list[int]:
        """Stream slots of micro-batch m of the current step on this process."""
        bs = self.config.batch_size
        base = self.step * self.rows_per_step + m * self.world * bs + self.rank * bs
        return list(range(base, base + bs))

    def _set_shares(self, micro: list[MicroBatch]) -> int:
        """Give every micro-batch its share of each loss term's tokens in the whole step; returns the step's tokens."""
        names = list(micro[0].token_counts(self.config))
        local = torch.tensor([[*mb.token_counts(self.config).values(), mb.real_tokens] for mb in micro],
                             dtype=torch.float64)  # [M, terms + 1]
        glob = self.acc.reduce(local.sum(0).to(self.acc.device), reduction="sum").cpu()
        for m, mb in enumerate(micro):
            mb.shares = {n: float(local[m, i]) / float(glob[i]) if float(glob[i]) else 0.0 for i, n in enumerate(names)}
        return int(glob[-1])

    def _log_step(self, logged, weights, loss_v, lr, grad_norm, masked, step_tokens, t0) -> None:
        cfg = self.config
        start, tokens = self._window
        self._window = (start, tokens + step_tokens)
        if self.step % cfg.log_every and self.step != cfg.steps:
            return
        now = time.perf_counter()
        n_masked, correct = masked
        rec = {"event": "train", "step": self.step, "steps": cfg.steps, "block_size": self.block, "loss": loss_v}
        rec.update(logged)
        rec.update({f"{k}_weight": w for k, w in weights.items() if k != "mdm"})
        rec.update({"lr": lr, "grad_norm": grad_norm, "masked_tokens": int(n_masked),
                    "masked_accuracy": correct / n_masked if n_masked else None, "tokens": self.tokens,
                    "tokens_per_s": self._window[1] / max(now - start, 1e-9), "step_seconds": now - t0,
                    "elapsed": now - self.started,
                    "eta_s": (now - self._loop_start) / (self.step - self.start_step) * (cfg.steps - self.step),
                    "peak_memory_bytes": peak_memory_bytes(self.acc.device)})
        self._window = (now, 0)
        self.last = rec
        self.emit(rec, log=True)

    # --- evaluation, checkpoints, export
    def evaluate(self) -> dict | None:
        """Held-out MDM/AR losses at every evaluation block size (None without held-out rows)."""
        if self.config.target == "drafter":
            return self._evaluate_drafter()
        if self.data.eval is None:
            return None
        res = evaluate(self.model, self.data.eval, eval_block_sizes(self.config.block_size),
                       self.model_folder.settings.mask_token_id, self.config.context_mask,
                       batch_size=self.config.batch_size, autocast=self.autocast)
        rec = {"event": "eval", "step": self.step, "block_size": self.curriculum.block_size_at(max(self.step - 1, 0)),
               "ar": res["ar"], "mdm": {str(k): v for k, v in res["mdm"].items()},
               "acc": {str(k): v for k, v in res["acc"].items()},
               "mdm_tokens": {str(k): v for k, v in res["mdm_tokens"].items()}, "ar_tokens": res["ar_tokens"]}
        self.evals.append(rec)
        self.emit(rec, log=True)
        return rec

    def _evaluate_drafter(self) -> dict | None:
        from nbdiff.drafter.train import evaluate_drafter, eval_rows

        rows = eval_rows(self.config, self.tokenizer, self.data)
        if rows is None:
            return None
        res = evaluate_drafter(self.model, rows, self.config, self.autocast)
        rec = {"event": "eval", "step": self.step, "block_size": self.config.block_size, **res}
        self.evals.append(rec)
        self.emit(rec, log=True)
        return rec

    def save(self) -> Path | None:
        """A checkpoint of the current step (every process calls it); the first one commits a --force run."""
        acc, step = self.acc, self.step
        if step == self.saved_at or step == 0:
            return self.checkpoint
        state_dict = acc.get_state_dict(self.model)  # collective under FSDP: every rank calls it
        run_dir = self.folder.dir
        if _is_fsdp(acc):
            write_optimizer(staging_dir(run_dir, step), self.optimizer.state_dict(), self.rank)
        acc.wait_for_everyone()
        if acc.is_main_process:
            if not _is_fsdp(acc):
                write_optimizer(staging_dir(run_dir, step), self.optimizer.state_dict())
            wanted = set(self.names)
            state = {"tokens": self.tokens, "block_size": self.curriculum.block_size_at(step - 1),
                     "data_slot": step * self.rows_per_step, "curriculum_step": step, "world_size": self.world,
                     "data_fingerprint": self.fingerprint, "recipe": self.config.to_dict(),
                     "elapsed": time.perf_counter() - self.started}
            finish_checkpoint(run_dir, step, {k: v for k, v in state_dict.items() if k in wanted}, state,
                              keep=self.config.keep_checkpoints)
        acc.wait_for_everyone()
        self.folder.commit()
        self.saved_at = step
        self.checkpoint = self.folder.dir / CHECKPOINTS / _checkpoint_name(step)
        self.emit({"event": "checkpoint", "step": step, "path": str(self.checkpoint)})
        return self.checkpoint

    def export(self) -> None:
        """Write the final model (or adapter) into the run folder."""
        acc = self.acc
        state_dict = acc.get_state_dict(self.model)  # collective under FSDP
        if acc.is_main_process and self.config.target == "drafter":
            from nbdiff.drafter.train import export_drafter

            export_drafter(acc.unwrap_model(self.model), self.folder.dir)
        elif acc.is_main_process:
            settings = adapted_settings(self.model_folder, self.config, self.step, self.tokens, self.block)
            write_final_model(self.folder.dir, acc.unwrap_model(self.model), state_dict, self.tokenizer, self.config,
                              self.model_folder, settings)
        acc.wait_for_everyone()
        self.folder.commit()

    # --- the loop
    def train(self) -> AdaptResult:
        """Train from the current step to --steps; Ctrl-C (KeyboardInterrupt) saves a checkpoint and returns."""
        status = "completed"
        self._loop_start = time.perf_counter()
        self._window = (time.perf_counter(), 0)
        cfg = self.config
        try:
            if self.step == 0:
                self.evaluate()
            self.model.train()
            while self.step < cfg.steps:
                self.train_step()
                if cfg.time_limit and self._broadcast(time.perf_counter() - self._loop_start > 60 * cfg.time_limit):
                    break  # the window is over (rank 0's clock decides): finish as at --steps
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps:
                    self.evaluate()
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.steps:
                    self.save()
        except KeyboardInterrupt:
            self.optimizer.zero_grad(set_to_none=True)
            status = "interrupted"
            self.save()
        if status == "completed":
            self.evaluate()
            self.save()  # the final checkpoint: `--resume --steps N` extends the run
            self.export()
            if cfg.prune_checkpoints and self.is_main:
                remove_checkpoints(self.folder.dir)
                self.checkpoint = None
        return self._finish(status)

    def _finish(self, status: str) -> AdaptResult:
        size = folder_bytes(self.checkpoint) if self.checkpoint is not None and self.is_main else 0
        result = AdaptResult(out_dir=self.folder.out, status=status, steps=self.step, tokens=self.tokens,
                             block_size=self.block, seconds=time.perf_counter() - self.started,
                             checkpoint=self.checkpoint, checkpoint_bytes=size, last=self.last, evals=self.evals,
                             warnings=self.warnings)
        self.emit({"event": "done", "status": status, "step": self.step, "tokens": self.tokens,
                   "block_size": self.block, "seconds": result.seconds, "out": str(self.folder.out),
                   "checkpoint": str(self.checkpoint) if self.checkpoint else None, "checkpoint_bytes": size})
        self.acc.wait_for_everyone()
        return result

    def close(self) -> None:
        """Release the output folder (its lock; an uncommitted --force staging folder is dropped)."""
        if self.folder is not None:
            self.folder.close()


def adapt(config: AdaptConfig, callback: Callback | None = None) -> AdaptResult:
    """Adapt a converted model with the NBDiff recipe; see the module docstring.

    `callback(record)` receives dicts with an "event" key: "start", "train", "eval", "checkpoint",
    "done". Raising KeyboardInterrupt (from the callback or Ctrl-C) saves a checkpoint and returns a
    result with status 'interrupted'. Raises NBDiffError for bad input and for a NaN loss.
    """
    run = AdaptRun(config, callback)
    try:
        run.setup()
        return run.train()
    finally:
        run.close()


# ----------------------------------------------------------------------------- helpers


def _objective(config: AdaptConfig):
    """(micro-batch builder, loss) of the run's target: the NBDiff layout, or a drafter's blocks (nbdiff.drafter)."""
    if config.target == "drafter":
        from nbdiff.drafter.train import drafter_loss, make_draft_batch

        return make_draft_batch, drafter_loss
    return make_micro_batch, compute_loss


def _terms(parts: LossParts, ar_weight: float):
    """(name, weighted value, weight in L) of every logged loss term."""
    yield "mdm", parts.mdm, 1.0
    yield "ar", parts.ar, ar_weight
    for name, value in parts.extra.items():
        yield name, value, 1.0


def _checkpoint_name(step: int) -> str:
    from nbdiff.adapt.checkpoint import checkpoint_name

    return checkpoint_name(step)


def _is_fsdp(acc) -> bool:
    from accelerate.utils import DistributedType

    return acc.distributed_type == DistributedType.FSDP


def _yaml(config: AdaptConfig) -> str:
    import yaml

    return yaml.safe_dump(config.to_dict(), sort_keys=False)


def _data_fingerprint(data: Dataset) -> str:
    """Cheap identity of the packed data (shape and token sums), so --resume can refuse changed data."""
    t = data.train.input_ids
    e = data.eval.input_ids if data.eval is not None else torch.zeros(0, dtype=torch.int64)
    return f"{tuple(t.shape)}:{int(t.sum())}:{int(t[:, ::7].sum())}:{tuple(e.shape)}:{int(e.sum())}"


def _trim_metrics(path: Path, step: int) -> list[dict]:
    """On resume, drop records after the checkpoint's step (they will be written again); returns the evals kept."""
    from nbdiff.fsutil import atomic_write_text

    if not path.is_file():
        return []
    keep, evals = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and rec.get("step", 0) <= step:
            keep.append(line)
            if rec.get("event") == "eval":
                evals.append(rec)
    atomic_write_text(path, "".join(line + "\n" for line in keep))
    return evals
