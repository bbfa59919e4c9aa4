"""Would folding the verification of block k and the draft of block k+1 into one forward pay here?

    python benchmarks/exact_fold.py /work/models/smollm2-nbdiff --block-size 8 --new-tokens 48

Exact mode today spends two forwards per block (a one-shot draft, then the verifying causal pass).
Folding them saves the draft forward, but the next block's draft is then made before its first
token is known (offset 0 is still MASK), so the draft is one token further ahead. This script
measures both on the AR reference reply (transformers greedy generate(), so no decoding error
mixes in), greedy, one-shot drafts:

- accepted drafts per block when the first token is known (today's exact mode) and when it is not
  (the folded draft), per offset;
- the time of one forward of 8 tokens (verify alone), 16 (verify + next draft) and 8 + 8 * 8
  (verify + a draft for every possible accepted length, as TiDAR does) at the prompt's context;
- tokens per forward and an estimated tokens/s of each scheme from those figures.

Feeds docs/benchmarks/exact-mode.md, section "Exact mode (issue 12) / Acceptance per offset and the fold question".
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

PROMPTS = [
    "Write a short paragraph about the sea.",
    "List five fruits, one per line.",
    "Write a Python function that reverses a string.",
    "What is 17 times 23? Explain step by step.",
]


def accepted(draft: list[int], truth: list[int]) -> int:
    k = 0
    while k < len(draft) and k < len(truth) and draft[k] == truth[k]:
        k += 1
    return k


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--block-size", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    from nbdiff.api import encode, load
    from nbdiff.decode.context import CachedContext
    from nbdiff.loading import model_settings

    torch.set_num_threads(args.threads)
    model, tok = load(args.model, device="cpu", dtype="fp32")
    mask = model_settings(model).mask_token_id
    b = args.block_size
    known_at, folded_at = [0] * (b - 1), [0] * (b - 1)
    known_sum = folded_sum = blocks = 0
    times = {8: [], 16: [], b + b * b: []}
    for text in PROMPTS:
        prompt = encode(tok, text)
        with torch.no_grad():
            ref = model.generate(torch.tensor([prompt]), max_new_tokens=args.new_tokens, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)[0, len(prompt) :].tolist()
        ctx = CachedContext(model, [prompt])
        ctx.prefill()
        for s in range(0, len(ref) - b + 1, b):
            truth = ref[s + 1 : s + b]  # the tokens after the block's first one
            known = torch.tensor([[ref[s]] + [mask] * (b - 1)])
            draft = ctx.block_logits(known)[0, :-1].argmax(-1).tolist()  # offset j read from logits at j - 1
            unknown = torch.tensor([[mask] * b])
            folded = ctx.block_logits(unknown)[0, :-1].argmax(-1).tolist()
            a, f = accepted(draft, truth), accepted(folded, truth)
            for k in range(a):
                known_at[k] += 1
            for k in range(f):
                folded_at[k] += 1
            known_sum, folded_sum, blocks = known_sum + a, folded_sum + f, blocks + 1
            if s == 0:  # forward widths at this context
                for width in times:
                    start = time.perf_counter()
                    ctx.block_logits(torch.full((1, width), mask))
                    times[width].append(time.perf_counter() - start)
            ctx.commit(torch.tensor([ref[s : s + b]]))
    t = {w: statistics.median(v) for w, v in times.items()}
    per_block_known = 1 + known_sum / blocks
    per_block_folded = 1 + folded_sum / blocks
    print(f"blocks: {blocks} (block size {b}, {len(PROMPTS)} chat prompts, {args.new_tokens} reference tokens each)")
    print(f"accepted per offset, first token known : {[round(k / blocks, 3) for k in known_at]}")
    print(f"accepted per offset, folded (unknown)  : {[round(k / blocks, 3) for k in folded_at]}")
    print(f"forward time (median ms): " + ", ".join(f"{w} tokens {1000 * v:.1f}" for w, v in t.items()))
    print("| scheme | forwards/block | tokens/block | tokens/forward | est. tokens/s |")
    print("|---|---|---|---|---|")
    rows = [
        ("exact, one-shot draft + verify", 2, per_block_known, t[8] + t[8]),
        ("folded: verify k + draft k+1 (16 tokens)", 1, per_block_folded, t[16]),
        (f"TiDAR-style: a draft per accepted length ({b + b * b} tokens)", 1, per_block_known, t[b + b * b]),
    ]
    for name, fwd, tokens, seconds in rows:
        print(f"| {name} | {fwd} | {tokens:.2f} | {tokens / fwd:.2f} | {tokens / seconds:.1f} |")


if __name__ == "__main__":
    main()
