"""Decoding options: one dataclass shared by the decoder, the API, chat, visualize and bench.

Messages name the fields (`threshold`), not command-line flags; the CLI maps them to its flags.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path, PurePath
from typing import Any

from nbdiff.errors import NBDiffError
from nbdiff.method.settings import check_block_size

CONFIDENCE_RULES = ("prob", "entropy", "margin")
DRAFTERS = ("auto", "diffusion", "ngram")
AUTO = "auto"
"""--drafter value: exact mode's default, resolved by `nbdiff.decode.plan.plan_drafting` (the cheapest drafting
measured to pay: the folder's or a shipped drafter after lookup, else lookup)."""
TRAINED = "trained"
"""--drafter value: the trained drafter in the model folder's drafter/ subfolder."""
LOOKUP = "lookup+"
"""--drafter prefix: prompt lookup when it finds a match, the trained drafter otherwise."""


@dataclass
class DecodeOptions:
    """How to decode. `block_size=None` means the block size the model folder was adapted to."""

    block_size: int | None = None
    """Tokens per block (power of two; 1 = exactly greedy/sampled AR). None: the model folder's default
    (`nbdiff.loading.default_block_size`: the block size it was adapted to, 1 right after conversion)."""
    sub_blocks: int = 1
    """Split each block into this many equal sub-blocks decoded left to right."""
    threshold: float = 0.9
    """Besides the most confident masked token, commit every one whose confidence exceeds this."""
    confidence: str = "prob"
    """'prob' (probability of the chosen token), 'entropy' (negative entropy) or 'margin' (top1 - top2)."""
    temperature: float = 0.0
    """0 = greedy."""
    top_k: int = 0
    """Keep the k most likely tokens when sampling (0 = all)."""
    top_p: float = 1.0
    """Nucleus mass when sampling (1.0 = off)."""
    max_new_tokens: int = 256
    """Upper bound on generated tokens (need not be a multiple of the block size)."""
    seed: int | None = None
    """Seed of the sampling generator (None = nondeterministic)."""
    exact: bool = False
    """Verify every drafted block with the model's own causal pass: the output is the AR output."""
    draft_steps: int | None = None
    """Exact mode: at most this many denoising forwards per draft (1 = one-shot; None = until filled)."""
    drafter: Any = "auto"
    """Exact mode: 'auto' (`nbdiff.decode.plan`), 'diffusion' (the block's denoising steps), 'ngram' (lookup in
    prompt and reply), a trained drafter (its folder, 'trained' = the model folder's drafter/, or a loaded nbdiff.drafter.Drafter; it turns
    exact mode on), or 'lookup+' before one of those: lookup when it finds a match, the drafter otherwise."""
    draft_threshold: float = 0.05
    """Trained drafter: verify draft tokens while the product of their draft probabilities exceeds this (0 = all).
    On a CPU a verify of 8 tokens costs about 2x one; 0.05 cut the tokens checked per verify from 6.4 to 0.75 at
    the same tokens per verify with a weak drafter (docs/benchmarks/drafter.md, "Trained drafter: decoding")."""

    draft_gate: float | None = None
    """Trained drafter: a row's drafter forward runs only where the model's confidence in the block's first token
    (by --confidence's rule) is at least this; below it the row drafts by lookup or not at all (0 = always draft;
    None = the plan's DRAFT_GATE, nbdiff.decode.plan)."""

    def __post_init__(self) -> None:
        if self.block_size is not None:
            check_block_size(self.block_size, "--block-size")
            if self.sub_blocks < 1 or self.block_size % self.sub_blocks:
                raise NBDiffError(
                    f"--sub-blocks {self.sub_blocks} does not divide --block-size {self.block_size}",
                    "pick a divisor of the block size, e.g. 1, 2 or 4",
                )
        elif self.sub_blocks < 1:
            raise NBDiffError(f"--sub-blocks must be >= 1, got {self.sub_blocks}")
        if not 0.0 < self.threshold <= 1.0:
            raise NBDiffError(f"--threshold must be in (0, 1], got {self.threshold}")
        if self.confidence not in CONFIDENCE_RULES:
            raise NBDiffError(f"--confidence must be one of {', '.join(CONFIDENCE_RULES)}, got {self.confidence!r}")
        if not self.temperature >= 0 or self.temperature == float("inf"):  # also refuses nan
            raise NBDiffError(f"--temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise NBDiffError(f"--top-k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise NBDiffError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise NBDiffError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.draft_steps is not None and self.draft_steps < 1:
            raise NBDiffError(f"--draft-steps must be >= 1, got {self.draft_steps}", "1 = one-shot draft of the whole block")
        self._check_drafter()
        if not 0.0 <= self.draft_threshold < 1.0:
            raise NBDiffError(f"--draft-threshold must be in [0, 1), got {self.draft_threshold}", "0 verifies every draft token")
        if self.draft_gate is not None and not 0.0 <= self.draft_gate <= 1.0:
            raise NBDiffError(f"--draft-gate must be in [0, 1], got {self.draft_gate}", "0 runs the drafter at every block")

    def _check_drafter(self) -> None:
        """'diffusion', 'ngram', or a trained drafter (which turns exact mode on: it only drafts for verification)."""
        if isinstance(self.drafter, PurePath):
            self.drafter = str(self.drafter)
        if isinstance(self.drafter, str):
            if self.drafter in DRAFTERS:
                return
            part = self.drafter.removeprefix(LOOKUP)
            if part != TRAINED and not Path(part).expanduser().is_dir():
                raise NBDiffError(f"--drafter {self.drafter!r} is neither {', '.join(DRAFTERS)}, {TRAINED} nor a drafter folder",
                                  f"pass a folder written by `nbdiff adapt --target drafter`, or prefix it with {LOOKUP!r}")
        elif not hasattr(self.drafter, "config") or not callable(self.drafter):
            raise NBDiffError(f"--drafter got a {type(self.drafter).__name__}", "pass a name, a drafter folder or a loaded Drafter")
        self.exact = True

    @property
    def trained_drafter(self) -> bool:
        """Whether `drafter` names a trained drafter."""
        return not (isinstance(self.drafter, str) and self.drafter in DRAFTERS)

    def with_(self, **changes: Any) -> "DecodeOptions":
        """A validated copy with some fields changed (used by chat's /set)."""
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain values (a loaded drafter becomes its description): JSON traces and chat's /show read these."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        if not isinstance(data["drafter"], str):
            data["drafter"] = f"<{type(data['drafter']).__name__} for {data['drafter'].config.target_architecture}>"
        return data

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


LOOKUP_BLOCK_SIZE = 2
"""Block size of exact mode with n-gram drafts when none is given (the folder's is the diffusion's) on
a CPU that multiplies with torch's products: a draft of one token. There wider verification passes
cost more than their extra accepted tokens give back: 1.09x block size 1 at 2, 0.99x at 4, 0.95x at 8
(docs/benchmarks/exact-mode.md, "Exact mode's default drafter"); on a GPU, where a pass of 8 tokens costs about
what one does, pass --block-size 8."""

LOOKUP_BLOCK_SIZE_KERNEL = 4
"""The same where nbdiff's few-row CPU kernel runs the model (nbdiff.cpu_kernel): a verify of 4 tokens
costs about 1.1x one token there, and lookup at block 4 gave 1.15x `generate()` against 1.11x at
block 2 and 1.10x at 8 (default model, fp32, median of 3 repeats; docs/benchmarks/cpu-kernel.md, "Few-row fp32
products on the CPU"). On AVX2-only CPUs, where 4 tokens cost 1.16-1.33x one, the plan makes each row's
draft follow its last accepted run (DraftingPlan.lookup_follows; docs/benchmarks/llamacpp.md, "An AVX2-only
CPU")."""


def kernel_isa(model) -> int:
    """The isa nbdiff's few-row CPU kernel runs `model` at (nbdiff.cpu_kernel.cpu_isa's numbering; 1 = AVX2),
    0 where torch's products do (a GPU, no compiler, the switch off)."""
    kernel = getattr(model, "_nbdiff_cpu_kernel", None)  # set by nbdiff.loading.load_model on a CPU
    return kernel.isa if kernel is not None and kernel.ready else 0


def lookup_block_size(model) -> int:
    """Exact mode's default block size for n-gram drafts on this model (see the two constants)."""
    return LOOKUP_BLOCK_SIZE_KERNEL if kernel_isa(model) else LOOKUP_BLOCK_SIZE
