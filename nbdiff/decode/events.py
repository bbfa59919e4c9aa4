"""The records the decoder yields: every consumer (chat, visualize, bench, API, tests) reads these.

They are plain dataclasses of ints, floats and strings so they serialise to JSON lines as they are
(`to_json` / `event_from_json`), which is how `visualize --record/--replay` shares a run.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Union


@dataclass
class StepEvent:
    """One denoising step (or the AR step that gives a block its first token) for one sequence."""

    seq: int
    """Index of the sequence in the batch."""
    block: int
    """Index of the active block (0 = first generated block)."""
    step: int
    """Global step counter of this sequence (denoising steps plus AR steps)."""
    positions: list[int]
    """Offsets inside the block committed at this step."""
    tokens: list[int]
    """Token ids committed at those offsets."""
    texts: list[str]
    """Their text (empty strings when the decoder has no tokenizer)."""
    confidences: list[float]
    """Confidence of each committed token under the chosen rule."""
    masks_left: int
    """Masked positions still left in the block after this step."""
    block_size: int
    """Size of the active block."""
    sub_block: int = 0
    """Index of the sub-block being decoded."""
    ar: bool = False
    """True for the AR step that gives a block its first token (from the previous forward's last logits)."""
    kind: str = "step"


@dataclass
class BlockEvent:
    """A block committed to the context (its keys/values are now in the cache)."""

    seq: int
    block: int
    tokens: list[int]
    """Tokens the block gives this sequence (exact mode: its first token and the accepted drafts)."""
    text: str
    """What those tokens add to the sequence's text (filled by the streaming layer, nbdiff.api)."""
    drafted: list[int] = field(default_factory=list)
    """Exact mode: the draft tokens after the first token that the verification pass checked."""
    accepted: int = 0
    """Exact mode: how many of them were kept (a prefix); the rest were rejected."""
    last: bool = False
    """True when this is the sequence's last block (EOS, length or cancel)."""
    kind: str = "block"

    @property
    def rejected(self) -> list[int]:
        """Exact mode: the draft tokens the verification dropped."""
        return self.drafted[self.accepted :]


@dataclass
class FinalEvent:
    """End of a generation, totals over the batch."""

    new_tokens: int
    forwards: int
    """Every forward pass: prefill, denoising steps and commit passes."""
    tokens_per_forward: float
    seconds: float
    """Wall time of the run (set by the streaming layer, nbdiff.api.stream; 0 from a bare decode())."""
    tokens_per_second: float
    finish_reason: str
    """'eos', 'length' or 'cancelled' (first sequence's reason for batches; see finish_reasons)."""
    texts: list[str] = field(default_factory=list)
    finish_reasons: list[str] = field(default_factory=list)
    steps: int = 0
    """Denoising steps (model calls that committed tokens inside blocks)."""
    prompt_tokens: int = 0
    tokens: list[list[int]] = field(default_factory=list)
    """Generated token ids per sequence (up to and including EOS)."""
    block_size: int = 0
    """Block size the decoder used."""
    notes: list[str] = field(default_factory=list)
    """Things the caller should tell the user (e.g. max_new_tokens shortened to fit the context)."""
    drafted: int = 0
    """Exact mode: draft tokens checked by verification passes (all sequences)."""
    accepted: int = 0
    """Exact mode: draft tokens the verification kept."""
    accepted_at: list[int] = field(default_factory=list)
    """Exact mode: accepted_at[k] = verified blocks whose draft token at offset k + 1 was kept."""
    verified_blocks: int = 0
    """Exact mode: blocks (per sequence) that went through verification."""
    accepted_length: float = 0.0
    """Exact mode: mean tokens a verified block gives (its first token plus the accepted drafts)."""
    reused_tokens: int = 0
    """Prompt tokens served from a kept cache (chat's next turn) instead of being computed again."""
    drafter_forwards: int = 0
    """Exact mode with a trained drafter: its forwards (`forwards` counts the AR model's only)."""
    drafter_gated: int = 0
    """Exact mode with a trained drafter: row blocks left without a drafter draft by the first-token gate
    (DraftingPlan.draft_gate)."""
    near_ties: int = 0
    """Greedy exact mode: kept tokens whose top two logits were within the dtype's rounding
    (nbdiff.decode.exact.near_ties); a reply with none is block size 1's reply in the same dtype. Counted
    only where a verify pass can round unlike one-token steps (plan['counts_near_ties']: 16-bit weights, or
    off the CPU); 0 in fp32 on the CPU, where the reply is block size 1's bit for bit."""
    plan: dict[str, Any] = field(default_factory=dict)
    """The drafting plan that ran (nbdiff.decode.plan.DraftingPlan.to_dict: drafter, kind, block size, why)."""
    kind: str = "final"


Event = Union[StepEvent, BlockEvent, FinalEvent]
_KINDS = {"step": StepEvent, "block": BlockEvent, "final": FinalEvent}


def to_json(event: Event) -> str:
    return json.dumps(asdict(event), ensure_ascii=False)


def event_from_json(line: str | dict[str, Any]) -> Event:
    data = json.loads(line) if isinstance(line, str) else dict(line)
    cls = _KINDS[data.get("kind", "")]
    return cls(**data)
