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


class SmallRowsLinear(nn.Linear):
    """nn.Linear whose CPU forward of at most MAX_ROWS rows, without autograd, takes the kernel (fp32;
    bf16 too at isa 3)."""

    _isa = 0  # set by install(); 0 (a layer made some other way): torch's product always

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return few_rows_linear(x, self.weight, self.bias, self._isa)


def few_rows_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, isa: int) -> torch.Tensor:
    """x w^T + bias through the kernel at `isa` where SmallRowsLinear would take it (few rows on the CPU, no
    autograd, a contiguous weight of x's dtype), else torch's product. A trained drafter's LM head (the AR
    model's head restricted to its draft vocabulary: a weight of its own) takes it too."""
    dt = x.dtype
    if (isa and dt is w.dtype and (dt is torch.float32 or (dt is torch.bfloat16 and isa == 3))
            and x.device.type == "cpu"
            and x.numel() <= MAX_ROWS[dt] * w.shape[1] and w.is_contiguous()
            and not (torch.is_grad_enabled() and (w.requires_grad or x.requires_grad))):
        return torch.ops.nbdiff.small_m_linear(x, w, bias, isa)
    return F.linear(x, w, bias)
