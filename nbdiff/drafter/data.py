"""Training blocks of a drafter: random anchors in the replies, block inputs, targets and the mask.

A packed row (nbdiff.adapt.data.PackedRows: ids, positions, document ids, which tokens are reply
tokens) holds L tokens. Training picks N anchors among the reply positions and lays out N blocks
side by side, so all blocks of a row go through one drafter forward:

- block j, anchored at row index a_j, holds `[x_a, MASK, ..., MASK]` (b tokens) at positions
  pos(a_j) .. pos(a_j) + b - 1 (RoPE), exactly what decoding feeds the drafter after AR produced x_a;
- it sees the fused AR features of the row indices c < a_j of its own document (strictly before
  the anchor: AR's hidden state at a_j does not exist yet when x_a has just been produced) and
  its own b tokens, bidirectionally; never another block;
- its targets are x_{a+1} .. x_{a+b-1} (offset k = 1..b-1), kept where the token is a reply token
  of the same document inside the row, weighted exp(-(k-1)/gamma) (DFlash's decay: early offsets
  decide how much of a draft is accepted).

Anchors and everything else depend only on (seed, row slot), so a resumed run sees the same blocks.
The mask exists in two forms built from one rule (`allowed`): a dense bool [R, N*b, L + N*b]
(CPU: sdpa takes a bool mask in any compute dtype) and a flex-attention BlockMask (CUDA), which
skips the tiles the rule forbids.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

IGNORE = -100
GAMMA_BY_BLOCK = {16: 7.0, 10: 5.0, 8: 4.0}  # DFlash's decay per block size


def default_gamma(block_size: int) -> float:
    """DFlash's gamma at block 16/10/8; about b/2.2 otherwise."""
    return GAMMA_BY_BLOCK.get(block_size, max(1.0, round(block_size / 2.2, 1)))


def offset_weights(block_size: int, gamma: float) -> torch.Tensor:
    """[b] loss weight of each block position: 0 at the anchor, exp(-(k-1)/gamma) at offset k >= 1."""
    k = torch.arange(block_size, dtype=torch.float32)
    w = torch.exp(-(k - 1) / gamma)
    w[0] = 0.0
    return w


def valid_anchors(doc_ids: torch.Tensor, trainable: torch.Tensor) -> torch.Tensor:
    """bool [R, L]: index a may anchor a block (the next token is a reply token of the same document)."""
    ok = torch.zeros_like(trainable)
    ok[:, :-1] = trainable[:, 1:] & (doc_ids[:, 1:] == doc_ids[:, :-1])
    return ok


def sample_anchors(valid: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """[n] sorted row indices drawn without replacement among valid ones; -1 pads when there are fewer."""
    where = valid.nonzero().flatten()
    if where.numel() > n:
        pick = torch.randperm(where.numel(), generator=generator)[:n]
        where = where[pick].sort().values
    out = torch.full((n,), -1, dtype=torch.int64)
    out[: where.numel()] = where
    return out


@dataclass
class DraftBatch:
    """One micro-batch of drafter training: R packed rows and N blocks of b tokens per row."""

    input_ids: torch.Tensor
    """[R, L] the rows (AR input)."""
    position_ids: torch.Tensor
    """[R, L]"""
    doc_ids: torch.Tensor
    """[R, L]"""
    anchors: torch.Tensor
    """[R, N] row index of each block's anchor (-1 = an unused block)."""
    block_ids: torch.Tensor
    """[R, N*b] anchor token then mask tokens."""
    block_pos: torch.Tensor
    """[R, N*b] positions pos(a) .. pos(a) + b - 1."""
    targets: torch.Tensor
    """[R, N*b] AR-vocabulary target ids (IGNORE where there is none)."""
    weights: torch.Tensor
    """[R, N*b] loss weight (0 where there is no target)."""
    rows: list[int]
    """Row numbers in the packed data (the feature cache's keys)."""
    block_size: int
    real_tokens: int = 0
    """Drafted targets in this micro-batch (the trainer's 'tokens' for a drafter run)."""
    shares: dict[str, float] = field(default_factory=dict)

    def token_counts(self, config=None) -> dict[str, float]:
        """The denominator of the loss mean: the summed offset weights (the trainer turns it into a share)."""
        return {"mdm": float(self.weights.sum())}

    def to(self, device) -> "DraftBatch":
        tensors = {f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)
                   if isinstance(getattr(self, f.name), torch.Tensor)}
        return dataclasses.replace(self, **tensors)


def build_blocks(input_ids: torch.Tensor, position_ids: torch.Tensor, doc_ids: torch.Tensor, trainable: torch.Tensor,
                 anchors: torch.Tensor, block_size: int, mask_token_id: int, gamma: float,
                 rows: list[int] | None = None) -> DraftBatch:
    """The blocks of given anchors ([R, N], -1 = unused): inputs, positions, targets and weights."""
    R, L = input_ids.shape
    b = block_size
    k = torch.arange(b)
    used = anchors >= 0  # [R, N]
    a = anchors.clamp(min=0)
    idx = a[:, :, None] + k  # [R, N, b] row index of each block position
    inside = (idx < L) & used[:, :, None]
    idx_c = idx.clamp(max=L - 1)
    gather = lambda t: torch.gather(t, 1, idx_c.flatten(1)).view(R, -1, b)  # noqa: E731
    anchor_doc = torch.gather(doc_ids, 1, a)[:, :, None]  # [R, N, 1]
    ok = inside & (gather(doc_ids) == anchor_doc) & gather(trainable) & (k > 0)
    targets = torch.where(ok, gather(input_ids), torch.full_like(idx, IGNORE))
    weights = offset_weights(b, gamma)[None, None].expand(R, -1, -1) * ok
    block_ids = torch.full((R, anchors.shape[1], b), mask_token_id, dtype=input_ids.dtype)
    block_ids[:, :, 0] = torch.gather(input_ids, 1, a)
    block_pos = torch.gather(position_ids, 1, a)[:, :, None] + k
    return DraftBatch(input_ids, position_ids, doc_ids, anchors, block_ids.flatten(1), block_pos.flatten(1),
                      targets.flatten(1), weights.flatten(1).float(), list(rows or range(R)), b,
                      real_tokens=int(ok.sum()))


def allowed(q: torch.Tensor, key: torch.Tensor, anchors: torch.Tensor, doc_ids: torch.Tensor, block_size: int,
            row: torch.Tensor) -> torch.Tensor:
    """The rule, elementwise: may block query q (0..N*b-1) see key (0..L-1 features, then L.. block tokens)?

    A feature key c: c < a_j and doc(c) == doc(a_j), j = q // b. A block key: the same block j.
    Unused blocks (anchor -1) see only their own tokens.
    """
    L = doc_ids.shape[1]
    j = torch.div(q, block_size, rounding_mode="floor")
    a = anchors[row, j]
    c = key.clamp(max=L - 1)
    feature = (key < L) & (key < a) & (doc_ids[row, c] == doc_ids[row, a.clamp(min=0)])
    own_block = (key >= L) & (torch.div(key - L, block_size, rounding_mode="floor") == j)
    return feature | own_block


def dense_mask(anchors: torch.Tensor, doc_ids: torch.Tensor, block_size: int) -> torch.Tensor:
    """bool [R, N*b, L + N*b] (True = may attend) of `allowed`, for sdpa."""
    R, L = doc_ids.shape
    nq = anchors.shape[1] * block_size
    q = torch.arange(nq, device=doc_ids.device)[None, :, None]
    key = torch.arange(L + nq, device=doc_ids.device)[None, None, :]
    row = torch.arange(R, device=doc_ids.device)[:, None, None]
    return allowed(q, key, anchors, doc_ids, block_size, row)


def flex_block_mask(anchors: torch.Tensor, doc_ids: torch.Tensor, block_size: int, tile: int = 128):
    """A flex-attention BlockMask of `allowed` over [N*b queries, L + N*b keys] (CUDA)."""
    from torch.nn.attention.flex_attention import create_block_mask

    R, L = doc_ids.shape
    nq = anchors.shape[1] * block_size

    def mask_mod(b, h, q, k):
        return allowed(q, k, anchors, doc_ids, block_size, b)

    return create_block_mask(mask_mod, R, None, nq, L + nq, device=str(doc_ids.device), BLOCK_SIZE=tile)


def draft_vocabulary(tokens: torch.Tensor, trainable: torch.Tensor, size: int, keep: list[int] = ()) -> list[int]:
    """The `size` most frequent reply tokens (ties by id), plus `keep` (EOS, ...), sorted by id."""
    counts = torch.bincount(tokens[trainable].flatten(), minlength=int(tokens.max()) + 1 if tokens.numel() else 1)
    order = sorted(range(counts.numel()), key=lambda t: (-int(counts[t]), t))
    chosen = [t for t in order[:size] if counts[t] > 0]
    return sorted(set(chosen) | set(int(t) for t in keep))


def vocab_lookup(draft_vocab: list[int] | None, vocab_size: int) -> torch.Tensor | None:
    """[V] AR id -> draft index (IGNORE when outside the draft vocabulary); None for the full vocabulary."""
    if draft_vocab is None:
        return None
    lookup = torch.full((vocab_size,), IGNORE, dtype=torch.int64)
    lookup[torch.tensor(draft_vocab, dtype=torch.int64)] = torch.arange(len(draft_vocab))
    return lookup


def walk_tokens_per_verify(accept: list[int], start: int, end: int) -> tuple[int, int]:
    """(tokens, verifies) of greedy decoding along a known reply, from per-anchor accepted drafts.

    accept[a]: how many drafted tokens the block anchored at row index a gets right in a row
    (its leading matches). Decoding starts with AR's token at `start` (the first reply token, from
    the prefill) and ends at `end` (the last reply token's index + 1): each verify keeps the
    accepted drafts plus AR's own next token, and the next block is anchored at the last kept token.
    """
    a, tokens, verifies = start, 0, 0
    while a < end - 1:
        gain = min(accept[a] + 1, end - 1 - a)
        tokens += gain
        verifies += 1
        a += gain
    return tokens, verifies


def leading_matches(pred: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[.., b] draft and target ids -> [..] number of leading offsets k = 1.. where they agree."""
    hit = (pred[..., 1:] == targets[..., 1:]).int()
    return hit.cumprod(-1).sum(-1)


def document_rows(corpus, pad_id: int, max_len: int | None = None):
    """One document per row (left-aligned, padded; never cut unless longer than max_len): PackedRows.

    Evaluation walks each reply from its prompt as decoding does, so documents are not packed.
    """
    from nbdiff.adapt.data import PackedRows

    docs = [corpus.document(d) for d in range(corpus.num_documents)]
    if max_len is not None:
        docs = [(t[:max_len], m[:max_len]) for t, m in docs]
    L = max(int(t.numel()) for t, _ in docs)
    R = len(docs)
    ids = torch.full((R, L), pad_id, dtype=torch.int64)
    doc = torch.full((R, L), -1, dtype=torch.int64)
    trainable = torch.zeros((R, L), dtype=torch.bool)
    for r, (t, m) in enumerate(docs):
        n = int(t.numel())
        ids[r, :n], doc[r, :n], trainable[r, :n] = t, r, m
    pos = torch.arange(L).expand(R, L).clone()
    return PackedRows(ids, pos, doc, trainable)
