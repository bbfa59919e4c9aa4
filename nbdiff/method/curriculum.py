"""Block-size curriculum: from AR (b = 1) to the target block size.

Two forms:
- the formula of METHOD.md, `b(s) = min(b_max, b0 * r ** floor(max(0, s - s0) / delta))`;
- an explicit list of (first step, block size) stages, e.g. `[(0, 1), (100, 2), (200, 4)]`.
`BlockCurriculum.staged(sizes, growth_steps)` spreads sizes evenly over the first growth_steps
steps (the last size is reached at step `growth_steps`), and `constant(b)` is "no curriculum".
"""

from __future__ import annotations

from dataclasses import dataclass

from nbdiff.errors import NBDiffError
from nbdiff.method.settings import check_block_size


@dataclass(frozen=True)
class BlockCurriculum:
    """Block size as a function of the optimizer step."""

    stages: tuple[tuple[int, int], ...] = ()
    """Explicit (first step, block size) pairs, sorted by step; empty = use the formula."""
    b0: int = 1
    """Formula: starting block size."""
    ratio: int = 2
    """Formula: growth factor r."""
    start: int = 0
    """Formula: step s0 at which growth starts."""
    interval: int = 1
    """Formula: steps delta between growths."""
    b_max: int = 32
    """Formula: final block size."""

    def __post_init__(self) -> None:
        if self.stages:
            steps = [s for s, _ in self.stages]
            if steps[0] != 0:
                raise NBDiffError("the first curriculum stage must start at step 0")
            if steps != sorted(steps) or len(set(steps)) != len(steps):
                raise NBDiffError("curriculum stages must start at increasing steps")
            for _, b in self.stages:
                check_block_size(b, "--curriculum")
        else:
            check_block_size(self.b0, "b0")
            check_block_size(self.b_max, "--block-size")
            if self.ratio < 1 or self.interval < 1 or self.start < 0:
                raise NBDiffError("curriculum needs ratio >= 1, interval >= 1 and start >= 0")

    @classmethod
    def constant(cls, block_size: int) -> "BlockCurriculum":
        return cls(stages=((0, check_block_size(block_size)),))

    @classmethod
    def staged(cls, sizes: list[int], growth_steps: int) -> "BlockCurriculum":
        """Sizes spread evenly: stage k starts at round(k * growth_steps / (len(sizes) - 1))."""
        if not sizes:
            raise NBDiffError("--curriculum needs at least one block size")
        if growth_steps < 0:
            raise NBDiffError("--growth-steps must be >= 0")
        if list(sizes) != sorted(sizes):
            raise NBDiffError(f"--curriculum sizes must grow, got {','.join(map(str, sizes))}")
        if len(sizes) == 1:
            return cls.constant(sizes[0])
        n = len(sizes) - 1
        stages = tuple((round(k * growth_steps / n), b) for k, b in enumerate(sizes))
        dedup: dict[int, int] = {}
        for step, b in stages:  # growth_steps smaller than the number of stages: keep the larger
            dedup[step] = b
        return cls(stages=tuple(sorted(dedup.items())))

    @classmethod
    def parse(cls, spec: str, block_size: int, growth_steps: int) -> "BlockCurriculum":
        """CLI form: 'none' (target size from the start), '1,2,4,...' or 'step:size,step:size'."""
        spec = spec.strip()
        if spec == "none":
            return cls.constant(block_size)
        try:
            if ":" in spec:
                stages = tuple((int(a), int(b)) for a, b in (p.split(":") for p in spec.split(",")))
                return cls(stages=stages)
            sizes = [int(p) for p in spec.split(",")]
        except ValueError:
            raise NBDiffError(
                f"cannot read --curriculum {spec!r}", "use 'none', '1,2,4,8,16,32' or '0:1,100:2,200:4'"
            ) from None
        if sizes[-1] != block_size:
            raise NBDiffError(
                f"--curriculum ends at {sizes[-1]} but --block-size is {block_size}",
                "make the last curriculum size equal the target block size",
            )
        return cls.staged(sizes, growth_steps)

    def block_size_at(self, step: int) -> int:
        if self.stages:
            size = self.stages[0][1]
            for first, b in self.stages:
                if step >= first:
                    size = b
            return size
        grown = max(0, step - self.start) // self.interval
        return min(self.b_max, self.b0 * self.ratio**grown)

    @property
    def final_block_size(self) -> int:
        return self.stages[-1][1] if self.stages else self.b_max
