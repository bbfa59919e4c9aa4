"""Load a model folder for decoding: device, dtype, sdpa attention, safetensors only, no remote code.

A folder converted by `nbdiff convert` carries its block-diffusion settings in config.json
(`nbdiff.method.settings`). A plain, never-converted Hugging Face folder also loads: it has no mask
token, so it decodes only at block size 1 (plain AR; `model_settings` returns None and the CLI says
how to convert); asking it for a larger block size is an NBDiffError that names `nbdiff convert`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from nbdiff.adapters import apply_adapter_folder, is_adapter_folder, read_adapter_folder
from nbdiff.errors import NBDiffError
from nbdiff.fsutil import quiet_transformers
from nbdiff.hardware import DtypeChoice, auto_dtype
from nbdiff.quantize import bnb_config, normalize
from nbdiff.method.settings import BlockDiffusionSettings, read_settings, settings_from_config

DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _choice(value) -> str:
    return str(getattr(value, "value", value)).lower()


def resolve_device(device: str = "auto") -> str:
    """'auto' -> cuda if available, else mps, else cpu; an unavailable explicit device is an error."""
    device = _choice(device)
    if device not in DEVICES:
        raise NBDiffError(f"--device must be one of {', '.join(DEVICES)}, got {device!r}")
    cuda, mps = torch.cuda.is_available(), getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if device == "auto":
        return "cuda" if cuda else "mps" if mps else "cpu"
    if (device == "cuda" and not cuda) or (device == "mps" and not mps):
        raise NBDiffError(f"--device {device} is not available on this machine", "use --device cpu or --device auto")
    return device


def resolve_dtype(dtype: str | torch.dtype = "auto", device: str = "cpu") -> torch.dtype:
    """'auto' -> bf16 on CUDA (fp16 if the GPU lacks bf16), fp16 on MPS, on CPU bf16 where it is
    native (nbdiff.hardware) and fp32 elsewhere. `choose_dtype` also says why."""
    return choose_dtype(dtype, device).dtype


def choose_dtype(dtype: str | torch.dtype = "auto", device: str = "cpu") -> DtypeChoice:
    """The dtype for `--dtype` on `device`, with a one-line reason (shown by `info` and `--json`)."""
    if isinstance(dtype, torch.dtype):
        return DtypeChoice(dtype, "asked for")
    name = _choice(dtype)
    if name == "auto":
        return auto_dtype(device)
    if name not in DTYPES:
        raise NBDiffError(f"--dtype must be auto, bf16, fp16 or fp32, got {dtype!r}")
    return DtypeChoice(DTYPES[name], f"--dtype {name}")


EXACT_DTYPE_REASON = ("exact mode: fp32, so the output is AR's token for token "
                      "(bf16 rounds a block's verification pass and one-token steps differently)")
SERVE_DTYPE_REASON = ("nbdiff serve on a CPU: fp32, so a greedy reply is the same alone or beside other "
                      "requests (bf16 products round a row differently in a batch; fp32 few-row products "
                      "go through nbdiff.cpu_kernel)")
CHAT_DTYPE_REASON = ("nbdiff chat on a CPU: fp32, so a turn through the kept conversation is a fresh call's reply "
                     "token for token (in bf16 the kept keys/values, computed a token at a time, round unlike a "
                     "fresh prefill's: 22 of 24 turns identical in bf16, 24 of 24 in fp32, benchmarks/session_agreement.py)")


def loaded_dtype(model) -> DtypeChoice | None:
    """The dtype choice `load_model` made for this model (None for models it did not load)."""
    return getattr(model, "_nbdiff_dtype", None)


def dtype_name(model) -> str:
    """The model's dtype in the flags' words (bf16, fp32, ...), whoever loaded it."""
    choice = loaded_dtype(model)
    return choice.name if choice else str(model.dtype).removeprefix("torch.")


def check_folder(path: str | Path) -> Path:
    """A model folder with config.json and safetensors weights, or an NBDiffError saying what to do."""
    folder = Path(path).expanduser()
    convert_hint = f"run `nbdiff convert {path} --out DIR` first, then pass DIR"
    if not folder.exists():
        raise NBDiffError(f"model folder {path} does not exist", convert_hint)
    if folder.is_file():
        raise NBDiffError(f"{path} is a file, not a model folder", convert_hint)
    if not (folder / "config.json").is_file():
        raise NBDiffError(f"{path} has no config.json, so it is not a Hugging Face model folder", convert_hint)
    if not any(folder.glob("*.safetensors")):
        raise NBDiffError(
            f"{path} has no *.safetensors weights (nbdiff loads safetensors only)", convert_hint
        )
    return folder


def load_model(path: str | Path, quantize: str | None = None, device: str = "auto", dtype: str = "auto"):
    """Load (model, tokenizer) from a folder, in eval mode with sdpa attention.

    An adapter folder (`nbdiff adapt --export adapter`) loads its base and applies the adapter
    (nbdiff.adapters).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if is_adapter_folder(path):
        settings, base = read_adapter_folder(path)
        model, tokenizer = load_model(base, quantize=quantize, device=device, dtype=dtype)
        return apply_adapter_folder(path, settings, model, tokenizer, quantize=quantize)
    folder = check_folder(path)
    read_settings(folder)  # validates the nbdiff section early, with a clear message
    dev = resolve_device(device)
    choice = choose_dtype(dtype, dev)
    torch_dtype = choice.dtype
    kind = normalize(quantize)
    kwargs = dict(dtype=torch_dtype, attn_implementation="sdpa", trust_remote_code=False, use_safetensors=True)
    if kind is not None:
        kwargs["quantization_config"] = bnb_config(kind, torch_dtype)
        kwargs["device_map"] = {"": dev}
    try:
        with quiet_transformers():  # the library never prints
            model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise NBDiffError(f"cannot load {path}: {str(exc).splitlines()[0]}", "is it a causal LM folder?") from None
    except Exception as exc:
        if type(exc).__name__ != "SafetensorError":
            raise
        raise NBDiffError(f"the weights in {path} are corrupt or truncated ({str(exc).splitlines()[0]})",
                          "write the folder again (`nbdiff convert` or `nbdiff adapt`)") from None
    if kind is None:
        model.to(dev)
    model.eval()
    model._nbdiff_dtype = choice  # read back by loaded_dtype (info, generate --json)
    if dev == "cpu" and kind is None:
        from nbdiff.cpu_kernel import install

        # products of a few rows (nbdiff.cpu_kernel; fp32, bf16); weights stored in bf16 stay bf16 under fp32 sums
        model._nbdiff_cpu_kernel = install(model, bf16_weights=True)
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    settings = model_settings(model)
    if settings is not None:
        vocab = model.get_input_embeddings().weight.shape[0]
        if settings.mask_token_id >= vocab:
            raise NBDiffError(
                f"{path}: mask token id {settings.mask_token_id} is outside the vocabulary ({vocab})",
                "re-run `nbdiff convert`",
            )
    return model, tokenizer


def model_settings(model) -> BlockDiffusionSettings | None:
    """The block-diffusion settings a loaded model carries, or None if it was never converted."""
    return settings_from_config(model.config)


def default_block_size(settings: BlockDiffusionSettings | None) -> int:
    """The block size a folder decodes at when none is asked for: the one its weights were adapted to.

    A converted, not yet adapted folder says 1 (its weights are the AR model's: larger blocks give
    poor text until `nbdiff adapt` trains them), an adapted one the last step of its curriculum. The
    block size it was converted for (`block_size`, the curriculum's target) caps it: a folder may
    ask to decode below what it was adapted to (the default model: adapted to 8, decodes at 1).
    A folder that was never converted decodes as plain AR (1).
    """
    if settings is None:
        return 1
    return min(settings.block_size, settings.adapted_block_size)


def context_length(model) -> int | None:
    """The model's maximum number of positions, if its config says."""
    return getattr(model.config, "max_position_embeddings", None)
