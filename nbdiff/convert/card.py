"""The README.md model card written into a converted folder."""

from __future__ import annotations

from nbdiff.method.settings import BlockDiffusionSettings
from nbdiff.convert.mask_token import MaskChoice


def model_card(source: str, architecture: str, settings: BlockDiffusionSettings, mask: MaskChoice, dtype: str, parameters: int) -> str:
    """A short README.md for the converted folder."""
    if settings.adapted_block_size > 1:
        state = (f"It was adapted up to block size {settings.adapted_block_size} before this conversion "
                 "(`adapted_block_size` and the adapt record are kept).")
    else:
        state = ("It has not been adapted yet (`adapted_block_size: 1`), so block decoding with large "
                 "blocks needs\n`nbdiff adapt` first.")
    return f"""---
library_name: transformers
tags: [nbdiff, block-diffusion]
---
# Block-diffusion initialisation of `{source}`

Converted by `nbdiff convert` ({architecture}, {parameters / 1e6:,.1f}M parameters, {dtype}).
The weights are the source model's: run causally, this model gives the source's logits. {state}

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
