"""A prompt's prefill with and without the kernel's many-row path (AVX2: prompts of up to 64 tokens
through the kernel and the lean forward, nbdiff/cpu_kernel/linear.py's PROMPT_ROWS), on one loaded
model, the two taking turns over --rounds rounds.

For each prompt length: the prefill forward (an empty cache, logits of the last position only, as
nbdiff's decoding asks) in milliseconds, median of --repeat per round, for "kernel" (what nbdiff runs)
and "mkl" (torch's product for every prompt over 16 tokens and transformers' forward, nbdiff before
the many-row path); then whether each position's keys and values from the kernel's prefill equal, bit
for bit, the ones the same tokens get fed one at a time (the kernel's property extended to prompts;
the attention of a position over its predecessors differs in shape, so only layer 0's keys and values,
which depend on the products alone, are compared).

    python benchmarks/prompt_rows.py /work/models/qwen05-nbdiff --lengths 16,32,48,64 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def prefill_ms(model, ids: torch.Tensor, repeat: int) -> float:
    from transformers import DynamicCache

    times = []
    for _ in range(repeat + 1):
        cache = DynamicCache(config=model.config)
        start = time.perf_counter()
        with torch.inference_mode():
            model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
        times.append(time.perf_counter() - start)
    times = sorted(times[1:])
    return times[len(times) // 2] * 1e3


def set_prompt_rows(model, on: bool, saved: dict) -> None:
    """Switch the many-row path on (as loaded) or off (nbdiff's limits before it: 16 rows), the lean
    forward's own limit with it (it is read when the lean forward is installed)."""
    from nbdiff.cpu_kernel import fast_forward, linear

    linear.PROMPT_ROWS.clear()
    if on:
        linear.PROMPT_ROWS.update(saved)
    fast_forward.uninstall(model)
    fast_forward.install(model)


def layer0_keys_match(model, ids: torch.Tensor) -> bool:
    from transformers import DynamicCache

    with torch.inference_mode():
        whole = DynamicCache(config=model.config)
        model(input_ids=ids, cache=whole, use_cache=True, logits_to_keep=1)
        steps = DynamicCache(config=model.config)
        for t in range(ids.shape[1]):
            model(input_ids=ids[:, t:t + 1], cache=steps, use_cache=True, logits_to_keep=1)
    n = ids.shape[1]
    a, b = whole.layers[0], steps.layers[0]
    return bool(torch.equal(a.keys[..., :n, :], b.keys[..., :n, :]) and torch.equal(a.values[..., :n, :], b.values[..., :n, :]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--lengths", default="16,32,48,64")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from nbdiff.cpu_kernel import cpu_isa, linear
    from nbdiff.hardware import cpu_name
    from nbdiff.loading import load_model

    model, _ = load_model(args.model, device="cpu", dtype="fp32")
    saved = dict(linear.PROMPT_ROWS)
    isa = cpu_isa()
    if not saved.get(isa):
        raise SystemExit(f"this CPU's kernel (isa {isa}) has no many-row path: nothing to compare")
    lengths = [int(n) for n in args.lengths.split(",")]
    gen = torch.Generator().manual_seed(0)
    prompts = {n: torch.randint(100, model.config.vocab_size // 2, (1, n), generator=gen) for n in lengths}
    times = {n: {"kernel": [], "mkl": []} for n in lengths}
    for r in range(args.rounds):
        for name in (("kernel", "mkl") if r % 2 == 0 else ("mkl", "kernel")):
            set_prompt_rows(model, name == "kernel", saved)
            for n in lengths:
                times[n][name].append(round(prefill_ms(model, prompts[n], args.repeat), 1))
    set_prompt_rows(model, True, saved)
    rows = []
    for n in lengths:
        k, m = sorted(times[n]["kernel"]), sorted(times[n]["mkl"])
        rows.append({"tokens": n, "kernel_ms": times[n]["kernel"], "mkl_ms": times[n]["mkl"],
                     "kernel_median_ms": k[len(k) // 2], "mkl_median_ms": m[len(m) // 2],
                     "layer0_kv_same_as_one_by_one": layer0_keys_match(model, prompts[n])})
    result = {"cpu": cpu_name(), "threads": args.threads, "torch": torch.__version__, "model": args.model,
              "rounds": args.rounds, "repeat": args.repeat, "rows": rows}
    if args.json:
        print(json.dumps(result, indent=1))
        return
    print(f"{result['cpu']}, {args.threads} threads, torch {torch.__version__}, {args.rounds} rounds taking turns, "
          f"median of {args.repeat} prefills each")
    print("| prompt tokens | kernel (ms, per round) | torch's product (ms, per round) | kernel / torch (medians) "
          "| layer 0's keys/values = one token at a time |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['tokens']} | {' / '.join(map(str, row['kernel_ms']))} | {' / '.join(map(str, row['mkl_ms']))} "
              f"| {row['kernel_median_ms'] / row['mkl_median_ms']:.2f}x | {'yes' if row['layer0_kv_same_as_one_by_one'] else 'no'} |")


if __name__ == "__main__":
    main()
