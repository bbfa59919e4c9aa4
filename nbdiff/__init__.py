"""nbdiff: turn an autoregressive LM into a block-diffusion LM the NBDiff way.

The library (this package) depends on torch, transformers and safetensors only; it never prints
and never imports typer, rich or textual. Heavy modules load lazily on first attribute access.

    import nbdiff
    model, tokenizer = nbdiff.load("smollm2-nbdiff")
    text, final = nbdiff.generate(model, tokenizer, "Hello", block_size=8)

Modules, one per concept: settings (config.json section), masks (every attention mask),
noising, losses, curriculum, layout (the 2L training forward), compat (mask-support probe),
events (decoder records).
"""

from __future__ import annotations

import importlib
from typing import Any

from nbdiff.errors import NBDiffError

__version__ = "0.1.0"

# public name -> module that defines it (imported on first use)
_LAZY = {
    "training_mask": "nbdiff.method.masks",
    "packed_training_mask": "nbdiff.method.masks",
    "decoding_mask": "nbdiff.method.masks",
    "BlockDiffusionSettings": "nbdiff.method.settings",
    "read_settings": "nbdiff.method.settings",
    "BlockCurriculum": "nbdiff.method.curriculum",
    "load": "nbdiff.api",
    "generate": "nbdiff.api",
    "stream": "nbdiff.api",
}

__all__ = ["NBDiffError", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'nbdiff' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
