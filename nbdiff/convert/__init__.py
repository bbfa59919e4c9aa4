"""Turn an autoregressive checkpoint into a block-diffusion initialisation (`nbdiff convert`).

Notable features:
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
- `mask_token`: which token becomes the mask token, and its embedding row.
- `tensors`: where each input tensor lives, the shard plan, streaming writes.
- `card`: the README.md model card.
"""

from .card import model_card
from .converter import DEFAULT_MAX_SHARD_BYTES, ConvertProgress, ConvertResult, convert, default_out_dir
from .mask_token import DEFAULT_MASK_TOKEN, MaskChoice, choose_mask_token

__all__ = [
    "DEFAULT_MASK_TOKEN", "DEFAULT_MAX_SHARD_BYTES", "ConvertProgress", "ConvertResult", "MaskChoice",
    "choose_mask_token", "convert", "default_out_dir", "model_card",
]
