"""Reading a source for conversion: config, tokenizer, generation config, GGUF weights, tensor names.

Nothing here loads real weights into a model: names come from a model built on the meta device,
and a GGUF file's weights are read only when asked for, tensor by tensor (`gguf_weights`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from nbdiff.errors import NBDiffError, first_line
from nbdiff.fsutil import quiet_transformers
from nbdiff.convert.sources import Source


def read_config(source: Source, dtype: torch.dtype):
    """(config without quantization settings or auto_map, loader of a GGUF state dict or None)."""
    if source.kind == "gguf":
        config, load_weights = _read_gguf(source, dtype)
    else:
        config, load_weights = _read_folder_config(source), None
    return _plain_config(config), load_weights


def _read_folder_config(source: Source):
    from transformers import AutoConfig

    try:
        with quiet_transformers():
            return AutoConfig.from_pretrained(str(source.folder), trust_remote_code=False)
    except Exception as exc:
        raise NBDiffError(
            f"cannot read {source.folder / 'config.json'} ({first_line(exc)})",
            "nbdiff converts transformers causal LMs that need no remote code",
        ) from None


def _check_gguf_header(path: Path) -> None:
    with open(path, "rb") as fh:
        header = fh.read(24)  # magic (4), version (4), tensor count (8), metadata count (8)
    if header[:4] != b"GGUF":
        raise NBDiffError(f"{path.name} is not a GGUF file (bad magic bytes)", "pass a GGUF model file or a Hugging Face folder")
    if len(header) < 24:
        raise NBDiffError(f"{path.name} is truncated (GGUF header incomplete)", "download the file again")


def _truncated_gguf(path: Path) -> bool:
    """True when the file ends before the data its header and tensor table promise."""
    try:
        from gguf import GGUFReader

        GGUFReader(str(path))
    except ImportError:
        return False
    except Exception:
        return True
    return False


def _read_gguf(source: Source, dtype: torch.dtype):
    """A GGUF file's config, and a function that gives its weights (in `dtype`) as one tensor group."""
    from transformers import AutoConfig

    _check_gguf_header(source.path)
    folder, name = str(source.path.parent), source.path.name
    try:
        with quiet_transformers():
            config = AutoConfig.from_pretrained(folder, gguf_file=name)
    except Exception as exc:
        if _truncated_gguf(source.path):
            raise NBDiffError(f"{name} is truncated or corrupt (it ends before the data its header describes)",
                              "download the file again") from None
        raise NBDiffError(f"{name} is not a GGUF model transformers can read ({first_line(exc)})",
                          "pass a GGUF file of a supported architecture (llama, qwen2, qwen3, mistral, ...)") from None
    return config, lambda: _gguf_group(source.path, config, dtype)


def _gguf_group(path: Path, config, dtype: torch.dtype):
    """Tensor by tensor (`GgufTensors`) where that reproduces transformers' load, else the whole
    model dequantized by transformers (mixture-of-experts files and transformers' newer GGUF path)."""
    from nbdiff.convert.gguf_weights import stream_gguf
    from nbdiff.convert.tensors import TensorGroup

    try:
        tensors = stream_gguf(path, config, dtype)
        if tensors is not None:
            return TensorGroup(gguf=tensors)
    except NBDiffError:
        raise
    except Exception as exc:
        raise NBDiffError(f"cannot read the tensors of {path.name} ({first_line(exc)})") from None
    return TensorGroup(state=_dequantize_gguf(str(path.parent), path.name, dtype))


def _dequantize_gguf(folder: str, name: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    try:
        with quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
    except Exception as exc:
        raise NBDiffError(f"cannot dequantize {name} ({first_line(exc)})") from None
    # The dequantized weights are plain tensors; only the state dict is kept (the config's
    # quantization settings were dropped), so the saved folder is an ordinary checkpoint.
    state = {k: v.detach() for k, v in model.state_dict().items()}
    del model
    return state


def _plain_config(config):
    """Drop quantization settings (GGUF, bitsandbytes, ...) and `auto_map`: the output is plain
    weights, and no remote code is copied, so an auto_map would point at files that are not there."""
    for obj in {id(config): config, id(config.get_text_config()): config.get_text_config()}.values():
        for name in ("quantization_config", "auto_map"):
            if hasattr(obj, name):
                with contextlib.suppress(AttributeError):
                    delattr(obj, name)
                if getattr(obj, name, None) is not None:
                    setattr(obj, name, None)
    return config


def read_tokenizer(source: Source):
    from transformers import AutoTokenizer

    try:
        with quiet_transformers():
            if source.kind == "gguf":
                return AutoTokenizer.from_pretrained(str(source.folder), gguf_file=source.gguf_file)
            return AutoTokenizer.from_pretrained(str(source.folder), trust_remote_code=False)
    except Exception as exc:
        raise NBDiffError(f"cannot load the tokenizer of {source.label} ({first_line(exc)})",
                          "the folder needs tokenizer.json (or tokenizer.model) and tokenizer_config.json") from None


def generation_config(source: Source, config):
    """The source's generation_config.json when valid, else one built from the model config."""
    from transformers import GenerationConfig

    if source.kind == "folder" and (source.folder / "generation_config.json").is_file():
        try:
            gen = GenerationConfig.from_pretrained(str(source.folder))
            gen.validate()
            return gen
        except Exception:
            pass  # an invalid or odd file: rebuild it from the model config
    return GenerationConfig.from_model_config(config)


@dataclass
class ModelNames:
    """What the model class calls its tensors (read on the meta device: no memory)."""

    embedding: str
    """Key of the input embedding."""
    head: str | None
    """Key of an untied output head, None when tied to the embedding."""
    aliases: set[str]
    """Keys that are the embedding under another name (a tied lm_head): not written."""
    expected: set[str]
    """Keys the checkpoint must hold."""
    class_name: str

    def resized(self) -> set[str]:
        """Keys whose first dimension is the vocabulary (they gain the mask row)."""
        keys = {self.embedding} | ({self.head} if self.head else set())
        if self.head:
            keys.add(self.head.removesuffix("weight") + "bias")
        return keys


def model_names(config) -> ModelNames:
    from transformers import AutoModelForCausalLM

    try:
        with quiet_transformers(), torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    except Exception as exc:
        raise NBDiffError(f"cannot build the model class for {config.model_type!r} ({first_line(exc)})") from None
    params = dict(model.named_parameters(remove_duplicate=False))
    emb = model.get_input_embeddings().weight
    head_mod = model.get_output_embeddings()
    head = head_mod.weight if head_mod is not None else None
    emb_key = next(k for k, p in params.items() if p is emb)
    tied = head is None or head is emb
    head_key = None if tied else next(k for k, p in params.items() if p is head)
    aliases = {k for k, p in params.items() if p is emb and k != emb_key}
    expected = set(model.state_dict().keys()) - aliases
    return ModelNames(emb_key, head_key, aliases, expected, type(model).__name__)


WeightsLoader = Callable[[], "TensorGroup"]  # noqa: F821 - nbdiff.convert.tensors.TensorGroup
