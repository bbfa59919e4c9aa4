"""nbdiff.cpu_kernel.pages: weights copied onto transparent huge pages keep their values, Parameters and bits."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nbdiff.cpu_kernel import pages


def _anon_huge_kb() -> int:
    with open("/proc/self/smaps_rollup") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("AnonHugePages"))


@pytest.mark.skipif(not pages.available(), reason="no transparent huge pages here (or NBDIFF_HUGE_PAGES=0)")
def test_weights_move_to_huge_pages_with_their_values_and_parameters():
    torch.manual_seed(0)
    layer = nn.Linear(1024, 1024)  # 4 MiB of weight: moved; its 4 KiB bias: too small, left
    small = nn.Linear(8, 8)
    weight, before, bias_ptr = layer.weight, layer.weight.detach().clone(), layer.bias.data_ptr()
    x = torch.randn(3, 1024)
    y = layer(x)
    huge_before = _anon_huge_kb()
    moved = pages.to_huge_pages([layer.weight, layer.bias, small.weight])
    assert moved == 1024 * 1024 * 4
    assert layer.weight is weight and torch.equal(layer.weight, before)  # same Parameter, same values
    assert layer.bias.data_ptr() == bias_ptr
    assert torch.equal(layer(x), y)  # the same product, bit for bit
    assert pages.to_huge_pages([layer.weight]) == 0  # a second install moves nothing again
    assert layer.weight.data_ptr() not in (before.data_ptr(),)
    # the kernel may decline a huge page (memory fragmented); when it grants them they show here
    assert _anon_huge_kb() >= huge_before
    assert sorted(layer.state_dict()) == ["bias", "weight"]


def test_switched_off_moves_nothing(monkeypatch):
    monkeypatch.setenv(pages.ENV_SWITCH, "0")
    layer = nn.Linear(1024, 1024)
    ptr = layer.weight.data_ptr()
    assert not pages.available() and pages.to_huge_pages([layer.weight]) == 0 and layer.weight.data_ptr() == ptr
