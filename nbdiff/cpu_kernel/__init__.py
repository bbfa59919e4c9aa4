"""Linear layers for a handful of rows on x86 CPUs: one-token decoding steps, exact mode's verify
passes and the server's packed steps. There MKL's fp32 sgemm costs nearly as much per row as its
one-row gemv (it does not overlap streaming the weights with computing on them), and torch's bf16
product of one row is slower than its fp32 one although it reads half the bytes.

The kernels (small_m.h, kernel_body.h, avx2.cpp, avx512.cpp, avx512_bf16.cpp, op.cpp next to this
file) are built once per machine with the system's C++ compiler into `$NBDIFF_HOME/kernels/<key>/`
(a few seconds) and registered as `torch.ops.nbdiff.small_m_linear`. `install(model)` switches a
model's `nn.Linear` layers in fp32 (and in bf16 where the CPU has AVX512-BF16) to
`SmallRowsLinear`, which takes the kernel for inputs of at most `max_rows(dtype, isa)` rows
(`MAX_ROWS[dtype]`; on AVX2 fp32 prompts of up to 64 tokens too, through the kernel's many-row
tiles) and torch's own product otherwise (long prefills, training, other dtypes and devices).
Weights and state dicts are untouched.

Each output element is summed in one fixed order whatever the number of rows, so a row decoded
beside others gets the bits it gets alone. Without a compiler, on a CPU without AVX2 + FMA, or with
`NBDIFF_CPU_KERNEL=0`, nothing changes and `status()` says why.
"""
from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from nbdiff.cpu_kernel.linear import MAX_ROWS, SmallRowsLinear, bf16_exact, kept_bf16, max_rows  # noqa: F401 (public here)

HERE = Path(__file__).parent
SOURCES = ("small_m.h", "kernel_body.h", "fp32_rows.h", "avx512.cpp", "avx2.cpp", "avx512_bf16.cpp", "op.cpp", "layers.cpp")
TORCH_SOURCES = ("op.cpp", "layers.cpp")  # compiled against torch's headers
# each kernel source and the compiler flags for its instruction set
OBJECTS = {"avx2": "-mavx2 -mfma", "avx512": "-mavx512f -mfma", "avx512_bf16": "-mavx512f -mavx512bw -mavx512bf16 -mfma"}
ISA_NAMES = {1: "AVX2", 2: "AVX-512", 3: "AVX-512 + BF16"}
ENV_SWITCH = "NBDIFF_CPU_KERNEL"
NO_ISA = "off (the CPU has neither AVX-512 nor AVX2 with FMA)"


@dataclass(frozen=True)
class KernelStatus:
    ready: bool
    reason: str  # one line for people: why it is on or off
    isa: int = 0  # cpu_isa()'s numbering: 3 = AVX-512 + BF16, 2 = AVX-512, 1 = AVX2, 0 = none


@lru_cache(maxsize=1)
def cpu_isa() -> int:
    """The best instruction set the kernel has a version for, from the CPU's flags: 3 = AVX-512 with
    BF16 (fp32 and bf16 products), 2 = AVX-512, 1 = AVX2 (fp32 products), 0 = none. Read once (the
    CPU does not change while the process runs)."""
    from nbdiff.hardware import _cpuinfo_flags

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return 0
    flags = _cpuinfo_flags()
    if "fma" not in flags:
        return 0
    if "avx512f" in flags:
        return 3 if {"avx512bw", "avx512_bf16"} <= flags else 2
    return 1 if "avx2" in flags else 0


def dtypes(isa: int) -> tuple[torch.dtype, ...]:
    """The weight dtypes the kernel takes at this instruction set."""
    return (torch.float32, torch.bfloat16) if isa == 3 else (torch.float32,) if isa else ()


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++") or shutil.which("clang++")


def _build_key(cxx: str) -> str:
    digest = hashlib.sha256(torch.__version__.encode() + cxx.encode())
    for name in SOURCES:
        digest.update((HERE / name).read_bytes())
    return digest.hexdigest()[:16]


def _run(cmd: list[str], cwd: Path) -> None:
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["no message"])[-1]
        raise RuntimeError(f"{Path(cmd[0]).name} failed: {last[:200]}")


def _target(cxx: str, cache: Path | None = None) -> Path:
    from nbdiff.default_model import cache_root

    return (cache or cache_root() / "kernels") / _build_key(cxx) / "nbdiff_small_m.so"


def build(cache: Path | None = None) -> Path:
    """Compile the kernels (once; reused while the sources, torch and the compiler stay the same)
    and return the shared library's path. Raises RuntimeError with one line if it cannot."""
    from torch.utils import cpp_extension

    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX or install g++)")
    target = _target(cxx, cache)
    if target.is_file():
        return target
    folder = target.parent
    folder.mkdir(parents=True, exist_ok=True)
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    common = [cxx, "-O3", "-fPIC", "-ffp-contract=off", f"-D_GLIBCXX_USE_CXX11_ABI={abi}"]
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        work = Path(tmp)
        for name, flags in OBJECTS.items():  # plain C++ with intrinsics: quick to compile
            _run([*common, "-std=c++17", *flags.split(), "-c", str(HERE / f"{name}.cpp"), "-o", f"{name}.o"], work)
        includes = [f"-I{p}" for p in cpp_extension.include_paths()]  # torch's headers want C++20
        for name in TORCH_SOURCES:
            _run([*common, "-std=c++20", "-fopenmp", "-w", *includes, "-c", str(HERE / name), "-o", f"{name}.o"], work)
        libs = cpp_extension.library_paths()[0]
        _run([cxx, "-shared", "-fopenmp", *(f"{name}.o" for name in TORCH_SOURCES), *(f"{name}.o" for name in OBJECTS),
              f"-L{libs}", f"-Wl,-rpath,{libs}", "-lc10", "-ltorch_cpu", "-o", "lib.so"], work)
        os.replace(work / "lib.so", target)  # whole or not at all, also with two builders at once
    return target


_lock = threading.Lock()
_status: KernelStatus | None = None


def _switched_off(name: str = ENV_SWITCH) -> bool:
    return os.environ.get(name, "1").strip().lower() in ("0", "false", "no", "off")


def describe() -> str:
    """What the kernel does on this machine, in one line, without building it (`nbdiff info`)."""
    if _switched_off():
        return f"off ({ENV_SWITCH}=0)"
    if _status is not None:
        return _status.reason
    isa, cxx = cpu_isa(), _compiler()
    if not isa:
        return NO_ISA
    if cxx is None:
        return "off (no C++ compiler found: set CXX or install g++)"
    when = "built" if _target(cxx).is_file() else "built when a model is first loaded on this CPU (about 8 s)"
    return f"{ISA_NAMES[isa]}, {when}; {_what(isa)}"


def needs_build() -> bool:
    """Whether the next `status()` (the first CPU model load) will compile the kernel: for a CLI that
    wants to say so while it waits."""
    cxx = _compiler()
    return (not _switched_off() and _status is None and cpu_isa() > 0 and cxx is not None
            and not _target(cxx).is_file())


def status() -> KernelStatus:
    """Build and load the kernel on first call (thread-safe); later calls return the same answer.
    `NBDIFF_CPU_KERNEL=0` turns it off (read on every call)."""
    global _status
    if _switched_off():
        return KernelStatus(False, f"off ({ENV_SWITCH}=0)")
    with _lock:
        if _status is None:
            _status = _load()
        return _status


def load_library(cache: Path | None = None) -> Path:
    """Build (or reuse) the library and load it into torch. A cached library that does not load
    (a truncated file, another toolchain's) is nbdiff's own: it is built again once."""
    path = build(cache)
    try:
        torch.ops.load_library(str(path))
    except OSError:
        path.unlink(missing_ok=True)
        path = build(cache)
        torch.ops.load_library(str(path))
    return path


def _load() -> KernelStatus:
    isa = cpu_isa()
    if not isa:
        return KernelStatus(False, NO_ISA)
    try:
        if not hasattr(torch.ops.nbdiff, "small_m_linear"):
            load_library()
            torch.library.register_fake("nbdiff::small_m_linear")(_fake)  # shapes for torch.compile / meta
            torch.library.register_fake("nbdiff::small_m_linear_multi")(_fake_multi)
            torch.library.register_fake("nbdiff::decoder_layers")(_fake_layers)
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        return KernelStatus(False, f"off ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})")
    return KernelStatus(True, f"on ({ISA_NAMES[isa]}, {_what(isa)})", isa)


def _what(isa: int) -> str:
    return ", ".join(f"{NAMES[d]} products of up to {max_rows(d, isa)} rows" for d in dtypes(isa))


NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16"}


def _fake(x, w, b, isa):
    return x.new_empty((*x.shape[:-1], w.shape[0]))


def _fake_multi(x, ws, bs, isa):
    return [x.new_empty((*x.shape[:-1], w.shape[0])) for w in ws]


def _fake_layers(x, cos, sin, mask, params, eps, keys, values, head_dim, groups, gqa, enable_gqa, is_causal, scaling,
                 used, fused, isa):
    length = (lambda t: t.shape[-2] + x.shape[1]) if used < 0 else (lambda t: used + x.shape[1])
    grown = [t.new_empty((*t.shape[:-2], length(t), t.shape[-1])) for t in (*keys, *values)]
    return [x.new_empty(x.shape), *(t for pair in zip(grown[:len(keys)], grown[len(keys):]) for t in pair)]


def small_m_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                   isa: int | None = None) -> torch.Tensor:
    """x @ weight.T + bias through the kernel (any number of rows; fp32 CPU tensors, or bf16 where
    the CPU has AVX512-BF16)."""
    state = status()
    if not state.ready:
        raise RuntimeError(f"the CPU kernel is {state.reason}")
    return torch.ops.nbdiff.small_m_linear(x, weight, bias, state.isa if isa is None else isa)


BF16_SWITCH = "NBDIFF_BF16_WEIGHTS"


def keep_bf16(layers: list[nn.Module]) -> int:
    """Give each fp32 linear layer in `layers` whose weight holds only bf16 numbers (a checkpoint stored in bf16
    and loaded in fp32: every value widened exactly) a bf16 copy of that weight instead, and return how many
    changed. The arithmetic stays fp32: the kernel widens each weight as it reads it and sums exactly as over the
    fp32 weight (the same bits, from half the bytes: a one-token step reads the weights from memory, so it is
    about twice as fast); prompts of up to 64 rows take its many-row path, longer ones torch's product on a
    widened copy (few_rows_linear). A weight shared with another module (tied embeddings) is copied, not
    changed: the embedding keeps its fp32 table."""
    changed = 0
    for module in layers:
        w = module.weight
        if w.dtype is not torch.float32 or not bf16_exact(w):
            continue
        module.weight = nn.Parameter(w.detach().to(torch.bfloat16), requires_grad=w.requires_grad)
        module._kept_bf16 = True  # read through kept_bf16 by users of the weight alone (a drafter's head rows)
        changed += 1
    return changed


def install(model: nn.Module, fast_forward: bool = True, bf16_weights: bool = False) -> KernelStatus:
    """Switch `model`'s CPU nn.Linear layers (exactly nn.Linear, not subclasses such as quantized or
    LoRA layers) in a dtype the kernel takes on this CPU (fp32; bf16 with AVX512-BF16) to
    SmallRowsLinear when the kernel is ready; a no-op otherwise (and no build when the model has no
    such layer). fast_forward: also give an fp32 Llama/Qwen2 model the lean forward for its few-row
    passes (nbdiff.cpu_kernel.fast_forward; same bits, less Python). bf16_weights: keep the fp32 layers
    whose weights are bf16 numbers in bf16 (`keep_bf16`: the same bits, half the bytes; for models loaded
    to decode, not to train: the weights' optimizer would see bf16; `NBDIFF_BF16_WEIGHTS=0` turns it off)."""
    kinds = dtypes(cpu_isa())
    layers = [m for m in model.modules()
              if type(m) is nn.Linear and m.weight.dtype in kinds and m.weight.device.type == "cpu"]
    if not layers:
        return KernelStatus(False, f"off (no CPU linear layers in {' or '.join(NAMES[d] for d in kinds) or 'any dtype it takes here'})")
    state = status()
    if state.ready:
        kept = keep_bf16(layers) if bf16_weights and not _switched_off(BF16_SWITCH) else 0
        for module in layers:
            module.__class__ = SmallRowsLinear
            module._isa = state.isa
        from nbdiff.cpu_kernel.pages import to_huge_pages

        to_huge_pages(module.weight for module in layers)  # the kernel streams them: fewer TLB misses (pages.py)
        if fast_forward:
            from nbdiff.cpu_kernel import fast_forward as lean

            lean.install(model)
        if kept:
            state = KernelStatus(True, f"{state.reason[:-1]}; {kept} of {len(layers)} weights kept in bf16 as stored, "
                                       "fp32 sums)", state.isa)
    return state


def uninstall(model: nn.Module) -> None:
    """Back to plain nn.Linear and the model's own forward, with fp32 weights where keep_bf16 kept bf16 ones
    (the same values; for comparisons)."""
    from nbdiff.cpu_kernel import fast_forward as lean

    lean.uninstall(model)
    for module in model.modules():
        if type(module) is SmallRowsLinear:
            module.__class__ = nn.Linear
            if vars(module).pop("_kept_bf16", False):
                module.weight = nn.Parameter(module.weight.detach().float(), requires_grad=module.weight.requires_grad)
