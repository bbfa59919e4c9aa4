"""What a trained drafter costs per block next to the AR verify pass (docs/benchmarks/drafter.md, "Trained drafter: decoding").

    OMP_NUM_THREADS=1 python benchmarks/drafter_decode_cost.py MODEL_DIR [--context 200]

Prints, relative to one cached AR forward of one token (median of 12, fp32): an AR forward of n
tokens (the verify pass, hidden states kept as exact mode with a drafter keeps them), and one
drafter forward (2 layers of the AR width, block 8 and 16, LM head over the whole vocabulary or
4,096 ids); then the drafter forward with the FeatureCache against projecting every context
column again at each block (contexts of 200, 1,000 and 4,000 columns). Untrained weights: the cost
does not depend on them. The load average is printed with the figures: on a shared CPU, compare
ratios from one run only.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from nbdiff.hardware import cpu_name


def median_ms(fn, repeats: int = 12) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def ar_cost(model, context: int, n: int) -> float:
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    ids = torch.randint(0, 30000, (1, context))
    new, pos = torch.randint(0, 30000, (1, n)), torch.arange(context, context + n)[None]
    model(input_ids=ids, cache=cache, use_cache=True)

    def step():
        model(input_ids=new, position_ids=pos, cache=cache, use_cache=True, output_hidden_states=True)
        cache.crop(-n)

    return median_ms(step)


def drafter(model, vocab: int | None):
    from nbdiff.drafter import DrafterConfig, new_drafter

    ids = list(range(vocab)) if vocab else None
    return new_drafter(DrafterConfig.for_target(model, block_size=16, draft_vocab=ids), model).eval()


def drafter_cost(d, context: int, b: int, cached: bool = True) -> float:
    from nbdiff.drafter import FeatureCache

    H = d.config.hidden_size
    feats, feat_pos = torch.randn(1, context, H), torch.arange(context)[None]
    block, pos = torch.randint(0, 4000, (1, b)), torch.arange(context, context + b)[None]
    cache = FeatureCache()
    d.extend(cache, feats, feat_pos)
    if cached:
        return median_ms(lambda: d(block, pos, cache=cache, logits_from=1))
    return median_ms(lambda: d(block, pos, feats, feat_pos, logits_from=1))


@torch.no_grad()
def main() -> None:
    import nbdiff

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--context", type=int, default=200)
    args = parser.parse_args()
    torch.manual_seed(0)
    model, _ = nbdiff.load(args.model, device="cpu", dtype="fp32")
    print(f"{cpu_name()}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}")
    one = ar_cost(model, args.context, 1)
    print(f"AR forward, 1 token after {args.context}: {one:.1f} ms")
    for n in (2, 4, 8, 16):
        print(f"AR forward of {n} tokens: {ar_cost(model, args.context, n) / one:.2f}x")
    full, small = drafter(model, None), drafter(model, 4096)
    for b in (8, 16):
        print(f"drafter block {b}: whole vocabulary {drafter_cost(full, args.context, b) / one:.2f}x, "
              f"4,096 ids {drafter_cost(small, args.context, b) / one:.2f}x")
    for context in (200, 1000, 4000):
        cached, again = drafter_cost(small, context, 8), drafter_cost(small, context, 8, cached=False)
        print(f"context {context}: drafter block 8 with the feature cache {cached:.1f} ms, projected again {again:.1f} ms")
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
