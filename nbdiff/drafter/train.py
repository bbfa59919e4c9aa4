"""Training a drafter: `nbdiff adapt MODEL --data D --out DIR --target drafter`.

The adapt run (nbdiff.adapt.trainer.AdaptRun) stays the loop, the run folder, the resume, the
checkpoints and the metrics; a drafter run swaps four parts (the trainer asks for them when
`--target drafter`):
- the trained module (`training_module` -> `DrafterTraining`): the new drafter (nbdiff.drafter.model.Drafter) sharing
  the AR model's embeddings and LM head (frozen), with the frozen AR model held beside it, never
  saved and never wrapped;
- the micro-batch (`make_draft_batch`): packed rows with random anchors among the reply tokens
  (nbdiff.drafter.data), drawn from the row slot's own generator, so resume is exact;
- the loss (`drafter_loss`): one AR forward per batch without gradients (output_hidden_states; or
  the features read back from the on-disk cache), then one drafter forward over every block of a
  row under one mask, cross-entropy at the masked offsets weighted exp(-(k-1)/gamma);
- the evaluation (`evaluate_drafter`: held-out loss, and tokens per verify of step-by-step simulated
  greedy decoding along the replies of --drafter-eval-data) and the export (`export_drafter`: the
  run folder becomes a drafter folder, nbdiff.drafter.folder).

Options measured in docs/benchmarks/drafter.md ("Trained drafter (CPU)"): draft layers and their
initialisation (random, or copied from AR layers), the AR layers read, the block size, a reduced
draft vocabulary (the most frequent reply tokens), features cached on disk across epochs, bf16.
"""

from __future__ import annotations

import hashlib
from typing import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from nbdiff.drafter.data import (IGNORE, DraftBatch, build_blocks, default_gamma, dense_mask, draft_vocabulary,
                                 flex_block_mask, leading_matches, sample_anchors, valid_anchors, vocab_lookup,
                                 walk_tokens_per_verify)
from nbdiff.errors import NBDiffError
from nbdiff.method.losses import LossParts


# ----------------------------------------------------------------------------- AR features


def ar_hidden_states(ar_model, input_ids: torch.Tensor, position_ids: torch.Tensor, doc_ids: torch.Tensor,
                     layer_ids: list[int]) -> torch.Tensor:
    """Outputs of the AR layers `layer_ids` over packed rows, documents kept apart: [R, L, n, H], no grad.

    The AR model runs causally inside each document (the clean quadrant of the adaptation mask),
    which is what it computes in decoding; hidden_states[i + 1] is the output of layer i.
    """
    from nbdiff.method.layout import training_attention_mask

    mask = training_attention_mask(ar_model, position_ids, doc_ids, 1, clean_only=True)
    base = ar_model.get_decoder() if hasattr(ar_model, "get_decoder") else ar_model.model
    with torch.no_grad():
        out = base(input_ids=input_ids, position_ids=position_ids, attention_mask=mask, use_cache=False,
                   output_hidden_states=True)
    return torch.stack([out.hidden_states[i + 1] for i in layer_ids], dim=2)


class FeatureStore:
    """AR features of packed rows on disk, one safetensors file per row, reused across epochs.

    The folder's name carries a key of what the features depend on (the AR weights' fingerprint,
    the layers read, the data, the dtype), so a changed model or data never reads stale features.
    """

    def __init__(self, root: Callable[[], Path], key: str, dtype: torch.dtype = torch.bfloat16):
        # root: a function giving the folder now (a --force run's folder moves when it commits)
        self._root = root
        self._name = hashlib.sha256(key.encode()).hexdigest()[:16]
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dtype = dtype
        self.hits = self.misses = 0

    @property
    def dir(self) -> Path:
        return Path(self._root()) / self._name

    def _path(self, row: int) -> Path:
        return self.dir / f"row-{row:08d}.safetensors"

    def get(self, rows: list[int]) -> torch.Tensor | None:
        """[R, L, n, H] when every row is cached, else None."""
        from safetensors.torch import load_file

        paths = [self._path(r) for r in rows]
        if not all(p.is_file() for p in paths):
            self.misses += 1
            return None
        self.hits += 1
        return torch.stack([load_file(str(p))["h"] for p in paths])

    def put(self, rows: list[int], hidden: torch.Tensor) -> None:
        from nbdiff.fsutil import atomic_file
        from safetensors.torch import save_file

        for r, h in zip(rows, hidden):
            path = self._path(r)
            if not path.is_file():
                with atomic_file(path) as tmp:
                    save_file({"h": h.detach().to("cpu", self.dtype).contiguous()}, str(tmp))


# ----------------------------------------------------------------------------- the trained module


class DrafterTraining(torch.nn.Module):
    """The module a drafter run trains: the drafter; the frozen AR model sits beside it, unregistered.

    forward(batch) -> draft logits [R, N*b, Vd] of every block of the batch, in one drafter pass.
    """

    def __init__(self, drafter, ar_model, cache: "FeatureStore | None" = None):
        super().__init__()
        self.drafter = drafter
        object.__setattr__(self, "ar", ar_model)  # not a submodule: not trained, saved or wrapped
        self.cache = cache
        self.use_flex = False
        c = drafter.config
        lookup = vocab_lookup(c.draft_vocab, c.vocab_size)
        self.register_buffer("vocab_lookup", lookup if lookup is not None else torch.zeros(0, dtype=torch.int64),
                             persistent=False)  # [V] AR id -> draft index (empty: the whole vocabulary)

    def features(self, batch: DraftBatch) -> torch.Tensor:
        """AR hidden states [R, L, n, H] of the batch's rows (from the cache when it has them)."""
        ids = self.drafter.config.target_layer_ids
        if self.cache is not None:
            hidden = self.cache.get(batch.rows)
            if hidden is not None:
                return hidden.to(batch.input_ids.device)
        hidden = ar_hidden_states(self.ar, batch.input_ids, batch.position_ids, batch.doc_ids, ids)
        if self.cache is not None:  # rounded to the cache's dtype now, so a cached epoch sees the same values
            self.cache.put(batch.rows, hidden)
            hidden = hidden.to(self.cache.dtype)
        return hidden

    def forward(self, batch: DraftBatch, hidden: torch.Tensor | None = None) -> torch.Tensor:
        if hidden is None:
            hidden = self.features(batch)
        feats = self.drafter.fuse(list(hidden.to(self._dtype()).unbind(2)))  # [R, L, H]
        if self.use_flex:
            mask = flex_block_mask(batch.anchors, batch.doc_ids, batch.block_size)
        else:  # bool: sdpa takes it in any compute dtype; no row is empty (a block always sees itself)
            mask = dense_mask(batch.anchors, batch.doc_ids, batch.block_size)[:, None]
        return self.drafter(batch.block_ids, batch.block_pos, feats, batch.position_ids, mask)

    def _dtype(self) -> torch.dtype:
        return self.drafter.dtype

    def draft_targets(self, targets: torch.Tensor) -> torch.Tensor:
        """AR-vocabulary targets -> draft-vocabulary indices (IGNORE outside the draft vocabulary)."""
        if not self.vocab_lookup.numel():
            return targets
        return torch.where(targets == IGNORE, targets, self.vocab_lookup[targets.clamp(min=0)])


def drafter_loss(model, batch: DraftBatch, config=None, block_size: int | None = None,
                 hidden: torch.Tensor | None = None) -> LossParts:
    """Weighted cross-entropy of one micro-batch at the drafted offsets (the run's compute_loss).

    Each target's weight is exp(-(k-1)/gamma) at offset k; the mean over the whole optimizer step
    is the weighted sum divided by the step's summed weights (`batch.shares`, set by the trainer).
    Targets outside a reduced draft vocabulary cannot be drafted and carry no loss.
    """
    inner = getattr(model, "module", model)
    logits = model(batch, hidden)  # [R, Q, Vd]
    targets = inner.draft_targets(batch.targets)
    weights = batch.weights * (targets != IGNORE)
    ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="none")
    denom = float(batch.weights.sum())
    loss = (ce * weights.flatten()).sum() / max(denom, 1e-9) * batch.shares.get("mdm", 1.0)
    valid = batch.targets != IGNORE
    correct = int(((logits.argmax(-1) == targets) & valid).sum())  # outside the draft vocabulary: never right
    zero = loss.new_zeros(())
    return LossParts(total=loss, mdm=loss, ar=zero, mdm_tokens=int(valid.sum()), ar_tokens=0, mdm_correct=correct)


# ----------------------------------------------------------------------------- batches


def gamma_of(config) -> float:
    return config.drafter_gamma if config.drafter_gamma is not None else default_gamma(config.block_size)


def make_draft_batch(rows, slots: list[int], config, block_size: int, mask_token_id: int) -> DraftBatch:
    """Rows of the given stream slots, each with `drafter_anchors` random anchors from its slot's generator."""
    from nbdiff.adapt.data import row_index, slot_generator

    idx = [row_index(s, len(rows), config.seed) for s in slots]
    ids, pos, docs, trainable = rows.input_ids[idx], rows.position_ids[idx], rows.doc_ids[idx], rows.trainable[idx]
    valid = valid_anchors(docs, trainable)
    anchors = torch.stack([sample_anchors(valid[j], config.drafter_anchors, slot_generator(config.seed, slot))
                           for j, slot in enumerate(slots)])
    return build_blocks(ids, pos, docs, trainable, anchors, block_size, mask_token_id, gamma_of(config), rows=idx)


# ----------------------------------------------------------------------------- building the run's module


def target_layers(config, num_ar_layers: int) -> list[int]:
    """The AR layers read: --drafter-target-layers 'auto' (DFlash's spread of up to 5) or a list."""
    from nbdiff.drafter.config import target_hidden_layers

    spec = config.drafter_target_layers.strip()
    if spec == "auto":
        return target_hidden_layers(num_ar_layers, min(5, num_ar_layers))
    try:
        ids = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise NBDiffError(f"--drafter-target-layers must be 'auto' or layer numbers like 1,9,17, got {spec!r}") from None
    bad = [i for i in ids if not 0 <= i < num_ar_layers]
    if not ids or bad:
        raise NBDiffError(f"--drafter-target-layers {spec!r}: the model has layers 0..{num_ar_layers - 1}",
                          "pick layer numbers in that range, or 'auto'")
    return ids


def build_drafter(ar_model, config, mask_token_id: int, draft_vocab: list[int] | None):
    """A fresh drafter for `ar_model` from the recipe (layers, layers read, block size, vocabulary, init), fp32;
    with --drafter-from, that drafter folder's drafter (`starting_drafter`)."""
    from nbdiff.drafter.config import DrafterConfig
    from nbdiff.drafter.folder import new_drafter

    if config.drafter_from is not None:
        return starting_drafter(ar_model, config, mask_token_id)

    dconf = DrafterConfig.for_target(
        ar_model, num_hidden_layers=config.drafter_layers,
        target_layer_ids=target_layers(config, ar_model.config.num_hidden_layers), block_size=config.block_size,
        mask_token_id=mask_token_id, draft_vocab=draft_vocab, target_name=str(config.model),
        intermediate_size=config.drafter_intermediate or None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        drafter = new_drafter(dconf, ar_model).float()  # fp32 master weights (bf16 autocast where native)
        init_like_ar(drafter, ar_model)
    if config.drafter_init == "copy":
        copy_ar_layers(drafter, ar_model)
    return drafter


def starting_drafter(ar_model, config, mask_token_id: int):
    """The drafter --drafter-from names ('auto': the one nbdiff ships for ar_model), in fp32, to train on.

    It must be this model's (`load_drafter` checks the weights), drafted at the run's block size and
    with the model folder's mask token; its layout and draft vocabulary stay as they are (reply tokens
    outside that vocabulary are not trained on)."""
    from nbdiff.drafter.folder import load_drafter, shipped_drafter

    path = config.drafter_from
    if path == "auto":
        path = shipped_drafter(ar_model)
        if path is None:
            raise NBDiffError("--drafter-from auto: nbdiff ships no drafter for this model",
                              "name a drafter folder, or leave --drafter-from out to train a new drafter")
    elif not Path(path).expanduser().is_dir():
        raise NBDiffError(f"--drafter-from {path}: no such folder", "name a drafter folder (config.json, model.safetensors)")
    drafter = load_drafter(path, ar_model)
    c = drafter.config
    if c.block_size != config.block_size:
        raise NBDiffError(f"--drafter-from {path} drafts blocks of {c.block_size}, the run's --block-size is "
                          f"{config.block_size}", f"use --block-size {c.block_size}")
    if c.mask_token_id != mask_token_id:
        raise NBDiffError(f"--drafter-from {path} uses mask token {c.mask_token_id}, the model folder {mask_token_id}",
                          "convert the model again, or train a new drafter")
    return drafter.float()  # its target_name stays: load_drafter has checked that this is that model


def init_like_ar(drafter, ar_model) -> None:
    """Linear weights ~ N(0, the AR model's initializer_range), as transformers initialises a new model."""
    std = float(getattr(ar_model.config, "initializer_range", 0.02))
    with torch.no_grad():
        for module in drafter.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.normal_(0.0, std)


def copy_ar_layers(drafter, ar_model) -> int:
    """Start draft layer i from AR layer N - k + i (the last k layers); returns the tensors copied.

    Only tensors whose name (inside the layer) and shape match are copied; the fusion, and any
    part the AR layer lacks, keep their random initialisation.
    """
    ar_layers = ar_model.get_decoder().layers
    k = len(drafter.layers)
    copied = 0
    with torch.no_grad():
        for i, layer in enumerate(drafter.layers):
            src = dict(ar_layers[len(ar_layers) - k + i].named_parameters())
            for name, p in layer.named_parameters():
                if name in src and src[name].shape == p.shape:
                    p.copy_(src[name].to(p.dtype))
                    copied += 1
    return copied


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def accepted_drafts(module: DrafterTraining, rows, block_size: int, chunk: int = 32) -> torch.Tensor:
    """[R, L] drafted tokens AR would accept for a block anchored at each index (-1: not an anchor).

    Every valid anchor of every row is drafted, `chunk` blocks per forward, under the training mask
    (the tests prove it equals decoding's drafts); a draft is accepted up to its first token that
    differs from the reply (the AR model's own greedy text).
    """
    drafter = module.drafter
    ids, pos, docs, trainable = rows.input_ids, rows.position_ids, rows.doc_ids, rows.trainable
    hidden = eval_features(module, rows)
    valid = valid_anchors(docs, trainable)
    out = torch.full(ids.shape, -1, dtype=torch.int64)
    R = ids.shape[0]
    for r in range(R):
        where = valid[r].nonzero().flatten()
        for s in range(0, where.numel(), chunk):
            anchors = where[s:s + chunk][None]
            batch = build_blocks(ids[r:r + 1], pos[r:r + 1], docs[r:r + 1], trainable[r:r + 1], anchors, block_size,
                                 drafter.config.mask_token_id, 1.0).to(hidden.device)
            logits = module(batch, hidden[r:r + 1])  # [1, n*b, Vd]
            pred = drafter.to_full_vocab(logits.argmax(-1)).view(1, -1, block_size)
            out[r, anchors[0]] = leading_matches(pred, batch.targets.view(1, -1, block_size))[0].cpu()
    return out


def eval_features(module: DrafterTraining, rows) -> torch.Tensor:
    """AR features [R, L, n, H] of evaluation rows, computed once per run (the AR model is frozen).

    When the run caches its training features on disk, these go there too (a folder of their own,
    keyed by the evaluation rows), so a resumed run - a chunk of a long CPU run - does not spend
    an AR pass over the held-out replies again; they are then read back in the cache's dtype.
    """
    key = (id(rows), tuple(rows.input_ids.shape))
    store = module.__dict__.setdefault("_eval_features", {})
    if key not in store:
        store.clear()
        device = module.drafter.fc.weight.device
        disk = None
        if module.cache is not None:
            c = module.drafter.config
            disk = FeatureStore(lambda: module.cache.dir.parent, f"eval|{c.target_fingerprint}|{c.target_layer_ids}|"
                                f"{tuple(rows.input_ids.shape)}|{int(rows.input_ids.sum())}|"
                                f"{int((rows.input_ids * rows.position_ids).sum())}", module.cache.dtype)
        parts = []
        for r in range(0, len(rows), 8):
            idx = list(range(r, min(r + 8, len(rows))))
            hidden = disk.get(idx) if disk is not None else None
            if hidden is None:
                part = [t[r:r + 8].to(device) for t in (rows.input_ids, rows.position_ids, rows.doc_ids)]
                hidden = ar_hidden_states(module.ar, *part, module.drafter.config.target_layer_ids)
                if disk is not None:
                    disk.put(idx, hidden)
                    hidden = hidden.to(disk.dtype)
            parts.append(hidden.to(device))
        store[key] = torch.cat(parts)
    return store[key]


def lookup_accepts(rows, block_size: int, max_ngram: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """[R, L] drafted tokens prompt lookup gets right when anchored at each reply index (-1 elsewhere),
    and [R, L] the length of the n-gram it matched there (0 = no match).

    The history is the row up to the anchor (prompt and reply so far), as in decoding
    (nbdiff.decode.drafters.ngram_match); a draft counts up to its first token that differs from the reply.
    """
    from nbdiff.decode.drafters import ngram_match

    out = torch.full(rows.input_ids.shape, -1, dtype=torch.int64)
    matched = torch.zeros(rows.input_ids.shape, dtype=torch.int64)
    valid = valid_anchors(rows.doc_ids, rows.trainable)
    for r in range(len(rows)):
        ids = rows.input_ids[r].tolist()
        for a in valid[r].nonzero().flatten().tolist():
            draft, matched[r, a] = ngram_match(ids[: a + 1], block_size - 1, max_ngram)
            n = 0
            while n < len(draft) and a + 1 + n < len(ids) and rows.trainable[r, a + 1 + n] and draft[n] == ids[a + 1 + n]:
                n += 1
            out[r, a] = n
    return out, matched


def lookup_first(drafts: torch.Tensor, lookup: torch.Tensor, matched: torch.Tensor) -> torch.Tensor:
    """What `--drafter lookup+DIR` drafts at each anchor: lookup where its match has LOOKUP_MIN_MATCH+ tokens."""
    from nbdiff.drafter.decoding import LOOKUP_MIN_MATCH

    return torch.where(matched >= LOOKUP_MIN_MATCH, lookup, drafts)


def reply_spans(doc_ids: torch.Tensor, trainable: torch.Tensor) -> list[tuple[int, int, int]]:
    """(row, first reply index, last reply index + 1) of every document piece with reply tokens."""
    spans = []
    for r in range(doc_ids.shape[0]):
        for d in doc_ids[r].unique().tolist():
            where = (trainable[r] & (doc_ids[r] == d)).nonzero().flatten()
            if where.numel() >= 2:
                spans.append((r, int(where[0]), int(where[-1]) + 1))
    return spans


def simulated_tokens_per_verify(accepts: torch.Tensor, rows) -> tuple[float, int, int]:
    """(tokens per verify, tokens, verifies) of greedy decoding along every reply of `rows`.

    The first reply token comes from the prefill (no verify); then each verify keeps the block's
    accepted drafts plus AR's own token (nbdiff.drafter.data.walk_tokens_per_verify).
    """
    tokens = verifies = 0
    for r, start, end in reply_spans(rows.doc_ids, rows.trainable):
        acc = accepts[r].clamp(min=0).tolist()
        t, v = walk_tokens_per_verify(acc, start, end)
        tokens, verifies = tokens + t, verifies + v
    return (tokens / verifies if verifies else 0.0), tokens, verifies


@torch.no_grad()
def drafter_eval_loss(module: DrafterTraining, rows, block_size: int, anchors: int, mask_token_id: int,
                      gamma: float, seed: int = 0) -> tuple[float, float, int]:
    """(weighted loss, accuracy, targets) of the held-out rows at fixed random anchors, 8 rows a forward."""
    g = torch.Generator().manual_seed(seed)
    hidden = eval_features(module, rows)
    valid = valid_anchors(rows.doc_ids, rows.trainable)
    a = torch.stack([sample_anchors(valid[r], anchors, g) for r in range(len(rows))])
    loss = weight = 0.0
    correct = targets = 0
    for r in range(0, len(rows), 8):
        cut = slice(r, r + 8)
        batch = build_blocks(rows.input_ids[cut], rows.position_ids[cut], rows.doc_ids[cut], rows.trainable[cut],
                             a[cut], block_size, mask_token_id, gamma).to(hidden.device)
        parts = drafter_loss(module, batch, hidden=hidden[cut])  # the weighted mean over these rows
        w = float(batch.weights.sum())
        loss, weight = loss + float(parts.mdm) * w, weight + w
        correct, targets = correct + parts.mdm_correct, targets + parts.mdm_tokens
    return loss / max(weight, 1e-9), correct / max(targets, 1), targets


EVAL_BLOCK = 8
"""Every evaluation also walks block 8 (where CPU decoding runs drafters), whatever block the run trains."""

_LOOKUP: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def evaluate_drafter(module: DrafterTraining, rows, config, autocast, block_sizes: list[int] | None = None) -> dict:
    """The eval record's fields: per block size the held-out loss ('mdm'), accuracy and tokens per verify,
    with the tokens per verify of prompt lookup alone and of lookup first, this drafter otherwise.

    Block sizes: the trained one and EVAL_BLOCK. The loss is taken at 8 fixed random anchors per
    row; tokens per verify walks every reply (`simulated_tokens_per_verify`).
    """
    if block_sizes is None:
        block_sizes = sorted({config.block_size, min(EVAL_BLOCK, config.block_size)})
    inner = getattr(module, "module", module)
    was_training = inner.training
    inner.eval()
    res: dict = {"ar": 0.0, "mdm": {}, "acc": {}, "mdm_tokens": {}, "tokens_per_verify": {},
                 "lookup_tokens_per_verify": {}, "lookup_first_tokens_per_verify": {}}
    with autocast():
        for b in block_sizes:
            loss, acc, n = drafter_eval_loss(inner, rows, b, min(8, config.drafter_anchors),
                                             inner.drafter.config.mask_token_id, default_gamma(b), config.seed)
            drafts = accepted_drafts(inner, rows, b)
            tpv, _, _ = simulated_tokens_per_verify(drafts, rows)
            key = (id(rows), tuple(rows.input_ids.shape), b)
            if key not in _LOOKUP:  # the rows' own: the same at every evaluation
                _LOOKUP[key] = lookup_accepts(rows, b)
            lookup, matched = _LOOKUP[key]
            alone, _, _ = simulated_tokens_per_verify(lookup, rows)
            first, _, _ = simulated_tokens_per_verify(lookup_first(drafts, lookup, matched), rows)
            for name, value in (("mdm", loss), ("acc", acc), ("mdm_tokens", n), ("tokens_per_verify", tpv),
                                ("lookup_tokens_per_verify", alone), ("lookup_first_tokens_per_verify", first)):
                res[name][str(b)] = value
    inner.train(was_training)
    return res


# ----------------------------------------------------------------------------- the run's parts


def training_module(config, folder, device: torch.device, data, run_dir: Callable[[], Path],
                    tokenizer) -> DrafterTraining:
    """The module an adapt run with --target drafter trains (nbdiff.adapt.trainer calls this in setup).
    `run_dir`: a function giving where the run folder is now (a --force run moves it at its first
    checkpoint, and the feature cache must follow)."""
    from transformers import AutoModelForCausalLM

    from nbdiff.adapt.run_folder import FEATURE_CACHE
    from nbdiff.method.attention import flex_available

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # frozen: no master weights needed
    try:
        ar = AutoModelForCausalLM.from_pretrained(str(folder.path), dtype=dtype,
                                                  attn_implementation=config.attn_implementation)
    except (OSError, ValueError, RuntimeError) as exc:
        cause = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise NBDiffError(f"cannot load the model in {folder.path}: {cause}", "convert the model again") from None
    ar.requires_grad_(False)
    ar.eval().to(device)
    vocab = None
    if config.drafter_vocab and config.drafter_from is None:
        eos = [t for t in [tokenizer.eos_token_id] if t is not None]
        vocab = draft_vocabulary(data.train.input_ids, data.train.trainable, config.drafter_vocab, keep=eos)
    drafter = build_drafter(ar, config, folder.settings.mask_token_id, vocab)
    cache = None
    if config.drafter_cache_features:
        key = f"{drafter.config.target_fingerprint}|{drafter.config.target_layer_ids}|{tuple(data.train.input_ids.shape)}" \
              f"|{int(data.train.input_ids.sum())}|{config.seed}"
        cache = FeatureStore(lambda: run_dir() / FEATURE_CACHE, key)
    module = DrafterTraining(drafter, ar, cache).to(device)
    module.use_flex = flex_available(device)
    flex = "flex attention block mask" if module.use_flex else "dense bool mask (sdpa)"
    module.nbdiff_notes = [
        f"drafter: {len(drafter.layers)} layers "
        f"({config.drafter_init + ' init' if config.drafter_from is None else 'from ' + str(config.drafter_from)}), reads AR layers "
        f"{drafter.config.target_layer_ids}, block {config.block_size}, "
        f"{drafter.config.draft_vocab_size} draft tokens, {config.drafter_anchors} anchors per row, {flex}",
        f"AR model frozen in {str(dtype).replace('torch.', '')}" + (", features cached on disk" if cache else "")]
    return module


_EVAL_ROWS: dict[tuple, object] = {}


def eval_rows(config, tokenizer, data):
    """The rows evaluation walks: --drafter-eval-data (one document per row), else the held-out rows of --data."""
    if not config.drafter_eval_data:
        return data.eval
    key = (config.drafter_eval_data, id(tokenizer))
    if key not in _EVAL_ROWS:
        from nbdiff.adapt.data import load_corpus
        from nbdiff.drafter.data import document_rows

        corpus = load_corpus([config.drafter_eval_data], tokenizer)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        _EVAL_ROWS.clear()
        _EVAL_ROWS[key] = document_rows(corpus, pad, max_len=config.seq_len)
    return _EVAL_ROWS[key]


def export_drafter(module, run_dir: Path) -> None:
    """Write the trained drafter (nbdiff.drafter.folder.save_drafter) into the run folder, config.json last."""
    import os
    import shutil

    from nbdiff.drafter.folder import WEIGHTS, save_drafter

    run_dir = Path(run_dir)
    staging = run_dir / ".drafter.nbdiff-tmp-export"  # a name the run folder's --force rules know
    shutil.rmtree(staging, ignore_errors=True)
    save_drafter(getattr(module, "module", module).drafter, staging)
    for name in (WEIGHTS, "config.json"):  # a folder with config.json is a complete drafter folder
        os.replace(staging / name, run_dir / name)
    shutil.rmtree(staging, ignore_errors=True)
