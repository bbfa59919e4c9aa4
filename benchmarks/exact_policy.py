"""Exact mode's drafting policy on one model: rows decoded back to back per prompt, and what each verify kept.

Rows (`--rows`, comma-separated): `b1` (block size 1: plain greedy AR through the decoder), `auto`
(`generate --exact`: the drafting plan decides), `ngram:W` (prompt lookup verified W tokens wide),
`diffusion:W` (one-shot diffusion drafts of the model itself, W wide), `drafter:W:T:SPEC` (a trained
drafter's folder, `lookup+` before it for lookup first, W wide, confidence cut T: --draft-threshold). Every row runs on every prompt
before the next prompt starts, `--repeats` rounds interleaved (this machine's speed drifts within
minutes: compare rows of one run). Prints per suite and overall: tokens, forwards, tokens per forward,
tokens/s (sum of tokens over sum of median seconds), speed against `b1`, replies identical to `b1`'s;
then, for lookup rows, the verifies by the length of the n-gram that matched (0 = none): how many,
tokens drafted, tokens kept. One JSON line per row with --json.

    OMP_NUM_THREADS=2 cpu-exclusive python benchmarks/exact_policy.py /work/models/qwen05-nbdiff --limit 2 -n 64 \\
        --rows b1,auto,ngram:4,ngram:8,ngram:16
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict


def options_of(row: str, n: int):
    from nbdiff.decode.options import DecodeOptions

    if row == "b1":
        return DecodeOptions(block_size=1, max_new_tokens=n)
    if row == "auto":
        return DecodeOptions(exact=True, max_new_tokens=n)
    if row.startswith("drafter:"):  # drafter:W:T:SPEC, SPEC a drafter folder, 'lookup+' before it for lookup first
        _, width, cut, spec = row.split(":", 3)
        return DecodeOptions(exact=True, drafter=spec, block_size=int(width), draft_threshold=float(cut), max_new_tokens=n)
    kind, _, width = row.partition(":")
    if kind not in ("ngram", "diffusion") or not width.isdigit():
        raise SystemExit(f"unknown row {row!r}: use b1, auto, ngram:W, diffusion:W or drafter:W:T:SPEC")
    extra = {"draft_steps": 1} if kind == "diffusion" else {}
    return DecodeOptions(exact=True, drafter=kind, block_size=int(width), max_new_tokens=n, **extra)


def decode_once(model, tok, prompt: str, options):
    """(reply tokens, final record, per-verify (match length, drafted, accepted), seconds)."""
    from nbdiff.api import encode, stream
    from nbdiff.decode.drafters import ngram_match
    from nbdiff.decode.events import BlockEvent, FinalEvent

    ids = encode(tok, prompt)
    verifies, produced, final = [], [], None
    start = time.perf_counter()
    for event in stream(model, tok, prompt, options):
        if isinstance(event, BlockEvent):
            if options.exact and event.tokens:
                _, size = ngram_match(ids + produced + event.tokens[:1], 1)
                verifies.append((size, len(event.drafted), event.accepted))
            produced += event.tokens
        elif isinstance(event, FinalEvent):
            final = event
    return list(final.tokens[0]), final, verifies, time.perf_counter() - start


def simulate(prompt: list[int], reply: list[int], draft, width: int) -> list[tuple[int, int]]:
    """Exact mode along a greedy reply, as the decoder walks it: (verify width, tokens kept) per verify.
    `draft(history, max_len)` proposes tokens after the known first token; the draft is kept while it
    equals the reply (the model's own greedy tokens), so no forward is needed to know what a verify keeps."""
    out, i = [], 0
    while i < len(reply):
        budget = min(width, len(reply) - i)  # the decoder caps the block at the row's token budget
        d = list(draft(prompt + reply[: i + 1], budget - 1))[: budget - 1]
        kept = 0
        while kept < len(d) and d[kept] == reply[i + 1 + kept]:
            kept += 1
        out.append((1 + len(d), 1 + kept))
        i += 1 + kept
    return out


def capped_lookup(caps: tuple[int, ...]):
    """Prompt lookup drafting at most caps[n - 1] tokens after a match of n tokens (n = 1..3)."""
    from functools import lru_cache

    from nbdiff.decode.drafters import ngram_match

    @lru_cache(maxsize=None)
    def match(history: tuple) -> tuple[tuple, int]:
        tokens, size = ngram_match(history, 15)
        return tuple(tokens), size

    def draft(history, max_len):
        tokens, size = match(tuple(history))
        return list(tokens[: min(max_len, caps[size - 1])]) if size else []
    return draft


def simulate_policies(path: str, costs_ms: dict, limit: int) -> None:
    """Predicted speed against block size 1 of lookup policies along the replies in `path` (JSON lines of
    suite, prompt ids, reply ids): tokens kept over the summed measured cost of each verify's width (linear
    between measured widths). A policy caps the draft by the length of the n-gram that matched."""
    costs = {int(w): ms for w, ms in costs_ms.items()}
    known = sorted(costs)

    def cost(w: int) -> float:
        if w in costs:
            return costs[w]
        lo = max(k for k in known if k < w)
        hi = min(k for k in known if k > w)
        return costs[lo] + (costs[hi] - costs[lo]) * (w - lo) / (hi - lo)

    replies = [json.loads(line) for line in open(path)]
    suites = list(dict.fromkeys(r["suite"] for r in replies)) + ["all"]
    grid = [(c1, c2, c3) for c1 in (0, 1, 2, 3) for c2 in (0, 1, 2, 3, 5, 7) for c3 in (1, 2, 3, 5, 7, 11, 15)
            if c1 <= c2 <= c3]
    grid += [(w - 1,) * 3 for w in (2, 4, 8, 16)]  # today's rule: the block's width whatever matched
    draft_of = {caps: capped_lookup(caps) for caps in dict.fromkeys(grid)}
    print("| caps after a 1-, 2-, 3-token match | " + " | ".join(suites) + " | tokens/verify (all) |")
    print("|---|" + "---|" * (len(suites) + 1))
    results = []
    for caps, draft in draft_of.items():
        tokens, spent, verifies = defaultdict(int), defaultdict(float), defaultdict(int)
        for r in replies:
            for w, kept in simulate(r["prompt"], r["reply"][:limit], draft, 1 + max(caps)):
                for key in (r["suite"], "all"):
                    tokens[key] += kept
                    spent[key] += cost(w)
                    verifies[key] += 1
        speed = {k: tokens[k] * costs[1] / spent[k] for k in suites}
        results.append((speed["all"], caps, speed, tokens["all"] / verifies["all"]))
    for _, caps, speed, tpv in sorted(results, reverse=True):
        print(f"| {caps} | " + " | ".join(f"{speed[k]:.3f}" for k in suites) + f" | {tpv:.2f} |")


def verify_costs(model, tok, widths: list[int], context: int, repeats: int) -> dict[int, float]:
    """Median milliseconds of a verify pass (causal forward of w tokens keeping w logits, then cropped back)
    at `context` cached tokens, the widths taken in turn each round (the machine's speed drifts)."""
    import torch

    from nbdiff.decode.context import CachedContext

    ids = (tok("def f(x):\n    return x * 2\n" * 200)["input_ids"])[:context]
    ctx = CachedContext(model, [ids], 0)
    ctx.prefill()
    times: dict[int, list[float]] = {w: [] for w in widths}
    for r in range(repeats + 1):
        for w in widths:
            block = torch.tensor([ids[:w]], dtype=torch.long)
            start = time.perf_counter()
            ctx.causal(block, keep=w)
            elapsed = time.perf_counter() - start
            ctx.keep_last(w, [0])
            if r:  # round 0 warms every width up
                times[w].append(elapsed * 1000)
    return {w: statistics.median(t) for w, t in times.items()}


def main() -> None:
    import torch

    import nbdiff
    from nbdiff.eval.bench import limit_per_suite, load_suites
    from nbdiff.hardware import cpu_name

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--suite", action="append", default=None)
    ap.add_argument("--limit", type=int, default=2)
    ap.add_argument("-n", "--max-new-tokens", type=int, default=64)
    ap.add_argument("--rows", default="b1,auto,ngram:4,ngram:8")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--records", default=None, help="write every verify as a JSON line here (suite, row, n, drafted, kept)")
    ap.add_argument("--replies-out", default=None, help="also append block size 1's replies here (for --simulate)")
    ap.add_argument("--write-replies", default=None, help="only write block size 1's replies (JSON lines) here, a suite per batch")
    ap.add_argument("--simulate", default=None, help="only simulate lookup policies along replies written by --write-replies")
    ap.add_argument("--costs-json", default=None, help="--simulate: the JSON line --costs printed, in a file")
    ap.add_argument("--costs", default=None, help="only time verify passes of these widths, e.g. 1,2,4,8,16")
    ap.add_argument("--context", type=int, default=160, help="--costs: cached tokens before the timed pass")
    args = ap.parse_args()

    if args.write_replies:
        from nbdiff.api import encode, eos_ids
        from nbdiff.decode.decoder import decode
        from nbdiff.decode.options import DecodeOptions
        from nbdiff.loading import model_settings

        model, tok = nbdiff.load(args.model, dtype=args.dtype)
        prompts = limit_per_suite(load_suites(args.suite), args.limit)
        with open(args.write_replies, "w") as f:
            for suite in dict.fromkeys(p.suite for p in prompts):
                batch = [encode(tok, p.prompt) for p in prompts if p.suite == suite]
                final = list(decode(model, batch, DecodeOptions(block_size=1, max_new_tokens=args.max_new_tokens),
                                    mask_token_id=model_settings(model).mask_token_id, eos_token_ids=eos_ids(model, tok),
                                    pad_token_id=tok.pad_token_id or 0))[-1]
                for ids, reply in zip(batch, final.tokens):
                    f.write(json.dumps({"suite": suite, "prompt": ids, "reply": reply}) + "\n")
        return
    if args.simulate:
        simulate_policies(args.simulate, json.loads(open(args.costs_json).read())["costs_ms"], args.max_new_tokens)
        return
    if args.costs:
        model, tok = nbdiff.load(args.model, dtype=args.dtype)
        costs = verify_costs(model, tok, [int(w) for w in args.costs.split(",")], args.context, args.repeats)
        print(f"# {cpu_name()}, {torch.get_num_threads()} threads, dtype {model.dtype}, context {args.context}, "
              f"median of {args.repeats}")
        base = costs[min(costs)]
        for w, ms in costs.items():
            print(f"| {w} | {ms:.1f} ms | {ms / base:.2f}x |")
        print(json.dumps({"costs_ms": costs}))
        return
    from nbdiff.api import encode

    rows = args.rows.split(",")
    if "b1" not in rows:
        rows.insert(0, "b1")
    model, tok = nbdiff.load(args.model, dtype=args.dtype)
    prompts = limit_per_suite(load_suites(args.suite), args.limit)
    for row in rows:  # warm-up: allocation and kernel selection stay out of the timings
        decode_once(model, tok, prompts[0].prompt, options_of(row, 8))
    plans = {}
    # per (row, suite): tokens, forwards, seconds, identical, replies
    acc = defaultdict(lambda: {"tokens": 0, "forwards": 0, "seconds": 0.0, "identical": 0, "replies": 0})
    shapes = defaultdict(lambda: defaultdict(lambda: [0, 0, 0]))  # row -> match length -> [verifies, drafted, kept]
    records: list[dict] = []
    load_start = __import__("os").getloadavg()[0]
    for p in prompts:
        times = defaultdict(list)
        results = {}
        for _ in range(args.repeats):
            for row in rows:
                tokens, final, verifies, seconds = decode_once(model, tok, p.prompt, options_of(row, args.max_new_tokens))
                times[row].append(seconds)
                results[row] = (tokens, final, verifies)
        reference = results["b1"][0]
        if args.replies_out:
            with open(args.replies_out, "a") as f:
                f.write(json.dumps({"suite": p.suite, "prompt": encode(tok, p.prompt), "reply": reference}) + "\n")
        for row in rows:
            tokens, final, verifies = results[row]
            plans[row] = final.plan
            for key in (p.suite, "all"):
                a = acc[(row, key)]
                a["tokens"] += len(tokens)
                a["forwards"] += final.forwards
                a["seconds"] += statistics.median(times[row])
                a["identical"] += tokens == reference
                a["replies"] += 1
            for size, drafted, accepted in verifies:
                records.append({"suite": p.suite, "row": row, "n": size, "drafted": drafted, "kept": accepted})
                s = shapes[row][size]
                s[0] += 1
                s[1] += drafted
                s[2] += accepted
    suites = list(dict.fromkeys(p.suite for p in prompts)) + ["all"]
    print(f"# {cpu_name()}, torch {torch.__version__}, {torch.get_num_threads()} threads, dtype {model.dtype}, "
          f"load average {load_start:.2f} at start, {args.max_new_tokens} new tokens, {args.limit} prompts per suite, "
          f"{args.repeats} repeats")
    for row in rows:
        print(f"# {row}: {plans[row].get('kind')} block {plans[row].get('block_size')}: {plans[row].get('why')}")
    print("| suite | row | tokens | forwards | tokens/forward | tokens/s | x b1 | identical to b1 |")
    print("|---|---|---|---|---|---|---|---|")
    for suite in suites:
        base = acc[("b1", suite)]
        for row in rows:
            a = acc[(row, suite)]
            tps = a["tokens"] / a["seconds"]
            ratio = tps / (base["tokens"] / base["seconds"])
            print(f"| {suite} | {row} | {a['tokens']} | {a['forwards']} | {a['tokens'] / max(a['forwards'], 1):.2f} | "
                  f"{tps:.2f} | {ratio:.2f}x | {a['identical']}/{a['replies']} |")
            if args.json:
                print(json.dumps({"suite": suite, "row": row, **a, "tokens_per_second": tps, "x_b1": ratio}))
    if args.records:
        with open(args.records, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    for row in rows:
        if row == "b1" or not shapes[row]:
            continue
        cells = ", ".join(f"n={size}: {v} verifies, {d} drafted, {k} kept" for size, (v, d, k) in sorted(shapes[row].items()))
        print(f"# {row} verifies by matched n-gram length: {cells}")


if __name__ == "__main__":
    main()
