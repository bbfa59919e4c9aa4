"""Exact mode's lookup drafts at several verify widths against block size 1, interleaved, on one loaded model:
block 1; `--exact --drafter ngram` at block 2 and 4 with full-width drafts; block 4 with drafts that follow
their accepted runs (DraftingPlan.lookup_follows, what the plan does on AVX2-only CPUs). Each round runs every
configuration over the same prompts (the first --per prompts of each bench suite), the order turned by one
each round; prints tokens/s per round, each round's ratio to block 1, tokens per forward and how many
replies equal block 1's tokens.

    python benchmarks/lookup_width.py smollm2-nbdiff --suites code,chat,lists,rewrite,arithmetic --tokens 128 --rounds 4
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--suites", default="code,chat,lists,rewrite,arithmetic")
    parser.add_argument("--per", type=int, default=1, help="prompts per suite")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--configs", default="block1,lookup2,lookup4,lookup4-follow")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from llamacpp_compare import _load, nbdiff_stream

    from nbdiff.decode import plan as planmod
    from nbdiff.hardware import cpu_name
    from nbdiff.resources import bench_suites_dir

    every = {"block1": ({}, False), "lookup2": (dict(exact=True, drafter="ngram", block_size=2), False),
             "lookup4": (dict(exact=True, drafter="ngram", block_size=4), False),
             "lookup4-follow": (dict(exact=True, drafter="ngram", block_size=4), True)}
    configs = {name: every[name] for name in args.configs.split(",")}
    model, tok = _load(args.model, "fp32")
    prompts = [json.loads(line)["prompt"] for s in args.suites.split(",")
               for line in (bench_suites_dir() / f"{s}.jsonl").read_text(encoding="utf-8").splitlines()[:args.per]]
    nbdiff_stream(model, tok, "Say hello.", 4)  # warm-up
    speed = {k: [] for k in configs}
    per_forward, tokens = {}, {}
    try:
        for r in range(args.rounds):
            names = list(configs)
            for name in names[r % len(names):] + names[:r % len(names)]:
                kwargs, follow = configs[name]
                planmod.LOOKUP_FOLLOWS = follow  # the plan sets lookup_follows only on AVX2 with the kernel
                start, n, forwards = time.perf_counter(), 0, 0
                for i, prompt in enumerate(prompts):
                    out = nbdiff_stream(model, tok, prompt, args.tokens, **kwargs)
                    n, forwards = n + out["new_tokens"], forwards + (out["forwards"] or 0)
                    tokens.setdefault(i, {})[name] = out["tokens"]
                speed[name].append(round(n / (time.perf_counter() - start), 2))
                per_forward[name] = round(n / max(forwards, 1), 2)
    finally:
        planmod.LOOKUP_FOLLOWS = True
    base = speed.get("block1")
    print(json.dumps({"cpu": cpu_name(), "threads": args.threads, "model": args.model, "prompts": len(prompts),
                      "tokens_per_s": speed,
                      "vs_block1_per_round": {k: [round(a / b, 3) for a, b in zip(v, base)] for k, v in speed.items()} if base else None,
                      "tokens_per_forward": per_forward,
                      "same_as_block1": {k: sum(t[k] == t["block1"] for t in tokens.values()) for k in configs} if base else None}))


if __name__ == "__main__":
    main()
