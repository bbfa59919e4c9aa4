"""MODEL for the decoding commands: a folder, an adapter folder, or (omitted) the default model.

`resolve_model(None)` builds the default model on first use (nbdiff.default_model: SmolLM2-135M
converted, the shipped adapter merged in) with a Rich progress bar on stderr, and returns its
folder; `load_for_decoding` loads whatever MODEL names. generate, chat, visualize, bench and eval
all go through here.
"""

from __future__ import annotations

from typing import Optional

from nbdiff_cli.console import err_console


def resolve_model(model: Optional[str]) -> str:
    """MODEL as given, or the default model's folder (built on first use, progress on stderr)."""
    if model:
        return model
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn

    from nbdiff.default_model import default_model_dir, ensure_default_model, is_built

    folder = default_model_dir()
    if is_built(folder):
        return str(folder)
    labels = {"convert": "converting SmolLM2-135M-Instruct", "adapter": "applying the default adapter",
              "write": "writing the default model", "done": "default model ready"}
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(), TimeElapsedColumn(),
                        console=err_console, transient=True)
    task = progress.add_task("preparing the default model (once)", total=None)

    def on_progress(p) -> None:
        progress.update(task, description=labels.get(p.stage, p.stage), completed=p.done, total=p.total or None)

    with progress:
        path = ensure_default_model(on_progress)
    err_console.print(f"default model ready in {path}", style="dim")
    return str(path)


def _build_cpu_kernel() -> None:
    """Compile nbdiff's few-row CPU kernel now if it is not built yet, saying so (once per machine)."""
    from nbdiff import cpu_kernel

    if cpu_kernel.needs_build():
        with err_console.status("building nbdiff's CPU kernel (once per machine, about 10 s)"):
            state = cpu_kernel.status()
        err_console.print(f"CPU kernel {state.reason}", style="dim")


def load_for_decoding(model: Optional[str], device, dtype, quantize, *, exact: bool = False, served: bool = False,
                      kept: bool = False):
    """Load MODEL (default model when omitted) for a decoding command; errors are one line.

    With `exact`, `--dtype auto` loads fp32: exact mode promises AR's tokens, and in bf16 a
    verification pass over a block rounds differently from one-token steps, so near-ties flip
    (measured on SmolLM2: 2 of 6 replies identical in bf16, 6 of 6 in fp32; docs/benchmarks/bf16-cpu.md).
    On a CPU without native bf16 fp32 is the fast dtype anyway; on one with AVX512-BF16 bf16 would be
    faster, but exact mode in bf16 under auto waits for a measurement there that its replies keep block
    size 1's (none was possible on the machines this was written on). An explicit `--dtype bf16 --exact`
    verifies in bf16: its reply is block size 1's in bf16 except after a near-tie, which it counts
    (FinalEvent.near_ties, nbdiff.decode.exact).
    With `served` (nbdiff serve) on a CPU it loads fp32 too: a batched greedy reply must equal the
    lone one, and bf16 rows do not keep their bits beside others (12 of 16 replies identical with
    torch's bf16 products, 14 of 16 with nbdiff's kernel).
    With `kept` (nbdiff chat: a conversation's KV cache kept across turns) on a CPU it loads fp32
    too: in bf16 the kept keys/values, computed one token at a time, round unlike a fresh prefill's,
    so a later turn can differ from a fresh call (loading.CHAT_DTYPE_REASON).
    """
    from dataclasses import replace

    from nbdiff.api import load
    from nbdiff.loading import CHAT_DTYPE_REASON, EXACT_DTYPE_REASON, SERVE_DTYPE_REASON, choose_dtype, resolve_device
    from nbdiff.quantize import normalize
    from nbdiff.threads import in_passing_thread

    value = lambda x: getattr(x, "value", x)  # noqa: E731 - enums from typer, strings from Python
    pick = str(value(dtype)).lower()
    on_cpu, unquantized = resolve_device(value(device)) == "cpu", normalize(value(quantize)) is None
    reason = (EXACT_DTYPE_REASON if exact else SERVE_DTYPE_REASON if served and on_cpu
              else CHAT_DTYPE_REASON if kept and on_cpu else None)
    fp32 = reason is not None and pick == "auto" and unquantized
    folder = resolve_model(model)
    if on_cpu and unquantized:
        _build_cpu_kernel()
    # on a passing thread: the main thread then owns no OpenMP team, and the thread that decodes (the main one,
    # the server's engine, chat's reply worker) owns the only one (nbdiff.threads: every forward slower otherwise)
    mdl, tok = in_passing_thread(load, folder, quantize=value(quantize), device=value(device),
                                 dtype="fp32" if fp32 else pick)
    if fp32:  # say why fp32 ran (info and --json read it back)
        mdl._nbdiff_dtype = replace(choose_dtype("fp32"), reason=reason)
    return mdl, tok
