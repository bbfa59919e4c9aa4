"""What the screen shows, as plain data: a `RunView` folds decoder events into it.

No textual here, so the fold is testable alone and the same for live runs and replays. Every
number comes from the events and their recorded times (never from the wall clock at render
time), which is what makes a replayed trace render the same on every machine.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from nbdiff.decode.events import BlockEvent, Event, FinalEvent, StepEvent


@dataclass
class Tile:
    """One committed position of the active block."""

    token: int
    text: str
    confidence: float
    step: int
    """Global step counter at which it was committed."""
    step_in_block: int
    """0 = the AR step that gives a block its first token, 1 = first denoising step, ..."""


@dataclass
class RunView:
    """Everything the visualizer draws, for the first sequence of a run."""

    prompt: str = ""
    blocks: list[str] = field(default_factory=list)
    """Text of every committed block, in order."""
    block: int = -1
    """Index of the active block (-1 before the first event)."""
    block_size: int = 0
    sub_block: int = 0
    sub_blocks: int = 1
    full_block_size: int = 0
    """Largest block size seen: the last block may be shorter, but its sub-blocks keep the size
    full_block_size // sub_blocks, as in the decoder."""
    tiles: list[Tile | None] = field(default_factory=list)
    """The active block, one entry per position; None = still masked."""
    block_steps: int = 0
    """Steps applied to the active block so far."""
    steps: int = 0
    """Step events applied (AR steps and denoising steps)."""
    tokens: int = 0
    """Tokens committed so far."""
    committed_blocks: int = 0
    per_step: list[int] = field(default_factory=list)
    """Tokens committed at each step (the step bars)."""
    seconds: float = 0.0
    """Recorded time of the latest event, seconds since the run started."""
    rejected_from: int | None = None
    """Exact mode: offsets of the active block from here on were drafts the verification rejected."""
    accepted_lengths: list[int] = field(default_factory=list)
    """Exact mode: tokens each verified block kept (its first token plus the accepted drafts)."""
    final: FinalEvent | None = None

    def apply(self, event: Event, t: float | None = None) -> None:
        if t is not None:
            self.seconds = t
        if isinstance(event, StepEvent):
            if event.seq != 0:
                return
            self._apply_step(event)
        elif isinstance(event, BlockEvent):
            if event.seq != 0:
                return
            self.blocks.append(event.text)
            self.committed_blocks += 1
            if event.drafted:
                self.accepted_lengths.append(len(event.tokens))
                self.rejected_from = len(event.tokens) if event.accepted < len(event.drafted) else None
        elif isinstance(event, FinalEvent):
            self.final = event

    def _apply_step(self, event: StepEvent) -> None:
        if event.block != self.block or len(self.tiles) != event.block_size:
            self.block = event.block
            self.block_size = event.block_size
            self.tiles = [None] * event.block_size
            self.block_steps = 0
            self.rejected_from = None
            self.full_block_size = max(self.full_block_size, event.block_size)
        self.sub_block = event.sub_block
        for pos, tok, text, conf in zip(event.positions, event.tokens, event.texts, event.confidences):
            if 0 <= pos < len(self.tiles):
                self.tiles[pos] = Tile(tok, text, conf, event.step, self.block_steps)
        self.block_steps += 1
        self.steps += 1
        self.tokens += len(event.positions)
        self.per_step.append(len(event.positions))

    # ---- derived figures -------------------------------------------------------------------

    @property
    def sub_block_size(self) -> int:
        sub = max(1, self.sub_blocks)
        full = self.full_block_size or self.block_size
        return full // sub if full and full % sub == 0 else max(full, 1)

    @property
    def done(self) -> bool:
        return self.final is not None

    @property
    def active_committed(self) -> bool:
        """True once the active block has been committed (its text is in `blocks`)."""
        return self.committed_blocks > self.block

    @property
    def text(self) -> str:
        """Generated text so far: committed blocks (the decoder's own detokenisation)."""
        return "".join(self.blocks)

    @property
    def active_text(self) -> str:
        """Partial text of the active block (committed positions only), if not yet committed."""
        if self.active_committed:
            return ""
        return "".join(t.text for t in self.tiles if t is not None)

    @property
    def new_tokens(self) -> int:
        return self.final.new_tokens if self.final else self.tokens

    @property
    def forwards(self) -> int:
        """Forward passes: exact from the final record; before it, 1 prefill + denoising steps +
        commit passes (a block's first token comes from the previous pass, so it costs nothing)."""
        if self.final:
            return self.final.forwards
        started = self.block + 1 if self.block >= 0 else 0
        return (1 if self.steps or self.block >= 0 else 0) + (self.steps - started) + self.committed_blocks

    @property
    def tokens_per_forward(self) -> float:
        if self.final:
            return self.final.tokens_per_forward
        return self.tokens / self.forwards if self.forwards else 0.0

    @property
    def accepted_length(self) -> float | None:
        """Exact mode: mean tokens kept per verified block (None when nothing was verified)."""
        if self.final and self.final.verified_blocks:
            return self.final.accepted_length
        return sum(self.accepted_lengths) / len(self.accepted_lengths) if self.accepted_lengths else None

    @property
    def tokens_per_second(self) -> float:
        if self.final:
            return self.final.tokens_per_second
        return self.tokens / self.seconds if self.seconds > 0 else 0.0
