"""The kernel's weights on transparent huge pages (nbdiff/cpu_kernel/pages.py) against the weights as loaded,
one-token forwards over a cached context, interleaved in one process (the machine's memory speed drifts).

    python benchmarks/huge_pages.py MODEL --threads 2 --pairs 4 --repeat 15

Loads MODEL with huge pages off (NBDIFF_HUGE_PAGES=0: its weights as transformers left them, a mapping
of the safetensors files on 4 KiB pages), makes huge-page copies of the same tensors, then times
--repeat one-token forwards at a --context-token depth with each set in turn, --pairs times (order
swapped every pair), and checks the logits are equal bit for bit. Prints the medians per pair.
"""
from __future__ import annotations

import argparse
import os
import time

os.environ["NBDIFF_HUGE_PAGES"] = "0"  # load as before; the copies are made below

import torch  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--context", type=int, default=100)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import nbdiff
    from nbdiff.cpu_kernel import pages
    from nbdiff.cpu_kernel.linear import SmallRowsLinear
    from nbdiff.decode.context import growing_cache
    from nbdiff.hardware import cpu_name

    model, _ = nbdiff.load(args.model, device="cpu", dtype="fp32")
    weights = {id(m.weight): m.weight for m in model.modules() if type(m) is SmallRowsLinear}
    params = [p for p in weights.values() if p.numel() * p.element_size() >= pages.MIN_BYTES]
    loaded = [p.data for p in params]
    huge = [pages._huge_copy(p.detach()) for p in params]
    if any(h is None for h in huge):
        raise SystemExit("no huge-page copies here (mmap.madvise failed)")
    ids = torch.randint(0, 1000, (1, args.context))
    step = torch.tensor([[5]])

    def measure():
        cache = growing_cache(model.config)
        times = []
        with torch.no_grad():
            model(input_ids=ids, past_key_values=cache, use_cache=True)
            for _ in range(args.repeat):
                start = time.perf_counter()
                logits = model(input_ids=step, past_key_values=cache, use_cache=True).logits
                times.append(time.perf_counter() - start)
        times.sort()
        return times[len(times) // 2] * 1e3, logits

    results = {"as loaded": [], "huge pages": []}
    outputs = {}
    for pair in range(args.pairs):
        order = [("as loaded", loaded), ("huge pages", huge)]
        for name, tensors in (order if pair % 2 == 0 else order[::-1]):
            for p, t in zip(params, tensors):
                p.data = t
            ms, logits = measure()
            results[name].append(ms)
            outputs[name] = logits
    same = torch.equal(outputs["as loaded"], outputs["huge pages"])
    moved = sum(p.numel() * p.element_size() for p in params) / 1e6
    print(f"{cpu_name()}, {args.threads} threads, torch {torch.__version__}; {moved:.0f} MB of weights; "
          f"one-token forward at depth {args.context}, median of {args.repeat}, ms per pair:")
    for name, xs in results.items():
        print(f"  {name:11s} " + " / ".join(f"{x:.1f}" for x in xs))
    ratios = [h / a for a, h in zip(results["as loaded"], results["huge pages"])]
    print(f"  huge / loaded per pair: " + " / ".join(f"{r:.3f}" for r in ratios) + f"; logits equal: {same}")


if __name__ == "__main__":
    main()
