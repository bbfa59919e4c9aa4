"""The few-row linear layer (nbdiff.cpu_kernel's product for the rows of a decoding step) and its row
limits, in a module of their own so that the lean forward (fast_forward) and the package's install()
both import them without importing each other."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Above this many rows torch's product is as fast or faster (fp32: MKL, which the kernel beats until
# it has to read the weights twice; bf16: oneDNN with AMX, nearly flat in rows). Measured with
# benchmarks/cpu_kernel.py (docs/benchmarks/cpu-kernel.md).
MAX_ROWS = {torch.float32: 16, torch.bfloat16: 12}
# On AVX2 the kernel has a many-row path (kernel_body.h's panels: 4 x 3 tiles over weight panels that
# stay in L2), which is as fast as MKL's sgemm or faster up to about 64 rows (AMD EPYC Zen 3: 43 rows
# 0.72-0.96x MKL's time, 64 rows 0.93-1.03x, 128 rows 1.07x; docs/benchmarks/cpu-kernel.md): prompts
# of up to this many tokens take the kernel too, so a prompt's rows get the bits they get one by one.
PROMPT_ROWS = {1: 64}
WIDENED_ROWS = 64
"""fp32 inputs with bf16 weights (nbdiff.cpu_kernel.keep_bf16) take the kernel up to this many rows on AVX2 and
AVX-512: both have a many-row path for them, faster than torch's product on a widened copy of the weights."""


def max_rows(dtype: torch.dtype, isa: int, weight: torch.dtype | None = None) -> int:
    """The most rows the kernel at `isa` takes in `dtype` (more: torch's product); `weight`: the weight's dtype where
    it is not `dtype` (bf16 under fp32 inputs)."""
    if dtype is torch.float32 and weight is torch.bfloat16:
        return WIDENED_ROWS
    return PROMPT_ROWS.get(isa, MAX_ROWS[dtype]) if dtype is torch.float32 else MAX_ROWS[dtype]


class SmallRowsLinear(nn.Linear):
    """nn.Linear whose CPU forward of at most max_rows(dtype, isa) rows, without autograd, takes the kernel (fp32,
    an fp32 input with a bf16 weight: see keep_bf16; bf16 too at isa 3)."""

    _isa = 0  # set by install(); 0 (a layer made some other way): torch's product always

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return few_rows_linear(x, self.weight, self.bias, self._isa)


def few_rows_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, isa: int) -> torch.Tensor:
    """x w^T + bias through the kernel at `isa` where SmallRowsLinear would take it (few rows on the CPU, no
    autograd, a contiguous weight of x's dtype, or a bf16 weight under an fp32 x), else torch's product. A bf16
    weight under an fp32 x (nbdiff.cpu_kernel.keep_bf16) is widened to fp32 either way, exactly: the kernel as
    it reads it (up to WIDENED_ROWS rows), torch's product on a widened copy, so the result has the bits the
    fp32 weight gives in the same product. A trained
    drafter's LM head (the AR model's head restricted to its draft vocabulary: a weight of its own) takes it too."""
    dt = x.dtype
    widened = dt is torch.float32 and w.dtype is torch.bfloat16
    if (isa and (dt is w.dtype or widened) and (dt is torch.float32 or (dt is torch.bfloat16 and isa == 3))
            and x.device.type == "cpu"
            and x.numel() <= max_rows(dt, isa, w.dtype) * w.shape[1] and w.is_contiguous()
            and not (torch.is_grad_enabled() and (w.requires_grad or x.requires_grad))):
        return torch.ops.nbdiff.small_m_linear(x, w, bias, isa)
    if widened:
        w, bias = w.float(), (bias.float() if bias is not None else None)
    return F.linear(x, w, bias)


def kept_bf16(layer) -> bool:
    """Whether `layer` (a linear layer, or None) holds a weight kept in bf16 under fp32 sums (keep_bf16)."""
    return bool(getattr(layer, "_kept_bf16", False))


def bf16_exact(w: torch.Tensor, chunk: int = 1 << 22) -> bool:
    """Whether every value of the fp32 tensor `w` is a bf16 number (its low 16 bits all zero), so that a bf16
    copy holds it exactly. Read in pieces of `chunk` elements (no full-size temporary)."""
    flat = w.detach().reshape(-1).view(torch.int32)
    return all(not torch.any(flat[i:i + chunk] & 0xFFFF) for i in range(0, flat.numel(), chunk))
