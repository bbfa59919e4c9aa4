"""What one exact-mode step costs on this machine: the model's cached causal pass of 1, 2, 4, 8, 16 tokens
(with and without the hidden states a trained drafter reads) and the drafter's forward, each against a
one-token pass. These are the figures behind nbdiff.decode.plan's ROW_COST_CPU and DRAFTER_COST.

    OMP_NUM_THREADS=2 python benchmarks/step_costs.py MODEL --drafter DIR --threads 2 [--depth 300] [--repeat 20]

The context is `--depth` tokens of a short code text repeated; each timed pass is followed by dropping its
columns again (CachedContext.keep_last), so every pass sees the same depth. Median of --repeat passes after
one untimed pass. Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_kernel import timed  # noqa: E402  (benchmarks/cpu_kernel.py: median ms after one warm-up call)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="an nbdiff model folder")
    parser.add_argument("--drafter", required=True, help="a drafter folder for that model")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--depth", type=int, default=300, help="cached tokens before every timed pass")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--widths", default="1,2,4,8,16")
    args = parser.parse_args()

    import torch

    import nbdiff
    from nbdiff.decode.context import CachedContext
    from nbdiff.drafter.decoding import TrainedDrafting, loaded_drafter

    torch.set_num_threads(args.threads)
    model, tokenizer = nbdiff.load(args.model, device="cpu", dtype="fp32")
    drafter = loaded_drafter(model, args.drafter)
    ids = tokenizer("def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n" * 40)["input_ids"][: args.depth]
    ctx = CachedContext(model, [ids], 0, None)
    drafting = TrainedDrafting(drafter, ctx)
    ctx.prefill()
    drafting.absorb(ctx)

    def ar_pass(width: int, hidden: bool) -> None:
        ctx.keep_hidden_states = hidden
        ctx.causal(torch.tensor([ids[-width:]]), keep=width)
        ctx.keep_last(width, [0])
        ctx.hidden_states = None

    rows = []
    with torch.no_grad():
        for width in map(int, args.widths.split(",")):
            rows.append({"what": "model pass", "tokens": width,
                         "ms_hidden_states": round(timed(lambda: ar_pass(width, True), args.repeat), 2),
                         "ms": round(timed(lambda: ar_pass(width, False), args.repeat), 2)})
        for width in (4, drafter.config.block_size):
            rows.append({"what": "drafter forward", "tokens": width,
                         "ms": round(timed(lambda: drafting.model_drafts(ctx, [ids[-1]], width), args.repeat), 2)})
    one = next(r["ms_hidden_states"] for r in rows if r["what"] == "model pass" and r["tokens"] == 1)
    for r in rows:
        r["x_one_token_pass"] = round(r.get("ms_hidden_states", r["ms"]) / one, 3)
    print(json.dumps({"threads": args.threads, "depth": args.depth, "torch": torch.__version__, "rows": rows}, indent=1))
    print("\n| pass | tokens | ms (hidden states) | ms (without) | x one-token pass |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['what']} | {r['tokens']} | {r.get('ms_hidden_states', '-')} | {r['ms']} | {r['x_one_token_pass']} |")


if __name__ == "__main__":
    main()
