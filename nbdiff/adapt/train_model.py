"""The model side of `nbdiff adapt`: read the converted folder, load it for training, write the result.

Notable features:
- `read_model_folder` reads config.json once (the `nbdiff` settings, the context length, the
  weight dtype) and opens every safetensors file's header, so a truncated or corrupt folder is one
  clear error before the run writes anything.
- Training weights: fp32 master weights (bf16 autocast on GPU), bf16 for LoRA on GPU; `--quantize
  nf4` loads frozen 4-bit weights with `nbdiff.quantize.bnb_config` (QLoRA).
- LoRA through peft, with the mask token's embedding row trainable (`trainable_token_indices`).
- `write_final_model` writes the merged model, or the adapter with `nbdiff.json` (the settings
  and, under `base_model`, where its base lives), into a temporary folder inside the run and moves
  the files in with config.json last: a loadable folder is a complete one.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nbdiff.errors import NBDiffError
from nbdiff.adapt.recipe import AdaptConfig
from nbdiff.method.settings import BlockDiffusionSettings, attach_settings, settings_from_config


@dataclass
class ModelFolder:
    """A converted model folder, as the trainer needs it (config.json read once)."""

    path: Path
    config: dict[str, Any]
    settings: BlockDiffusionSettings

    @property
    def max_positions(self) -> int | None:
        value = self.config.get("max_position_embeddings")
        return value if isinstance(value, int) else None

    @property
    def dtype(self) -> torch.dtype:
        name = self.config.get("dtype") or self.config.get("torch_dtype") or "float32"
        value = getattr(torch, str(name), torch.float32)
        return value if isinstance(value, torch.dtype) else torch.float32


def read_model_folder(model: str | Path, seq_len: int, block_size: int) -> ModelFolder:
    """Check that `model` is a complete converted folder that fits `seq_len`; NBDiffError otherwise."""
    path = Path(model)
    if not path.is_dir():
        raise NBDiffError(f"model folder {path} does not exist", "pass a folder written by `nbdiff convert`")
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise NBDiffError(f"{path} has no config.json", "pass a Hugging Face model folder or run `nbdiff convert` first")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise NBDiffError(f"{cfg_path} is not valid JSON: {exc}", "convert the model again") from None
    settings = settings_from_config(config) if isinstance(config, dict) else None
    if settings is None:
        raise NBDiffError(
            f"{path} was never converted to a block-diffusion model (no `nbdiff` section in config.json)",
            f"run `nbdiff convert {path} --out CONVERTED` first, then adapt CONVERTED",
        )
    folder = ModelFolder(path, config, settings)
    _check_weight_files(path)
    max_pos = folder.max_positions
    if max_pos is not None and seq_len > max_pos:
        fit = max_pos - max_pos % block_size
        hint = f"use --seq-len {fit} or less" if fit else f"use a --block-size of at most {max_pos}"
        raise NBDiffError(f"--seq-len {seq_len} exceeds the model's context ({max_pos} positions)", hint)
    return folder


def _check_weight_files(path: Path) -> None:
    """Every safetensors file opens (its header covers the file) and every indexed shard exists."""
    from safetensors import safe_open

    files = sorted(path.glob("*.safetensors"))
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise NBDiffError(f"{index} is unreadable ({exc})", "convert the model again") from None
        missing = sorted(s for s in shards if not (path / s).is_file())
        if missing:
            raise NBDiffError(f"{path} lacks the weight file {missing[0]} named in its index", "convert the model again")
    if not files:
        raise NBDiffError(f"{path} holds no .safetensors weights", "convert the model again")
    for f in files:
        try:
            with safe_open(str(f), framework="pt"):
                pass
        except Exception as exc:  # safetensors raises its own error type for every kind of damage
            cause = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise NBDiffError(f"{f} is truncated or corrupt ({cause})", "convert the model again") from None


def load_tokenizer(folder: ModelFolder):
    """The folder's tokenizer; a damaged tokenizer file is one NBDiffError."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder.path))
    except Exception as exc:  # tokenizers reports a damaged file with a bare Exception
        cause = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise NBDiffError(f"cannot load the tokenizer in {folder.path}: {cause}", "convert the model again") from None


def make_accelerator(config: AdaptConfig):
    """accelerate's Accelerator for --device/--dtype (a launcher's mixed-precision setting wins)."""
    from accelerate import Accelerator

    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    cuda = torch.cuda.is_available()
    if config.device == "cuda" and not cuda:
        raise NBDiffError("--device cuda was asked for but no CUDA GPU is visible", "use --device cpu or auto")
    cpu = config.device == "cpu" or not cuda
    kwargs: dict[str, Any] = {"cpu": cpu}
    if "ACCELERATE_MIXED_PRECISION" not in os.environ:
        # CPU bf16 autocast is ours (autocast_context): accelerate's state is per process and would
        # refuse a second run in the same process with another precision
        kwargs["mixed_precision"] = "bf16" if not cpu and training_autocast(config, "cuda") else "no"
    if launched and cpu:
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")
    return Accelerator(**kwargs)


def training_autocast(config: AdaptConfig, device: str) -> bool:
    """bf16 autocast over fp32 master weights: on a GPU unless --dtype fp32; on a CPU with native
    bf16 (nbdiff.hardware) for --dtype auto. --dtype fp32 opts out everywhere."""
    from nbdiff.hardware import cpu_bf16

    if config.dtype == "fp32":
        return False
    if device == "cuda":
        return True
    return config.dtype == "auto" and cpu_bf16().native


def autocast_context(config: AdaptConfig, acc):
    """The context manager factory a training step runs under: accelerate's (GPU mixed precision,
    or none), or bf16 autocast on a CPU where training_autocast says so."""
    if acc.device.type == "cpu" and training_autocast(config, "cpu"):
        return lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    return acc.autocast


def load_model(config: AdaptConfig, folder: ModelFolder, device: torch.device):
    """The model to train: weights in the training dtype (or nf4), LoRA-wrapped when --lora-rank > 0."""
    from transformers import AutoModelForCausalLM

    from nbdiff.convert.compat import probe_mask_support

    gpu = device.type == "cuda"
    if config.dtype == "bf16" or (config.lora_rank > 0 and training_autocast(config, device.type)):
        dtype = torch.bfloat16  # LoRA under autocast: the frozen base in bf16, adapters in fp32 (peft)
    else:
        dtype = torch.float32  # fp32 master weights (bf16 autocast where training_autocast says)
    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": config.attn_implementation}
    if config.quantize == "nf4":
        from nbdiff.quantize import bnb_config

        kwargs["quantization_config"] = bnb_config("nf4", torch.bfloat16 if gpu else torch.float32, double_quant=True)
        kwargs["device_map"] = {"": (device.index or 0) if gpu else "cpu"}  # this process's GPU under DDP
    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder.path), **kwargs)
    except (OSError, ValueError, RuntimeError) as exc:
        cause = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise NBDiffError(f"cannot load the model in {folder.path}: {cause}", "convert the model again") from None
    probe_mask_support(model.config, config.attn_implementation)
    vocab = model.get_input_embeddings().weight.shape[0]
    if not 0 <= folder.settings.mask_token_id < vocab:
        raise NBDiffError(f"mask token id {folder.settings.mask_token_id} is outside the embedding table ({vocab} rows)",
                          "re-run `nbdiff convert` on the source model")
    model.config.use_cache = False
    plan = memory_plan(config, model, device)
    if plan.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if config.lora_rank > 0:
        model = wrap_lora(model, config, folder.settings)
    from nbdiff.method.attention import choose_training_attention

    _, attention = choose_training_attention(model, device, "auto" if config.attn_implementation == "sdpa"
                                             else config.attn_implementation)
    model.nbdiff_notes = [_dtype_note(config, device, dtype), plan.note, attention]  # one line each, for the start record
    return model


def _dtype_note(config: AdaptConfig, device: torch.device, weights: torch.dtype) -> str:
    from nbdiff.hardware import cpu_bf16

    name = {torch.bfloat16: "bf16", torch.float32: "fp32"}.get(weights, str(weights))
    if training_autocast(config, device.type):
        why = "GPU" if device.type == "cuda" else cpu_bf16().evidence
        return f"dtype: bf16 autocast, {name} weights, fp32 trainable weights ({why}; --dtype fp32 to opt out)"
    if config.dtype == "auto" and device.type == "cpu":
        return f"dtype: {name}, no autocast ({cpu_bf16().evidence})"
    return f"dtype: {name} weights, no autocast (--dtype {config.dtype})"


def memory_plan(config: AdaptConfig, model, device: torch.device):
    """Gradient checkpointing (on when asked, else only when the step would not fit) and the
    --max-memory guard, from nbdiff.adapt.memory's estimate of one micro-batch step."""
    from nbdiff.adapt.memory import parse_memory, plan_memory

    n_params = sum(p.numel() for p in model.parameters())
    if config.lora_rank > 0:  # adapters: 2 * rank * (in + out) per wrapped linear, about
        n_trainable = 2 * config.lora_rank * model.config.num_hidden_layers * 7 * model.config.hidden_size * 2
    else:
        n_trainable = n_params
    rows = config.batch_size * (2 if config.complementary_masks else 1)
    compute = torch.bfloat16 if training_autocast(config, device.type) else torch.float32
    return plan_memory(model.config, n_params, n_trainable, rows, config.seq_len, device, compute,
                       checkpointing=True if config.gradient_checkpointing else None,
                       max_memory=parse_memory(config.max_memory))


def wrap_lora(model, config: AdaptConfig, settings: BlockDiffusionSettings):
    """LoRA on every linear layer (or --lora-targets); the mask token's input embedding row trains too.

    The mask row is the one embedding the AR model never learnt, so LoRA alone cannot fix it; peft's
    `trainable_token_indices` trains just that row (a [1, hidden] delta) instead of the whole table
    (`modules_to_save` would copy and train all of embed_tokens).
    """
    from nbdiff.fsutil import quiet_bitsandbytes

    quiet_bitsandbytes()  # peft imports bitsandbytes when installed, and that import warns on CPU
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if config.quantize != "none":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=config.gradient_checkpointing)
    targets: Any = config.lora_targets
    if targets != "all-linear":
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    lora = LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha if config.lora_alpha is not None else 2 * config.lora_rank,
        lora_dropout=config.lora_dropout,
        target_modules=targets,
        trainable_token_indices=[settings.mask_token_id],
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def trainable_names(model) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def load_trained_weights(model, weights: dict[str, torch.Tensor], names: list[str], where: Path) -> None:
    """Copy a checkpoint's trainable weights into `model` (every name must be there)."""
    missing = [n for n in names if n not in weights]
    if missing:
        raise NBDiffError(f"checkpoint {where} lacks {len(missing)} trainable weights (e.g. {missing[0]})",
                          "it was written by a different model or LoRA setup")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n in names:
            params[n].copy_(weights[n].to(params[n].dtype))


def adapted_settings(folder: ModelFolder, config: AdaptConfig, steps: int, tokens: int,
                     block_size: int) -> BlockDiffusionSettings:
    """The `nbdiff` settings of the adapted model: block sizes, context mask and an `adapt` record."""
    new = BlockDiffusionSettings.from_dict(folder.settings.to_dict())
    new.block_size = config.block_size
    new.adapted_block_size = block_size
    new.context_mask = config.context_mask
    new.extra = dict(new.extra, adapt={
        "steps": steps, "tokens": tokens, "context_mask": config.context_mask,
        "ar_loss_weight": config.ar_loss_weight, "curriculum": config.curriculum, "lora_rank": config.lora_rank,
        "from": str(config.model)})
    return new


def write_final_model(out: Path, unwrapped, state_dict, tokenizer, config: AdaptConfig, folder: ModelFolder,
                      settings: BlockDiffusionSettings) -> None:
    """Write the final model (merged weights, or the LoRA adapter + nbdiff.json) into the run folder `out`.

    The files are written into a temporary folder inside `out` and moved in one by one, config.json
    (or nbdiff.json) last, so a folder that looks loadable is complete.
    """
    from nbdiff.fsutil import clean_stale_temps, temp_sibling

    target = out / "final-model"  # only names the temporary: .final-model.nbdiff-tmp-<pid>-<id>
    clean_stale_temps(target)
    tmp = temp_sibling(target)
    tmp.mkdir()
    try:
        if config.lora_rank > 0 and config.export == "adapter":
            unwrapped.save_pretrained(tmp)
            record = dict(settings.to_dict(), base_model={"path": str(folder.path.resolve()),
                                                          "source": folder.settings.source})
            (tmp / "nbdiff.json").write_text(json.dumps(record, indent=1), encoding="utf-8")
        else:
            final = merge_lora(unwrapped, config) if config.lora_rank > 0 else unwrapped
            state = final.state_dict() if config.lora_rank > 0 else state_dict
            state = {k: (v.to(folder.dtype) if v.is_floating_point() else v) for k, v in state.items()}
            attach_settings(final.config, settings)
            final.config.use_cache = True
            final.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        last = ("config.json", "nbdiff.json")
        for f in sorted(tmp.iterdir(), key=lambda p: p.name in last):
            dest = out / f.name
            if dest.is_dir() and not dest.is_symlink():
                shutil.rmtree(dest)
            os.replace(f, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def merge_lora(peft_model, config: AdaptConfig):
    """Merged weights: in place for LoRA; for QLoRA the adapter goes onto a full-precision reload of the base."""
    if config.quantize == "none":
        return peft_model.merge_and_unload()
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    adapter = {k: v.detach().float().cpu() for k, v in get_peft_model_state_dict(peft_model).items()}
    base = AutoModelForCausalLM.from_pretrained(config.model, dtype=torch.float32,
                                                attn_implementation=config.attn_implementation)
    fresh = get_peft_model(base, peft_model.peft_config["default"])
    set_peft_model_state_dict(fresh, adapter)
    return fresh.merge_and_unload()
