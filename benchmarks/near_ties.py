"""Exact mode in the model's own dtype: does its reply equal block size 1's, and where not, was it a near-tie?

For each prompt: nbdiff at block size 1 (plain AR, one-token steps) and exact mode (the drafting plan's
drafter and block size unless --block-size/--drafter), both in --dtype. Prints one JSON line per prompt
(identical?, near_ties counted by exact mode, the first differing token and the top-2 margin there in
ulps of the dtype, read from a fresh causal forward of the common prefix), then a summary line.

    OMP_NUM_THREADS=1 python benchmarks/near_ties.py /work/models/qwen05-nbdiff --dtype bf16 --suite code --limit 4 -n 32
"""

from __future__ import annotations

import argparse
import json

import torch


def margin_ulps(model, ids: list[int]) -> float:
    """Top-1 minus top-2 of the next-token logits after `ids`, in ulps of the model's dtype at top-1."""
    with torch.no_grad():
        logits = model(torch.tensor([ids], device=model.device)).logits[0, -1]
    top = logits.topk(2).values.float()
    ulp = torch.finfo(model.dtype).eps * 2.0 ** torch.floor(torch.log2(top[0].abs().clamp_min(1e-30)))
    return float((top[0] - top[1]) / ulp)


def main() -> None:
    import nbdiff
    from nbdiff.api import encode
    from nbdiff.eval.bench import limit_per_suite, load_suites
    from nbdiff.hardware import cpu_name

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--suite", action="append", default=None)
    ap.add_argument("--limit", type=int, default=4)
    ap.add_argument("-n", "--max-new-tokens", type=int, default=32)
    ap.add_argument("--block-size", type=int, default=None)
    ap.add_argument("--drafter", default="auto")
    args = ap.parse_args()

    model, tok = nbdiff.load(args.model, device="cpu", dtype=args.dtype)
    prompts = limit_per_suite(load_suites(args.suite), args.limit)
    same = ties_total = 0
    for p in prompts:
        opts = dict(max_new_tokens=args.max_new_tokens)
        _, ar = nbdiff.generate(model, tok, p.prompt, block_size=1, **opts)
        _, ex = nbdiff.generate(model, tok, p.prompt, exact=True, drafter=args.drafter, block_size=args.block_size, **opts)
        a, b = ar.tokens[0], ex.tokens[0]
        row = {"suite": p.suite, "identical": a == b, "near_ties": ex.near_ties, "tokens": len(b),
               "plan": ex.plan.get("drafter"), "block_size": ex.block_size}
        if a != b:
            d = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            row.update(first_difference=d, margin_ulps_there=margin_ulps(model, encode(tok, p.prompt) + a[:d]))
        same += a == b
        ties_total += ex.near_ties
        print(json.dumps(row), flush=True)
    print(json.dumps({"kind": "summary", "model": args.model, "dtype": args.dtype, "cpu": cpu_name(),
                      "threads": torch.get_num_threads(), "prompts": len(prompts), "identical": same,
                      "near_ties": ties_total}), flush=True)


if __name__ == "__main__":
    main()
