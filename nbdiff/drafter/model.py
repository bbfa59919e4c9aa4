"""The drafter network: a few decoder layers of the AR model's width that fill a block in one forward.

    features = RMSNorm(Linear(n*H -> H)(concat of n AR layer outputs))      `Drafter.fuse`   [B, C, H]
    x = AR embedding of the block [first token, MASK, ..., MASK]                               [B, b, H]
    every draft layer:  queries from the block only; keys/values = this layer's K/V projections of the
                        features (placed first) and of the block; the block sees itself bidirectionally
    logits = AR LM head (rows of the draft vocabulary) of RMSNorm(x)                            [B, b, Vd]

Block offset j's logits predict the token AT offset j (no shift): offset 0 holds the known first
token, offsets 1..b-1 are the draft. The AR embedding and LM head are shared, frozen and never saved:
the drafter holds them outside its module tree, so `state_dict()` and `parameters()` are the draft
layers and the fusion only. Draft layers are Qwen3-style (q/k RMSNorm per head, no biases, SiLU MLP)
with RoPE at the tokens' own positions, as DFlash's published drafters.

Decoding keeps a `FeatureCache`: per draft layer, the keys/values of the context features, projected
once when the features arrive (`Drafter.extend`) and reused by every later block.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from nbdiff.cpu_kernel.linear import few_rows_linear, kept_bf16
from nbdiff.drafter.config import DrafterConfig


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_tables(pos: torch.Tensor, d: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, 1, T, d] of the rotary embedding at positions pos [B, T] (rotate-half convention); one pair
    serves every layer's queries and keys at those positions."""
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, device=pos.device, dtype=torch.float32) / d))  # [d/2]
    ang = pos.float()[:, None, :, None] * inv  # [B, 1, T, d/2]
    ang = torch.cat([ang, ang], -1)
    return ang.cos(), ang.sin()


def rope(x: torch.Tensor, tables: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotary embedding of x [B, h, T, d] with `rope_tables` of its positions."""
    cos, sin = tables
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)


@dataclass
class FeatureCache:
    """Projected context features of every draft layer: keys[i], values[i] are [B, kv_heads, C, d]."""

    keys: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)

    @property
    def length(self) -> int:
        return self.keys[0].shape[2] if self.keys else 0

    def crop(self, length: int) -> None:
        """Keep the first `length` columns."""
        self.keys = [k[:, :, :length] for k in self.keys]
        self.values = [v[:, :, :length] for v in self.values]


class Attention(nn.Module):
    def __init__(self, c: DrafterConfig):
        super().__init__()
        self.c = c
        self.q_proj = nn.Linear(c.hidden_size, c.num_attention_heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.num_attention_heads * c.head_dim, c.hidden_size, bias=False)
        if c.qk_norm:
            self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
            self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps)

    def _heads(self, x: torch.Tensor, proj: nn.Linear, norm: str | None) -> torch.Tensor:
        B, T, _ = x.shape
        y = proj(x).view(B, T, -1, self.c.head_dim)  # [B, T, h, d]
        if norm is not None and self.c.qk_norm:
            y = getattr(self, norm)(y)
        return y.transpose(1, 2)  # [B, h, T, d]

    def project_kv(self, x: torch.Tensor, tables: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys (normed, rotated) and values [B, kv_heads, T, d] of inputs x [B, T, H]; `tables`: `rope_tables` of
        their positions."""
        return rope(self._heads(x, self.k_proj, "k_norm"), tables), self._heads(x, self.v_proj, None)

    def forward(self, x, tables, ctx_k, ctx_v, mask):
        """x [B, b, H] (normed block), `rope_tables` of its positions, ctx_k/ctx_v [B, kv, C, d]; mask bool/additive
        [B, 1, b, C + b], BlockMask or None."""
        q = rope(self._heads(x, self.q_proj, "q_norm"), tables)  # [B, h, b, d]
        k_blk, v_blk = self.project_kv(x, tables)
        k, v = torch.cat([ctx_k, k_blk], 2), torch.cat([ctx_v, v_blk], 2)  # [B, kv, C + b, d]
        if mask is not None and not isinstance(mask, torch.Tensor):  # a flex-attention BlockMask (training on GPU)
            from torch.nn.attention.flex_attention import flex_attention

            out = flex_attention(q, k, v, block_mask=mask, enable_gqa=True)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        B, _, b, _ = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(B, b, -1))


class MLP(nn.Module):
    def __init__(self, c: DrafterConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DraftLayer(nn.Module):
    def __init__(self, c: DrafterConfig):
        super().__init__()
        self.self_attn = Attention(c)
        self.mlp = MLP(c)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, x, tables, ctx_k, ctx_v, mask):
        x = x + self.self_attn(self.input_layernorm(x), tables, ctx_k, ctx_v, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Drafter(nn.Module):
    """Draft layers + fusion; the AR embedding and LM head are borrowed (frozen, not saved)."""

    def __init__(self, config: DrafterConfig, embed_tokens: nn.Module, lm_head: nn.Module):
        super().__init__()
        self.config = config
        c = config
        self.fc = nn.Linear(len(c.target_layer_ids) * c.hidden_size, c.hidden_size, bias=False)
        self.hidden_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.layers = nn.ModuleList(DraftLayer(c) for _ in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self._shared = (embed_tokens, lm_head)  # a tuple: not registered as submodules, so never saved or trained
        ids = torch.tensor(c.draft_vocab if c.draft_vocab is not None else [], dtype=torch.long)
        self.register_buffer("draft_ids", ids, persistent=False)  # [Vd] draft index -> AR id (empty = identity)
        self._rows = None  # the LM head rows of the draft vocabulary, gathered on first use

    @property
    def dtype(self) -> torch.dtype:
        """The arithmetic's dtype: its norms' (a loaded drafter's linear weights may be kept in bf16 under fp32
        sums, nbdiff.cpu_kernel.keep_bf16)."""
        return self.hidden_norm.weight.dtype

    @property
    def embed_tokens(self) -> nn.Module:
        return self._shared[0]

    @property
    def lm_head(self) -> nn.Module:
        return self._shared[1]

    # ---- features -----------------------------------------------------------------------

    def select(self, hidden_states) -> list[torch.Tensor]:
        """The outputs of the layers read, from a transformers `output_hidden_states` tuple (index 0 = embeddings)."""
        return [hidden_states[i + 1] for i in self.config.target_layer_ids]

    def fuse(self, hidden_states: list[torch.Tensor]) -> torch.Tensor:
        """AR layer outputs (each [B, T, H], in target_layer_ids order) -> context features [B, T, H]."""
        return self.fuse_concatenated(torch.cat(hidden_states, dim=-1))

    def fuse_concatenated(self, x: torch.Tensor) -> torch.Tensor:
        """`fuse` of the layer outputs already concatenated along the last axis [B, T, n * H]."""
        return self.hidden_norm(self.fc(x.to(self.dtype)))

    def extend(self, cache: FeatureCache, feats: torch.Tensor, feat_pos: torch.Tensor) -> None:
        """Append context features [B, n, H] at positions [B, n] to a decoding cache (every layer's K/V)."""
        tables = self.rope_tables(feat_pos)
        for i, layer in enumerate(self.layers):
            k, v = layer.self_attn.project_kv(feats, tables)
            if i < len(cache.keys):
                cache.keys[i] = torch.cat([cache.keys[i], k], 2)
                cache.values[i] = torch.cat([cache.values[i], v], 2)
            else:
                cache.keys.append(k)
                cache.values.append(v)

    # ---- the block ------------------------------------------------------------------------

    def forward(self, block_ids: torch.Tensor, block_pos: torch.Tensor, feats: torch.Tensor | None = None,
                feat_pos: torch.Tensor | None = None, attn_mask=None, cache: FeatureCache | None = None,
                logits_from: int = 0) -> torch.Tensor:
        """Logits [B, b - logits_from, Vd] of block_ids [B, b] at positions block_pos [B, b].

        Context: fused features feats [B, C, H] at positions feat_pos [B, C], or a FeatureCache (decoding).
        attn_mask: bool (True = may attend) or additive float [B, 1, b, C + b], a flex BlockMask, or None
        (every query sees every context column and the whole block). Training passes many blocks at once.
        logits_from: skip the LM head at the first offsets (decoding needs none at offset 0, the known token).
        """
        with torch.no_grad():
            x = self.embed_tokens(block_ids)
        x = x.to(self.dtype)  # [B, b, H]
        tables = self.rope_tables(block_pos)
        feat_tables = self.rope_tables(feat_pos) if cache is None else None
        for i, layer in enumerate(self.layers):
            if cache is not None:
                ctx_k, ctx_v = cache.keys[i], cache.values[i]
            else:
                ctx_k, ctx_v = layer.self_attn.project_kv(feats, feat_tables)
            x = layer(x, tables, ctx_k, ctx_v, attn_mask)
        return self.head(self.norm(x[:, logits_from:]))

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """The AR LM head (frozen) on h [B, b, H], restricted to the draft vocabulary."""
        weight, bias = self._head_rows()
        if not kept_bf16(self.lm_head):  # kept: an fp32 head stored in bf16, widened as it is read
            h = h.to(weight.dtype)
        # where the AR head takes nbdiff's few-row CPU kernel its rows here do too (isa 0: torch's product)
        return few_rows_linear(h, weight, bias, getattr(self.lm_head, "_isa", 0))

    def _head_rows(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The LM head's rows of the draft vocabulary [Vd, H] (and bias), gathered once per weight version."""
        head = self.lm_head
        weight = head.weight.detach()
        bias = head.bias.detach() if getattr(head, "bias", None) is not None else None
        if not self.draft_ids.numel():
            return weight, bias
        key = (weight.data_ptr(), weight.dtype, weight.device, weight._version, self.draft_ids.device)
        if self._rows is None or self._rows[0] != key:
            self._rows = (key, weight[self.draft_ids], bias[self.draft_ids] if bias is not None else None)
        return self._rows[1], self._rows[2]

    def rope_tables(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotary tables of positions pos [B, T] (shared by every draft layer)."""
        return rope_tables(pos, self.config.head_dim, self.config.rope_theta)

    def to_full_vocab(self, ids: torch.Tensor) -> torch.Tensor:
        """Draft-vocabulary ids (e.g. argmax of the logits) -> AR vocabulary ids."""
        return self.draft_ids[ids] if self.draft_ids.numel() else ids
