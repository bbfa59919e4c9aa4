"""`nbdiff generate MODEL --prompt TEXT`: one reply, printed as blocks are committed, or one JSON object."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from nbdiff_cli.console import console, err_console, printable, user_text
from nbdiff_cli.models import load_for_decoding
from nbdiff_cli.options import Hardware, ModelArg, decoding_options


def figures(final) -> str:
    """The figure line under a reply (generate, chat): this call's tokens, tokens per forward, marked
    "slow" below one (block size 1 would have taken fewer forwards), tokens per verified block in
    exact mode (and a trained drafter's forwards: tokens/forward counts the model's), tokens per second."""
    slow = final.tokens_per_forward < 1 and final.new_tokens > 0 and final.finish_reason != "cancelled"
    return (f"{final.new_tokens} tokens, {final.tokens_per_forward:.2f} tokens/forward" + (" (slow)" if slow else "")
            + (f", {final.accepted_length:.2f} tokens/block accepted" if final.verified_blocks else "")
            + (f", {final.drafter_forwards} drafter forwards" if getattr(final, "drafter_forwards", 0) else "")
            + f", {final.tokens_per_second:.1f} tokens/s")


@decoding_options()
def generate(
    model: ModelArg = None,
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="The prompt (a user message when the tokenizer has a chat template).")] = "",
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object (text and speed figures) instead of streaming.")] = False,
    raw: Annotated[bool, typer.Option("--raw", help="Plain continuation: do not apply the chat template.")] = False,
    *,
    options=None,
    hardware: Hardware = Hardware(),
    system: Optional[str] = None,
) -> None:
    """Generate one reply with block diffusion and print it (or --json with tokens/forward and tokens/s)."""
    import json

    from nbdiff.api import stream
    from nbdiff.errors import NBDiffError
    from nbdiff.decode.events import BlockEvent, FinalEvent

    prompt = user_text(prompt)  # bytes that are not UTF-8 become U+FFFD (tokenizers refuse them raw)
    system = user_text(system) if system is not None else None
    if not prompt.strip():
        raise NBDiffError("the prompt is empty", "pass some text with --prompt")
    mdl, tok = load_for_decoding(model, hardware.device, hardware.dtype, hardware.quantize, exact=options.exact)
    final = None
    for event in stream(mdl, tok, prompt, options, system=system, raw=raw):
        if isinstance(event, BlockEvent) and not json_out:
            console.out(printable(event.text), end="", highlight=False)  # never markup; controls escaped
        elif isinstance(event, FinalEvent):
            final = event
    assert final is not None
    if json_out:
        payload = {
            "text": final.texts[0],
            "new_tokens": final.new_tokens,
            "forwards": final.forwards,
            "tokens_per_forward": round(final.tokens_per_forward, 4),
            "seconds": round(final.seconds, 4),
            "tokens_per_second": round(final.tokens_per_second, 3),
            "finish_reason": final.finish_reason,
            "prompt_tokens": final.prompt_tokens,
            "steps": final.steps,
            "block_size": final.block_size,
            "notes": final.notes,
        }
        from nbdiff.loading import dtype_name, loaded_dtype

        choice = loaded_dtype(mdl)  # which dtype ran, and why (--dtype auto reads the CPU's bf16 support)
        payload.update(dtype=dtype_name(mdl), dtype_reason=choice.reason if choice else None)
        kernel = getattr(mdl, "_nbdiff_cpu_kernel", None)  # nbdiff.cpu_kernel: set by load_model on the CPU
        payload.update(cpu_kernel=kernel.reason if kernel else None)
        payload.update(plan=final.plan)  # which drafter, which block size, and why (nbdiff.decode.plan)
        if options.exact:  # the drafter that ran, what the verification kept: tokens per block, accepted per offset
            payload.update(drafter=final.plan.get("drafter"),
                           accepted_length=round(final.accepted_length, 4), drafted=final.drafted,
                           accepted=final.accepted, accepted_at=final.accepted_at,
                           drafter_forwards=final.drafter_forwards,  # `forwards` counts the AR model's only
                           drafter_gated=final.drafter_gated,  # row blocks the first-token gate left to lookup
                           near_ties=final.near_ties)  # kept tokens decided by a near-tie (nbdiff.decode.exact)
        typer.echo(json.dumps(payload, ensure_ascii=False))
        return
    console.out("")
    for note in final.notes:
        err_console.print(f"note: {note}", style="yellow", markup=False)
    err_console.print(f"{figures(final)} ({final.finish_reason})", style="dim", markup=False)
