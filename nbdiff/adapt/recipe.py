"""The adaptation recipe: every setting of `nbdiff adapt`, as one dataclass.

A YAML recipe is a saved `AdaptConfig`. Precedence: command line beats file beats default
(`AdaptConfig.build(file=..., **cli_values)`). Validation lives in `__post_init__` and names the
offending flag: every value has the field's type, and every float is finite. `RESUME_SAFE` lists
the fields a resumed run may change; any other difference is refused by `--resume` (see
`differences`).

The class is also the command line: `nbdiff adapt` makes one flag per field, with the attribute
docstring as help, the `# --- Section` comment above it as help panel (`field_docs`) and the
default shown from here, so a default lives in one place. `CHOICES` holds the allowed values.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from nbdiff.errors import NBDiffError
from nbdiff.method.settings import CONTEXT_MASKS, check_block_size

WEIGHTINGS = ("none", "inverse-t")  # of L_MDM (nbdiff.method.losses): mean over masked tokens, or ELBO 1/t
QUANTIZE = ("none", "nf4")
EXPORTS = ("merged", "adapter")
DTYPES = ("auto", "fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")
ATTENTION = ("sdpa", "eager")
TARGETS = ("model", "drafter")
DRAFTER_INITS = ("random", "copy")

# The allowed values of the fields that take one of a few words (validation and --help read this).
CHOICES: dict[str, tuple[str, ...]] = {
    "context_mask": CONTEXT_MASKS, "loss_weighting": WEIGHTINGS, "quantize": QUANTIZE, "export": EXPORTS,
    "dtype": DTYPES, "device": DEVICES, "attn_implementation": ATTENTION, "target": TARGETS,
    "drafter_init": DRAFTER_INITS,
}

# Fields a resumed run may change without breaking exact continuation. `steps` may change because
# the schedules keep their length (`schedule_steps` is pinned to the checkpoint's on resume).
RESUME_SAFE = frozenset(
    {"resume", "force", "eval_every", "save_every", "keep_checkpoints", "log_every", "export", "cache_dir",
     "steps", "prune_checkpoints", "drafter_eval_data", "time_limit"}
)


@dataclass
class AdaptConfig:
    """Everything `nbdiff adapt` needs. Field name = flag name with '-' for '_'."""

    # --- Data and bookkeeping
    model: str = ""
    """Converted model folder (run `nbdiff convert` first)."""
    data: list[str] = field(default_factory=list)
    """Training data: files (.txt/.md, .jsonl, .parquet) or folders (a saved HF dataset, or files inside)."""
    out: str = ""
    """Output folder: final model, metrics.jsonl, recipe.yaml, checkpoints/."""

    # --- Recipe: the paper's ablations are one flag each
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
    certainty_weight: float = 0.0
    """Certainty forcing (dParallel): weight of the entropy of masked predictions that are already right (0 = off)."""
    certainty_temperature: float = 1.0
    """Temperature of the certainty-forcing entropy (the logits are divided by it)."""

    # --- Curriculum
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

    # --- Optimisation
    steps: int = 100
    """Optimizer steps (with --resume: a larger value extends the run)."""
    schedule_steps: int | None = None
    """Length of the warmup, cosine and curriculum schedules (default: --steps; --resume keeps the first
    run's, so added steps train at the final block size and learning rate)."""
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
    time_limit: float = 0.0
    """Stop training after this many minutes (0 = no limit) and finish as at --steps: evaluate, save,
    export (for a fixed window, e.g. a GPU lease; --steps still sizes the schedules)."""

    # --- Hardware and memory
    device: str = "auto"
    """'auto', 'cpu' or 'cuda' (under accelerate/torchrun the launcher decides)."""
    dtype: str = "auto"
    """auto = fp32 master weights with bf16 autocast on GPUs and on CPUs with native bf16 (LoRA: base in
    bf16); fp32 = no autocast."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory (off: turned on only when a step would not fit)."""
    max_memory: str | None = None
    """Refuse a step whose estimated peak exceeds this (4G, 512M); default: the free memory."""
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

    # --- Drafter: --target drafter trains a small block-diffusion drafter beside the frozen model
    target: str = "model"
    """'model' (the NBDiff adaptation of the model itself) or 'drafter' (a drafter for exact mode; the
    model stays frozen; OUT becomes a drafter folder, nbdiff.drafter)."""
    drafter_layers: int = 2
    """Draft layers (DFlash uses 5)."""
    drafter_intermediate: int = 0
    """MLP width of every draft layer (0 = the model's; narrower layers make a smaller drafter to ship)."""
    drafter_init: str = "random"
    """Draft layers start 'random' or as a 'copy' of the model's last layers."""
    drafter_from: str | None = None
    """Go on training this drafter folder (its layers, layers read, vocabulary and weights) on --data;
    'auto' = the drafter nbdiff ships for the model. Leave the other --drafter-* layout flags out."""
    drafter_target_layers: str = "auto"
    """Model layers whose outputs are fused: 'auto' (up to 5, spread from the 2nd to the 3rd-from-last) or '1,9,17'."""
    drafter_anchors: int = 32
    """Blocks per packed row, anchored at random reply tokens (all in one drafter forward)."""
    drafter_gamma: float | None = None
    """Loss weight exp(-(k-1)/gamma) at block offset k (default: 7 at block 16, 5 at 10, 4 at 8)."""
    drafter_vocab: int = 0
    """Draft vocabulary: the N most frequent reply tokens of the data (0 = the model's whole vocabulary)."""
    drafter_cache_features: bool = False
    """Keep the model's features of every row on disk (OUT/feature-cache) and reuse them after the first epoch."""
    drafter_eval_data: str | None = None
    """Chat records whose replies measure tokens per verify at every evaluation (novel prompts; default:
    the held-out rows of --data)."""

    # --- Data and bookkeeping
    eval_fraction: float = 0.05
    """Fraction of packed rows held out for evaluation (0 = none)."""
    eval_max_rows: int = 16
    """At most this many held-out rows."""
    cache_dir: str | None = None
    """Where tokenised data is cached (default: OUT/data-cache)."""

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
    """Replace the run in --out (only a folder an adapt run wrote; the old run goes once the new one has
    a checkpoint)."""
    prune_checkpoints: bool = False
    """Delete the checkpoints once the final model is written (kept by default: `--resume --steps N`
    extends the run)."""

    def __post_init__(self) -> None:
        if isinstance(self.data, (str, Path)):
            self.data = [str(self.data)]
        if isinstance(self.data, (list, tuple)):
            self.data = [str(p) for p in self.data]
        self.model, self.out = str(self.model), str(self.out)
        if self.cache_dir is not None:
            self.cache_dir = str(self.cache_dir)
        for f in fields(self):
            setattr(self, f.name, _typed(f.name, getattr(self, f.name), str(f.type)))
        for name, allowed in CHOICES.items():
            _choice(getattr(self, name), allowed, _flag(name))
        self._check_ranges()
        if self.quantize != "none" and self.lora_rank == 0:
            raise NBDiffError("--quantize nf4 trains LoRA adapters on frozen 4-bit weights",
                              "add --lora-rank 16 (or another rank)")
        if self.seq_len % self.block_size:
            lo = (self.seq_len // self.block_size) * self.block_size
            hint = f"use --seq-len {lo} or {lo + self.block_size}" if lo else f"use --seq-len {self.block_size}"
            raise NBDiffError(
                f"--seq-len {self.seq_len} is not a multiple of the final block size {self.block_size}", hint
            )
        self.curriculum_schedule()  # validates --curriculum
        if self.target == "drafter":
            self._check_drafter()

    def _check_drafter(self) -> None:
        if self.lora_rank or self.quantize != "none":
            raise NBDiffError("--target drafter trains a new drafter beside the frozen model",
                              "drop --lora-rank and --quantize")
        if self.block_size < 2:
            raise NBDiffError("--target drafter needs --block-size 2 or more (16 is DFlash's)")
        _at_least(self.drafter_layers, 1, "--drafter-layers")
        _at_least(self.drafter_anchors, 1, "--drafter-anchors")
        _at_least(self.drafter_vocab, 0, "--drafter-vocab")
        _at_least(self.drafter_intermediate, 0, "--drafter-intermediate")
        if self.drafter_gamma is not None and not self.drafter_gamma > 0:
            raise NBDiffError(f"--drafter-gamma must be > 0, got {self.drafter_gamma}")
        if self.drafter_from is not None:
            layout = ("drafter_layers", "drafter_intermediate", "drafter_init", "drafter_target_layers", "drafter_vocab")
            given = [_flag(f.name) for f in fields(self) if f.name in layout and getattr(self, f.name) != f.default]
            if given:
                raise NBDiffError(f"--drafter-from takes the drafter's layout from {self.drafter_from}: "
                                  f"{', '.join(given)} cannot change it", f"drop {', '.join(given)}")

    def _check_ranges(self) -> None:
        check_block_size(self.block_size, "--block-size")
        _at_least(self.ar_loss_weight, 0.0, "--ar-loss-weight")
        if self.ar_loss_weight_final is not None:
            _at_least(self.ar_loss_weight_final, 0.0, "--ar-loss-weight-final")
        _at_least(self.certainty_weight, 0.0, "--certainty-weight")
        if not self.certainty_temperature > 0:
            raise NBDiffError(f"--certainty-temperature must be > 0, got {self.certainty_temperature}")
        if not 0.0 < self.noise_eps <= 1.0:
            raise NBDiffError(f"--noise-eps must be in (0, 1], got {self.noise_eps}")
        for name in ("steps", "seq_len", "batch_size", "grad_accum", "growth_interval", "log_every",
                     "keep_checkpoints", "schedule_steps"):
            if getattr(self, name) is not None:
                _at_least(getattr(self, name), 1, _flag(name))
        for name in ("eval_every", "save_every", "growth_start", "lora_rank", "eval_max_rows", "growth_steps",
                     "warmup_steps", "weight_decay", "max_grad_norm", "lora_alpha", "time_limit"):
            if getattr(self, name) is not None:
                _at_least(getattr(self, name), 0, _flag(name))
        if not self.lr > 0:
            raise NBDiffError(f"--lr must be a positive number, got {self.lr}")
        for name, lo, hi in (("min_lr_ratio", 0.0, 1.0), ("adam_beta1", 0.0, 1.0), ("adam_beta2", 0.0, 1.0)):
            if not lo <= getattr(self, name) <= hi:
                raise NBDiffError(f"{_flag(name)} must be in [{lo:g}, {hi:g}], got {getattr(self, name)}")
        for name in ("eval_fraction", "lora_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise NBDiffError(f"{_flag(name)} must be in [0, 1), got {getattr(self, name)}")

    # --- derived values
    @property
    def effective_schedule_steps(self) -> int:
        return self.schedule_steps if self.schedule_steps is not None else self.steps

    @property
    def effective_growth_steps(self) -> int:
        return self.growth_steps if self.growth_steps is not None else (self.effective_schedule_steps * 5) // 8

    @property
    def effective_warmup_steps(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else (self.effective_schedule_steps * 3) // 100

    def curriculum_schedule(self):
        """The BlockCurriculum this recipe asks for."""
        from nbdiff.method.curriculum import BlockCurriculum

        spec = self.curriculum.strip()
        if self.target == "drafter":  # a drafter trains at its block size from the start
            return BlockCurriculum.constant(self.block_size)
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
        if f.name == "schedule_steps":  # compare the lengths the schedules really had
            before = before if before is not None else old.get("steps")
            after = new.effective_schedule_steps
        if before != after:
            out.append(f"{_flag(f.name)[2:]}: {before!r} -> {after!r}")
    return out


def field_docs(cls: type = AdaptConfig) -> dict[str, tuple[str, str]]:
    """name -> (section, help) of every field: its attribute docstring and the `# --- Section` above it."""
    import ast
    import inspect
    import textwrap

    source = textwrap.dedent(inspect.getsource(cls))
    sections = [(i + 1, line.split("# ---", 1)[1].split(":")[0].strip())
                for i, line in enumerate(source.splitlines()) if line.strip().startswith("# ---")]
    body = ast.parse(source).body[0].body
    docs: dict[str, tuple[str, str]] = {}
    for node, nxt in zip(body, body[1:] + [None]):
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        doc = ""
        if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
            doc = " ".join(nxt.value.value.split())
        section = next((name for line, name in reversed(sections) if line < node.lineno), "")
        docs[node.target.id] = (section, doc)
    return docs


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _typed(name: str, value: Any, annotation: str) -> Any:
    """`value` checked against the field's annotation ('int', 'float | None', ...); float text is parsed."""
    base = annotation.replace("| None", "").strip()
    if value is None and annotation.endswith("| None"):
        return None
    if base == "float" and isinstance(value, str):  # YAML reads `1e-4` (no dot) as text
        try:
            value = float(value)
        except ValueError:
            pass
    ok = {
        "str": isinstance(value, str),
        "bool": isinstance(value, bool),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "list[str]": isinstance(value, list) and all(isinstance(v, str) for v in value),
    }.get(base, True)
    if not ok:
        kind = {"list[str]": "a list of paths", "int": "an integer", "float": "a number"}.get(base, f"a {base}")
        raise NBDiffError(f"{_flag(name)} must be {kind}, got {value!r}")
    if base == "float":
        if not math.isfinite(value):
            raise NBDiffError(f"{_flag(name)} must be a finite number, got {value!r}")
        value = float(value)
    return value


def _choice(value: Any, allowed: tuple[str, ...], flag: str) -> None:
    if value not in allowed:
        raise NBDiffError(f"{flag} must be one of {', '.join(allowed)}, got {value!r}")


def _at_least(value: float, low: float, flag: str) -> None:
    if value < low:
        kind = "an integer" if isinstance(value, int) else "a number"
        raise NBDiffError(f"{flag} must be {kind} >= {low}, got {value!r}")
