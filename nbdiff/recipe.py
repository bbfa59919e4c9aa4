"""The adaptation recipe: every setting of `nbdiff adapt`, as one dataclass.

A YAML recipe is a saved `AdaptConfig`. Precedence: command line beats file beats default
(`AdaptConfig.build(file=..., **cli_values)`). Validation lives in `__post_init__` and names the
offending flag. `RESUME_SAFE` lists the fields a resumed run may change; any other difference is
refused by `--resume` (see `differences`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import NBDiffError
from .settings import CONTEXT_MASKS, check_block_size

WEIGHTINGS = ("none", "inverse-t")
QUANTIZE = ("none", "nf4")
EXPORTS = ("merged", "adapter")
DTYPES = ("auto", "fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")

# Fields a resumed run may change without breaking exact continuation.
RESUME_SAFE = frozenset(
    {"resume", "force", "eval_every", "save_every", "keep_checkpoints", "log_every", "export", "cache_dir"}
)


@dataclass
class AdaptConfig:
    """Everything `nbdiff adapt` needs. Field name = flag name with '-' for '_'."""

    model: str = ""
    """Converted model folder (run `nbdiff convert` first)."""
    data: list[str] = field(default_factory=list)
    """Training data: files (.txt/.md, .jsonl, .parquet) or folders (a saved HF dataset, or files inside)."""
    out: str = ""
    """Output folder: final model, metrics.jsonl, recipe.yaml, checkpoints/."""

    # --- recipe (the paper's ablations are one flag each)
    context_mask: str = "causal"
    """Clean-copy attention: 'causal' (NBDiff M_CC) or 'block-causal' (BD3-LM baseline)."""
    ar_loss_weight: float = 0.5
    """lambda in L = L_MDM + lambda * L_AR (0 turns the AR loss off)."""
    ar_loss_weight_final: float | None = None
    """If set, lambda moves linearly in log2(block size) from --ar-loss-weight (b=1) to this (final b)."""
    loss_weighting: str = "none"
    """L_MDM weighting: 'none' (mean over masked tokens) or 'inverse-t' (ELBO 1/t)."""
    complementary_masks: bool = False
    """Also train each row's complementary mask (Fast-dLLM v2); doubles the noised rows."""
    noise_eps: float = 1e-3
    """Smallest noise level: t ~ U[eps, 1] per block."""

    # --- curriculum
    block_size: int = 32
    """Target block size (power of two)."""
    curriculum: str = "auto"
    """'auto' (1,2,4,..,block size over --growth-steps), 'none', '1,2,4,...', 'step:size,...' or 'formula'."""
    growth_steps: int | None = None
    """Steps over which a list curriculum grows (default: 5/8 of --steps, as in the paper's ablations)."""
    growth_start: int = 0
    """'formula' curriculum: step s0 at which the block size starts to grow."""
    growth_interval: int = 100
    """'formula' curriculum: steps between doublings (delta)."""

    # --- optimisation
    steps: int = 100
    """Optimizer steps."""
    seq_len: int = 512
    """Tokens per packed row (a multiple of the final block size)."""
    batch_size: int = 1
    """Rows per micro-batch on each process."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    lr: float = 1e-5
    """Peak learning rate (AdamW)."""
    min_lr_ratio: float = 0.1
    """The cosine decays to lr * this."""
    warmup_steps: int | None = None
    """Linear warmup steps (default: 3% of --steps)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.95
    """AdamW beta2."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0 = off)."""
    seed: int = 0
    """Seed of the data order, the noise and the initialisation of LoRA."""

    # --- hardware and memory
    device: str = "auto"
    """'auto', 'cpu' or 'cuda' (under accelerate/torchrun the launcher decides)."""
    dtype: str = "auto"
    """Weight dtype: auto = fp32 master weights (bf16 autocast on GPU); bf16 for LoRA on GPU."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""
    attn_implementation: str = "sdpa"
    """'sdpa' or 'eager' (the 2L mask needs one of these)."""
    lora_rank: int = 0
    """LoRA rank (0 = full fine-tuning). The mask token's embedding row stays trainable."""
    lora_alpha: float | None = None
    """LoRA alpha (default: 2 * rank)."""
    lora_dropout: float = 0.0
    """LoRA dropout."""
    lora_targets: str = "all-linear"
    """Modules LoRA wraps: 'all-linear' or comma-separated names (q_proj,v_proj)."""
    quantize: str = "none"
    """'nf4' loads the base weights in 4 bits (QLoRA; needs --lora-rank)."""
    export: str = "merged"
    """LoRA output: 'merged' weights (loadable by chat) or the 'adapter' alone."""

    # --- data
    eval_fraction: float = 0.05
    """Fraction of packed rows held out for evaluation (0 = none)."""
    eval_max_rows: int = 16
    """At most this many held-out rows."""
    cache_dir: str | None = None
    """Where tokenised data is cached (default: OUT/data-cache)."""

    # --- bookkeeping
    eval_every: int = 0
    """Evaluate every N steps (0 = only before and after training)."""
    save_every: int = 0
    """Checkpoint every N steps (0 = only at the end and on Ctrl-C)."""
    keep_checkpoints: int = 2
    """Keep this many most recent checkpoints."""
    log_every: int = 1
    """Write a metrics line every N steps."""
    resume: bool = False
    """Continue from the last checkpoint in --out (settings must match)."""
    force: bool = False
    """Start over in an --out that already holds a run."""

    def __post_init__(self) -> None:
        if isinstance(self.data, (str, Path)):
            self.data = [str(self.data)]
        self.data = [str(p) for p in self.data]
        self.model, self.out = str(self.model), str(self.out)
        if self.cache_dir is not None:
            self.cache_dir = str(self.cache_dir)
        _choice(self.context_mask, CONTEXT_MASKS, "--context-mask")
        _choice(self.loss_weighting, WEIGHTINGS, "--loss-weighting")
        _choice(self.quantize, QUANTIZE, "--quantize")
        _choice(self.export, EXPORTS, "--export")
        _choice(self.dtype, DTYPES, "--dtype")
        _choice(self.device, DEVICES, "--device")
        _choice(self.attn_implementation, ("sdpa", "eager"), "--attn-implementation")
        check_block_size(self.block_size, "--block-size")
        _at_least(self.ar_loss_weight, 0.0, "--ar-loss-weight")
        if self.ar_loss_weight_final is not None:
            _at_least(self.ar_loss_weight_final, 0.0, "--ar-loss-weight-final")
        if not 0.0 < self.noise_eps <= 1.0:
            raise NBDiffError(f"--noise-eps must be in (0, 1], got {self.noise_eps}")
        for flag, value in (("--steps", self.steps), ("--seq-len", self.seq_len), ("--batch-size", self.batch_size),
                            ("--grad-accum", self.grad_accum), ("--growth-interval", self.growth_interval),
                            ("--log-every", self.log_every), ("--keep-checkpoints", self.keep_checkpoints)):
            _int_at_least(value, 1, flag)
        for flag, value in (("--eval-every", self.eval_every), ("--save-every", self.save_every),
                            ("--growth-start", self.growth_start), ("--lora-rank", self.lora_rank),
                            ("--eval-max-rows", self.eval_max_rows)):
            _int_at_least(value, 0, flag)
        if self.growth_steps is not None:
            _int_at_least(self.growth_steps, 0, "--growth-steps")
        if self.warmup_steps is not None:
            _int_at_least(self.warmup_steps, 0, "--warmup-steps")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise NBDiffError(f"--lr must be a positive number, got {self.lr}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise NBDiffError(f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise NBDiffError(f"--eval-fraction must be in [0, 1), got {self.eval_fraction}")
        _at_least(self.weight_decay, 0.0, "--weight-decay")
        _at_least(self.max_grad_norm, 0.0, "--max-grad-norm")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise NBDiffError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
        if self.quantize != "none" and self.lora_rank == 0:
            raise NBDiffError("--quantize nf4 trains LoRA adapters on frozen 4-bit weights",
                              "add --lora-rank 16 (or another rank)")
        if self.seq_len % self.block_size:
            lo = (self.seq_len // self.block_size) * self.block_size
            hint = f"use --seq-len {lo or self.block_size} or {lo + self.block_size}"
            raise NBDiffError(
                f"--seq-len {self.seq_len} is not a multiple of the final block size {self.block_size}", hint
            )
        self.curriculum_schedule()  # validates --curriculum

    # --- derived values
    @property
    def effective_growth_steps(self) -> int:
        return self.growth_steps if self.growth_steps is not None else (self.steps * 5) // 8

    @property
    def effective_warmup_steps(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else (self.steps * 3) // 100

    def curriculum_schedule(self):
        """The BlockCurriculum this recipe asks for."""
        from .curriculum import BlockCurriculum

        spec = self.curriculum.strip()
        if spec == "formula":
            return BlockCurriculum(b0=1, ratio=2, start=self.growth_start, interval=self.growth_interval,
                                   b_max=self.block_size)
        if spec == "auto":
            sizes = [2**k for k in range(int(math.log2(self.block_size)) + 1)]
            return BlockCurriculum.staged(sizes, self.effective_growth_steps)
        schedule = BlockCurriculum.parse(spec, self.block_size, self.effective_growth_steps)
        if schedule.final_block_size != self.block_size:
            raise NBDiffError(
                f"--curriculum ends at {schedule.final_block_size} but --block-size is {self.block_size}",
                "make the last curriculum size equal the target block size",
            )
        return schedule

    def ar_weight_at(self, block_size: int) -> float:
        """lambda for the current block size (annealed when --ar-loss-weight-final is set)."""
        if self.ar_loss_weight_final is None or self.block_size == 1:
            return self.ar_loss_weight
        frac = math.log2(block_size) / math.log2(self.block_size)
        return self.ar_loss_weight + frac * (self.ar_loss_weight_final - self.ar_loss_weight)

    # --- YAML and precedence
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save_yaml(self, path: str | Path) -> None:
        import yaml

        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False), encoding="utf-8")

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "recipe") -> "AdaptConfig":
        known = {f.name for f in fields(cls)}
        norm = {str(k).replace("-", "_"): v for k, v in data.items()}
        unknown = sorted(k for k in norm if k not in known)
        if unknown:
            raise NBDiffError(f"{source} has unknown settings: {', '.join(unknown)}",
                              "see `nbdiff adapt --help` for the names (use '-' or '_')")
        return cls(**norm)

    @classmethod
    def load_yaml(cls, path: str | Path) -> dict[str, Any]:
        """The raw settings of a YAML recipe (validated when merged by `build`)."""
        import yaml

        path = Path(path)
        if not path.is_file():
            raise NBDiffError(f"recipe {path} not found")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise NBDiffError(f"cannot read recipe {path}: {exc}") from None
        if not isinstance(data, dict):
            raise NBDiffError(f"recipe {path} must be a mapping of settings")
        return {str(k).replace("-", "_"): v for k, v in data.items()}

    @classmethod
    def build(cls, file: str | Path | None = None, **cli: Any) -> "AdaptConfig":
        """Defaults, overridden by the YAML file, overridden by command-line values that are not None."""
        merged: dict[str, Any] = {}
        if file is not None:
            merged.update(cls.load_yaml(file))
        merged.update({k: v for k, v in cli.items() if v is not None})
        return cls.from_dict(merged, source=str(file) if file else "settings")


def differences(old: dict[str, Any], new: "AdaptConfig") -> list[str]:
    """Human-readable 'name: old -> new' for every setting a resume may not change."""
    out = []
    for f in fields(AdaptConfig):
        if f.name in RESUME_SAFE:
            continue
        before, after = old.get(f.name, f.default), getattr(new, f.name)
        if f.name == "data":
            before = [str(Path(p).resolve()) for p in (before or [])]
            after = [str(Path(p).resolve()) for p in after]
        if f.name in ("model", "out"):
            before, after = str(Path(before).resolve()), str(Path(after).resolve())
        if before != after:
            out.append(f"{f.name.replace('_', '-')}: {before!r} -> {after!r}")
    return out


def _choice(value: Any, allowed: tuple[str, ...], flag: str) -> None:
    if value not in allowed:
        raise NBDiffError(f"{flag} must be one of {', '.join(allowed)}, got {value!r}")


def _at_least(value: float, low: float, flag: str) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < low:
        raise NBDiffError(f"{flag} must be a number >= {low}, got {value!r}")


def _int_at_least(value: int, low: int, flag: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise NBDiffError(f"{flag} must be an integer >= {low}, got {value!r}")
