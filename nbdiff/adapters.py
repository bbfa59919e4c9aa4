"""Adapter folders: what `nbdiff adapt --lora-rank R --export adapter` writes, loadable as a model.

An adapter folder holds a peft LoRA adapter (`adapter_config.json`, `adapter_model.safetensors`;
the mask token's embedding row rides in it as a trainable-token delta), the tokenizer, and
`nbdiff.json`: the block-diffusion settings of the adapted model plus `base_model`, the converted
folder it was trained on (`{"path": ..., "source": ...}` or a plain path string; a relative path
is read from the adapter folder).

`apply_adapter_folder` takes the base as `nbdiff.loading.load_model` loaded it (that function reads
the folder with `read_adapter_folder` first), applies the adapter and merges it into the weights (merged LoRA decodes at the base model's speed); a quantized base keeps
the LoRA layers unmerged (merging into 4-bit weights would round them). The adapted settings are
attached to the model's config, so the decoder, chat, visualize and bench see an ordinary
converted model.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from nbdiff.errors import NBDiffError
from nbdiff.method.settings import BlockDiffusionSettings, attach_settings

ADAPTER_CONFIG = "adapter_config.json"
SETTINGS_FILE = "nbdiff.json"


def is_adapter_folder(path: str | Path) -> bool:
    """True for a folder with a peft adapter and nbdiff.json but no config.json of its own."""
    folder = Path(path).expanduser()
    return (folder.is_dir() and (folder / ADAPTER_CONFIG).is_file() and (folder / SETTINGS_FILE).is_file()
            and not (folder / "config.json").is_file())


def read_adapter_folder(path: str | Path) -> tuple[BlockDiffusionSettings, Path]:
    """(adapted settings, base model folder) of an adapter folder; NBDiffError if the base is missing."""
    folder = Path(path).expanduser()
    try:
        record = json.loads((folder / SETTINGS_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise NBDiffError(f"{folder / SETTINGS_FILE} is not readable JSON ({exc})", "export the adapter again") from None
    if not isinstance(record, dict):
        raise NBDiffError(f"{folder / SETTINGS_FILE} is not a JSON object", "export the adapter again")
    base = record.pop("base_model", None)
    base_path = base.get("path") if isinstance(base, dict) else base
    if not isinstance(base_path, str) or not base_path:
        raise NBDiffError(f"{folder / SETTINGS_FILE} does not name its base model (`base_model`)",
                          'add "base_model": {"path": "DIR"} with the converted folder the adapter was trained on')
    resolved = Path(base_path).expanduser()
    if not resolved.is_absolute():
        resolved = folder / resolved
    if not (resolved / "config.json").is_file():
        source = base.get("source") if isinstance(base, dict) else None
        hint = f"convert it again (`nbdiff convert {source} --out {base_path}`)" if source else \
            f"edit base_model in {folder / SETTINGS_FILE} to point at the converted base folder"
        raise NBDiffError(f"the adapter's base model {base_path} is not there", hint)
    return BlockDiffusionSettings.from_dict(record), resolved


def apply_adapter_folder(path: str | Path, settings: BlockDiffusionSettings, model, tokenizer,
                         quantize: str | None = None):
    """(model, tokenizer) of an adapter folder: the loaded base + adapter (merged unless quantized) + settings."""
    from nbdiff.fsutil import quiet_bitsandbytes, quiet_transformers

    quiet_bitsandbytes()  # peft imports bitsandbytes when installed, and that import warns on CPU
    from peft import PeftModel
    from transformers import AutoTokenizer

    from nbdiff.quantize import normalize

    folder = Path(path).expanduser()
    choice = getattr(model, "_nbdiff_dtype", None)
    try:
        with quiet_transformers(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # peft calls deprecated transformers helpers
            peft_model = PeftModel.from_pretrained(model, folder, is_trainable=False)
            if (folder / "tokenizer_config.json").is_file():
                tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise NBDiffError(f"cannot apply the adapter in {path}: {str(exc).splitlines()[0]}",
                          "was it trained on this base model?") from None
    with warnings.catch_warnings():  # peft's merge calls deprecated transformers helpers: not the user's concern
        warnings.simplefilter("ignore", FutureWarning)
        model = peft_model.merge_and_unload() if normalize(quantize) is None else peft_model.get_base_model()
    model.eval()
    if choice is not None:
        model._nbdiff_dtype = choice
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    vocab = model.get_input_embeddings().weight.shape[0]
    if settings.mask_token_id >= vocab:
        raise NBDiffError(f"{path}: mask token id {settings.mask_token_id} is outside the vocabulary ({vocab})",
                          "the adapter was trained on another base model")
    attach_settings(model.config, settings)
    return model, tokenizer
