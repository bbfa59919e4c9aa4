"""Decoding at long context: nbdiff against transformers generate() on the same weights, in one run.

    python benchmarks/long_context.py /work/models/smollm2-nbdiff --contexts 500 2000 6000 --new-tokens 16
    python benchmarks/long_context.py MODEL --part block8      # per-block split at block size 8
    python benchmarks/long_context.py MODEL --part chat        # chat: 10th-turn vs 1st-turn time to first token

Prompts are raw (no chat template) slices of /work/shared/data/austen.txt cut to exactly N tokens.
- `b1`: block size 1, greedy, EOS ignored. Prefill = time to the first token; decoding = tokens/s over
  the remaining tokens. generate() is timed the same way (one N-token call, its tokens timed by a
  stopping criterion that never stops).
- `block8`: block size 8 at the largest context: per block, time inside the model's forward
  passes against the block's whole time (the rest is the decoder's own work: masks, picking,
  bookkeeping).
- `chat`: ten turns of --words-word user messages with --new-tokens-token replies at block size 8; time to the
  first token of each turn with the kept cache (nbdiff.api.Session) and with re-encoding.
Prints Markdown tables; --json writes the figures.

Feeds docs/benchmarks/long-context.md, section "Long context (issue 16)".
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path

import torch

AUSTEN = Path("/work/shared/data/austen.txt")


def austen_ids(tokenizer, n: int, offset: int = 0) -> list[int]:
    text = AUSTEN.read_text(encoding="utf-8")
    ids = tokenizer(text[offset : offset + 8 * n + 1000])["input_ids"]
    if len(ids) < n:
        raise SystemExit(f"austen.txt is too short for {n} tokens")
    return ids[:n]


def time_generate(model, ids: list[int], new: int) -> tuple[float, float]:
    """(seconds to the first token, seconds to the end) of one generate() call (a stopping criterion
    that never stops notes the time of every token)."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    marks: list[float] = []

    class Clock(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            marks.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    x = torch.tensor([ids])
    start = time.perf_counter()
    with torch.no_grad():
        model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new, min_new_tokens=new, do_sample=False,
                       eos_token_id=None, pad_token_id=0, stopping_criteria=StoppingCriteriaList([Clock()]))
    return marks[0] - start, marks[-1] - start


def time_nbdiff(model, ids: list[int], new: int, block_size: int, mask_id: int) -> tuple[float, float, object]:
    """(seconds to the first token, seconds to the end, final record)."""
    from nbdiff.decode.decoder import decode
    from nbdiff.decode.events import FinalEvent, StepEvent
    from nbdiff.decode.options import DecodeOptions

    opts = DecodeOptions(block_size=block_size, max_new_tokens=new)
    start = time.perf_counter()
    first = None
    for event in decode(model, [ids], opts, mask_token_id=mask_id, eos_token_ids=[]):
        if first is None and isinstance(event, StepEvent):
            first = time.perf_counter() - start
        if isinstance(event, FinalEvent):
            final = event
    return first, time.perf_counter() - start, final


def part_b1(model, tok, mask_id, contexts, new):
    lines = ["| context | method | prefill (s) | decoding (tokens/s) |", "|---|---|---|---|"]
    out = {}
    for n in contexts:
        ids = austen_ids(tok, n)
        first, total = time_generate(model, ids, new)  # the two methods back to back, same load
        g = dict(prefill=first, rate=(new - 1) / (total - first))
        first, total, _ = time_nbdiff(model, ids, new, 1, mask_id)
        d = dict(prefill=first, rate=(new - 1) / (total - first))
        out[n] = dict(generate=g, nbdiff=d)
        lines.append(f"| {n} | transformers generate() | {g['prefill']:.2f} | {g['rate']:.1f} |")
        lines.append(f"| {n} | nbdiff b=1 | {d['prefill']:.2f} ({d['prefill'] / g['prefill']:.2f}x) | "
                     f"{d['rate']:.1f} ({g['rate'] / d['rate']:.2f}x time) |")
    return lines, out


def part_block8(model, tok, mask_id, n, new):
    """Per-block split: model forward time vs the decoder's own work, at block size 8."""
    ids = austen_ids(tok, n)
    spent = {"forward": 0.0}
    real = model.forward

    @functools.wraps(real)  # same signature: the decoder reads it to name the cache argument
    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return real(*args, **kwargs)
        finally:
            spent["forward"] += time.perf_counter() - start

    from nbdiff.decode.decoder import decode
    from nbdiff.decode.events import BlockEvent, FinalEvent
    from nbdiff.decode.options import DecodeOptions

    model.forward = timed
    try:
        opts = DecodeOptions(block_size=8, max_new_tokens=new)
        start = time.perf_counter()
        marks, prefill_forward = [], None
        for event in decode(model, [ids], opts, mask_token_id=mask_id, eos_token_ids=[]):
            if prefill_forward is None:
                prefill_forward = spent["forward"]
                marks.append((time.perf_counter() - start, spent["forward"]))
            if isinstance(event, BlockEvent):
                marks.append((time.perf_counter() - start, spent["forward"]))
            if isinstance(event, FinalEvent):
                final = event
    finally:
        del model.forward
    # block k spans marks[k] .. marks[k + 1] (the commit pass of block k runs after its record; it is
    # counted in block k + 1's span, one pass per block either way)
    spans = [(marks[k + 1][0] - marks[k][0], marks[k + 1][1] - marks[k][1]) for k in range(len(marks) - 1)]
    total = sum(s for s, _ in spans)
    fwd = sum(f for _, f in spans)
    lines = [
        "| context | blocks | forwards/block | block time (ms) | in model forward (ms) | decoder's own work |",
        "|---|---|---|---|---|---|",
        f"| {n} | {len(spans)} | {(final.forwards - 1) / len(spans):.2f} | {1000 * total / len(spans):.1f} | "
        f"{1000 * fwd / len(spans):.1f} | {100 * (total - fwd) / total:.1f}% |",
    ]
    return lines, dict(context=n, blocks=len(spans), block_ms=1000 * total / len(spans),
                       forward_ms=1000 * fwd / len(spans), own_share=(total - fwd) / total, forwards=final.forwards)


def part_chat(model, tok, turns: int, words: int, new: int):
    import nbdiff
    from nbdiff.decode.events import StepEvent

    text = AUSTEN.read_text(encoding="utf-8").split()
    results = {}
    for label, keep in (("kept cache", True), ("re-encoding", False)):
        session = nbdiff.api.Session() if keep else None
        messages, ttft = [], []
        for turn in range(turns):
            messages.append({"role": "user", "content": " ".join(text[turn * words : (turn + 1) * words])})
            start, first = time.perf_counter(), None
            reply = ""
            for event in nbdiff.stream(model, tok, messages, block_size=8, max_new_tokens=new, session=session):
                if first is None and isinstance(event, StepEvent):
                    first = time.perf_counter() - start
                if hasattr(event, "texts") and getattr(event, "kind", "") == "final":
                    reply = event.texts[0]
                    prompt_tokens = event.prompt_tokens
            ttft.append(first)
            messages.append({"role": "assistant", "content": reply})
        results[label] = dict(ttft=ttft, last_prompt_tokens=prompt_tokens)
    lines = ["| chat (block 8) | turn 1 TTFT (s) | turn 10 TTFT (s) | ratio | turn 10 prompt tokens |", "|---|---|---|---|---|"]
    for label, r in results.items():
        t = r["ttft"]
        lines.append(f"| {label} | {t[0]:.2f} | {t[-1]:.2f} | {t[-1] / t[0]:.2f} | {r['last_prompt_tokens']} |")
    return lines, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--part", choices=["b1", "block8", "chat", "all"], default="all")
    parser.add_argument("--contexts", type=int, nargs="+", default=[500, 2000, 6000])
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--words", type=int, default=60, help="words of Austen per user turn")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()

    from nbdiff.api import load
    from nbdiff.loading import model_settings

    torch.set_num_threads(args.threads)
    model, tok = load(args.model, device="cpu", dtype="fp32")
    mask_id = model_settings(model).mask_token_id
    time_nbdiff(model, austen_ids(tok, 64), 4, 1, mask_id)  # warm-up
    time_generate(model, austen_ids(tok, 64), 4)
    figures = {}
    if args.part in ("b1", "all"):
        lines, figures["b1"] = part_b1(model, tok, mask_id, args.contexts, args.new_tokens)
        print("\n".join(lines) + "\n")
    if args.part in ("block8", "all"):
        lines, figures["block8"] = part_block8(model, tok, mask_id, max(args.contexts), 2 * args.new_tokens)
        print("\n".join(lines) + "\n")
    if args.part in ("chat", "all"):
        lines, figures["chat"] = part_chat(model, tok, args.turns, args.words, args.new_tokens)
        print("\n".join(lines) + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
