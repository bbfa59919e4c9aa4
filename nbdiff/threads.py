"""Which thread does a model's CPU work, and why it matters.

torch's CPU operations run in parallel through OpenMP (libgomp in the PyPI wheels). Each thread that
starts a parallel region gets its own team of OpenMP worker threads, kept until that thread ends.
When the process then holds more OpenMP threads than it has CPUs (two teams of N threads on N CPUs),
libgomp stops letting idle workers spin between regions (a few hundred spins, then sleep), so every
parallel region pays a wake-up. A one-token forward starts several per layer (each product, the
attention), so the cost is per token. Measured on a 2-core Intel Xeon (model 207), torch 2.13, 2
threads: an `add` of 200k floats 24-28 us on the thread that owns the only team, 88-150 us on a
second thread once the main thread owns one; a one-token forward of SmolLM2-135M on a worker thread
23-26 ms against 33-39 ms; `nbdiff chat` 35-40 tokens/s against 24-27 on SmolLM2, 13.8-14.2 against
11.3-12.1 on Qwen2.5-Coder-0.5B (docs/benchmarks/cpu-speed.md, "One OpenMP team per process"). On a
machine where torch's threads are half the logical CPUs (physical cores with SMT) two teams still
fit and nothing changes.

The commands that load a model on the main thread and decode on another (chat's reply worker, the
server's engine, `distill` through the engine) can pay that on every forward. `in_passing_thread(fn)`
runs `fn` on a new thread and waits for it: the thread's team ends with the thread, so the main
thread never owns one and the thread that decodes afterwards owns the only team in the process.
`nbdiff_cli.models.load_for_decoding` loads this way, and chat resolves its plan (which may load a
drafter) this way too.
"""
from __future__ import annotations

import threading
from typing import Any, Callable, TypeVar

T = TypeVar("T")


def in_passing_thread(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """fn(*args, **kwargs) on a new thread that ends when fn returns; its value, or its exception raised here.

    Ctrl-C while waiting raises KeyboardInterrupt here at once (the thread is a daemon: it does not keep
    the process alive)."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller, raised on its thread
            box["error"] = exc

    worker = threading.Thread(target=target, name="nbdiff-passing", daemon=True)
    worker.start()
    worker.join()
    if "error" in box:
        raise box["error"]
    return box["value"]
