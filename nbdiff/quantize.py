"""Quantized weights with bitsandbytes: nf4 / fp4 (4-bit) and int8, applied while loading.

bitsandbytes is optional and imported lazily; asking for quantization without it is an
NBDiffError with the install command. 4-bit layers run on CPU too with bitsandbytes >= 0.48.
Linear layers are quantized; embeddings, norms and the output head stay in `compute_dtype`.
"""

from __future__ import annotations

import importlib.util

import torch

from nbdiff.errors import NBDiffError

QUANT_TYPES = ("nf4", "fp4", "int8")


def normalize(kind: str | None) -> str | None:
    """'none'/None -> None; otherwise one of QUANT_TYPES (else NBDiffError)."""
    if kind is None:
        return None
    kind = str(getattr(kind, "value", kind)).lower()
    if kind in ("", "none"):
        return None
    if kind not in QUANT_TYPES:
        raise NBDiffError(f"--quantize must be none, {', '.join(QUANT_TYPES)}; got {kind!r}")
    return kind


def require_bitsandbytes(kind: str) -> None:
    if importlib.util.find_spec("bitsandbytes") is None:
        raise NBDiffError(
            f"--quantize {kind} needs bitsandbytes, which is not installed",
            "pip install 'nbdiff[quant]' (or bitsandbytes), or drop --quantize",
        )


def bnb_config(kind: str, compute_dtype: torch.dtype = torch.float32, double_quant: bool = False):
    """The transformers BitsAndBytesConfig for `kind` (nf4, fp4 or int8).

    `double_quant` also quantizes the 4-bit scales (about 0.4 bits per weight less; QLoRA training
    uses it, where memory is what limits the model size).
    """
    kind = normalize(kind)
    if kind is None:
        raise NBDiffError("bnb_config needs a quantization type", f"one of {', '.join(QUANT_TYPES)}")
    require_bitsandbytes(kind)
    from transformers import BitsAndBytesConfig

    from nbdiff.fsutil import quiet_bitsandbytes

    quiet_bitsandbytes()  # before bitsandbytes is imported: its import warns too

    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=kind,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_use_double_quant=double_quant,
    )


def weight_bytes(model) -> int:
    """Bytes held by the model's parameters and buffers (quantized layers count their packed size)."""
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        total += t.numel() * t.element_size()
    return total
