"""What this machine computes natively, and the dtype `--dtype auto` picks from it.

bf16 pays on a CPU only where the instructions exist (x86 AVX512-BF16 or AMX-BF16, Arm's BF16
extension, Apple M2 and later); elsewhere torch emulates it and it is slower than fp32. The
detection reads the CPU's flags, never benchmarks, and says in words what it found, so
`nbdiff info` and `generate --json` can tell people which dtype ran and why.
"""

from __future__ import annotations

import platform
import subprocess
import sys
from dataclasses import dataclass
from functools import lru_cache

import torch


@dataclass(frozen=True)
class DtypeChoice:
    """A resolved dtype and the reason for it (one line, for people)."""

    dtype: torch.dtype
    reason: str

    @property
    def name(self) -> str:
        return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(self.dtype, str(self.dtype))


@dataclass(frozen=True)
class CpuBf16:
    """Whether the CPU has native bf16 arithmetic, and what showed it."""

    native: bool
    evidence: str


def _cpuinfo_flags() -> set[str]:
    """Flags of the first processor in /proc/cpuinfo (x86 'flags', Arm 'Features'); empty elsewhere."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip().lower() in ("flags", "features"):
                    return set(value.split())
    except OSError:
        pass
    return set()


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), or what platform knows elsewhere: named beside every figure."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _apple_feat_bf16() -> bool:
    """Apple silicon reports FEAT_BF16 (M2 and later) through sysctl."""
    try:
        out = subprocess.run(["sysctl", "-n", "hw.optional.arm.FEAT_BF16"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.stdout.strip() == "1"


def _torch_capability() -> str:
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except Exception:  # older torch or an unusual build
        return "unknown"


@lru_cache(maxsize=1)
def cpu_bf16() -> CpuBf16:
    """Detect native bf16 on this CPU (cached: the answer does not change while the process runs)."""
    machine = platform.machine().lower()
    if sys.platform == "darwin" and machine in ("arm64", "aarch64"):
        if _apple_feat_bf16():
            return CpuBf16(True, "Apple silicon with FEAT_BF16")
        return CpuBf16(False, "Apple silicon without FEAT_BF16 (M1)")
    flags = _cpuinfo_flags()
    for flag, words in (("amx_bf16", "AMX-BF16"), ("avx512_bf16", "AVX512-BF16")):
        if flag in flags:
            return CpuBf16(True, f"CPU has {words}")
    if machine in ("aarch64", "arm64") and "bf16" in flags:
        return CpuBf16(True, "Arm CPU with the BF16 extension")
    return CpuBf16(False, f"no native bf16 on this CPU (torch sees {_torch_capability()})")


def auto_dtype(device: str) -> DtypeChoice:
    """What `--dtype auto` means on `device` ('cpu', 'cuda' or 'mps')."""
    if device == "cuda":
        if torch.cuda.is_bf16_supported():
            return DtypeChoice(torch.bfloat16, "auto: the GPU supports bf16")
        return DtypeChoice(torch.float16, "auto: the GPU lacks bf16, fp16 instead")
    if device == "mps":
        return DtypeChoice(torch.float16, "auto: fp16 on Apple GPUs (mps)")
    found = cpu_bf16()
    if found.native:
        return DtypeChoice(torch.bfloat16, f"auto: {found.evidence}, so bf16 (--dtype fp32 for full precision)")
    return DtypeChoice(torch.float32, f"auto: fp32 on CPU, {found.evidence} (bf16 would be emulated and slow)")
