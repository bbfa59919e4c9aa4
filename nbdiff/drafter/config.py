"""The settings of a trained drafter: its own shape and the AR model it belongs to.

A drafter is only useful with the AR model whose hidden states it was trained on, so the config
names that model (architecture, hidden size, number of layers, the layers it reads, a fingerprint
of its embedding and LM head, and a probe: a few of its embedding rows) and
`nbdiff.drafter.folder.load_drafter` refuses any other. The fingerprint is an exact hash that holds
across fp32/bf16/fp16 copies; the probe also recognises a quantized copy of the model (a Q4 GGUF
dequantized, say), whose near-zero weights changed sign and so changed the hash.
"""

from __future__ import annotations

import base64
import hashlib
import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

from nbdiff.errors import NBDiffError


def target_hidden_layers(num_ar_layers: int, n: int) -> list[int]:
    """The AR layers whose outputs feed the fusion: n layers spread from the 2nd to the 3rd-from-last.

    DFlash's rule, round(1 + i * (N - 4) / (n - 1)) for i = 0..n-1; one layer = the middle one. Small
    models (N < 5) fall back to distinct layers spread over all of them.
    """
    if n < 1:
        raise NBDiffError(f"a drafter reads at least one AR layer, got {n}")
    if n == 1:
        return [num_ar_layers // 2]
    if num_ar_layers >= 5:
        ids = [int(round(1 + i * (num_ar_layers - 4) / (n - 1))) for i in range(n)]
    else:
        ids = [int(round(i * (num_ar_layers - 1) / (n - 1))) for i in range(n)]
    return sorted(set(ids))


def fingerprint(ar_model) -> str:
    """A short hash of the AR model's embedding and LM head that survives dtype changes.

    The sign of a fixed sample of weights (every 61st row up to row 15616, first 64 columns) is the
    same in fp32, bf16 and fp16 copies of one model, and differs at about half the places between
    two models; rows added at the end of the vocabulary (a mask token) do not change it.
    """
    digest = hashlib.sha256()
    for weight in (ar_model.get_input_embeddings().weight, ar_model.get_output_embeddings().weight):
        rows = torch.arange(0, min(weight.shape[0], 15616), 61, device=weight.device)
        sample = weight.detach()[rows, :64].float().cpu()  # [<=256, <=64]
        digest.update(str(weight.shape[1]).encode())
        digest.update(bytes((sample > 0).flatten().to(torch.uint8).tolist()))
    return "signs-sha256:" + digest.hexdigest()[:16]


PROBE_ROWS = 16
"""Embedding rows in a probe, spread evenly over the first PROBE_SPAN ids (ordinary tokens in any
vocabulary; the padded and added rows at the end are left out)."""
PROBE_SPAN = 15360
PROBE_COLUMNS = 256
"""At most this many columns of each row (every k-th): 16 x 224 bf16 values, 9.6 KB of base64, for a
896-wide model."""
PROBE_MATCH = 0.9
"""Mean cosine similarity of the probe's rows at or above which a model is the probe's model.

Measured on the probe's rows of the Q4_K_M-dequantized Qwen2.5-Coder-0.5B and Q4_1-dequantized
SmolLM2-135M embeddings and of nbdiff's tiny random models (a throwaway script, rounding blocks of 32
along each row; docs/benchmarks/drafter-qwen05.md section 5): a matrix against its bf16, fp16 or
8-bit copy >= 0.99999; against a 4-bit copy 0.992-0.997; two different 4-bit copies 0.988-0.993; a
4-bit against a 3-bit copy 0.956-0.975; a 2-bit (ternary) copy 0.75-0.82. Unrelated weights: two
random inits -0.02-0.05 (single rows up to 0.31), the neighbouring rows of one real embedding, which
share a common direction, 0.09-0.25 (single rows up to 0.44). 0.9 passes every copy at 3 bits or more
and stays far above anything unrelated."""


def _probe_layout(num_rows: int, width: int) -> tuple[list[int], int]:
    span = min(num_rows, PROBE_SPAN)
    return [i * span // PROBE_ROWS for i in range(PROBE_ROWS)], max(1, math.ceil(width / PROBE_COLUMNS))


def _probe_sample(weight: torch.Tensor, rows: list[int], column_step: int) -> torch.Tensor:
    index = torch.tensor(rows, device=weight.device)
    return weight.detach()[index, ::column_step].float().cpu()  # [rows, ceil(H / step)]


def weight_probe(ar_model) -> dict[str, Any]:
    """A few embedding rows of the AR model, stored with the drafter to recognise its model's copies.

    `rows` are the embedding rows sampled, `column_step` the stride over their columns, `bf16` the
    sample [len(rows), ceil(H / column_step)] as little-endian bf16, base64.
    """
    weight = ar_model.get_input_embeddings().weight
    rows, step = _probe_layout(weight.shape[0], weight.shape[1])
    sample = _probe_sample(weight, rows, step).bfloat16().view(torch.int16).numpy().astype("<i2")
    return {"rows": rows, "column_step": step, "bf16": base64.b64encode(sample.tobytes()).decode("ascii")}


def probe_matrix(probe: dict[str, Any], hidden_size: int) -> torch.Tensor:
    """The probe's sample as fp32 [len(rows), ceil(hidden_size / column_step)]; NBDiffError if malformed."""
    import numpy as np

    try:
        rows, step = [int(r) for r in probe["rows"]], int(probe["column_step"])
        raw = base64.b64decode(probe["bf16"], validate=True)
    except (KeyError, TypeError, ValueError):
        raise NBDiffError("target_probe needs `rows`, `column_step` and base64 `bf16`",
                          "write the drafter folder again") from None
    columns = math.ceil(hidden_size / step) if step > 0 else 0
    if not rows or min(rows) < 0 or columns == 0 or len(raw) != 2 * len(rows) * columns:
        raise NBDiffError(f"target_probe holds {len(raw)} bytes, not {len(rows)} rows x {columns} columns of bf16",
                          "write the drafter folder again")
    values = torch.from_numpy(np.frombuffer(raw, dtype="<i2").astype(np.int16))
    return values.view(torch.bfloat16).float().view(len(rows), columns)


def probe_similarity(probe: dict[str, Any], ar_model) -> float:
    """Mean cosine similarity of the probe's rows and ar_model's same embedding rows (-1.0 when it lacks them)."""
    weight = ar_model.get_input_embeddings().weight
    try:
        stored = probe_matrix(probe, weight.shape[1])  # [rows, columns]
    except NBDiffError:
        return -1.0  # another width (or a damaged probe): not this model's rows
    rows = [int(r) for r in probe["rows"]]
    if max(rows) >= weight.shape[0]:
        return -1.0
    mine = _probe_sample(weight, rows, int(probe["column_step"]))
    return torch.nn.functional.cosine_similarity(stored, mine, dim=1).mean().item()


def default_mask_token_id(ar_model) -> int:
    """The block's mask token: the model's nbdiff mask token, else its pad token, else the last id."""
    from nbdiff.loading import model_settings

    settings = model_settings(ar_model)
    if settings is not None:
        return int(settings.mask_token_id)
    pad = getattr(ar_model.config, "pad_token_id", None)
    if isinstance(pad, int) and pad >= 0:
        return pad
    return ar_model.get_input_embeddings().weight.shape[0] - 1


@dataclass(kw_only=True)
class DrafterConfig:
    """Shape of the draft layers and the AR model they read. Saved as the `nbdiff_drafter` section of config.json."""

    target_architecture: str
    """The AR model's class, e.g. "LlamaForCausalLM"."""
    hidden_size: int
    """Width of the AR model (and of every draft layer)."""
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    target_layer_ids: list[int]
    """AR layers (0-based) whose outputs are fused: hidden_states[i + 1] of a transformers forward."""
    num_target_layers: int
    """Number of decoder layers of the AR model."""
    mask_token_id: int
    """Token at block offsets 1..b-1 (an AR vocabulary id; its embedding is the AR model's)."""
    vocab_size: int
    """The AR vocabulary size."""
    num_hidden_layers: int = 2
    """Draft layers."""
    block_size: int = 16
    """Block the drafter was trained for (it also runs at smaller blocks)."""
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    draft_vocab: list[int] | None = None
    """Reduced draft vocabulary (AR token ids, the LM head's rows used); None = the whole vocabulary."""
    target_fingerprint: str = ""
    """`fingerprint(ar_model)` of the AR model it was trained on ("" = not checked)."""
    target_probe: dict[str, Any] | None = None
    """`weight_probe(ar_model)`: a few of its embedding rows, which also recognise quantized copies (None = not kept)."""
    target_name: str = ""
    """Where the AR model came from (for messages only)."""
    qk_norm: bool = True
    """RMSNorm on every head's queries and keys (DFlash's Qwen3-style layers)."""

    def __post_init__(self) -> None:
        if self.num_hidden_layers < 1:
            raise NBDiffError(f"a drafter needs at least one layer, got {self.num_hidden_layers}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise NBDiffError(f"{self.num_attention_heads} attention heads do not split into "
                              f"{self.num_key_value_heads} key/value heads")
        bad = [i for i in self.target_layer_ids if not 0 <= i < self.num_target_layers]
        if not self.target_layer_ids or bad:
            raise NBDiffError(f"target_layer_ids {self.target_layer_ids} must name AR layers 0..{self.num_target_layers - 1}")
        if not 0 <= self.mask_token_id < self.vocab_size:
            raise NBDiffError(f"mask token id {self.mask_token_id} is outside the AR vocabulary ({self.vocab_size})")
        if self.block_size < 2:
            raise NBDiffError(f"a drafter's block size must be >= 2, got {self.block_size}")
        if self.draft_vocab is not None:
            self.draft_vocab = [int(t) for t in self.draft_vocab]
            if not self.draft_vocab or min(self.draft_vocab) < 0 or max(self.draft_vocab) >= self.vocab_size:
                raise NBDiffError(f"draft_vocab must hold ids of the AR vocabulary (0..{self.vocab_size - 1})")
        if self.target_probe is not None:
            probe_matrix(self.target_probe, self.hidden_size)  # a malformed probe is refused when read

    @property
    def draft_vocab_size(self) -> int:
        return len(self.draft_vocab) if self.draft_vocab is not None else self.vocab_size

    @classmethod
    def for_target(cls, ar_model, *, num_hidden_layers: int = 2, num_target_features: int = 5,
                   target_layer_ids: list[int] | None = None, block_size: int = 16, mask_token_id: int | None = None,
                   draft_vocab: list[int] | None = None, target_name: str = "",
                   intermediate_size: int | None = None) -> "DrafterConfig":
        """A config matching a loaded AR model: its width and heads, its MLP size unless `intermediate_size`
        (a narrower MLP makes a smaller drafter), DFlash's layer rule."""
        c = ar_model.config
        layers = int(c.num_hidden_layers)
        heads = int(c.num_attention_heads)
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
        theta = getattr(c, "rope_theta", None) or (getattr(c, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
        return cls(
            target_architecture=(getattr(c, "architectures", None) or [type(ar_model).__name__])[0],
            hidden_size=int(c.hidden_size), num_attention_heads=heads,
            num_key_value_heads=int(getattr(c, "num_key_value_heads", None) or heads), head_dim=int(head_dim),
            intermediate_size=int(intermediate_size or c.intermediate_size), num_target_layers=layers,
            target_layer_ids=target_layer_ids or target_hidden_layers(layers, min(num_target_features, layers)),
            mask_token_id=default_mask_token_id(ar_model) if mask_token_id is None else mask_token_id,
            vocab_size=int(ar_model.get_output_embeddings().weight.shape[0]), num_hidden_layers=num_hidden_layers,
            block_size=block_size, rms_norm_eps=float(getattr(c, "rms_norm_eps", 1e-6)), rope_theta=float(theta),
            draft_vocab=draft_vocab, target_fingerprint=fingerprint(ar_model), target_probe=weight_probe(ar_model),
            target_name=target_name or str(getattr(c, "_name_or_path", "") or ""),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DrafterConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise NBDiffError(f"unknown drafter setting(s): {', '.join(unknown)}",
                              "the folder was written by a newer nbdiff: upgrade nbdiff")
        try:
            return cls(**data)
        except TypeError as exc:
            raise NBDiffError(f"drafter settings incomplete: {exc}", "write the drafter folder again") from None
