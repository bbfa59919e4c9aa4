"""Which architectures nbdiff can drive: those whose attention honours a custom 4-D mask.

The check is a probe, not a list of names: a shrunken random copy of the architecture (same class,
tiny widths) runs one forward with a causal mask and one with a mask that lets an early token see
a later one. If the early token's output does not change, the family ignores custom masks and
block diffusion cannot work on it. The probe costs milliseconds, whatever the real model's size.
"""

from __future__ import annotations

import copy

import torch

from nbdiff.errors import NBDiffError
from nbdiff.method.masks import to_model_mask

# Width fields shrunk for the probe; anything else keeps its value.
_SHRINK = {
    "num_hidden_layers": 1,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 256,
    "max_position_embeddings": 64,
    "moe_intermediate_size": 64,
    "num_experts": 4,
    "num_local_experts": 4,
    "num_experts_per_tok": 2,
}


def shrink_config(config):
    """A copy of `config` with tiny widths, one layer and no quantization settings."""
    small = copy.deepcopy(config)
    for name, value in _SHRINK.items():
        if hasattr(small, name) and getattr(small, name) is not None:
            setattr(small, name, value)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        tok = getattr(small, name, None)
        if isinstance(tok, int) and tok >= _SHRINK["vocab_size"]:
            setattr(small, name, 0)
        elif isinstance(tok, list):
            setattr(small, name, [t if t < _SHRINK["vocab_size"] else 0 for t in tok])
    if getattr(small, "layer_types", None):
        small.layer_types = list(small.layer_types)[:1]
    if hasattr(small, "quantization_config"):
        try:
            delattr(small, "quantization_config")
        except AttributeError:
            small.quantization_config = None
    small.tie_word_embeddings = getattr(config, "tie_word_embeddings", False)
    return small


def probe_mask_support(config, attn_implementation: str = "sdpa") -> None:
    """Raise NBDiffError unless this architecture honours custom 4-D masks with `attn_implementation`."""
    from transformers import AutoModelForCausalLM

    arch = (getattr(config, "architectures", None) or [getattr(config, "model_type", "?")])[0]
    try:
        small = shrink_config(config)
        small._attn_implementation = attn_implementation
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(small, attn_implementation=attn_implementation)
        model.eval()
    except Exception as exc:  # unknown families, missing optional deps, odd configs
        raise NBDiffError(
            f"cannot build architecture {arch!r} to check its attention masks: {type(exc).__name__}: {exc}",
            "nbdiff supports decoder-only transformers causal LMs (Llama, Qwen2/3, Mistral, ...)",
        ) from None
    n = 6
    ids = torch.arange(1, n + 1)[None] % small.vocab_size
    pos = torch.arange(n)[None]
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    peek = causal.clone()
    peek[1, 3] = True  # token 1 may see token 3
    with torch.no_grad():
        try:
            out_c = model(input_ids=ids, position_ids=pos, attention_mask=to_model_mask(causal, model)).logits
            out_p = model(input_ids=ids, position_ids=pos, attention_mask=to_model_mask(peek, model)).logits
            out_d = model(input_ids=ids, position_ids=pos).logits
        except Exception as exc:
            raise NBDiffError(
                f"architecture {arch!r} rejects custom 4-D attention masks: {type(exc).__name__}: {exc}",
                "block diffusion needs a model that accepts a 4-D attention mask",
            ) from None
    honours_causal = torch.allclose(out_c, out_d, atol=1e-4, rtol=1e-4)
    honours_peek = not torch.allclose(out_p[0, 1], out_c[0, 1], atol=1e-6)
    untouched = torch.allclose(out_p[0, 0], out_c[0, 0], atol=1e-5)
    if not (honours_causal and honours_peek and untouched):
        raise NBDiffError(
            f"architecture {arch!r} ignores custom 4-D attention masks (with {attn_implementation})",
            "block diffusion needs bidirectional attention inside a block; this family cannot be converted",
        )
