"""Turn an autoregressive checkpoint into a block-diffusion initialisation (`nbdiff convert`).

Notable features:
- Tensor by tensor: a safetensors checkpoint or a GGUF file (dequantized one tensor at a time) is
  read and written one tensor at a time, so peak memory is about twice the largest tensor plus
  the libraries, whatever the model size.
- The weights are not changed, except for at most one new embedding row: the converted model, run
  causally, gives the source's logits. What changes is config.json, which gains an `nbdiff`
  section (block size, mask token, shift, context mask, adapted_block_size=1, source). A source
  nbdiff already converted or adapted keeps its section (adapted_block_size, adapt record).
- Before anything is written, a probe checks that the family honours custom 4-D attention masks.
- The output is written into a hidden sibling folder and renamed at the end (`nbdiff.fsutil`);
  any failure removes it, and temporaries of killed runs are cleaned by the next run. `force`
  replaces an old folder only once the new one is complete.
- Progress is reported by bytes through a callback; this package never prints.

Modules, in the order `convert()` uses them:
- `converter`: `convert()`, the orchestrator, and its result types.
- `reading`: config, tokenizer, GGUF, and the model's tensor names (meta device).
- `gguf_weights`: a GGUF file's tensors, dequantized one at a time as transformers would.
- `mask_token`: which token becomes the mask token, and its embedding row.
- `tensors`: where each input tensor lives, the shard plan, shards written tensor by tensor.
- `card`: the README.md model card.

Beside them: `sources` (where a checkpoint comes from: folder, GGUF, alias, hub id) and `compat`
(which architectures honour a custom 4-D mask).
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> module that defines it, imported on first use so that `nbdiff.convert.sources`
# (which the command line reads before any model work) does not pull in torch
_LAZY = {
    "model_card": "card",
    "DEFAULT_MAX_SHARD_BYTES": "converter", "ConvertProgress": "converter", "ConvertResult": "converter",
    "convert": "converter", "default_out_dir": "converter",
    "DEFAULT_MASK_TOKEN": "mask_token", "MaskChoice": "mask_token", "choose_mask_token": "mask_token",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'nbdiff.convert' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"nbdiff.convert.{module}"), name)
    globals()[name] = value
    return value
