"""`nbdiff bench` as a library: decode prompt suites with every method side by side, in one run.

    rows = run_bench("smollm2-nbdiff", load_suites(), BenchConfig(block_sizes=(1, 4, 8)))

Rows of one run (per dtype, all against the same prompts and weights):
- `ar`: transformers `generate()` (greedy, KV cache, EOS honoured): what a user would otherwise run;
- `source`: `generate()` on the AR model an adapted folder came from (settings `source` or the adapt
  record's `from`, when that folder exists here);
- `nbdiff`: the block decoder for each block size x threshold, through `nbdiff.api.generate`, so
  the replies are the ones a user gets (chat template, EOS honoured);
- `exact`, `exact-ngram`: the decoder's exact mode (drafts verified by the AR pass) with the
  diffusion or the n-gram drafter, when this version of the decoder has it (`available_modes()`);
- `exact-auto`: exact mode as `nbdiff generate --exact` runs it: the drafting plan decides the drafter
  and the block size (nbdiff.decode.plan: the folder's drafter/, a shipped drafter found by the model's
  fingerprint, else prompt lookup), one row per dtype whatever the block sizes asked;
- `exact-drafter`: exact mode with a trained drafter (`BenchConfig.drafter`, or the one the drafting
  plan finds), one row per block size and verify-width threshold; it brings the `lookup` row along:
  transformers' own prompt-lookup decoding (`generate(prompt_lookup_num_tokens=...)`), the lossless
  speed-up a user has without nbdiff. Extras: tokens per verify (`accepted_length`), drafter
  forwards (the `forwards` column counts the AR model's), speed against the `lookup` row, the
  share of replies identical to the `ar` row's, and `near_ties` (kept tokens whose top two logits
  were within the dtype's rounding: nbdiff.decode.exact). Every decoder row carries the drafting plan
  that ran (`BenchRow.plan`: drafter, kind, block size, why).

Timing: one prompt at a time (batch 1: no padding, and a row's time is not set by the slowest
prompt of a batch), after one warm-up decode per row, model loading excluded; each prompt's time
is the median of `repeats` decodes. The rows of one prompt run back to back before the next prompt,
so a change in machine load (a shared CPU) touches every row alike instead of a few.

Quality (nbdiff.eval.metrics): generative perplexity of each reply scored in fp32 by the source AR model
(or the same weights read causally), distinct-2, and agreement with the `ar` reply. A row is marked
`below_ar` when its perplexity exceeds the `ar` row's by more than 10 % or its distinct-2 is more
than 0.05 below it (BELOW_AR_RULE); every aggregate is a token-weighted sum over the suite's prompts.

The library never prints: progress goes to an optional callback.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from nbdiff.eval import metrics
from nbdiff.errors import NBDiffError
from nbdiff.fsutil import quiet_transformers
from nbdiff.resources import bench_suites_dir

SUITES_DIR = bench_suites_dir()
"""Where the shipped suites live (one `NAME.jsonl` per suite)."""
MODES = ("ar", "source", "lookup", "nbdiff", "exact", "exact-ngram", "exact-auto", "exact-drafter")
DECODER_MODES = ("nbdiff", "exact", "exact-ngram", "exact-auto", "exact-drafter", "lookup")
"""What --modes takes (`lookup` is transformers' prompt lookup, a baseline like `ar`)."""
PPL_MARGIN = 1.10
DISTINCT_MARGIN = 0.05
BELOW_AR_RULE = (
    f"gen_ppl above {PPL_MARGIN:.2f} x the ar row's, or distinct-2 more than {DISTINCT_MARGIN} below it"
)


# --------------------------------------------------------------------------------------------
# prompts


@dataclass
class BenchPrompt:
    suite: str
    prompt: str


def suite_names(folder: Path = SUITES_DIR) -> list[str]:
    """Names of the shipped suites (file stems of `assets/bench/*.jsonl`)."""
    return sorted(p.stem for p in folder.glob("*.jsonl")) if folder.is_dir() else []


def load_suites(names: Sequence[str] | None = None, folder: Path = SUITES_DIR) -> list[BenchPrompt]:
    """Prompts of the named suites (all shipped suites when `names` is empty)."""
    known = suite_names(folder)
    if not known:
        raise NBDiffError(f"no prompt suites found in {folder}", "pass your own prompts with --prompts FILE")
    unknown = [n for n in names or [] if n not in known]
    if unknown:
        raise NBDiffError(f"unknown suite(s): {', '.join(unknown)}", f"known suites: {', '.join(known)}")
    prompts: list[BenchPrompt] = []
    for name in names or known:
        prompts += [BenchPrompt(name, p.prompt) for p in read_prompts(folder / f"{name}.jsonl", default_suite=name)]
    return prompts


def read_prompts(path: str | Path, default_suite: str | None = None) -> list[BenchPrompt]:
    """Prompts of a file: JSON lines with `prompt` (and optional `suite`), or one plain prompt a line.

    A file whose first non-blank line starts with `{` is read as JSON lines; otherwise each
    non-blank line is one prompt. Any bad line is an NBDiffError naming the file and line number.
    """
    path = Path(path)
    suite = default_suite or path.stem
    if not path.is_file():
        raise NBDiffError(f"prompts file {path} not found", "pass a file with one prompt a line, or JSON lines with a `prompt` field")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise NBDiffError(f"{path} is not UTF-8 text: {exc.reason} at byte {exc.start}") from None
    numbered = [(i + 1, line) for i, line in enumerate(lines) if line.strip()]
    if not numbered:
        raise NBDiffError(f"{path} holds no prompts", "write one prompt a line")
    as_json = numbered[0][1].lstrip().startswith("{")
    prompts: list[BenchPrompt] = []
    for number, line in numbered:
        where = f"{path}, line {number}"
        if not as_json:
            prompts.append(BenchPrompt(suite, line.strip()))
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise NBDiffError(f"{where}: not valid JSON ({exc.msg})", "every line must be one JSON object with a `prompt` field") from None
        if not isinstance(record, dict):
            raise NBDiffError(f"{where}: expected a JSON object, got {type(record).__name__}", 'write {"prompt": "...", "suite": "..."}')
        text = record.get("prompt")
        if not isinstance(text, str) or not text.strip():
            raise NBDiffError(f"{where}: `prompt` is missing or empty", 'write {"prompt": "...", "suite": "..."}')
        name = record.get("suite", suite)
        if not isinstance(name, str) or not name.strip():
            raise NBDiffError(f"{where}: `suite` must be a non-empty string", "leave it out to use the file name")
        prompts.append(BenchPrompt(name.strip(), text.strip()))
    return prompts


def limit_per_suite(prompts: Sequence[BenchPrompt], limit: int | None) -> list[BenchPrompt]:
    """The first `limit` prompts of each suite (all when None)."""
    if limit is None:
        return list(prompts)
    seen: dict[str, int] = {}
    kept = []
    for p in prompts:
        seen[p.suite] = seen.get(p.suite, 0) + 1
        if seen[p.suite] <= limit:
            kept.append(p)
    return kept


# --------------------------------------------------------------------------------------------
# what to run


def available_modes() -> list[str]:
    """Decoder modes this version of nbdiff supports (exact mode needs `DecodeOptions.exact`)."""
    from nbdiff.decode.options import DecodeOptions

    names = set(DecodeOptions.field_names())
    modes = ["nbdiff"]
    if "exact" in names:
        modes.append("exact")
        if "drafter" in names:
            modes += ["exact-ngram", "exact-auto"]
        if "draft_threshold" in names:
            modes.append("exact-drafter")
    return modes + ["lookup"]


def _default_draft_threshold() -> float:
    from nbdiff.decode.options import DecodeOptions

    return DecodeOptions.draft_threshold


@dataclass
class BenchConfig:
    """What `run_bench` decodes and how."""

    block_sizes: tuple[int, ...] = (1, 4, 8)
    """Block sizes of the decoder rows (1 = the decoder as plain AR)."""
    thresholds: tuple[float, ...] = (0.9, 0.7, 0.5)
    """Confidence thresholds of the decoder rows (block size 1 has nothing to denoise: one row)."""
    modes: tuple[str, ...] = ("nbdiff", "exact")
    """Decoder modes; modes the decoder lacks are skipped with a note."""
    max_new_tokens: int = 64
    """Upper bound on each reply (EOS ends a reply earlier)."""
    repeats: int = 1
    """Timed decodes per prompt and row; the median counts."""
    dtypes: tuple[str, ...] = ("auto",)
    """Weight dtypes to compare side by side (each gets its own ar row)."""
    device: str = "auto"
    quantize: str | None = None
    sub_blocks: int = 1
    draft_steps: int | None = None
    """Cap on the denoising steps of an exact-mode draft (when the decoder has `draft_steps`)."""
    exact_thresholds: tuple[float, ...] | None = None
    """Draft thresholds of the exact rows (None = `thresholds`); exact output does not depend on them."""
    drafter: str | None = None
    """Trained drafter folder of the exact-drafter rows (None = the drafting plan's: the folder's drafter/ or a shipped one)."""
    draft_thresholds: tuple[float, ...] = field(default_factory=lambda: (_default_draft_threshold(),))
    """Verify-width thresholds of the exact-drafter rows (0 = verify the whole block; default: DecodeOptions')."""
    lookup_tokens: int = 10
    """Tokens the `lookup` row drafts per step (transformers' prompt_lookup_num_tokens)."""
    warmup: bool = True

    def __post_init__(self) -> None:
        from nbdiff.method.settings import check_block_size

        if not self.block_sizes:
            raise NBDiffError("--block-sizes is empty", "e.g. --block-sizes 1,4,8")
        for b in self.block_sizes:
            check_block_size(b, "--block-sizes")
        if not self.thresholds:
            raise NBDiffError("--thresholds is empty", "e.g. --thresholds 0.9,0.7")
        for t in self.thresholds + (self.exact_thresholds or ()):
            if not 0.0 < t <= 1.0:
                raise NBDiffError(f"--thresholds values must be in (0, 1], got {t}")
        bad = [m for m in self.modes if m not in DECODER_MODES]
        if bad:
            raise NBDiffError(f"unknown mode(s): {', '.join(bad)}", f"modes: {', '.join(DECODER_MODES)}")
        if self.max_new_tokens < 1:
            raise NBDiffError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.repeats < 1:
            raise NBDiffError(f"--repeats must be >= 1, got {self.repeats}")
        if not self.dtypes:
            raise NBDiffError("--dtypes is empty", "e.g. --dtypes fp32,bf16")
        if not self.draft_thresholds or any(not 0.0 <= t < 1.0 for t in self.draft_thresholds):
            raise NBDiffError(f"--draft-thresholds values must be in [0, 1), got {self.draft_thresholds}", "e.g. 0,0.3")
        if self.lookup_tokens < 1:
            raise NBDiffError(f"--lookup-tokens must be >= 1, got {self.lookup_tokens}")


@dataclass(frozen=True)
class RowSpec:
    """One row of the table: a method and its settings (per dtype)."""

    mode: str
    dtype: str
    block_size: int = 1
    """0 for `exact-auto`: the drafting plan's."""
    threshold: float | None = None

    @property
    def label(self) -> str:
        if self.mode in ("ar", "source", "lookup"):
            return f"{self.dtype} {self.mode}"
        if self.mode == "exact-auto":
            return f"{self.dtype} {self.mode}"
        thr = "" if self.threshold is None else f" t={self.threshold:g}"
        return f"{self.dtype} {self.mode} b={self.block_size}{thr}"


def plan_rows(config: BenchConfig, dtypes: Sequence[str], has_source: bool, modes: Sequence[str]) -> list[RowSpec]:
    """Every row to decode, AR baselines first (per dtype)."""
    specs: list[RowSpec] = []
    for dtype in dtypes:
        specs.append(RowSpec("ar", dtype))
        if has_source:
            specs.append(RowSpec("source", dtype))
        if "lookup" in modes or "exact-drafter" in modes:
            specs.append(RowSpec("lookup", dtype))
        for mode in modes:
            if mode == "exact-auto":  # the plan picks the block size: one row
                specs.append(RowSpec(mode, dtype, 0))
                continue
            for b in config.block_sizes:
                if mode == "exact-drafter" and b > 1:
                    specs += [RowSpec(mode, dtype, b, t) for t in config.draft_thresholds]
                elif mode == "nbdiff" and b == 1:
                    specs.append(RowSpec(mode, dtype, 1))  # nothing to denoise: the threshold plays no part
                elif mode == "exact" and b > 1:
                    specs += [RowSpec(mode, dtype, b, t) for t in config.exact_thresholds or config.thresholds]
                elif mode == "exact-ngram" and b > 1:
                    specs.append(RowSpec(mode, dtype, b))  # n-gram drafts have no confidence threshold
                elif mode == "nbdiff":
                    specs += [RowSpec(mode, dtype, b, t) for t in config.thresholds]
    return specs


# --------------------------------------------------------------------------------------------
# results


@dataclass
class Sample:
    """One prompt decoded by one row."""

    suite: str
    prompt_ids: list[int]
    tokens: list[int]
    """Reply token ids, up to and including EOS."""
    forwards: int
    seconds: float
    """Median over the repeats."""
    nll: float = float("nan")
    extra: dict[str, float] = field(default_factory=dict)
    """Exact-mode counts of the decoder's final record (drafted, accepted, verified blocks, per offset)."""
    plan: dict[str, Any] = field(default_factory=dict)
    """The drafting plan of a decoder row (FinalEvent.plan)."""


@dataclass
class BenchRow:
    """A row of the table: one method over one suite (or "all")."""

    suite: str
    mode: str
    dtype: str
    block_size: int
    threshold: float | None
    prompts: int
    new_tokens: int
    forwards: int
    tokens_per_forward: float
    seconds: float
    tokens_per_second: float
    speedup: float
    gen_ppl: float
    distinct2: float
    ar_agreement: float
    below_ar: bool
    extra: dict[str, float] = field(default_factory=dict)
    plan: dict[str, Any] | None = None
    """Decoder rows: the drafting plan that ran (nbdiff.decode.plan: drafter, kind, block size, why)."""

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key, value in list(data.items()):
            if isinstance(value, float):
                data[key] = None if math.isnan(value) else round(value, 4)
        data["extra"] = {k: (None if isinstance(v, float) and math.isnan(v) else round(v, 4)) for k, v in self.extra.items()}
        return {"kind": "row", **data}


@dataclass
class BenchResult:
    machine: dict[str, Any]
    rows: list[BenchRow]
    notes: list[str]
    samples: dict[RowSpec, list[Sample]]
    suites: list[str]

    def rows_of(self, suite: str) -> list[BenchRow]:
        return [r for r in self.rows if r.suite == suite]


# --------------------------------------------------------------------------------------------
# running


Progress = Callable[[int, int, str], None]
"""progress(done, total, label): called after every timed decode."""


def _local_folder(text: str | None, base: Path) -> Path | None:
    if not text:
        return None
    for candidate in (Path(text).expanduser(), base / text):
        if (candidate / "config.json").is_file() and any(candidate.glob("*.safetensors")):
            return candidate.resolve()
    return None


def source_folder(model_path: str | Path) -> Path | None:
    """The AR folder an adapted folder came from (adapt `from`, then settings `source`), if it is here."""
    from nbdiff.adapters import is_adapter_folder, read_adapter_folder
    from nbdiff.method.settings import read_settings

    folder = Path(model_path).expanduser().resolve()
    if is_adapter_folder(folder):  # an adapter's source is the base it was trained on
        return read_adapter_folder(folder)[1].resolve()
    settings = read_settings(folder)
    if settings is None:
        return None
    adapt = settings.extra.get("adapt") if isinstance(settings.extra, dict) else None
    for text in ((adapt or {}).get("from"), settings.source):
        found = _local_folder(text, folder.parent)
        if found is not None and found != folder:
            return found
    return None


def ar_generate(model, prompt_ids: Sequence[int], max_new_tokens: int, eos: list[int], pad: int,
                lookup: int | None = None) -> tuple[list[int], float, int]:
    """transformers greedy `generate()` with its KV cache, EOS honoured; `lookup` = its prompt-lookup
    decoding with that many draft tokens. Returns (reply ids, seconds, forwards of the model)."""
    import time

    from transformers import GenerationConfig

    x = torch.tensor([list(prompt_ids)], device=model.device)  # [1, P]
    config = GenerationConfig(
        do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos or None, pad_token_id=pad, use_cache=True,
        prompt_lookup_num_tokens=lookup,
    )
    calls = []
    hook = model.register_forward_pre_hook(lambda *_: calls.append(1))  # prompt lookup verifies several tokens a call
    try:
        with torch.no_grad(), quiet_transformers():
            _sync(model)
            start = time.perf_counter()
            out = model.generate(x, attention_mask=torch.ones_like(x), generation_config=config)
            _sync(model)
            seconds = time.perf_counter() - start
    finally:
        hook.remove()
    reply = out[0, x.shape[1]:].tolist()
    for i, t in enumerate(reply):  # batch 1: generate stops at the first EOS; keep it, drop nothing else
        if t in eos:
            reply = reply[: i + 1]
            break
    return reply, seconds, len(calls)


def _sync(model) -> None:
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)


def _decode_options(spec: RowSpec, config: BenchConfig, max_new_tokens: int):
    from nbdiff.decode.options import DecodeOptions

    if spec.mode == "exact-auto":  # `nbdiff generate --exact`: drafter and block size from the plan
        return DecodeOptions(exact=True, max_new_tokens=max_new_tokens, temperature=0.0)
    values: dict[str, Any] = dict(block_size=spec.block_size, sub_blocks=min(config.sub_blocks, spec.block_size),
                                  max_new_tokens=max_new_tokens, temperature=0.0)
    if spec.threshold is not None:
        values["threshold"] = spec.threshold
    names = set(DecodeOptions.field_names())
    if spec.mode == "exact-drafter":
        values.pop("threshold", None)
        return DecodeOptions(**values, drafter=config.drafter, draft_threshold=spec.threshold or 0.0)
    if spec.mode in ("exact", "exact-ngram"):
        values["exact"] = True
        if "drafter" in names:
            values["drafter"] = "ngram" if spec.mode == "exact-ngram" else "diffusion"
        if config.draft_steps is not None and "draft_steps" in names and spec.mode == "exact":
            values["draft_steps"] = config.draft_steps
    return DecodeOptions(**values)


def _final_extras(final) -> dict[str, float]:
    """Exact-mode counts of a FinalEvent (absent from decoders without exact mode): summable per suite."""
    out: dict[str, float] = {}
    for name in ("drafted", "accepted", "verified_blocks", "drafter_forwards", "drafter_gated", "near_ties"):
        value = getattr(final, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            out[name] = float(value)
    for k, count in enumerate(getattr(final, "accepted_at", None) or []):
        out[f"accepted_at_{k + 1}"] = float(count)
    return out if out.get("verified_blocks") else {}


class _Runner:
    """Decodes one prompt under one row spec with the loaded models."""

    def __init__(self, models: dict[str, tuple[Any, Any]], sources: dict[str, tuple[Any, Any]], config: BenchConfig):
        self.models, self.sources, self.config = models, sources, config

    def once(self, spec: RowSpec, prompt: str, max_new_tokens: int) -> Sample:
        from nbdiff import api

        model, tok = (self.sources if spec.mode == "source" else self.models)[spec.dtype]
        prompt_ids = api.encode(tok, prompt)
        if spec.mode in ("ar", "source", "lookup"):
            pad = tok.pad_token_id if tok.pad_token_id is not None else 0
            lookup = self.config.lookup_tokens if spec.mode == "lookup" else None
            tokens, seconds, forwards = ar_generate(model, prompt_ids, max_new_tokens, api.eos_ids(model, tok), pad, lookup)
            return Sample("", prompt_ids, tokens, forwards=forwards, seconds=seconds)
        _sync(model)
        _, final = api.generate(model, tok, prompt, _decode_options(spec, self.config, max_new_tokens))
        _sync(model)
        return Sample("", prompt_ids, list(final.tokens[0]), forwards=final.forwards, seconds=final.seconds,
                      extra=_final_extras(final), plan=dict(getattr(final, "plan", None) or {}))

    def timed(self, spec: RowSpec, prompt: BenchPrompt) -> Sample:
        runs = [self.once(spec, prompt.prompt, self.config.max_new_tokens) for _ in range(self.config.repeats)]
        first = runs[0]
        first.suite = prompt.suite
        first.seconds = statistics.median(r.seconds for r in runs)
        return first


def _load(path, dtype: str, config: BenchConfig):
    from nbdiff.loading import load_model

    return load_model(path, quantize=config.quantize, device=config.device, dtype=dtype)


def _dtype_name(model) -> str:
    dtype = next(model.parameters()).dtype
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


def machine_info(models: dict[str, tuple[Any, Any]], config: BenchConfig, model_path: str) -> dict[str, Any]:
    """What the figures were measured on: CPU/GPU, threads, versions, dtypes, load average."""
    import transformers

    from nbdiff.hardware import cpu_name

    cpu = cpu_name()
    first_model = next(iter(models.values()))[0]
    device = first_model.device
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    reasons = {}
    if "auto" in config.dtypes:
        try:
            from nbdiff.hardware import auto_dtype

            reasons["auto"] = auto_dtype(device.type).reason
        except ImportError:  # older versions pick the dtype without saying why
            pass
    return {
        "kind": "machine",
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "gpu": gpu,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "dtypes": list(models),
        "dtype": ",".join(models),
        "dtype_reason": reasons.get("auto", "requested"),
        "quantize": config.quantize,
        "model": str(model_path),
        "max_new_tokens": config.max_new_tokens,
        "repeats": config.repeats,
        "load_average_start": load,
    }


def run_bench(model_path: str | Path, prompts: Sequence[BenchPrompt], config: BenchConfig | None = None,
              progress: Progress | None = None) -> BenchResult:
    """Decode every prompt with every row of `plan_rows` and aggregate per suite and over all."""
    config = config or BenchConfig()
    if not prompts:
        raise NBDiffError("no prompts to benchmark", "pick a suite with --suite or pass --prompts FILE")
    notes: list[str] = []
    modes = [m for m in config.modes if m in available_modes()]
    missing = [m for m in config.modes if m not in modes]
    if missing:
        notes.append(f"this decoder has no {', '.join(missing)} mode: those rows are skipped")
    source = source_folder(model_path)
    # load every dtype's model (and source model) up front so the rows of a prompt run back to back
    models: dict[str, tuple[Any, Any]] = {}
    sources: dict[str, tuple[Any, Any]] = {}
    for requested in config.dtypes:
        model, tok = _load(model_path, requested, config)
        name = _dtype_name(model)
        if name in models:
            notes.append(f"--dtypes {requested} resolved to {name}, already benchmarked")
            continue
        models[name] = (model, tok)
        if source is not None:
            sources[name] = _load(source, name, config)
    if source is not None:
        notes.append(f"source AR model: {source}")
    dtypes = list(models)
    if "exact-drafter" in modes:
        config, found = _with_drafter(config, next(iter(models.values()))[0], notes)
        modes = modes if found else [m for m in modes if m != "exact-drafter"]
    specs = plan_rows(config, dtypes, source is not None, modes)
    runner = _Runner(models, sources, config)
    machine = machine_info(models, config, str(model_path))

    if config.warmup:  # first calls pay for allocation and kernel selection; keep that out of the timings
        warmed = set()
        for spec in specs:  # once per shape: thresholds do not change what runs
            if (spec.mode, spec.dtype, spec.block_size) not in warmed:
                warmed.add((spec.mode, spec.dtype, spec.block_size))
                runner.once(spec, prompts[0].prompt, min(config.max_new_tokens, max(8, spec.block_size)))

    samples: dict[RowSpec, list[Sample]] = {s: [] for s in specs}
    total, done = len(prompts) * len(specs) * config.repeats, 0
    for prompt in prompts:
        for spec in specs:
            samples[spec].append(runner.timed(spec, prompt))
            done += config.repeats
            if progress is not None:
                progress(done, total, f"{prompt.suite}: {spec.label}")
    try:
        machine["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass

    _score(samples, model_path, source, models, config, notes)
    suites = list(dict.fromkeys(p.suite for p in prompts))
    rows = aggregate(samples, suites)
    return BenchResult(machine, rows, notes, samples, suites)


def _with_drafter(config: BenchConfig, model, notes: list[str]) -> tuple[BenchConfig, bool]:
    """The exact-drafter rows' drafter: --drafter, else the one the drafting plan finds for `model` (the
    folder's drafter/, a shipped one with its fingerprint); else the rows are skipped."""
    from dataclasses import replace

    from nbdiff.decode.options import DecodeOptions
    from nbdiff.decode.plan import plan_drafting

    folder = config.drafter
    if folder is None:
        plan = plan_drafting(model, DecodeOptions(exact=True, block_size=1))
        folder = plan.source if plan.trained else None
    if folder is None:
        notes.append("no trained drafter (pass --drafter DIR, or put one in the model folder's drafter/): "
                     "exact-drafter rows skipped")
        return config, False
    notes.append(f"exact-drafter rows draft with {folder}")
    return replace(config, drafter=str(folder)), True


def _score(samples: dict[RowSpec, list[Sample]], model_path, source: Path | None,
           models: dict[str, tuple[Any, Any]], config: BenchConfig, notes: list[str]) -> None:
    """Fill each sample's NLL under the fp32 scorer (identical replies are scored once)."""
    if source is None and "fp32" in models and config.quantize is None:
        scorer = models["fp32"][0]
    else:
        from nbdiff.loading import load_model

        scorer, _ = load_model(source or model_path, quantize=None, device=config.device, dtype="fp32")
    notes.append(f"gen_ppl scored in fp32 by {'the source model' if source is not None else 'the same weights at block size 1 (causal)'}")
    cache: dict[tuple, float] = {}
    for rows in samples.values():
        for s in rows:
            key = (tuple(s.prompt_ids), tuple(s.tokens))
            if key not in cache:
                cache[key] = metrics.reply_nll(scorer, s.prompt_ids, s.tokens)
            s.nll = cache[key]


def aggregate(samples: dict[RowSpec, list[Sample]], suites: Sequence[str]) -> list[BenchRow]:
    """Per-suite rows (and "all"): token-weighted sums, speedup and agreement against the same dtype's ar row."""
    rows: list[BenchRow] = []
    groups = list(suites) + (["all"] if len(suites) > 1 else [])
    for suite in groups:
        ar_rows: dict[str, BenchRow] = {}
        lookup_rows: dict[str, BenchRow] = {}
        ar_replies: dict[str, list[list[int]]] = {}
        for spec, all_samples in samples.items():
            chosen = [s for s in all_samples if suite == "all" or s.suite == suite]
            if not chosen:
                continue
            tokens = sum(len(s.tokens) for s in chosen)
            forwards = sum(s.forwards for s in chosen)
            seconds = sum(s.seconds for s in chosen)
            scored = [s for s in chosen if not math.isnan(s.nll)]
            replies = [s.tokens for s in chosen]
            if spec.mode == "ar":
                ar_replies[spec.dtype] = replies
            reference = ar_replies.get(spec.dtype)
            plan = chosen[0].plan or None  # every prompt of a row runs the same plan
            row = BenchRow(
                suite=suite, mode=spec.mode, dtype=spec.dtype,
                block_size=plan["block_size"] if plan and spec.mode == "exact-auto" else spec.block_size,
                threshold=spec.threshold, plan=plan,
                prompts=len(chosen), new_tokens=tokens, forwards=forwards,
                tokens_per_forward=tokens / forwards if forwards else float("nan"),
                seconds=seconds, tokens_per_second=tokens / seconds if seconds > 0 else float("nan"),
                speedup=float("nan"),
                gen_ppl=metrics.perplexity(sum(s.nll for s in scored), sum(len(s.tokens) for s in scored)),
                distinct2=metrics.distinct2(replies),
                ar_agreement=metrics.ar_agreement(replies, reference) if reference is not None else float("nan"),
                below_ar=False, extra=_exact_figures(chosen),
            )
            if spec.mode == "ar":
                ar_rows[spec.dtype] = row
            if spec.mode == "lookup":
                lookup_rows[spec.dtype] = row
            _against_baselines(row, replies, reference, lookup_rows.get(spec.dtype))
            base = ar_rows.get(spec.dtype)
            if base is not None:
                row.speedup = row.tokens_per_second / base.tokens_per_second
                if spec.mode != "ar":
                    row.below_ar = below_ar(row, base)
            rows.append(row)
        first = next(iter(ar_rows.values()), None)
        for dtype, row in ar_rows.items():  # dtypes side by side: each ar row against the first dtype's
            if first is not None and row is not first:
                row.extra[f"tokens_per_second_vs_{first.dtype}"] = row.tokens_per_second / first.tokens_per_second
    return rows


def _against_baselines(row: BenchRow, replies, reference, lookup: BenchRow | None) -> None:
    """Extras of a decoder or lookup row: the share of replies identical to AR's; exact rows' speed over `lookup`."""
    if row.mode == "ar" or reference is None:
        return
    row.extra["identical"] = sum(a == b for a, b in zip(replies, reference)) / len(replies)
    if lookup is not None and row.mode.startswith("exact") and lookup.tokens_per_second > 0:
        row.extra["speedup_vs_lookup"] = row.tokens_per_second / lookup.tokens_per_second


def below_ar(row: BenchRow, ar: BenchRow) -> bool:
    """BELOW_AR_RULE: perplexity more than 10 % above AR's, or distinct-2 more than 0.05 below."""
    worse_ppl = not math.isnan(row.gen_ppl) and not math.isnan(ar.gen_ppl) and row.gen_ppl > PPL_MARGIN * ar.gen_ppl
    worse_d2 = not math.isnan(row.distinct2) and not math.isnan(ar.distinct2) and row.distinct2 < ar.distinct2 - DISTINCT_MARGIN
    return worse_ppl or worse_d2


def _exact_figures(chosen: Sequence[Sample]) -> dict[str, float]:
    """Exact mode over a suite: mean tokens per verified block, share of draft tokens kept, and the
    share of blocks whose draft was right at offsets +1, +2, +3 (which part of the draft limits it)."""
    sums: dict[str, float] = {}
    for s in chosen:
        for k, v in s.extra.items():
            sums[k] = sums.get(k, 0.0) + v
    blocks = sums.get("verified_blocks", 0.0)
    if not blocks:
        return {}
    out = {"accepted_length": (blocks + sums.get("accepted", 0.0)) / blocks,
           "draft_acceptance": sums.get("accepted", 0.0) / sums["drafted"] if sums.get("drafted") else float("nan"),
           "verified_blocks": blocks}
    out["near_ties"] = sums.get("near_ties", 0.0)  # kept tokens decided by a near-tie (nbdiff.decode.exact)
    if sums.get("drafter_forwards"):  # a trained drafter's forwards, apart from the AR forwards of the row
        out["drafter_forwards"] = sums["drafter_forwards"]
        out["checked_per_verify"] = sums.get("drafted", 0.0) / blocks  # draft tokens a verify checks (its width - 1)
    if sums.get("drafter_gated"):  # row blocks the first-token gate left to lookup (DraftingPlan.draft_gate)
        out["drafter_gated"] = sums["drafter_gated"]
    for k in (1, 2, 3):
        if f"accepted_at_{k}" in sums:
            out[f"accepted_at_{k}"] = sums[f"accepted_at_{k}"] / blocks
    return out
