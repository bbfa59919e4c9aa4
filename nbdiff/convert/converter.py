"""Turn an autoregressive checkpoint into a block-diffusion initialisation (`nbdiff convert`).

Notable features:
- The weights are not changed, except for at most one new embedding row: the converted model, run
  causally, gives the source's logits. What changes is config.json, which gains an `nbdiff`
  section (block size, mask token, shift, context mask, adapted_block_size=1, source).
- Mask token: an existing mask-like special token is reused, else a reserved/unused special token
  (e.g. Llama-3 `<|reserved_special_token_N|>`), else `<|mask|>` is added. An added token takes a
  padded embedding row when config.vocab_size leaves one, else embeddings (and an untied lm_head)
  grow by one row. The mask row is the mean of the existing rows, not random.
- A safetensors checkpoint is streamed tensor by tensor, input shard by input shard (safe_open);
  the model is never instantiated (only on the meta device, for names), so peak memory stays near
  two shards whatever the model size. A GGUF file is dequantized by transformers' loader first.
- Before anything is written, a probe checks that the family honours custom 4-D attention masks.
- The output is written into a hidden sibling folder and renamed at the end; any failure removes
  it, so nothing half-written is ever left behind. `force` replaces an old folder only once the
  new one is complete.
- Progress is reported by bytes through a callback; this module never prints.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from .errors import NBDiffError
from .settings import BlockDiffusionSettings, attach_settings, check_block_size
from .sources import Source, resolve_source

DEFAULT_MASK_TOKEN = "<|mask|>"
DEFAULT_MAX_SHARD_BYTES = 2 * 10**9
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Mask-like special tokens reused as they are, in order of preference.
MASK_LIKE = ("<|mask|>", "<mask>", "[MASK]", "<|MASK|>", "<MASK>")
# Special tokens a vocabulary reserves and never uses (Llama-3, Mistral v3, others).
RESERVED = re.compile(r"reserved_special_token|^<\|reserved|^\[control_\d+\]$|^<unused\d+>$|^\[unused\d+\]$")
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass
class ConvertProgress:
    """One progress report: `stage` in ('load', 'weights', 'files', 'done'); bytes done of total."""

    stage: str
    done: int = 0
    total: int = 0


@dataclass
class MaskChoice:
    token: str
    token_id: int
    how: str
    """'reused' (mask-like token), 'reserved' (unused special token), 'added' or 'added+resized'."""


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


# --------------------------------------------------------------------------------------------
# small helpers


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' own tqdm bars and warnings: the caller owns the screen."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    # The GGUF loader calls tqdm directly, ignoring the switch above; give it a silent one.
    gguf_utils = _gguf_utils_module()
    gguf_tqdm = getattr(gguf_utils, "tqdm", None)
    if gguf_tqdm is not None:
        gguf_utils.tqdm = functools.partial(gguf_tqdm, disable=True)
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()
        if gguf_tqdm is not None:
            gguf_utils.tqdm = gguf_tqdm


def _gguf_utils_module():
    try:
        from transformers import modeling_gguf_pytorch_utils
    except Exception:  # gguf support missing: nothing to silence
        return None
    return modeling_gguf_pytorch_utils


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(dtype, str(dtype).replace("torch.", ""))


def _check_out_dir(out: Path, source: Source, force: bool) -> None:
    src = source.path.resolve()
    if out == src or (source.kind == "folder" and (src in out.parents or out in src.parents)):
        raise NBDiffError(f"output folder {out} overlaps the source {src}", "choose another --out")
    if out.exists() and not out.is_dir():
        raise NBDiffError(f"output path {out} exists and is not a folder", "choose another --out")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise NBDiffError(f"output folder {out} already exists and is not empty", "pass --force to replace it, or choose another --out")


def default_out_dir(source: Source) -> Path:
    """./<name>-nbdiff in the current folder."""
    return Path.cwd() / f"{source.default_name}-nbdiff"


# --------------------------------------------------------------------------------------------
# tensors: where they come from


class _Group:
    """One input unit read at a time: a safetensors file (streamed) or an in-memory state dict."""

    def __init__(self, path: Path | None = None, state: dict[str, torch.Tensor] | None = None):
        self.path = path
        self.state = state
        self.meta: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        if state is not None:
            self.meta = {k: (tuple(v.shape), v.dtype) for k, v in state.items()}
        else:
            from safetensors import safe_open

            try:
                with safe_open(str(path), framework="pt") as f:
                    for key in f.keys():
                        sl = f.get_slice(key)
                        dtype = SAFETENSORS_DTYPES.get(sl.get_dtype())
                        if dtype is None:
                            raise NBDiffError(f"{path.name}: tensor {key} has unsupported dtype {sl.get_dtype()}")
                        self.meta[key] = (tuple(sl.get_shape()), dtype)
            except NBDiffError:
                raise
            except Exception as exc:
                raise NBDiffError(
                    f"{path.name} is not a valid safetensors file ({_first_line(exc)})",
                    "the file is corrupt or truncated; download it again",
                ) from None

    @contextlib.contextmanager
    def open(self) -> Iterator[Callable[[str], torch.Tensor]]:
        if self.state is not None:
            yield self.state.__getitem__
            return
        from safetensors import safe_open

        # The mapping is closed when the group is done, so its pages stop counting as ours.
        with safe_open(str(self.path), framework="pt") as f:
            def get(key: str) -> torch.Tensor:
                try:
                    return f.get_tensor(key)
                except Exception as exc:
                    raise NBDiffError(f"{self.path.name}: cannot read tensor {key} ({_first_line(exc)})") from None

            yield get


def _folder_groups(folder: Path) -> list[_Group]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except Exception as exc:
            raise NBDiffError(f"{index} is not a valid safetensors index ({_first_line(exc)})") from None
        names = list(dict.fromkeys(weight_map.values()))
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise NBDiffError(f"{folder} lacks weight file {missing[0]} named in its index", "download the checkpoint again")
        files = [folder / n for n in names]
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise NBDiffError(f"{folder} has no *.safetensors weights")
    return [_Group(path=p) for p in files]


# --------------------------------------------------------------------------------------------
# loading config, tokenizer, GGUF


def _load_config(source: Source):
    from transformers import AutoConfig

    try:
        with _quiet_transformers():
            return AutoConfig.from_pretrained(str(source.folder), trust_remote_code=False)
    except Exception as exc:
        raise NBDiffError(
            f"cannot read {source.folder / 'config.json'} ({_first_line(exc)})",
            "nbdiff converts transformers causal LMs that need no remote code",
        ) from None


def _check_gguf_magic(path: Path) -> None:
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != b"GGUF":
        raise NBDiffError(f"{path.name} is not a GGUF file (bad magic bytes)", "pass a GGUF model file or a Hugging Face folder")


def _load_gguf(source: Source, dtype: torch.dtype):
    """Read a GGUF file's config; returns (config, a function that dequantizes its weights)."""
    from transformers import AutoConfig

    _check_gguf_magic(source.path)
    folder, name = str(source.path.parent), source.path.name
    try:
        with _quiet_transformers():
            config = AutoConfig.from_pretrained(folder, gguf_file=name)
    except Exception as exc:
        raise NBDiffError(f"{name} is not a GGUF model transformers can read ({_first_line(exc)})",
                          "pass a GGUF file of a supported architecture (llama, qwen2, qwen3, mistral, ...)") from None
    return config, lambda: _load_gguf_weights(folder, name, dtype)


def _load_gguf_weights(folder: str, name: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    try:
        with _quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
    except Exception as exc:
        raise NBDiffError(f"cannot dequantize {name} ({_first_line(exc)})") from None
    # The dequantized weights are plain tensors; only the state dict is kept, and the config's
    # quantization_config is dropped by the caller, so the saved folder is an ordinary checkpoint.
    state = {k: v.detach() for k, v in model.state_dict().items()}
    del model
    return state


def _load_tokenizer(source: Source):
    from transformers import AutoTokenizer

    try:
        with _quiet_transformers():
            if source.kind == "gguf":
                return AutoTokenizer.from_pretrained(str(source.folder), gguf_file=source.gguf_file)
            return AutoTokenizer.from_pretrained(str(source.folder), trust_remote_code=False)
    except Exception as exc:
        raise NBDiffError(f"cannot load the tokenizer of {source.label} ({_first_line(exc)})",
                          "the folder needs tokenizer.json (or tokenizer.model) and tokenizer_config.json") from None


# --------------------------------------------------------------------------------------------
# mask token


def _special_tokens(tokenizer) -> dict[str, int]:
    """Text -> id of every special (added, special=True) token, plus the named special tokens."""
    out: dict[str, int] = {}
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    for idx, added in decoder.items():
        if getattr(added, "special", False):
            out[str(added)] = int(idx)
    for text in getattr(tokenizer, "all_special_tokens", []) or []:
        idx = tokenizer.convert_tokens_to_ids(text)
        if isinstance(idx, int) and idx >= 0:
            out.setdefault(text, idx)
    return out


def _vocab_id(tokenizer, text: str) -> int | None:
    vocab = tokenizer.get_vocab()
    return vocab.get(text)


def choose_mask_token(tokenizer, requested: str | None = None) -> MaskChoice:
    """Pick (or add to `tokenizer`) the mask token; see the module docstring for the order."""
    specials = _special_tokens(tokenizer)
    if requested is not None:
        if not requested:
            raise NBDiffError("--mask-token is empty", f"omit it to use {DEFAULT_MASK_TOKEN}")
        if requested in specials:
            choice = MaskChoice(requested, specials[requested], "reused")
        elif _vocab_id(tokenizer, requested) is not None:
            raise NBDiffError(
                f"--mask-token {requested!r} is an ordinary token of the vocabulary (id {_vocab_id(tokenizer, requested)})",
                f"pick a special token or a new text such as {DEFAULT_MASK_TOKEN}",
            )
        else:
            choice = MaskChoice(requested, -1, "added")
    else:
        existing = getattr(tokenizer, "mask_token", None)
        choice = None
        if existing and existing in specials:
            choice = MaskChoice(existing, specials[existing], "reused")
        for text in MASK_LIKE:
            if choice is None and text in specials:
                choice = MaskChoice(text, specials[text], "reused")
        if choice is None:
            reserved = sorted((idx, text) for text, idx in specials.items() if RESERVED.search(text))
            if reserved:
                # the last reserved token is the least likely to be given a role by a later release
                idx, text = reserved[-1]
                choice = MaskChoice(text, idx, "reserved")
        if choice is None:
            choice = MaskChoice(DEFAULT_MASK_TOKEN, -1, "added")
    tokenizer.add_special_tokens({"mask_token": choice.token})
    token_id = tokenizer.convert_tokens_to_ids(choice.token)
    if choice.token_id >= 0 and token_id != choice.token_id:  # pragma: no cover - tokenizer oddity
        raise NBDiffError(f"the tokenizer maps {choice.token!r} to {token_id}, expected {choice.token_id}")
    choice.token_id = int(token_id)
    return choice


# --------------------------------------------------------------------------------------------
# the model's names (meta device: no memory)


def _meta_names(config) -> tuple[str, str | None, set[str], set[str], str]:
    """(input-embedding key, untied output key or None, keys tied to the embedding, expected keys, class)."""
    from transformers import AutoModelForCausalLM

    try:
        with _quiet_transformers(), torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    except Exception as exc:
        raise NBDiffError(f"cannot build the model class for {config.model_type!r} ({_first_line(exc)})") from None
    params = dict(model.named_parameters(remove_duplicate=False))
    emb = model.get_input_embeddings().weight
    head_mod = model.get_output_embeddings()
    head = head_mod.weight if head_mod is not None else None
    emb_key = next(k for k, p in params.items() if p is emb)
    tied = head is None or head is emb
    head_key = None if tied else next(k for k, p in params.items() if p is head)
    aliases = {k for k, p in params.items() if p is emb and k != emb_key}
    expected = set(model.state_dict().keys()) - aliases
    return emb_key, head_key, aliases, expected, type(model).__name__


# --------------------------------------------------------------------------------------------
# the converter


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
    check_block_size(block_size)
    if dtype not in ("auto", *DTYPES):
        raise NBDiffError(f"--dtype must be auto, bf16, fp16 or fp32, got {dtype!r}")
    if max_shard_bytes < 1:
        raise NBDiffError("max_shard_bytes must be positive")
    src = source if isinstance(source, Source) else resolve_source(str(source))
    out = (Path(out_dir).expanduser() if out_dir is not None else default_out_dir(src)).resolve()
    _check_out_dir(out, src, force)

    report(ConvertProgress("load"))
    if src.kind == "gguf":
        # dequantize straight to the target dtype (bf16 halves the peak for large GGUF files)
        config, load_weights = _load_gguf(src, DTYPES.get(dtype, torch.float32))
    else:
        config, load_weights = _load_config(src), None
    config = _strip_quantization(config)

    from .compat import probe_mask_support

    probe_mask_support(config)
    emb_key, head_key, tied_aliases, expected, class_name = _meta_names(config)
    config.architectures = [class_name]
    tokenizer = _load_tokenizer(src)
    n_tokens_before = len(tokenizer)
    mask = choose_mask_token(tokenizer, mask_token)

    groups = [_Group(state=load_weights())] if load_weights else _folder_groups(src.path)
    located = {k: g for g in groups for k in g.meta}
    missing = sorted(expected - set(located))
    if missing:
        raise NBDiffError(
            f"the checkpoint lacks {len(missing)} tensor(s) the {class_name} needs, e.g. {missing[0]}",
            "the weights do not match config.json; download the checkpoint again",
        )
    text_config = config.get_text_config()
    rows = int(located[emb_key].meta[emb_key][0][0])
    new_rows = max(rows, mask.token_id + 1)
    if new_rows > rows:
        mask.how = "added+resized"
    init_mask_row = mask.how.startswith("added")
    if not init_mask_row and mask.token_id >= rows:  # pragma: no cover - reused id outside the matrix
        raise NBDiffError(f"mask token id {mask.token_id} is outside the embedding matrix ({rows} rows)")
    resized = {emb_key} | ({head_key} if head_key else set())
    drop = tied_aliases  # a tied lm_head is the embedding; transformers re-ties it on load

    target = DTYPES.get(dtype)

    def out_meta(key: str) -> tuple[tuple[int, ...], torch.dtype]:
        shape, dt = located[key].meta[key]
        if key in resized or (key.endswith("lm_head.bias") and head_key):
            shape = (new_rows, *shape[1:])
        if target is not None and dt.is_floating_point:
            dt = target
        return shape, dt

    def nbytes(key: str) -> int:
        shape, dt = out_meta(key)
        n = 1
        for s in shape:
            n *= s
        return n * dt.itemsize

    # Shard plan: output shards never straddle input groups, so at most one input group and one
    # output shard are in memory at a time (peak ~ 2 x largest shard).
    plan: list[tuple[_Group, list[str]]] = []
    for g in groups:
        current: list[str] = []
        size = 0
        for key in g.meta:
            if key in drop:
                continue
            b = nbytes(key)
            if current and size + b > max_shard_bytes:
                plan.append((g, current))
                current, size = [], 0
            current.append(key)
            size += b
        if current:
            plan.append((g, current))
    total = sum(nbytes(k) for _, keys in plan for k in keys)
    float_dtypes = [out_meta(k)[1] for _, keys in plan for k in keys if out_meta(k)[1].is_floating_point]
    main_dtype = target or max(set(float_dtypes), key=float_dtypes.count, default=torch.float32)
    parameters = sum(nbytes(k) // out_meta(k)[1].itemsize for _, keys in plan for k in keys)

    settings = BlockDiffusionSettings(
        block_size=block_size,
        mask_token_id=mask.token_id,
        mask_token=mask.token,
        shift=True,
        context_mask="causal",
        adapted_block_size=1,
        source=src.label,
        extra={"mask_token_origin": mask.how},
    )

    # ---- write (into a hidden sibling folder, renamed at the end)
    created_parents = [p for p in reversed(out.parents) if not p.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.nbdiff-tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        from safetensors.torch import save_file

        names = (
            ["model.safetensors"]
            if len(plan) == 1
            else [f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i in range(len(plan))]
        )
        weight_map: dict[str, str] = {}
        done = 0
        report(ConvertProgress("weights", 0, total))
        by_group: dict[int, list[int]] = {}
        for i, (g, _) in enumerate(plan):
            by_group.setdefault(id(g), []).append(i)
        for g in groups:
            if id(g) not in by_group:
                continue
            with g.open() as get:
                for i in by_group[id(g)]:
                    tensors: dict[str, torch.Tensor] = {}
                    for key in plan[i][1]:
                        t = get(key)
                        if key in resized or (key.endswith("lm_head.bias") and head_key):
                            t = _with_mask_row(t, new_rows, mask.token_id, n_tokens_before, init_mask_row)
                        shape, dt = out_meta(key)
                        if t.dtype != dt:
                            t = t.to(dt)
                        tensors[key] = t.contiguous()
                        weight_map[key] = names[i]
                        done += nbytes(key)
                        report(ConvertProgress("weights", done, total))
                    save_file(tensors, str(tmp / names[i]), metadata={"format": "pt"})
                    del tensors
            if g.state is not None:
                g.state.clear()  # free the dequantized GGUF weights as soon as they are written
        if len(plan) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")

        report(ConvertProgress("files", total, total))
        text_config.vocab_size = new_rows
        config.dtype = main_dtype
        attach_settings(config, settings)
        config.save_pretrained(str(tmp))
        with _quiet_transformers():
            tokenizer.save_pretrained(str(tmp))
            _generation_config(src, config).save_pretrained(str(tmp))
        (tmp / "README.md").write_text(
            model_card(src.label, class_name, settings, mask, _dtype_name(main_dtype), parameters), encoding="utf-8"
        )
        output_bytes = sum(p.stat().st_size for p in tmp.iterdir() if p.is_file())
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for parent in reversed(created_parents):
            with contextlib.suppress(OSError):
                parent.rmdir()
        raise
    report(ConvertProgress("done", total, total))
    return ConvertResult(
        out_dir=out,
        source=src.label,
        architecture=class_name,
        parameters=parameters,
        dtype=_dtype_name(main_dtype),
        mask=mask,
        block_size=block_size,
        vocab_size=new_rows,
        output_bytes=output_bytes,
        shards=len(plan),
        seconds=time.perf_counter() - started,
        settings=settings,
    )


def _strip_quantization(config):
    """Drop quantization settings (GGUF, bitsandbytes, ...): the written weights are plain."""
    for obj in {id(config): config, id(config.get_text_config()): config.get_text_config()}.values():
        if hasattr(obj, "quantization_config"):
            with contextlib.suppress(AttributeError):
                delattr(obj, "quantization_config")
            if getattr(obj, "quantization_config", None) is not None:
                obj.quantization_config = None
    return config


def _with_mask_row(t: torch.Tensor, new_rows: int, mask_id: int, n_real: int, init: bool) -> torch.Tensor:
    """Grow `t` ([rows, ...]) to `new_rows` rows and set row `mask_id` to the mean of the real rows."""
    rows = t.shape[0]
    if new_rows == rows and not init:
        return t
    # mean over real token rows only ([n_real, hidden] -> [hidden]); padded rows are arbitrary
    mean = t[: max(1, min(n_real, rows))].float().mean(dim=0).to(t.dtype)
    if new_rows > rows:
        grown = torch.empty((new_rows, *t.shape[1:]), dtype=t.dtype)
        grown[:rows] = t
        grown[rows:] = mean
        t = grown
    else:
        t = t.clone()
    if init:
        t[mask_id] = mean
    return t


def _generation_config(source: Source, config):
    from transformers import GenerationConfig

    if source.kind == "folder" and (source.folder / "generation_config.json").is_file():
        try:
            gen = GenerationConfig.from_pretrained(str(source.folder))
            gen.validate()
            return gen
        except Exception:
            pass  # an invalid or odd file: rebuild it from the model config
    return GenerationConfig.from_model_config(config)


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename `tmp` to `out`; an old `out` is moved aside first and removed only afterwards."""
    old = None
    if out.exists():
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        else:
            old = out.parent / f".{out.name}.nbdiff-old-{uuid.uuid4().hex[:8]}"
            os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        if old is not None:
            os.rename(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def model_card(source: str, architecture: str, settings: BlockDiffusionSettings, mask: MaskChoice, dtype: str, parameters: int) -> str:
    """A short README.md for the converted folder."""
    return f"""---
library_name: transformers
tags: [nbdiff, block-diffusion]
---
# Block-diffusion initialisation of `{source}`

Converted by `nbdiff convert` ({architecture}, {parameters / 1e6:,.1f}M parameters, {dtype}).
The weights are the source model's: run causally, this model gives the source's logits. It has
not been adapted yet (`adapted_block_size: 1`), so block decoding with large blocks needs
`nbdiff adapt` first.

| setting | value |
|---|---|
| block size | {settings.block_size} |
| mask token | `{mask.token}` (id {mask.token_id}, {mask.how}) |
| shift | {settings.shift} |
| context mask | {settings.context_mask} |
| adapted block size | {settings.adapted_block_size} |

The settings live in `config.json` under `nbdiff`; `nbdiff info <this folder>` shows them.

Next steps:

```bash
nbdiff adapt <this folder> --out <adapted folder>   # train block sizes 1 -> {settings.block_size}
nbdiff chat <adapted folder>                        # chat with block decoding
```

Plain transformers loads it with no remote code:
`AutoModelForCausalLM.from_pretrained("<this folder>")`.
"""
