"""Decoding options: one dataclass shared by the decoder, the API, chat, visualize and bench.

Messages name the fields (`threshold`), not command-line flags; the CLI maps them to its flags.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from nbdiff.errors import NBDiffError
from nbdiff.method.settings import check_block_size

CONFIDENCE_RULES = ("prob", "entropy", "margin")
DRAFTERS = ("diffusion", "ngram")


@dataclass
class DecodeOptions:
    """How to decode. `block_size=None` means the model folder's block size."""

    block_size: int | None = None
    """Tokens per block (power of two; 1 = exactly greedy/sampled AR)."""
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
    drafter: str = "diffusion"
    """Exact mode: 'diffusion' (the block's denoising steps) or 'ngram' (lookup in prompt and reply)."""

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
        if self.drafter not in DRAFTERS:
            raise NBDiffError(f"--drafter must be one of {', '.join(DRAFTERS)}, got {self.drafter!r}")

    def with_(self, **changes: Any) -> "DecodeOptions":
        """A validated copy with some fields changed (used by chat's /set)."""
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]
