"""`convert()`: the orchestrator. Each step is a named function in a sibling module."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from nbdiff.convert.compat import probe_mask_support
from nbdiff.errors import NBDiffError
from nbdiff.fsutil import atomic_dir, quiet_transformers
from nbdiff.loading import DTYPES
from nbdiff.method.settings import BlockDiffusionSettings, attach_settings, check_block_size, settings_from_config
from nbdiff.convert.sources import Source, resolve_source
from nbdiff.convert.card import model_card
from nbdiff.convert.mask_token import MaskChoice, choose_mask_token, with_mask_row
from nbdiff.convert.reading import ModelNames, generation_config, model_names, read_config, read_tokenizer
from nbdiff.convert.tensors import OutputLayout, TensorGroup, folder_groups, plan_shards, write_shards

DEFAULT_MAX_SHARD_BYTES = 2 * 10**9
DTYPE_NAMES = {dt: name for name, dt in DTYPES.items()}


@dataclass
class ConvertProgress:
    """One progress report: `stage` in ('load', 'weights', 'files', 'done'); bytes done of total."""

    stage: str
    done: int = 0
    total: int = 0


@dataclass
class ConvertResult:
    out_dir: Path
    source: str
    architecture: str
    parameters: int
    dtype: str
    mask: MaskChoice
    block_size: int
    vocab_size: int
    output_bytes: int
    shards: int
    seconds: float
    settings: BlockDiffusionSettings = field(repr=False, default=None)  # type: ignore[assignment]


ProgressFn = Callable[[ConvertProgress], None]


def default_out_dir(source: Source) -> Path:
    """./<name>-nbdiff in the current folder."""
    return Path.cwd() / f"{source.default_name}-nbdiff"


def convert(
    source: str | Source,
    out_dir: str | Path | None = None,
    *,
    block_size: int = 32,
    mask_token: str | None = None,
    dtype: str = "auto",
    force: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    on_progress: ProgressFn | None = None,
) -> ConvertResult:
    """Convert `source` (folder, .gguf, alias or hub id) into a block-diffusion folder `out_dir`.

    `dtype`: 'auto' keeps each tensor's stored dtype (GGUF: fp32), or 'bf16' | 'fp16' | 'fp32'.
    Raises NBDiffError for bad input; on any failure nothing new is left on disk.
    """
    started = time.perf_counter()
    report = on_progress or (lambda _p: None)
    target = _check_arguments(block_size, dtype, max_shard_bytes)
    src = source if isinstance(source, Source) else resolve_source(str(source))
    out = (Path(out_dir).expanduser() if out_dir is not None else default_out_dir(src)).resolve()
    _check_out_dir(out, src, force)

    report(ConvertProgress("load"))
    # a GGUF file is dequantized tensor by tensor, straight to the target dtype
    config, load_gguf_weights = read_config(src, target or torch.float32)
    probe_mask_support(config)  # before anything is written: the family must honour 4-D masks
    names = model_names(config)
    config.architectures = [names.class_name]
    previous = settings_from_config(config)  # a folder nbdiff already converted (or adapted)
    _check_keeps_training(previous, mask_token, src)
    tokenizer = read_tokenizer(src)
    n_tokens_before = len(tokenizer)
    mask = choose_mask_token(tokenizer, mask_token)
    groups = [load_gguf_weights()] if load_gguf_weights else folder_groups(src.path)
    layout = _output_layout(groups, names, mask, target)
    shards = plan_shards(groups, layout, names.aliases, max_shard_bytes)  # a tied lm_head is re-tied on load
    total, parameters, main_dtype = _weight_totals(layout, [k for s in shards for k in s.keys], target)
    settings = _settings(block_size, mask, src.label, previous)
    add_mask_row = _mask_row_adder(layout, mask, n_tokens_before)
    try:
        with atomic_dir(out, replace=force) as tmp:
            report(ConvertProgress("weights", 0, total))
            write_shards(shards, layout, tmp, add_mask_row, lambda done: report(ConvertProgress("weights", done, total)))
            report(ConvertProgress("files", total, total))
            _write_files(tmp, src, config, tokenizer, settings, vocab_size=layout.new_rows, dtype=main_dtype)
            card = model_card(src.label, names.class_name, settings, mask, _dtype_name(main_dtype), parameters)
            (tmp / "README.md").write_text(card, encoding="utf-8")
            output_bytes = sum(p.stat().st_size for p in tmp.iterdir() if p.is_file())
    except OSError as exc:  # read-only filesystem, disk full, ...: nothing was left behind
        raise NBDiffError(f"cannot write {out}: {exc.strerror or exc}",
                          "free some space or choose another --out") from None
    report(ConvertProgress("done", total, total))
    return ConvertResult(
        out_dir=out, source=src.label, architecture=names.class_name, parameters=parameters,
        dtype=_dtype_name(main_dtype), mask=mask, block_size=block_size, vocab_size=layout.new_rows,
        output_bytes=output_bytes, shards=len(shards), seconds=time.perf_counter() - started, settings=settings,
    )


def _check_arguments(block_size: int, dtype: str, max_shard_bytes: int) -> torch.dtype | None:
    """Validate the options; returns the float dtype to write (None: keep each tensor's)."""
    check_block_size(block_size)
    if dtype != "auto" and dtype not in DTYPES:
        raise NBDiffError(f"--dtype must be auto, {', '.join(DTYPES)}; got {dtype!r}")
    if max_shard_bytes < 1:
        raise NBDiffError("max_shard_bytes must be positive")
    return DTYPES.get(dtype)


def _check_out_dir(out: Path, source: Source, force: bool) -> None:
    src = source.path.resolve()
    if out == src or (source.kind == "folder" and (src in out.parents or out in src.parents)):
        raise NBDiffError(f"output folder {out} overlaps the source {src}", "choose another --out")
    if out.exists() and not out.is_dir():
        raise NBDiffError(f"output path {out} exists and is not a folder", "choose another --out")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise NBDiffError(f"output folder {out} already exists and is not empty", "pass --force to replace it, or choose another --out")


def _check_keeps_training(previous: BlockDiffusionSettings | None, mask_token: str | None, src: Source) -> None:
    """An adapted folder's weights were trained with its mask token: another one would void that."""
    if previous is None or previous.adapted_block_size <= 1 or mask_token in (None, previous.mask_token):
        return
    raise NBDiffError(
        f"{src.label} was adapted (block size {previous.adapted_block_size}) with mask token "
        f"{previous.mask_token!r}; a different mask token would discard that training",
        "omit --mask-token to keep the adapted one",
    )


def _output_layout(groups: list[TensorGroup], names: ModelNames, mask: MaskChoice, target) -> OutputLayout:
    """Check the checkpoint holds every tensor, and size the vocabulary for the mask token."""
    located = {k: g for g in groups for k in g.meta}
    missing = sorted(names.expected - set(located))
    if missing:
        raise NBDiffError(
            f"the checkpoint lacks {len(missing)} tensor(s) the {names.class_name} needs, e.g. {missing[0]}",
            "the weights do not match config.json; download the checkpoint again",
        )
    rows = int(located[names.embedding].meta[names.embedding][0][0])
    new_rows = max(rows, mask.token_id + 1)
    if new_rows > rows:
        mask.how = "added+resized"
    if not mask.how.startswith("added") and mask.token_id >= rows:  # pragma: no cover - reused id outside the matrix
        raise NBDiffError(f"mask token id {mask.token_id} is outside the embedding matrix ({rows} rows)")
    resized = {k for k in names.resized() if k in located}
    return OutputLayout(located, resized, new_rows, target)


def _weight_totals(layout: OutputLayout, keys: list[str], target) -> tuple[int, int, torch.dtype]:
    """(bytes written, parameters, the dtype config.json names: the target or the most common float)."""
    total = sum(layout.nbytes(k) for k in keys)
    parameters = sum(layout.nbytes(k) // layout.meta(k)[1].itemsize for k in keys)
    floats = [layout.meta(k)[1] for k in keys if layout.meta(k)[1].is_floating_point]
    return total, parameters, target or max(set(floats), key=floats.count, default=torch.float32)


def _mask_row_adder(layout: OutputLayout, mask: MaskChoice, n_real_tokens: int):
    """The per-tensor edit: vocabulary-sized tensors gain rows; an added mask token gets the mean row."""
    init = mask.how.startswith("added")

    def add(key: str, t: torch.Tensor) -> torch.Tensor:
        if key not in layout.resized:
            return t
        return with_mask_row(t, layout.new_rows, mask.token_id, n_real_tokens, init)

    return add


def _settings(block_size: int, mask: MaskChoice, label: str, previous: BlockDiffusionSettings | None) -> BlockDiffusionSettings:
    """Fresh settings, or a converted/adapted source's own with the new block size and source."""
    if previous is None:
        return BlockDiffusionSettings(
            block_size=block_size, mask_token_id=mask.token_id, mask_token=mask.token, shift=True,
            context_mask="causal", adapted_block_size=1, source=label, extra={"mask_token_origin": mask.how},
        )
    kept = BlockDiffusionSettings.from_dict(previous.to_dict())
    kept.block_size, kept.source = block_size, label
    if (kept.mask_token, kept.mask_token_id) != (mask.token, mask.token_id):
        kept.mask_token, kept.mask_token_id = mask.token, mask.token_id
        kept.extra = dict(kept.extra, mask_token_origin=mask.how)
    return kept


def _write_files(folder: Path, src: Source, config, tokenizer, settings: BlockDiffusionSettings, *,
                 vocab_size: int, dtype: torch.dtype) -> None:
    """config.json (new vocabulary size, dtype and the nbdiff section), tokenizer, generation config."""
    config.get_text_config().vocab_size = vocab_size
    config.dtype = dtype
    attach_settings(config, settings)
    config.save_pretrained(str(folder))
    with quiet_transformers():
        tokenizer.save_pretrained(str(folder))
        generation_config(src, config).save_pretrained(str(folder))


def _dtype_name(dtype: torch.dtype) -> str:
    return DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))
