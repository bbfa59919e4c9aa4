"""Which attention kernel the 2L training pass uses, chosen from the device.

The dense [2L, 2L] bool mask works everywhere (sdpa, eager) but rules out the kernels that skip
work: the noised half attends to its own block and earlier clean blocks only, so most tiles of the
mask are empty. On CUDA, flex attention with a BlockMask built from the same rule
(nbdiff.method.masks.training_block_mask) skips them. On CPU the torch 2.13 build of flex attention runs
the forward only ("FlexAttention does not support backward on CPU"), so training keeps sdpa there.
"""

from __future__ import annotations

import torch

FLEX = "flex_attention"


def flex_available(device: torch.device | str) -> bool:
    """flex attention can train here: a CUDA device and a torch that ships it."""
    if torch.device(device).type != "cuda":
        return False
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def choose_training_attention(model, device: torch.device | str, asked: str = "auto") -> tuple[str, str]:
    """(implementation, one-line note) for the training pass; switches the model if needed.

    asked: 'auto' (flex on CUDA when the architecture supports it, else what the model has), or an
    explicit implementation, which is kept. Call before wrapping the model (DDP, accelerate).
    """
    inner = getattr(model, "module", model)
    current = getattr(inner.config, "_attn_implementation", None) or "eager"
    if asked != "auto":
        return current, f"attention: {current} (asked for)"
    if not flex_available(device):
        why = "no CUDA device" if torch.device(device).type != "cuda" else "this torch has no flex attention"
        return current, f"attention: {current} with the dense 2L mask ({why} for flex attention)"
    base = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    if not getattr(base, "_supports_flex_attn", False):
        return current, f"attention: {current} ({type(base).__name__} does not support flex attention)"
    base.set_attn_implementation(FLEX)
    return FLEX, "attention: flex_attention with a block mask of the 2L rule (skips empty tiles)"
