"""Weights on transparent huge pages, for the few-row kernel's streaming reads.

A decoding step reads every weight once, front to back, at the memory's speed (cpu-speed.md): with
4 KiB pages that is one TLB entry per 4 KiB, and a 2 GB model walks half a million page-table
entries per token. On Linux with transparent huge pages in `madvise` mode (the common default),
memory asked for with MADV_HUGEPAGE is backed by 2 MiB pages instead. Measured on the 0.5B (fp32,
2 threads, Intel Xeon model 207, four interleaved pairs): a one-token forward 67-69 ms on huge
pages against 72-81 ms on the weights as loaded (docs/benchmarks/cpu-speed.md).

`to_huge_pages(tensors)` copies each large CPU tensor into an anonymous mapping advised so and points
the tensor's `.data` at the copy (same values, same shapes, same Parameter objects: state dicts,
saving and the kernel's bits are unchanged). Elsewhere (no `madvise`, THP `never`, another OS) it
does nothing. `NBDIFF_HUGE_PAGES=0` turns it off.
"""
from __future__ import annotations

import mmap
import os
import sys

import torch

ENV_SWITCH = "NBDIFF_HUGE_PAGES"
MIN_BYTES = 2 << 20  # smaller tensors do not fill a huge page
_THP = "/sys/kernel/mm/transparent_hugepage/enabled"
_MOVED: set[int] = set()  # data pointers of the copies made here (a second install moves nothing again)


def available() -> bool:
    """Whether asking for huge pages can help here: Linux, THP in `always` or `madvise` mode, not switched off."""
    if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        with open(_THP, encoding="ascii") as f:
            mode = f.read()
    except OSError:
        return False
    return "[never]" not in mode


def _huge_copy(t: torch.Tensor) -> torch.Tensor | None:
    """A copy of contiguous `t` in an anonymous mapping advised MADV_HUGEPAGE, or None if it cannot be made."""
    n = t.numel() * t.element_size()
    try:
        buf = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        buf.madvise(mmap.MADV_HUGEPAGE)
    except (OSError, ValueError):
        return None
    # torch.frombuffer keeps `buf` alive as long as the tensor (it holds the buffer until the storage is freed)
    out = torch.frombuffer(buf, dtype=torch.uint8).view(t.dtype).view(t.shape)
    out.copy_(t)
    return out


def to_huge_pages(tensors) -> int:
    """Move each large contiguous CPU tensor (a Parameter's data in place) onto huge pages; returns the bytes moved."""
    if not available():
        return 0
    moved, seen = 0, set()
    for t in tensors:
        if (t.device.type != "cpu" or not t.is_contiguous() or t.numel() * t.element_size() < MIN_BYTES
                or t.data_ptr() in seen or t.data_ptr() in _MOVED):
            continue
        seen.add(t.data_ptr())
        copy = _huge_copy(t.detach())
        if copy is None:
            return moved
        t.data = copy
        _MOVED.add(copy.data_ptr())
        moved += copy.numel() * copy.element_size()
    return moved
