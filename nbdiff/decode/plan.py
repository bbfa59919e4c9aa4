"""The drafting plan: which drafter drafts, at which block size, and why, decided once per decoding call.

`plan_drafting(model, options)` is the one place that reads `DecodeOptions.drafter` and the model's
folders; `nbdiff.api.stream` resolves a plan and passes it to `decode()`, which asks it (a bare
`decode()` call without one resolves its own). Exact mode's drafter, in order:

    --drafter DIR / 'trained' / a loaded Drafter   that drafter ('lookup+' before it: prompt lookup first)
    --drafter diffusion / ngram                    as named
    --drafter auto (exact mode's default):
        the model folder's drafter/ subfolder      after prompt lookup ('lookup+trained')
        a shipped drafter for this model           found by the model's weights (fingerprint, or a probe
                                                   of embedding rows that quantized copies pass)
                                                   (nbdiff.drafter.folder.shipped_drafter), after lookup
        --draft-steps given                        the block's denoising steps
        otherwise                                  n-gram prompt lookup

Lookup first, then the drafter: 1.54 against 1.23 tokens per verify for the drafter alone
(docs/benchmarks/drafter.md). The n-gram drafter needs no forward of its own, so a verify never
gives fewer tokens than block size 1; a one-step diffusion draft costs a forward and kept about
one token on the models we ship (docs/benchmarks/exact-mode.md, "Exact mode's default drafter").

Block size when none is asked for: a trained drafter's own (the block it was trained for; at most
TRAINED_BLOCK_BF16 where the model's weights are kept in bf16 on a CPU); lookup
drafts `lookup_block_size(model)` (the folder's block size is the diffusion's); otherwise the
block size the folder was adapted to (`nbdiff.loading.default_block_size`), 1 for a model that was
never converted.

Why lookup verifies at most 4 tokens with the few-row kernel: the width is the lever, and it is set by
what a verify costs, not by the model. A verify's width is 1 + the longest draft, so a step where lookup
finds nothing is a one-token pass, block size 1's step. On Qwen2.5-Coder-0.5B (fp32, this project's
2-core CPU) a verify of 2/4/8/16 tokens cost 1.05x/1.14x/1.54x/2.76x one token, as on SmolLM2 (4: 1.12x);
lookup keeps about 1.2-1.3 tokens a verify there, so widths past 4 cost more than their tokens give:
measured 1.06x block size 1 at 4, 0.99x at 8, 0.83x at 16, and capping the draft by the length of the
n-gram that matched moved the simulated speed by under 1% (docs/benchmarks/exact-mode.md, "Exact mode on
Qwen2.5-Coder-0.5B"). The model's own diffusion drafts cost a forward each and are not planned unless
--draft-steps asks for them.

Near-ties (nbdiff.decode.exact) are counted only where a verify pass can round unlike one-token steps
(`verify_rounds_like_steps`): the plan says so once per call (`counts_near_ties`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nbdiff.decode.options import AUTO, LOOKUP, TRAINED, DecodeOptions, kernel_isa, lookup_block_size

OFF, DIFFUSION, NGRAM, TRAINED_KIND = "off", "diffusion", "ngram", "trained"
KINDS = (OFF, DIFFUSION, NGRAM, TRAINED_KIND)


@dataclass(frozen=True)
class DraftingPlan:
    """What one decoding call drafts with. Built by `plan_drafting`; the decoder asks it and nothing else."""

    kind: str
    """'off' (exact mode off: block diffusion, or plain AR at block size 1), 'diffusion' (the block's
    denoising steps draft), 'ngram' (prompt lookup) or 'trained' (a trained drafter)."""
    block_size: int
    """Tokens per block (exact mode: the verify width)."""
    drafter: Any = None
    """The loaded nbdiff.drafter.Drafter (kind 'trained'), else None."""
    lookup_first: bool = False
    """Kind 'trained': prompt lookup where its match has 2+ tokens, the drafter elsewhere."""
    draft_threshold: float = 0.0
    """Kind 'trained': verify draft tokens while the product of their probabilities exceeds this."""
    verify_costs: tuple[float, ...] = ()
    """Kind 'trained': verify_costs[m] = what a verify pass of m + 1 tokens costs against one token, m = 0..block-1
    (`verify_costs`): with the drafter's cost, how many draft tokens each verify checks (nbdiff.drafter.decoding)."""
    drafter_cost: float = 0.0
    """Kind 'trained': a drafter forward's cost against a one-token step (DRAFTER_COST)."""
    source: str | None = None
    """Kind 'trained': the drafter's folder (None for a Drafter passed in loaded)."""
    name: str = ""
    """The drafter in --drafter's words: 'ngram', 'diffusion', 'lookup+trained' (the folder's drafter/), a folder."""
    why: str = ""
    """One line for people (generate/bench --json): why this drafter and this block size."""
    lookup_follows: bool = False
    """Kind 'ngram': each row's next lookup draft is at most one token longer than its last draft's accepted
    run (a rejected first token: a draft of one), so only drafts that keep being kept grow to the block's
    width. Planned where wide verifies cost (the kernel on AVX2-only CPUs)."""
    counts_near_ties: bool = False
    """Greedy verification counts near-ties (nbdiff.decode.exact.near_ties): only where a verify pass can round
    unlike block size 1's one-token steps (`verify_rounds_like_steps`); elsewhere the count is 0 by definition."""

    draft_gate: float = 0.0
    """Kind 'trained': a row's drafter forward runs only where the model's confidence in the block's first token is
    at least this (options.draft_gate, else DRAFT_GATE)."""

    @property
    def exact(self) -> bool:
        return self.kind != OFF

    @property
    def trained(self) -> bool:
        return self.kind == TRAINED_KIND

    def to_dict(self) -> dict[str, Any]:
        """Plain values for JSON (FinalEvent.plan, generate --json, bench rows)."""
        return {"drafter": self.name, "kind": self.kind, "block_size": self.block_size, "lookup_first": self.lookup_first,
                "draft_threshold": self.draft_threshold if self.trained else None,
                "draft_gate": self.draft_gate if self.trained else None, "source": self.source, "why": self.why,
                "counts_near_ties": self.counts_near_ties}


def plan_drafting(model, options: DecodeOptions, *, registry=None) -> DraftingPlan:
    """The drafting plan of one decoding call (see the module docstring). `registry`: the folder of
    shipped drafters to search (default `nbdiff.drafter.folder.shipped_drafters_dir()`)."""
    if not options.exact:
        block, because = _block_size(model, options, None)
        return DraftingPlan(OFF, block, name=OFF, why=f"exact mode off; block size {block}: {because}")
    kind, part, lookup, name, why = _drafter(model, options, registry)
    drafter = source = None
    if kind == TRAINED_KIND:
        from nbdiff.drafter.decoding import drafter_path, loaded_drafter

        path = None if not isinstance(part, (str, Path)) else drafter_path(model, part)  # 'trained': the folder's drafter/
        drafter = loaded_drafter(model, part if path is None else path)
        source = None if path is None else str(path)
    block, because = _block_size(model, options, kind, drafter)
    follows = LOOKUP_FOLLOWS and kind == NGRAM and block > 2 and kernel_isa(model) == 1
    if follows:
        why += "; each row's lookup draft at most one token longer than its last accepted run (wide verifies cost on AVX2)"
    costs = verify_costs(model, block) if drafter is not None and COST_CUT else ()
    return DraftingPlan(kind, block, drafter, lookup, options.draft_threshold if drafter is not None else 0.0,
                        costs, drafter_cost(model) if drafter is not None else 0.0, source, name,
                        f"{why}; block size {block}: {because}",
                        counts_near_ties=options.temperature == 0 and not verify_rounds_like_steps(model),
                        lookup_follows=follows,
                        draft_gate=(DRAFT_GATE if options.draft_gate is None else options.draft_gate) if drafter is not None else 0.0)


TRAINED_BLOCK_BF16 = 4
"""A trained drafter's block where the model's weights are kept in bf16 on a CPU (`kept_bf16`): a verify of 4 tokens
costs about 1.26x one there, 8 tokens 2.2x (VERIFY_COSTS_CPU_BF16). Measured on Qwen2.5-Coder-0.5B's shipped drafter
(trained at 8) over 8 held-out code prompts, 2 interleaved rounds (Intel Xeon model 106, 2 threads): block 4 with
drafts cut by cost 1.44x block size 1, block 8 1.35x, block 8 cut by cost 1.29x; in the next run, beside llama.cpp,
block 4 1.47x, block 8 1.43x, block 4 cut by cost 1.37x (docs/benchmarks/drafter-qwen05.md, section 10)."""

ROW_COST_CPU = 0.074
"""A CPU verify pass's cost per token past the first, against a one-token step, up to 8 tokens: Qwen2.5-Coder-0.5B in
fp32, 2 threads, nbdiff's few-row kernel: 2/4/8 tokens 1.10x/1.19x/1.52x one (Intel Xeon model 106, 2026-12-07) and
1.05x/1.14x/1.54x (Xeon model 207, docs/benchmarks/exact-mode.md); past 8 the kernel's row blocks end and each
token costs ROW_COST_CPU_WIDE (16 tokens 2.76x)."""
ROW_COST_CPU_WIDE = 0.155
VERIFY_COSTS_CPU_BF16 = (1.0, 1.17, 1.26, 1.26, 1.58, 1.77, 1.9, 2.17, 2.33, 2.6, 2.95, 3.3, 3.45, 3.6, 3.75, 3.9)
"""A CPU verify pass of 1..16 tokens against a one-token step where the weights are kept in bf16 under fp32 sums
(nbdiff.cpu_kernel.keep_bf16): a step reads half the bytes, so it takes half the time, while every extra row costs
the multiply-adds it cost in fp32. Qwen2.5-Coder-0.5B, 2 threads, Intel Xeon model 106 (AVX-512, one 512-bit FMA
per cycle): one token 41-45 ms, 4 tokens 51-56, 8 tokens 91-96, 16 tokens 147-197 (two runs of
benchmarks/step_costs.py, docs/benchmarks/cpu-kernel.md); past 16 tokens 0.15 more per token."""
ROW_COST_GPU = 0.01
"""A GPU pass of a few tokens costs about what one does (reading the weights dominates); not measured by nbdiff yet."""
DRAFTER_COST = 0.09
"""A trained drafter's forward against a one-token step: 6.9 ms against 78 ms for the shipped 2-layer drafter of
Qwen2.5-Coder-0.5B (fp32, 2 threads, Intel Xeon model 106; docs/benchmarks/drafter-qwen05.md, section 9)."""
DRAFTER_COST_BF16 = 0.16
"""The same against a one-token step of the model's weights kept in bf16: 6.9-7.8 ms against 41-45 ms."""


DRAFT_GATE = 0.6
"""A trained drafter drafts a block only where the model gave the block's first token at least this confidence
(options.draft_gate overrides it; 0 = every block). Where the model itself is unsure of the next token its drafter's
next tokens are kept less often: on Qwen2.5-Coder-0.5B's shipped drafter, blocks whose first token had confidence
under 0.6 kept 0.32-0.43 draft tokens against 0.77-0.87 above 0.9 (held-out code; 0.35-0.42 against 0.56-0.66 on the
five bench suites). A skipped drafter forward saves its cost (about 0.09 of a step) and the verify's extra rows;
the row still drafts by lookup. Simulated step by step from every position of block size 1's replies (100 prompts,
`benchmarks/drafting_oracle.py`, verify costs measured inside decoding), 0.6 moved chat from 1.10x to 1.12x block
size 1, rewrite from 1.11x to 1.15x (the bench's first two rewrite prompts 0.92x to 0.98x), code from 1.46x to 1.44x
and held-out code from 1.34x to 1.31x; the wall clock cannot tell such differences apart on this machine
(docs/benchmarks/drafter-qwen05.md, section 11)."""


COST_CUT = False
"""True: a trained drafter's drafts (and lookup's, lookup first) are cut to the length with the most expected tokens per
verify cost (nbdiff.drafter.decoding.best_length; with the bf16 costs where the model's weights are kept in bf16).
False (the default): drafts are cut by --draft-threshold alone. Measured and left off: with fp32 weights, in
interleaved rounds on the 0.5B the cut verified fewer tokens (1.72 against 1.75 kept per forward on held-out code)
without a speed-up that showed through the machine's noise (docs/benchmarks/drafter-qwen05.md, section 9); with kept
bf16 weights, at block 4, 25.3 against 27.2 tokens/s (section 10)."""


def kept_bf16(model) -> bool:
    """Whether the model's output layer reads weights kept in bf16 under fp32 sums (nbdiff.cpu_kernel.keep_bf16)."""
    from nbdiff.cpu_kernel.linear import kept_bf16 as layer_kept

    return layer_kept(model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None)


def drafter_cost(model) -> float:
    """A trained drafter forward's cost against a one-token step of this model."""
    return DRAFTER_COST_BF16 if kept_bf16(model) else DRAFTER_COST


def verify_costs(model, block: int) -> tuple[float, ...]:
    """costs[m]: a verify pass of m + 1 tokens against one token, m = 0..block-1 (the constants above)."""
    import torch

    device = getattr(model, "device", None)
    gpu = device is not None and torch.device(device).type != "cpu"
    bf16 = not gpu and kept_bf16(model)
    out = []
    for m in range(block):
        if gpu:
            out.append(1.0 + ROW_COST_GPU * m)
        elif bf16:
            table = VERIFY_COSTS_CPU_BF16
            out.append(table[min(m, len(table) - 1)] + 0.15 * max(m - len(table) + 1, 0))
        else:
            out.append(1.0 + ROW_COST_CPU * min(m, 7) + ROW_COST_CPU_WIDE * max(m - 7, 0))
    return tuple(round(c, 4) for c in out)


LOOKUP_FOLLOWS = True  # lookup_follows where it is planned (False: never; for comparisons)


def verify_rounds_like_steps(model) -> bool:
    """Whether a verify pass of n tokens gives every row the same bits as n one-token steps on this model:
    fp32 (or wider) weights on the CPU, where nbdiff's few-row kernel and torch's products are batch-invariant
    (greedy exact replies equal block size 1's token for token: tests/test_exact.py). There a near-tie cannot
    change a token, so exact mode skips counting them (a top-2 over the vocabulary at every verified position).
    16-bit weights, or any device but the CPU (GPU products pick their reduction order by shape), round a
    wider pass differently: near-ties are counted there."""
    import torch

    dtype = getattr(model, "dtype", None)
    device = getattr(model, "device", None)
    return dtype in (torch.float32, torch.float64) and device is not None and torch.device(device).type == "cpu"


def _drafter(model, options: DecodeOptions, registry) -> tuple[str, Any, bool, str, str]:
    """(kind, the trained part: 'trained', a folder or a Drafter, lookup first?, name, why)."""
    spec = options.drafter
    if isinstance(spec, str) and spec in (DIFFUSION, NGRAM):
        return spec, None, False, spec, f"--drafter {spec}"
    if not (isinstance(spec, str) and spec == AUTO):
        from nbdiff.drafter.decoding import split_spec

        lookup, part = split_spec(spec)
        if not isinstance(part, (str, Path)):
            name = (LOOKUP if lookup else "") + f"<{type(part).__name__} for {part.config.target_architecture}>"
            return TRAINED_KIND, part, lookup, name, "a loaded drafter"
        return TRAINED_KIND, part, lookup, str(spec), f"--drafter {spec}"
    from nbdiff.drafter.folder import bundled_drafter, shipped_drafter

    found = bundled_drafter(model)
    if found is not None:
        return TRAINED_KIND, found, True, LOOKUP + TRAINED, "--drafter auto: prompt lookup, then the model folder's drafter/"
    shipped = shipped_drafter(model, registry)
    if shipped is not None:
        return (TRAINED_KIND, shipped, True, LOOKUP + str(shipped),
                f"--drafter auto: prompt lookup, then the shipped drafter {shipped.name} (trained for this model's weights: fingerprint or embedding probe)")
    if options.draft_steps is not None:
        return DIFFUSION, None, False, DIFFUSION, "--drafter auto with --draft-steps: the block's denoising steps draft"
    return NGRAM, None, False, NGRAM, "--drafter auto: prompt lookup (no drafter/ in the model folder, no shipped drafter for this model)"


def _block_size(model, options: DecodeOptions, kind: str | None, drafter=None) -> tuple[int, str]:
    """(block size, why) when options.block_size is None; as asked otherwise."""
    from nbdiff.loading import default_block_size, model_settings

    if options.block_size is not None:
        return options.block_size, "as asked"
    settings = model_settings(model)
    if drafter is not None:
        trained = drafter.config.block_size
        if kept_bf16(model) and trained > TRAINED_BLOCK_BF16:
            return TRAINED_BLOCK_BF16, (f"the drafter's block of {trained} cut to {TRAINED_BLOCK_BF16}: with weights kept "
                                        "in bf16 a step costs half, a verify's extra rows what they cost in fp32")
        return trained, "the block the drafter was trained for"
    if settings is not None and kind == NGRAM:
        isa = kernel_isa(model)
        where = "with nbdiff's few-row CPU kernel" + (" on AVX2" if isa == 1 else "") if isa else "with torch's products"
        return lookup_block_size(model), f"lookup drafts' measured best {where}"
    if settings is None:
        return 1, "a model that was never converted decodes as plain AR"
    return default_block_size(settings), "the block size the folder was adapted to"
