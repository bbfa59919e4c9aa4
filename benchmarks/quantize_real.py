"""4-bit weights on a real model: `--quantize nf4` against fp32 on the bench suites, same prompts.

Runs nbdiff's bench (`nbdiff.eval.bench.run_bench`, what `nbdiff bench` runs) twice on one set of
prompts: with fp32 weights, then with the linear layers quantized by bitsandbytes (`--kind`, nf4 by
default; compute in fp32, embeddings and head stay fp32). Rows: transformers `generate()` (ar) and
nbdiff's decoder at block size 1, greedy. Per row: tokens/s (decoding, after a warm-up), generative
perplexity of the replies scored by the fp32 model, distinct-2, and agreement with the fp32 AR reply
(common-prefix tokens over the fp32 reply's tokens, summed over prompts; 1.0 = every fp32 reply
reproduced). Peak memory is measured apart (`/usr/bin/time -v nbdiff generate ... -q nf4`): the
bench also holds the fp32 scorer.

    python benchmarks/quantize_real.py MODEL [--suites code,chat] [--limit 2] [-n 48] [--kind nf4]

Feeds docs/benchmarks/real-models.md, section "4-bit on the 1.5B".
"""

from __future__ import annotations

import argparse
import gc

import torch


def run(model: str, prompts, kind: str | None, max_new_tokens: int):
    from nbdiff.eval.bench import BenchConfig, run_bench

    config = BenchConfig(block_sizes=(1,), thresholds=(0.9,), modes=("nbdiff",), max_new_tokens=max_new_tokens,
                         dtypes=("fp32",), quantize=kind, device="cpu")
    result = run_bench(model, prompts, config)
    gc.collect()
    return result


def main() -> None:
    from nbdiff.eval import metrics
    from nbdiff.eval.bench import limit_per_suite, load_suites

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="folder written by nbdiff convert")
    parser.add_argument("--suites", default="code,chat")
    parser.add_argument("--limit", type=int, default=2, help="prompts per suite")
    parser.add_argument("-n", "--max-new-tokens", type=int, default=48)
    parser.add_argument("--kind", default="nf4", choices=["nf4", "fp4", "int8"])
    args = parser.parse_args()

    prompts = limit_per_suite(load_suites(args.suites.split(",")), args.limit)
    print(f"{len(prompts)} prompts ({args.suites}, {args.limit} each), up to {args.max_new_tokens} new tokens, "
          f"{torch.get_num_threads()} threads")
    runs = {"fp32": run(args.model, prompts, None, args.max_new_tokens),
            args.kind: run(args.model, prompts, args.kind, args.max_new_tokens)}
    reference = next(s for spec, s in runs["fp32"].samples.items() if spec.mode == "ar")
    print("| weights | row | tokens | tokens/s | gen. perplexity (fp32 scorer) | distinct-2 | agreement with fp32 AR |")
    print("|---|---|---|---|---|---|---|")
    for weights, result in runs.items():
        overall = "all" if any(r.suite == "all" for r in result.rows) else result.suites[0]  # one suite: no "all" row
        for row in (r for r in result.rows if r.suite == overall):
            spec = next(s for s in result.samples if s.mode == row.mode and s.block_size == row.block_size)
            agree = metrics.ar_agreement([s.tokens for s in result.samples[spec]], [s.tokens for s in reference])
            name = "ar (generate)" if row.mode == "ar" else f"nbdiff b={row.block_size}"
            print(f"| {weights} | {name} | {row.new_tokens} | {row.tokens_per_second:.2f} | {row.gen_ppl:.3f} | "
                  f"{row.distinct2:.3f} | {agree:.1%} |")
    for note in runs[args.kind].notes:
        print(f"note: {note}")


if __name__ == "__main__":
    main()
