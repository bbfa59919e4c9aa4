"""Are a trained drafter's probabilities keep chances? Greedy exact-mode decoding of real prompts with every draft
token verified (--draft-threshold 0), recording per step where the draft came from (prompt lookup or the
drafter), the drafter's probability of its first draft token, the model's own probability of the step's first
token, and how many draft tokens the verify kept. Tables of kept tokens per step by those probabilities.

    OMP_NUM_THREADS=1 python benchmarks/drafter_calibration.py MODEL --drafter lookup+DIR \\
        --suites code,chat,lists,rewrite,arithmetic --prompts 3 --tokens 96 [--out steps.json]

nbdiff.drafter.decoding.best_length reads the drafter's probabilities as keep chances: this is the check.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

BINS = [(0.0, 0.1), (0.1, 0.3), (0.3, 0.6), (0.6, 0.9), (0.9, 1.01)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--drafter", required=True, help="lookup+DIR or DIR")
    parser.add_argument("--suites", default="code,chat,lists,rewrite,arithmetic", help="bench suites or .jsonl files")
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--out", default=None, help="the steps as JSON")
    args = parser.parse_args()

    import nbdiff
    from nbdiff.decode.events import BlockEvent, StepEvent
    from nbdiff.drafter import decoding
    from nbdiff.resources import bench_suites_dir

    model, tokenizer = nbdiff.load(args.model, device="cpu", dtype="fp32")
    prompts = []
    for suite in args.suites.split(","):
        path = Path(suite) if suite.endswith(".jsonl") else bench_suites_dir() / f"{suite}.jsonl"
        lines = path.read_text(encoding="utf-8").splitlines()[: args.prompts]
        prompts += [(path.stem, json.loads(line)["prompt"]) for line in lines]

    drafts_log: list[dict] = []
    real = decoding.TrainedDrafting.drafts

    def logged(self, ctx, first, width, histories):
        found = real(self, ctx, first, width, histories)
        drafts_log.append({"lookup": bool(self.looked[0]), "drafter_p": (found.confidences[0] or [None])[0]
                           if not self.looked[0] else None, "drafted": len(found.tokens[0])})
        return found

    decoding.TrainedDrafting.drafts = logged
    steps = []
    try:
        for suite, prompt in prompts:
            drafts_log.clear()
            firsts, kept = [], []
            for event in nbdiff.stream(model, tokenizer, prompt, max_new_tokens=args.tokens, exact=True,
                                       drafter=args.drafter, draft_threshold=0.0):
                if isinstance(event, StepEvent) and event.ar:
                    firsts.append(event.confidences[0])
                elif isinstance(event, BlockEvent):
                    kept.append(event.accepted)
            for i, (first_p, k) in enumerate(zip(firsts, kept)):
                if i < len(drafts_log) and drafts_log[i]["drafted"]:
                    steps.append({"suite": suite, "model_p": first_p, "kept": k, **drafts_log[i]})
    finally:
        decoding.TrainedDrafting.drafts = real
    if args.out:
        Path(args.out).write_text(json.dumps(steps), encoding="utf-8")

    own = [s for s in steps if not s["lookup"]]
    print(f"{len(steps)} drafted steps, {len(own)} drafted by the drafter "
          f"(kept {sum(s['kept'] for s in own) / max(len(own), 1):.2f} tokens a step)\n")
    for key, title in (("drafter_p", "drafter's probability of its first token"),
                       ("model_p", "model's probability of the step's first token")):
        print(f"| {title} | steps | kept tokens a step | first token kept |\n|---|---|---|---|")
        for lo, hi in BINS:
            xs = [s for s in own if lo <= s[key] < hi]
            if xs:
                print(f"| {lo:.1f}-{min(hi, 1.0):.1f} | {len(xs)} | {sum(s['kept'] for s in xs) / len(xs):.2f} | "
                      f"{sum(s['kept'] > 0 for s in xs) / len(xs):.2f} |")
        print()
    by_suite: dict[str, list[int]] = {}
    for s in own:
        by_suite.setdefault(s["suite"], []).append(s["kept"])
    print("| suite | drafter steps | kept tokens a step |\n|---|---|---|")
    for suite, ks in by_suite.items():
        print(f"| {suite} | {len(ks)} | {sum(ks) / len(ks):.2f} |")


if __name__ == "__main__":
    main()
