"""How much memory one adaptation step needs, and the savers chosen from it.

The estimate counts what dominates a step of the 2L layout: weights (fp32 master copy), gradients
and AdamW state of the trainable parameters, the activations kept for the backward pass (per
token and layer, from the hidden and MLP widths), and one chunk of LM-head logits (the losses
never build [B, 2L, V]; nbdiff.method.layout.parallel_losses). Its per-token coefficients come from
counting the tensors saved for backward in a Llama layer and were checked against the measured
peak of SmolLM2-135M LoRA at batch 8 x 256 under bf16 autocast (6.8 GB measured, 6.7 GB estimated;
docs/benchmarks/adaptation.md, "Adaptation cost"): treat it as +-15%. `plan_memory` turns the estimate into a decision: gradient checkpointing off when the step
fits comfortably, on when only it makes the step fit, and an NBDiffError with the estimate when
nothing fits, instead of swapping or being killed halfway through a run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from nbdiff.errors import NBDiffError
from nbdiff.method.losses import CHUNK_BYTES

GiB = 2**30
RUNTIME_BYTES = int(0.6 * GiB)
"""torch, transformers and the data pipeline, before any model (measured RSS of an idle process)."""
HEADROOM = 0.85
"""Automatic choices plan for this fraction of the free memory (others use the machine too)."""

# saved activations per token and layer, in elements: ACT_HIDDEN * hidden + ACT_MLP * intermediate
# (norm inputs and outputs, q/k/v/o, rotary copies, attention output and logsumexp; gate, up, their
# product and the activation), and bytes per element: fp32, or a bf16 autocast mix (matmul outputs
# in bf16, the residual stream and norms in fp32)
ACT_HIDDEN, ACT_MLP = 12, 5
ACT_BYTES = {torch.float32: 4.0, torch.bfloat16: 3.0, torch.float16: 3.0}


@dataclass
class MemoryPlan:
    """What `plan_memory` decided, with the figures behind it."""

    estimate_bytes: int
    """Estimated peak of one step with the chosen settings."""
    budget_bytes: int | None
    """--max-memory, or the free memory of the device (None: unknown)."""
    gradient_checkpointing: bool
    note: str
    """One line for people: the estimate, the budget and what was chosen."""


def _width(config, *names, default=0) -> int:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return default


def estimate_step_bytes(config, n_params: int, n_trainable: int, rows: int, seq_len: int, two_l: bool = True,
                        compute_dtype: torch.dtype = torch.float32, checkpointing: bool = False) -> int:
    """Estimated peak bytes of one training step (forward, backward, optimizer) of `rows` x `seq_len`.

    config: the transformers config (hidden_size, intermediate_size, num_hidden_layers, vocab_size).
    two_l: the 2L layout (2 x seq_len tokens per row in the pass); False for a plain AR step.
    """
    hidden = _width(config, "hidden_size", "n_embd", default=1024)
    inter = _width(config, "intermediate_size", "moe_intermediate_size", default=4 * hidden)
    layers = _width(config, "num_hidden_layers", "n_layer", default=24)
    vocab = _width(config, "vocab_size", default=32000)
    tokens = rows * seq_len * (2 if two_l else 1)
    per_token_layer = (ACT_HIDDEN * hidden + ACT_MLP * inter) * ACT_BYTES.get(compute_dtype, 4.0)
    if checkpointing:
        # layer inputs only (fp32 residual stream), plus one layer recomputed in full during backward
        activations = tokens * (layers * hidden * 4 + per_token_layer)
    else:
        activations = tokens * layers * per_token_layer
    weights = n_params * 4  # fp32 master weights
    optimizer = n_trainable * 4 * 3  # gradient + two AdamW moments
    head = 3 * max(CHUNK_BYTES, vocab * 4 * 16)  # a chunk of logits, its softmax and its gradient
    embeddings_grad = tokens * hidden * 4  # gradient flowing into the embedding output
    return int(RUNTIME_BYTES + weights + optimizer + activations + head + embeddings_grad)


def free_memory_bytes(device: torch.device | str) -> int | None:
    """Free memory of a CUDA device, or the available RAM (MemAvailable) for CPU; None if unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def parse_memory(text: str | None) -> int | None:
    """'4G', '4GB', '3.5GiB', '512M', '4000000000' -> bytes; None or '' or 'auto' -> None."""
    if text is None or str(text).strip().lower() in ("", "auto", "none"):
        return None
    s = str(text).strip().upper().removesuffix("IB").removesuffix("B")
    scale = {"K": 2**10, "M": 2**20, "G": GiB, "T": 2**40}.get(s[-1:], 1)
    try:
        value = float(s[:-1] if scale > 1 else s)
    except ValueError:
        raise NBDiffError(f"--max-memory must look like 4G or 512M, got {text!r}") from None
    if value <= 0:
        raise NBDiffError(f"--max-memory must be positive, got {text!r}")
    return int(value * scale)


def _gb(n: int) -> str:
    return f"{n / GiB:.1f} GB"


def plan_memory(config, n_params: int, n_trainable: int, rows: int, seq_len: int, device: torch.device | str,
                compute_dtype: torch.dtype = torch.float32, checkpointing: bool | None = None,
                max_memory: int | None = None) -> MemoryPlan:
    """Choose gradient checkpointing (None = automatic) and refuse a step that would not fit.

    The budget is max_memory when given, else HEADROOM x the device's free memory.
    """
    free = free_memory_bytes(device)
    budget = max_memory if max_memory is not None else (int(free * HEADROOM) if free is not None else None)
    args = (config, n_params, n_trainable, rows, seq_len, True, compute_dtype)
    plain, saving = estimate_step_bytes(*args, checkpointing=False), estimate_step_bytes(*args, checkpointing=True)
    if checkpointing is None:
        checkpointing = budget is not None and plain > budget
    estimate = saving if checkpointing else plain
    where = f"--max-memory {_gb(budget)}" if max_memory is not None else (
        f"{_gb(budget)} free" if budget is not None else "free memory unknown")
    if budget is not None and estimate > budget:
        tip = "lower --batch-size (raise --grad-accum to keep the batch) or --seq-len"
        if not checkpointing:
            tip = "turn on --gradient-checkpointing, or " + tip
        raise NBDiffError(f"one adapt step needs about {_gb(estimate)} ({rows} rows x {seq_len} tokens, "
                          f"2L layout), more than {where}", tip)
    state = "on" if checkpointing else "off"
    return MemoryPlan(estimate, budget, checkpointing,
                      f"memory: about {_gb(estimate)} per step ({where}); gradient checkpointing {state}")
